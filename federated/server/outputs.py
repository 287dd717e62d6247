"""The files a run leaves behind: summary.json (the contract in DESIGN.md), config.yaml, a table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from federated.core.config import ExperimentConfig, config_to_yaml
from federated.server.evaluation import ID_ROLES, per_site_rows
from federated.server.federation import FederationResult, RoundRecord
from federated.core.io import atomic_write_text


def build_summary(cfg: ExperimentConfig, result: FederationResult, wall_s: float) -> dict[str, Any]:
    final = result.final
    return {
        "rounds_completed": len(result.history),
        "seed": cfg.seed,
        "strategy": cfg.strategy.name,
        "engine": cfg.engine.name,
        "privacy_mode": cfg.privacy.name,
        "scale": cfg.scale,
        "final": final.summary,
        "initial": {k: result.initial.summary[k] for k in ("id", "ood", "gap")},
        "per_site": per_site_rows(final.evaluations),
        "privacy": result.privacy(),  # per site {epsilon, delta, steps, ...} when DP is on
        "failures": {str(r.round): r.failures for r in [result.initial, *result.history] if r.failures},
        "rejections": [{"round": r.round, "site": site, "reason": reason}
                       for r in result.history for site, reason in r.rejections.items()],
        "skipped_rounds": [r.round for r in result.history if r.skipped],
        "history": [_history_row(r) for r in [result.initial, *result.history]],
        "timing": {"wall_s": wall_s, "federation_s": result.timing["wall_s"],
                   "train_s": result.timing["train_s"], "aggregate_s": result.timing["aggregate_s"],
                   "evaluate_s": result.timing["evaluate_s"]},
    }


def _history_row(r: RoundRecord) -> dict[str, Any]:
    return {"round": r.round, "id": r.summary["id"]["score"], "ood": r.summary["ood"]["score"],
            "gap": r.summary["gap"]}


def write_config(out_dir: Path, cfg: ExperimentConfig) -> None:
    atomic_write_text(out_dir / "config.yaml", config_to_yaml(cfg))


def _f(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def print_report(summary: dict[str, Any], out_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    final, initial = summary["final"], summary["initial"]
    sites = summary["per_site"]
    tasks = Table(title="Per-task scores (primary metric mapped to [0, 1]; ID = training sites' "
                        "test splits, OOD = held-out sites)")
    for col in ("task", "primary metric", "ID", "OOD", "ID sites", "OOD sites"):
        tasks.add_column(col, justify="left" if col in ("task", "primary metric") else "right")
    from federated.core.multimed import TASKS

    for t in TASKS.names():
        id_sites = sum(t in r["tasks"] for r in sites if r["role"] in ID_ROLES)
        ood_sites = sum(t in r["tasks"] for r in sites if r["role"] not in ID_ROLES)
        if id_sites + ood_sites == 0:
            continue
        tasks.add_row(t, TASKS.get(t).primary_metric, _f(final["id"]["per_task"].get(t)),
                      _f(final["ood"]["per_task"].get(t)), str(id_sites), str(ood_sites))
    console.print(tasks)
    table = Table(title="Per-site scores")
    for col in ("site", "role", "archetype", "tasks", "n_train", "n_test", "score"):
        table.add_column(col, justify="right" if col in ("tasks", "n_train", "n_test", "score") else "left")
    for row in sites:
        table.add_row(row["site"], {"train": "ID", "id_eval": "ID (eval)"}.get(row["role"], "OOD"), row["archetype"],
                      str(len(row["tasks"])), str(row["n_train"]), str(row["n_test"]), _f(row["score"]))
    console.print(table)
    console.print(
        f"ID score {_f(final['id']['score'])} (initial {_f(initial['id']['score'])})   "
        f"OOD score {_f(final['ood']['score'])} (initial {_f(initial['ood']['score'])})   "
        f"ID-OOD gap {_f(final['gap'])} on the {len(final['gap_tasks'])} tasks scored both ways")
    console.print(f"{summary['rounds_completed']} rounds in {summary['timing']['wall_s']:.1f} s; "
                  f"outputs in {out_dir}")


def write_final_model(out_dir: Path, arrays: Any) -> None:
    """The final global model as final_model.npz (parameter name -> array)."""
    import numpy as np

    from federated.core.io import atomic_write

    data = {k: a.numpy() for k, a in arrays.items()}
    atomic_write(Path(out_dir) / "final_model.npz", lambda tmp: np.savez(open(tmp, "wb"), **data))
