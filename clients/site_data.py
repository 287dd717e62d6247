"""A site's samples, loaded once from the memory-mapped corpus into tensors per (task, split).

A sample that lacks one of its task's modalities gets zeros and present=False,
so the fusion block masks it out; batches are always of one task, so every batch has the
same inputs.

A vector modality that lists its features (federated/core/features.py) is stored raw, missing
values as NaN: the site keeps the raw rows and trains on them only once the run's feature
statistics are applied (`use_feature_stats`: impute, then standardise), from a federated
statistics round, the pooled training rows (simulation) or its own rows (preprocess.statistics).
Until then a split holding such a modality is refused (`split`), never served raw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from federated.core.compute import to_device
from federated.core.corpus_schema import Modality
from federated.core.feature_stats import Moments, Standardiser, histogram
from federated.core.features import indicator_mask
from federated.core.protocol import Role
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


class FeatureStatsMissing(ValueError):
    """A split holding a raw-feature modality was asked for before the run's statistics came."""


@dataclass
class RawBlock:
    """A raw-feature modality's rows of one (task, split): which of the split's samples hold it,
    their rows in the corpus array (the identity used to count a sample once), their raw values."""

    has: np.ndarray  # bool, one per sample of the split
    index: np.ndarray  # corpus array row of each present sample
    values: np.ndarray  # (present samples, *shape), NaN where missing


def modality_rows(
    corpus: Corpus, plan: SitePlan, spec: Modality, task: str, split: str, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One modality of a (task, split) as this site holds it: (values of every sample, zeros where it
    lacks the modality; which samples have it; their corpus array rows, -1 where not). The site's
    masking and acquisition shift applied: what the site trains on and what its statistics describe."""
    m = spec.name
    idx = corpus.manifest[index_column(m)].to_numpy()[rows]
    has = idx >= 0
    if m in plan.masked:  # the site lacks it for these samples (or entirely)
        has &= ~np.isin(rows, plan.masked[m])
    arr = np.zeros((len(rows), *spec.shape), dtype=spec.dtype)
    if has.any():
        arr[has] = corpus.array(m)[idx[has]]
        if plan.shift.get(m):  # this site's scanner/protocol, applied on load
            arr[has] = shift_array(spec, arr[has], plan.shift[m], plan.site, plan.shift_seed, key=f"{task}/{split}")
    return arr, has, np.where(has, idx, -1)


def once_each(blocks: list[RawBlock], width: int) -> np.ndarray:
    """The (samples, features) rows of these blocks with each corpus array row once, in first-seen
    order: a sample that feeds two tasks is one patient, counted once."""
    if not blocks:
        return np.zeros((0, width), dtype=np.float64)
    index = np.concatenate([b.index for b in blocks])
    values = np.concatenate([b.values.reshape(len(b.values), -1)[:, :width] for b in blocks])
    _, first = np.unique(index, return_index=True)
    return values[np.sort(first)].astype(np.float64)


def site_feature_rows(corpus: Corpus, plan: SitePlan, modality: str, split: str) -> np.ndarray:
    """A site's raw rows of a raw-feature modality in one split (each sample once), read without
    loading the rest of its data: what SiteData.feature_rows gives for that site."""
    spec = corpus.schema.modality(modality)
    tasks = corpus.manifest["task"].to_numpy()
    blocks = []
    for t in plan.tasks:
        if modality not in corpus.schema.task(t).inputs:
            continue
        rows = plan.train_rows if split == "train" else plan.test_rows
        rows = rows[tasks[rows] == t]
        if len(rows):
            arr, has, idx = modality_rows(corpus, plan, spec, t, split, rows)
            blocks.append(RawBlock(has, idx[has], arr[has]))
    return once_each(blocks, len(spec.features))


def pooled_feature_rows(corpus: Corpus, plans: list[SitePlan], modality: str) -> np.ndarray:
    """The training sites' training rows of a modality in one block (preprocess.statistics=pooled,
    simulation only): every training site's rows as it holds them, one after another. Held-out
    sites are not in it: their rows are the OOD test set, and statistics pooled over them would
    carry the test hospitals' means and spreads into training."""
    parts = [site_feature_rows(corpus, p, modality, "train") for p in plans if p.role == Role.TRAIN]
    width = len(corpus.schema.modality(modality).features)
    return np.concatenate(parts) if parts else np.zeros((0, width))


