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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from federated.app.studies.spec import Run
from federated.core.protocol import Role
from federated.server.results import RunSummary

RUNS_DIR = "runs"


@dataclass
class RunOutcome:
    """One run of a grid: its summary (None if it failed), the error, and whether it ran now."""

    run_id: str
    summary: RunSummary | None
    error: str = ""
    ran: bool = True  # False: its summary.json was read back from an earlier, finished run


def run_one(job: tuple[str, list[str], str]) -> RunOutcome:
    """Run (run id, overrides, study folder), or read back its summary if it finished before."""
    run_id, overrides, out = job
    path = Path(out) / RUNS_DIR / run_id
    if (path / "summary.json").exists():
        return RunOutcome(run_id, RunSummary.from_dict(json.loads((path / "summary.json").read_text())), ran=False)
    try:
        import logging

        import flwr.common.logger  # noqa: F401  (configures Flower's logger, which we quiet)

        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("strategies").setLevel(logging.ERROR)
        from federated.app.runner import run_experiment
        from federated.core.config import load_config

        return RunOutcome(run_id, run_experiment(load_config(overrides), path, overwrite=True, progress=False))
    except Exception as e:  # a failed run is a result too: report it, keep the study going
        return RunOutcome(run_id, None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")


def run_jobs(
    jobs: list[tuple[str, list[str]]],
    out: Path,
    processes: int = 2,
    on_done: Callable[[str, bool, str], None] | None = None,
) -> dict[str, RunOutcome]:
    """Every (run id, overrides) job, `processes` at a time; on_done(run id, ok, error) after each."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, RunOutcome] = {}
    todo = [(rid, ov, str(out)) for rid, ov in jobs]

    def finished(outcome: RunOutcome) -> None:
        results[outcome.run_id] = outcome
        if on_done:
            on_done(outcome.run_id, outcome.summary is not None, outcome.error)

    if processes <= 1:
        for job in todo:
            finished(run_one(job))
        return results
    with mp.get_context("spawn").Pool(processes) as pool:
        for outcome in pool.imap_unordered(run_one, todo):
            finished(outcome)
    return results


@dataclass
class RunScores:
    """A finished run's columns of results.csv."""

    id: float
    ood: float
    gap: float
    worst_site: str | None
    worst_site_score: float | None
    id_personal: float | None
    ood_adapted: float | None  # the held-out sites' test-time-adapted models (ood.adapt)
    max_epsilon: float | None
    rounds: int
    wall_s: float
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)  # "id"/"ood" -> task -> score
    ood_sites: dict[str, float] = field(default_factory=dict)  # held-out site -> its score
    ood_adapted_sites: dict[str, float] = field(default_factory=dict)  # held-out site -> its adapted score

    @classmethod
    def of(cls, summary: RunSummary) -> RunScores:
        final, worst = summary.final, summary.final.worst_site
        return cls(
            id=final.id.score,
            ood=final.ood.score,
            gap=final.gap,
            worst_site=worst.site if worst else None,
            worst_site_score=worst.score if worst else None,
            id_personal=final.id_personal.score if final.id_personal else None,
            ood_adapted=final.ood_adapted.score if final.ood_adapted else None,
            max_epsilon=summary.max_epsilon(),
            rounds=summary.rounds_completed,
            wall_s=summary.timing.wall_s,
            per_task={"id": dict(final.id.per_task), "ood": dict(final.ood.per_task)},
            ood_sites={s.site: s.score for s in summary.per_site if s.role == Role.HELD_OUT},
            ood_adapted_sites={
                s.site: s.adapted_score
                for s in summary.per_site
                if s.role == Role.HELD_OUT and s.adapted_score is not None
            },
        )

    def columns(self) -> dict[str, Any]:
        """id, ood, ..., wall_s, then "id/<task>", "ood/<task>", "ood_site/<site>" and (with
        ood.adapt) "ood_adapted_site/<site>" columns."""
        cols: dict[str, Any] = {
            "id": self.id,
            "ood": self.ood,
            "gap": self.gap,
            "worst_site": self.worst_site,
            "worst_site_score": self.worst_site_score,
            "id_personal": self.id_personal,
            "ood_adapted": self.ood_adapted,
            "max_epsilon": self.max_epsilon,
            "rounds": self.rounds,
            "wall_s": self.wall_s,
        }
        for group, scores in self.per_task.items():
            cols.update({f"{group}/{task}": value for task, value in scores.items()})
        cols.update({f"ood_site/{site}": score for site, score in self.ood_sites.items()})
        cols.update({f"ood_adapted_site/{site}": score for site, score in self.ood_adapted_sites.items()})
        return cols


@dataclass
class StudyRow:
    """One row of results.csv: a run's labels per axis, its seed, its error, and its scores."""

    run_id: str
    labels: dict[str, str]
    seed: int
    error: str  # the first line of the error; empty when the run finished
    scores: RunScores | None  # None when the run failed

    @classmethod
    def of(cls, run: Run, outcome: RunOutcome) -> StudyRow:
        summary = outcome.summary
        return cls(
            run.run_id,
            dict(run.labels),
            run.seed,
            outcome.error.splitlines()[0] if outcome.error else "",
            RunScores.of(summary) if summary is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"run_id": self.run_id, **self.labels, "seed": self.seed, "error": self.error}
        return {**row, **self.scores.columns()} if self.scores is not None else row


def study_rows(runs: list[Run], outcomes: dict[str, RunOutcome]) -> list[StudyRow]:
    return [StudyRow.of(run, outcomes[run.run_id]) for run in runs]


def results_frame(rows: list[StudyRow]) -> pd.DataFrame:
    """results.csv: one row per run, columns in the order rows first name them."""
    return pd.DataFrame([row.to_dict() for row in rows])


def log_hparams(out: Path, run: Run, row: StudyRow) -> None:
    """The run's settings and final metrics in TensorBoard's HParams view (finished runs only)."""
    if row.scores is None:
        return
    from torch.utils.tensorboard import SummaryWriter

    scores = row.scores
    metrics = {
        f"final/{k}": float(v) for k, v in (("id", scores.id), ("ood", scores.ood), ("gap", scores.gap)) if v == v
    }  # NaN: no score to show
    with SummaryWriter(log_dir=str(out / "tensorboard" / run.run_id)) as w:
        w.add_hparams({**run.labels, "seed": run.seed}, metrics, run_name=".")
