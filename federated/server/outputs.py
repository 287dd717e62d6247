"""The files a run leaves behind: summary.json (a contract: docs/getting-started.md, "What it writes"),
config.yaml, a table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord
from rich.console import Console
from rich.table import Table

from federated.core.arrays import record_to_numpy
from federated.core.config import ExperimentConfig, config_to_yaml
from federated.core.io import atomic_write, atomic_write_text, write_json
from federated.server.evaluation import per_site_rows
from federated.server.records import FederationResult
from federated.server.results import HistoryRow, Rejection, RunSummary, RunTiming
from federated.server.run_folder import SUMMARY_FILE, record_outputs


def _site_of(failure_key: str) -> str:
    """'evaluate:site_03' -> 'site_03' (failure keys are stage:site)."""
    return failure_key.partition(":")[2]


def failing_sites(result: FederationResult) -> list[str]:
    """Sites that failed (to train or to evaluate) in every round of the run (round 0, its first
    evaluation, only when no round was trained), each with its last reason: their data never counted,
    so the scores are of a smaller federation than the one asked for."""
    records = result.history or [result.initial]
    problems = []
    for profile in result.profiles:
        reasons = [[v for k, v in r.failures.items() if _site_of(k) == profile.site] for r in records]
        if all(reasons):
            problems.append(f"site {profile.site} failed in every round ({len(records)}); last: {reasons[-1][-1]}")
    return problems


def lost_tasks(result: FederationResult) -> list[str]:
    """Tasks scored (ID or OOD) in round 0 but not at the end: the headline's mean over tasks
    would otherwise improve silently by losing its hardest tasks."""
    first, last = result.initial, result.final
    problems = []
    for label, before, after in (
        ("ID", first.summary.id.per_task, last.summary.id.per_task),
        ("OOD", first.summary.ood.per_task, last.summary.ood.per_task),
    ):
        problems += [
            f"task {t} was scored {label} in round {first.round} but not in round {last.round}"
            for t in sorted(set(before) - set(after))
        ]
    return problems


def run_problems(result: FederationResult) -> list[str]:
    """Why a run's scores are incomplete; empty for a clean run."""
    return failing_sites(result) + lost_tasks(result)


def build_summary(cfg: ExperimentConfig, result: FederationResult, wall_s: float) -> RunSummary:
    """A run's summary.json as a typed object (write it with `summary.to_dict()`)."""
    final, records = result.final, [result.initial, *result.history]
    return RunSummary(
        rounds_completed=len(result.history),
        seed=cfg.seed,
        strategy=cfg.strategy.name,
        engine=cfg.engine.name,
        privacy_mode=cfg.privacy.name,
        scale=cfg.scale,
        final=final.summary,
        initial=result.initial.summary.headline(),
        per_site=per_site_rows(final.evaluations),
        privacy=result.privacy(),  # per site {epsilon, delta, steps, ...} when DP is on
        privacy_by_round=result.privacy_by_round(),  # every round, those before a resume too
        failures={r.round: r.failures for r in records if r.failures},
        rejections=[Rejection(r.round, site, reason) for r in result.history for site, reason in r.rejections.items()],
        skipped_rounds=[r.round for r in result.history if r.skipped],
        history=[HistoryRow(r.round, r.summary.id.score, r.summary.ood.score, r.summary.gap) for r in records],
        timing=RunTiming(
            wall_s=wall_s,
            federation_s=result.timing.wall_s,
            train_s=result.timing.train_s,
            aggregate_s=result.timing.aggregate_s,
            evaluate_s=result.timing.evaluate_s,
        ),
        problems=run_problems(result),
        init_weights=result.init_weights,
        tasks={t.pop("name"): t for t in result.schema.to_dict()["tasks"]} if result.schema else {},
        excluded_sites=dict(result.excluded_sites),
        target_scales={t: dict(zip(("mean", "std", "mad"), s, strict=True)) for t, s in result.target_scales.items()},
        preprocess=result.feature_statistics.preprocess() if result.feature_statistics else {},
        feature_statistics=result.feature_statistics.per_modality() if result.feature_statistics else {},
    )


def write_config(out_dir: Path, cfg: ExperimentConfig) -> None:
    record_outputs(out_dir, "config.yaml")  # listed before it is written: --overwrite may delete it
    atomic_write_text(out_dir / "config.yaml", config_to_yaml(cfg))


