"""Callbacks that record a run: metrics.parquet, TensorBoard events, a progress bar."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from federated.core.config.schema import ExperimentConfig
from federated.core.io import atomic_write
from federated.core.protocol import Role
from federated.server.callbacks import Callback
from federated.server.evaluation import SiteEvaluation, SiteProfile
from federated.server.records import FederationResult, RoundRecord
from federated.server.run_folder import record_outputs


class MetricsTable(Callback):
    """One row per round x site x task x metric, plus per-site training loss rows."""

    COLUMNS: ClassVar[list[str]] = ["round", "site", "role", "task", "metric", "value"]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def on_resume(self, records: list[RoundRecord]) -> None:
        """Rows of the rounds before the checkpoint, rebuilt from their records."""
        for record in records:
            self.on_round_end(record)

    def on_round_end(self, record: RoundRecord) -> None:
        for ev in record.evaluations:
            self.rows += _evaluation_rows(record.round, ev)
        self.rows += _site_event_rows(record)

    def on_end(self, result: FederationResult) -> None:
        frame = pd.DataFrame(self.rows, columns=self.COLUMNS)
        record_outputs(self.path.parent, self.path.name)  # a run folder's metrics.parquet, listed first
        atomic_write(self.path, lambda tmp: frame.to_parquet(tmp, index=False))


def _evaluation_rows(rnd: int, ev: SiteEvaluation) -> list[dict[str, Any]]:
    """A site's metrics of the global model, then of its personalised model (metric "personal_*")."""
    rows = []
    for prefix, per_task in (("", ev.per_task), ("personal_", ev.personal or {})):
        for task, metrics in per_task.items():
            rows += [
                {
                    "round": rnd,
                    "site": ev.profile.site,
                    "role": ev.profile.role,
                    "task": task,
                    "metric": f"{prefix}{name}",
                    "value": value,
                }
                for name, value in metrics.items()
            ]
    return rows


def _site_event_rows(record: RoundRecord) -> list[dict[str, Any]]:
    """Per-site events of a round (task "*"): rejected updates, failures, training loss, epsilon,
    update norms."""
    roles = {ev.profile.site: ev.profile.role for ev in record.evaluations}
    events = [(site, "update_rejected", 1.0) for site in record.rejections]
    for key in record.failures:
        stage, _, site = key.partition(":")
        events.append((site, f"{stage}_failed", 1.0))
    events += [(site, "train_loss", stats.loss) for site, stats in record.train.items()]
    events += [(site, "epsilon", float(report["epsilon"])) for site, report in record.privacy.items()]
    # each screened update's L2 norm, and its ratio to the round's median (per sqrt(example): strategies/validation.py)
    for site, (norm, ratio) in record.update_norms.items():
        events += [(site, "update_norm", norm), *([(site, "update_norm_ratio", ratio)] if ratio is not None else [])]
    return [
        {
            "round": record.round,
            "site": site,
            "role": roles.get(site, Role.TRAIN),
            "task": "*",
            "metric": metric,
            "value": value,
        }
        for site, metric, value in events
    ]


class TensorBoardLogger(Callback):
    """ID/OOD scores, per-task scores and per-site scores per round, in a run folder's tensorboard/
    (listed in its manifest before it is made; a symbolic link there is refused, never followed)."""

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy import, only when used

        logdir = Path(logdir)
        record_outputs(logdir.parent, logdir.name)
        self.writer = SummaryWriter(log_dir=str(logdir))

    def on_round_end(self, record: RoundRecord) -> None:
        s, step, w = record.summary, record.round, self.writer
        for group, scores in (("id", s.id), ("ood", s.ood)):
            _scalar(w, f"{group}/score", scores.score, step)
            for task, value in scores.per_task.items():
                _scalar(w, f"{group}_task/{task}", value, step)
        _scalar(w, "gap", s.gap, step)
        for ev in record.evaluations:
            _scalar(w, f"site/{ev.profile.site}", ev.score, step)
        for site, stats in record.train.items():
            _scalar(w, f"train_loss/{site}", stats.loss, step)
        for site, report in record.privacy.items():
            _scalar(w, f"epsilon/{site}", float(report["epsilon"]), step)

    def on_end(self, result: FederationResult) -> None:
        self.writer.flush()
        self.writer.close()


def _scalar(writer: Any, tag: str, value: float, step: int) -> None:
    if value is not None and not math.isnan(value):
        writer.add_scalar(tag, value, step)


class ProgressBar(Callback):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task_id: Any = None

    def on_start(self, cfg: ExperimentConfig, profiles: list[SiteProfile]) -> None:
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task_id = self.progress.add_task("", total=cfg.rounds)

    def on_round_end(self, record: RoundRecord) -> None:
        if self.progress is None or record.round == 0:
            return
        s = record.summary
        self.progress.update(self.task_id, advance=1, description=f"ID {_fmt(s.id.score)}  OOD {_fmt(s.ood.score)}")

    def on_end(self, result: FederationResult) -> None:
        if self.progress is not None:
            self.progress.stop()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"
