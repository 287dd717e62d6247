"""Callbacks that record a run: metrics.parquet, TensorBoard events, a progress bar."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from federated.core.config.schema import ExperimentConfig
from federated.server.evaluation import SiteProfile
from federated.server.federation import Callback, FederationResult, RoundRecord
from federated.core.io import atomic_write


class MetricsTable(Callback):
    """One row per round x site x task x metric, plus per-site training loss rows."""

    COLUMNS = ["round", "site", "role", "task", "metric", "value"]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def on_resume(self, records: list[RoundRecord]) -> None:
        """Rows of the rounds before the checkpoint, rebuilt from their records."""
        for record in records:
            self.on_round_end(record)

    def on_round_end(self, record: RoundRecord) -> None:
        for ev in record.evaluations:
            for task, metrics in ev.per_task.items():
                for name, value in metrics.items():
                    self.rows.append({"round": record.round, "site": ev.profile.site,
                                      "role": ev.profile.role, "task": task, "metric": name,
                                      "value": value})
            for task, metrics in (ev.personal or {}).items():
                for name, value in metrics.items():
                    self.rows.append({"round": record.round, "site": ev.profile.site,
                                      "role": ev.profile.role, "task": task,
                                      "metric": f"personal_{name}", "value": value})
        roles = {ev.profile.site: ev.profile.role for ev in record.evaluations}
        for site in record.rejections:
            self.rows.append({"round": record.round, "site": site, "role": roles.get(site, "train"),
                              "task": "*", "metric": "update_rejected", "value": 1.0})
        for key in record.failures:
            stage, _, site = key.partition(":")
            self.rows.append({"round": record.round, "site": site, "role": roles.get(site, "train"),
                              "task": "*", "metric": f"{stage}_failed", "value": 1.0})
        for site, stats in record.train.items():
            self.rows.append({"round": record.round, "site": site, "role": roles.get(site, "train"),
                              "task": "*", "metric": "train_loss", "value": stats["loss"]})
        for site, report in record.privacy.items():
            self.rows.append({"round": record.round, "site": site, "role": roles.get(site, "train"),
                              "task": "*", "metric": "epsilon", "value": float(report["epsilon"])})

    def on_end(self, result: FederationResult) -> None:
        frame = pd.DataFrame(self.rows, columns=self.COLUMNS)
        atomic_write(self.path, lambda tmp: frame.to_parquet(tmp, index=False))


class TensorBoardLogger(Callback):
    """ID/OOD scores, per-task scores and per-site scores per round."""

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy import, only when used

        self.writer = SummaryWriter(log_dir=str(logdir))

    def on_round_end(self, record: RoundRecord) -> None:
        s, step, w = record.summary, record.round, self.writer
        for group in ("id", "ood"):
            _scalar(w, f"{group}/score", s[group]["score"], step)
            for task, value in s[group]["per_task"].items():
                _scalar(w, f"{group}_task/{task}", value, step)
        _scalar(w, "gap", s["gap"], step)
        for ev in record.evaluations:
            _scalar(w, f"site/{ev.profile.site}", ev.score, step)
        for site, stats in record.train.items():
            _scalar(w, f"train_loss/{site}", stats["loss"], step)
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
            TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=self.console, transient=False)
        self.progress.start()
        self.task_id = self.progress.add_task("", total=cfg.rounds)

    def on_round_end(self, record: RoundRecord) -> None:
        if self.progress is None or record.round == 0:
            return
        s = record.summary
        self.progress.update(self.task_id, advance=1,
                             description=f"ID {_fmt(s['id']['score'])}  OOD {_fmt(s['ood']['score'])}")

    def on_end(self, result: FederationResult) -> None:
        if self.progress is not None:
            self.progress.stop()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"