def write_summary(out_dir: Path, summary: RunSummary) -> None:
    """summary.json, written last: a folder with one holds a finished run."""
    record_outputs(out_dir, SUMMARY_FILE)
    write_json(Path(out_dir) / SUMMARY_FILE, summary.to_dict())


def _f(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _task_table(summary: RunSummary) -> Table:
    """Per task: its ID and OOD scores and how many sites of each kind hold it."""
    final, sites = summary.final, summary.per_site
    tasks = Table(
        title="Per-task scores (primary metric mapped to [0, 1]; ID = training sites' "
        "test splits, OOD = held-out sites)"
    )
    for col in ("task", "primary metric", "ID", "OOD", "ID sites", "OOD sites"):
        tasks.add_column(col, justify="left" if col in ("task", "primary metric") else "right")
    for t, spec in summary.tasks.items():
        id_sites = sum(t in r.tasks for r in sites if r.role.scored_id)
        ood_sites = sum(t in r.tasks for r in sites if not r.role.scored_id)
        if id_sites + ood_sites == 0:
            continue
        tasks.add_row(
            t,
            spec["metrics"][0],
            _f(final.id.per_task.get(t)),
            _f(final.ood.per_task.get(t)),
            str(id_sites),
            str(ood_sites),
        )
    return tasks


def _site_table(summary: RunSummary) -> Table:
    table = Table(title="Per-site scores")
    for col in ("site", "role", "archetype", "tasks", "n_train", "n_test", "score"):
        table.add_column(col, justify="right" if col in ("tasks", "n_train", "n_test", "score") else "left")
    for row in summary.per_site:
        table.add_row(
            row.site,
            row.role.label,
            row.archetype,
            str(len(row.tasks)),
            str(row.n_train),
            str(row.n_test),
            _f(row.score),
        )
    return table


def print_report(summary: RunSummary, out_dir: Path, console: Console | None = None) -> None:
    """The end-of-run tables and headline scores on the terminal."""
    console = console or Console()
    final, initial = summary.final, summary.initial
    console.print(_task_table(summary))
    console.print(_site_table(summary))
    console.print(
        f"ID score {_f(final.id.score)} (initial {_f(initial.id.score)})   "
        f"OOD score {_f(final.ood.score)} (initial {_f(initial.ood.score)})   "
        f"ID-OOD gap {_f(final.gap)} on the {len(final.gap_tasks)} tasks scored both ways"
    )
    if final.ood_adapted is not None:
        console.print(f"OOD score after test-time adaptation {_f(final.ood_adapted.score)} (ood.adapt)")
    if summary.preprocess:
        console.print(released_line(summary.preprocess), markup=False)
    console.print(f"{summary.rounds_completed} rounds in {summary.timing.wall_s:.1f} s; outputs in {out_dir}")
    print_problems(summary, console)


def released_line(preprocess: dict) -> str:
    """What the feature statistics round released (summary.json's `preprocess`), in one line: a
    reader of the report should not need the config to know whether sites sent exact aggregates."""
    source, k, eps = preprocess.get("statistics"), preprocess.get("min_count"), preprocess.get("epsilon", 0.0)
    if source == "per_site":
        return "Feature statistics (preprocess.statistics=per_site): each site's own rows; nothing released"
    if source == "pooled":
        return "Feature statistics (preprocess.statistics=pooled, simulation): the training sites' rows in one place"
    if eps:
        released = f"Laplace noise, epsilon {eps:g} per training site (DP per record, not per patient)"
    else:
        released = "exact aggregates"
    return f"Feature statistics (preprocess.statistics={source}): {released}, min_count {k}"


def print_problems(summary: RunSummary, console: Console) -> None:
    """Say, last and loudly, what makes the scores above incomplete."""
    if summary.problems:
        console.print(f"[bold red]The scores above are incomplete ({len(summary.problems)} problem(s)):[/bold red]")
        for line in summary.problems:
            console.print(f"  - {line}", markup=False)


def exit_code(summary: RunSummary, allow_site_failures: bool) -> int:
    """1 when the run has problems and engine.allow_site_failures is off, else 0."""
    return 1 if summary.problems and not allow_site_failures else 0


def write_final_model(out_dir: Path, arrays: ArrayRecord) -> None:
    """The final global model as final_model.npz (parameter name -> array)."""
    data = record_to_numpy(arrays)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **data)  # numeric arrays only: nothing to pickle

    record_outputs(out_dir, "final_model.npz")
    atomic_write(Path(out_dir) / "final_model.npz", save)
