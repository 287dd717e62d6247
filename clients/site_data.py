"""A site's samples, loaded once from the memory-mapped corpus into tensors per (task, split).

A sample that lacks one of its task's modalities gets zeros and present=False,
so the fusion block masks it out; batches are always of one task, so every batch has the
same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from federated.core.compute import to_device
from federated.core.targets import REGRESSION
from federated.data.format import Corpus, index_column
from partitions.acquisition_shift import shift_array
from partitions.site_plan import SitePlan


@dataclass
class TaskSplit:
    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    targets: torch.Tensor  # standardised for regression tasks

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def take(self, idx: torch.Tensor) -> TaskSplit:
        return TaskSplit(
            {m: x[idx] for m, x in self.inputs.items()}, {m: p[idx] for m, p in self.present.items()}, self.targets[idx]
        )

    def to(self, device: torch.device) -> TaskSplit:
        """This batch on the device (itself on the host's CPU): splits stay on the host, batches move."""
        if device.type == "cpu":
            return self
        return TaskSplit(
            {m: to_device(x, device) for m, x in self.inputs.items()},
            {m: to_device(p, device) for m, p in self.present.items()},
            to_device(self.targets, device),
        )


@dataclass
class TargetScale:
    """Regression targets are trained standardised; outputs are mapped back for metrics."""

    mean: float = 0.0
    std: float = 1.0
    mad: float | None = None


class SiteData:
    """own_scales=True (simulation): regression targets are standardised with the corpus's
    statistics. False (site-local mode): the corpus is one site's, so its statistics are not the
    federation's; the targets stay unscaled until `use_scales` gives the federated ones."""

    def __init__(self, corpus: Corpus, plan: SitePlan, own_scales: bool = True) -> None:
        self.plan = plan
        self.schema = corpus.schema
        self.scales: dict[str, TargetScale] = {}
        self.splits: dict[tuple[str, str], TaskSplit] = {}
        self.raw_targets: dict[tuple[str, str], np.ndarray] = {}  # regression targets as stored
        manifest = corpus.manifest
        tasks = manifest["task"].to_numpy()
        for t in plan.tasks:
            self.scales[t] = TargetScale()
            for split, rows in (("train", plan.train_rows), ("test", plan.test_rows)):
                rows = rows[tasks[rows] == t]
                if len(rows):
                    self.splits[(t, split)] = self._load(corpus, t, split, rows)
        if own_scales:
            self.use_scales(
                {
                    t: TargetScale(s["mean"], max(s["std"], 1e-8), s["mad"])
                    for t in self.regression_tasks
                    for s in [corpus.target_stats(t)]
                }
            )

    @property
    def regression_tasks(self) -> list[str]:
        return [t for t in self.plan.tasks if self.schema.task(t).target == REGRESSION]

    def use_scales(self, scales: dict[str, TargetScale]) -> None:
        """Standardise the regression targets with these scales (mean, std; mad for the score)."""
        missing = [t for t in self.regression_tasks if t not in scales]
        if missing:
            raise ValueError(f"site {self.plan.site}: no target scale for regression task(s) {missing}")
        for t in self.regression_tasks:
            if self.scales[t] == scales[t]:
                continue
            scale = self.scales[t] = scales[t]
            for split in ("train", "test"):
                if (t, split) in self.splits:
                    scaled = (self.raw_targets[(t, split)] - scale.mean) / scale.std
                    self.splits[(t, split)].targets = torch.from_numpy(scaled.astype(np.float32))

    def target_moments(self, task: str) -> tuple[int, float, float]:
        """(n, mean, sum of squared deviations from that mean) of a regression task's training
        targets: what a federated statistics round combines (Chan et al.'s pairwise update)."""
        part = self.raw_targets.get((task, "train"))
        if part is None or not len(part):
            return 0, 0.0, 0.0
        values = part.astype(np.float64)
        mean = float(values.mean())
        return len(values), mean, float(((values - mean) ** 2).sum())

    def abs_deviation(self, task: str, centre: float) -> float:
        """Sum over the training targets of |y - centre|: the MAD's numerator, centred on the federation's mean."""
        part = self.raw_targets.get((task, "train"))
        return 0.0 if part is None else float(np.abs(part.astype(np.float64) - centre).sum())

    def _load(self, corpus: Corpus, task: str, split: str, rows: np.ndarray) -> TaskSplit:
        manifest = corpus.manifest
        inputs, present = {}, {}
        for m in self.schema.task(task).inputs:
            spec = self.schema.modality(m)
            idx = manifest[index_column(m)].to_numpy()[rows]
            has = idx >= 0
            if m in self.plan.masked:  # the site lacks it for these samples (or entirely)
                has &= ~np.isin(rows, self.plan.masked[m])
            arr = np.zeros((len(rows), *spec.shape), dtype=spec.dtype)
            if has.any():
                arr[has] = corpus.array(m)[idx[has]]
                if self.plan.shift.get(m):  # this site's scanner/protocol, applied on load
                    arr[has] = shift_array(
                        spec, arr[has], self.plan.shift[m], self.plan.site, self.plan.shift_seed, key=f"{task}/{split}"
                    )
            inputs[m] = torch.from_numpy(arr)
            present[m] = torch.from_numpy(has)
        target = np.array(corpus.targets(task)[manifest["target_row"].to_numpy()[rows]])
        if task in self.plan.relabelled:  # this site's noisy labels (training rows only)
            noisy_rows, noisy_labels = self.plan.relabelled[task]
            hit = np.isin(rows, noisy_rows)
            if hit.any():
                lookup = dict(zip(noisy_rows.tolist(), noisy_labels.tolist(), strict=True))
                target[hit] = [lookup[r] for r in rows[hit].tolist()]
        if self.schema.task(task).target == REGRESSION:
            self.raw_targets[(task, split)] = target
            targets = torch.from_numpy(target.astype(np.float32))  # scaled by use_scales
        else:
            targets = torch.from_numpy(target.astype(np.int64))
        return TaskSplit(inputs, present, targets)

    def split(self, task: str, split: str) -> TaskSplit | None:
        return self.splits.get((task, split))

    def n(self, split: str) -> int:
        return sum(len(s) for (_, sp), s in self.splits.items() if sp == split)