def exact_median(rows: np.ndarray) -> np.ndarray:
    """Per feature, the median of the observed values; NaN for a feature with none."""
    out = np.full(rows.shape[1], np.nan)
    for j in range(rows.shape[1]):
        col = rows[:, j][~np.isnan(rows[:, j])]
        if col.size:
            out[j] = float(np.median(col))
    return out


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
        # Raw-feature modalities: their raw rows per (task, split), and the statistics applied to them.
        self.raw: dict[tuple[str, str], dict[str, RawBlock]] = {}
        self.feature_stats: dict[str, Standardiser] = {}
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

    @property
    def raw_modalities(self) -> list[str]:
        """The raw-feature modalities this site loaded, in schema order."""
        held = {m for blocks in self.raw.values() for m in blocks}
        return [m for m in self.schema.modalities if m in held]

    def feature_rows(self, modality: str, split: str = "train") -> np.ndarray:
        """This site's raw (samples, features) rows of a raw-feature modality in a split, each
        sample once (by its corpus array row), NaN where a value is missing."""
        blocks = [b[modality] for (_, s), b in self.raw.items() if s == split and modality in b]
        return once_each(blocks, len(self.schema.modality(modality).features))

    def feature_moments(self, modality: str) -> Moments:
        """(n, mean, M2) per feature over this site's training rows: what it sends in a federated
        statistics round (suppression and noise are the caller's)."""
        return Moments.of(self.feature_rows(modality, "train"))

    def feature_histogram(self, modality: str, lo: np.ndarray, width: np.ndarray) -> np.ndarray:
        """(features, HIST_BINS) counts of this site's training values on the federation's grid."""
        return histogram(self.feature_rows(modality, "train"), lo, width)

    def own_feature_stats(self) -> dict[str, Standardiser]:
        """preprocess.statistics=per_site: each raw modality's transform from this site's own rows,
        its training rows (a held-out site has none: its own test rows), with the exact median."""
        out = {}
        for m in self.raw_modalities:
            rows = self.feature_rows(m, "train")
            if not len(rows):
                rows = self.feature_rows(m, "test")
            impute = self.schema.modality(m).impute
            out[m] = Standardiser.of(
                Moments.of(rows),
                impute,
                exact_median(rows) if impute == "median" else None,
                indicator_mask(self.schema.modality(m)),
            )
        return out

    def use_feature_stats(self, stats: dict[str, Standardiser]) -> None:
        """Impute and standardise every split's input of each raw-feature modality with these
        statistics, from the raw rows kept (so applying others later is exact; the same again is a
        no-op). A missing value left after the transform (a modality that declares no impute) is refused."""
        missing = [m for m in self.raw_modalities if m not in stats]
        if missing:
            raise ValueError(f"site {self.plan.site}: no feature statistics for raw-feature modality(ies) {missing}")
        for m in self.raw_modalities:
            spec, std = self.schema.modality(m), stats[m]
            if len(std.mean) != len(spec.features):
                raise ValueError(
                    f"site {self.plan.site}: statistics of modality {m} have {len(std.mean)} features, "
                    f"the modality {len(spec.features)}"
                )
            if m in self.feature_stats and self.feature_stats[m].same_as(std):
                continue
            for key, blocks in self.raw.items():
                if m not in blocks:
                    continue
                block, split = blocks[m], self.splits[key]
                with np.errstate(over="ignore"):
                    values = std.apply(block.values)
                holes = np.isnan(values[:, : len(spec.features)]).any(axis=0)
                if holes.any():
                    name = spec.features[int(np.flatnonzero(holes)[0])].name
                    raise ValueError(
                        f"site {self.plan.site}: modality {m} has missing values of feature {name!r} and declares "
                        "no impute (its schema's impute: mean or median)"
                    )
                overflow = np.isinf(values[:, : len(spec.features)]).any(axis=0)
                if overflow.any():  # a std so small for this site's values that they leave a float32
                    name = spec.features[int(np.flatnonzero(overflow)[0])].name
                    raise ValueError(
                        f"site {self.plan.site}: the feature statistics of modality {m} standardise feature "
                        f"{name!r} of this site's values beyond a float32 (its std is too small for them)"
                    )
                arr = np.zeros((len(block.has), *spec.shape), dtype=spec.dtype)
                arr[block.has] = values
                split.inputs[m] = torch.from_numpy(arr)
            self.feature_stats[m] = std

    def _load(self, corpus: Corpus, task: str, split: str, rows: np.ndarray) -> TaskSplit:
        manifest = corpus.manifest
        inputs, present = {}, {}
        for m in self.schema.task(task).inputs:
            spec = self.schema.modality(m)
            arr, has, idx = modality_rows(corpus, self.plan, spec, task, split, rows)
            if spec.raw_features:  # kept raw; the input stays zeros until use_feature_stats
                self.raw.setdefault((task, split), {})[m] = RawBlock(has, idx[has], arr[has].copy())
                arr = np.zeros_like(arr)
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
        """A (task, split)'s tensors; refused while one of its raw-feature modalities has no
        statistics (trained on raw, a model would learn from unscaled values with NaN holes)."""
        waiting = [m for m in self.raw.get((task, split), {}) if m not in self.feature_stats]
        if waiting:
            raise FeatureStatsMissing(
                f"site {self.plan.site}: modality {waiting[0]} (task {task}) is stored raw and no feature "
                "statistics were applied to it (preprocess.statistics: federated and pooled come with the "
                "server's train and evaluate messages, per_site from the site's own rows)"
            )
        return self.splits.get((task, split))

    def n(self, split: str) -> int:
        return sum(len(s) for (_, sp), s in self.splits.items() if sp == split)
