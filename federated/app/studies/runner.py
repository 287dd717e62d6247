"""Run a study's grid: parallel worker processes, resume, progress, one results row per run.

Each run writes DIR/runs/<run id>/ as `multimed-fl run` would. A run whose summary.json exists
is read back instead of run again, so an interrupted study continues where it stopped (a run
killed midway has no summary.json and runs again from its start). Workers are spawned, not
forked: torch and Flower do not survive a fork.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from federated.app.studies.spec import Run, Study

RUNS_DIR = "runs"


def run_one(job: tuple[str, list[str], str]) -> tuple[str, dict[str, Any] | None, str, bool]:
    """(run id, summary or None, error text, whether it ran now)."""
    run_id, overrides, out = job
    path = Path(out) / RUNS_DIR / run_id
    if (path / "summary.json").exists():
        return run_id, json.loads((path / "summary.json").read_text()), "", False
    try:
        import logging

        import flwr.common.logger  # noqa: F401  (configures Flower's logger, which we quiet)

        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("strategies").setLevel(logging.ERROR)
        from federated.core.config import load_config
        from federated.app.runner import run_experiment

        return run_id, run_experiment(load_config(overrides), path, overwrite=True, progress=False), "", True
    except Exception as e:  # a failed run is a result too: report it, keep the study going
        return run_id, None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}", True


def run_jobs(jobs: list[tuple[str, list[str]]], out: Path, processes: int = 2,
             on_done: Callable[[str, bool, str], None] | None = None) -> dict[str, tuple[dict | None, str, bool]]:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, tuple[dict | None, str, bool]] = {}
    todo = [(rid, ov, str(out)) for rid, ov in jobs]
    if processes <= 1:
        for job in todo:
            rid, summary, error, ran = run_one(job)
            results[rid] = (summary, error, ran)
            if on_done:
                on_done(rid, summary is not None, error)
        return results
    with mp.get_context("spawn").Pool(processes) as pool:
        for rid, summary, error, ran in pool.imap_unordered(run_one, todo):
            results[rid] = (summary, error, ran)
            if on_done:
                on_done(rid, summary is not None, error)
    return results


def result_row(run: Run, summary: dict | None, error: str) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run.run_id, **run.labels, "seed": run.seed,
                           "error": error.splitlines()[0] if error else ""}
    if summary:
        final = summary["final"]
        worst = final.get("worst_site") or {}
        row.update(id=final["id"]["score"], ood=final["ood"]["score"], gap=final["gap"],
                   worst_site=worst.get("site"), worst_site_score=worst.get("score"),
                   id_personal=(final.get("id_personal") or {}).get("score"),
                   max_epsilon=max((p.get("epsilon") or 0.0 for p in summary.get("privacy", {}).values()),
                                   default=None),
                   rounds=summary["rounds_completed"], wall_s=summary["timing"]["wall_s"])
        for group in ("id", "ood"):
            for task, value in final[group]["per_task"].items():
                row[f"{group}/{task}"] = value
        for site in summary["per_site"]:
            if site["role"] == "held_out":
                row[f"ood_site/{site['site']}"] = site["score"]
    return row


def log_hparams(out: Path, run: Run, row: dict[str, Any]) -> None:
    """The run's settings and final metrics in TensorBoard's HParams view."""
    if row.get("id") is None:
        return
    from torch.utils.tensorboard import SummaryWriter

    metrics = {f"final/{k}": float(row[k]) for k in ("id", "ood", "gap")
               if row.get(k) is not None and row[k] == row[k]}
    with SummaryWriter(log_dir=str(out / "tensorboard" / run.run_id)) as w:
        w.add_hparams({**run.labels, "seed": run.seed}, metrics, run_name=".")


def results_frame(study: Study, runs: list[Run], results: dict[str, tuple[dict | None, str, bool]]) -> pd.DataFrame:
    return pd.DataFrame([result_row(r, *results[r.run_id][:2]) for r in runs])
