"""A site plan (SitePlan), the planner and step registries, and the checks every plan must pass.

A plan is a list of SitePlan: per site its role (train or held_out), the tasks and
modalities it holds, and the manifest row indices of its train and test samples. Plans hold
index arrays into the corpus manifest, never copies of data, so they are cheap to build in
every process (each ClientApp rebuilds the same plan from the same config and seed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import Role
from federated.core.registry import Registry
from federated.data.format import Corpus, index_column
from partitions.index import manifest_index


class PlanError(ValueError):
    """A site plan that cannot work; the message says why."""


@dataclass(frozen=True)
class SitePlan:
    site: str
    role: Role
    archetype: str
    origin_site: str
    tasks: tuple[str, ...]
    modalities: tuple[str, ...]
    train_rows: np.ndarray  # manifest row positions; empty for held-out sites
    test_rows: np.ndarray  # ID test split of a training site; everything of a held-out site
    # Manifest rows whose modality is masked at this site (partitions/missing_modalities.py):
    # the sample keeps its other modalities; the masked one is zeros with present=False.
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    # Training rows with a noisy label, per task: (rows, labels) (partitions/label_noise.py).
    relabelled: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # Acquisition-shift severity per modality (partitions/acquisition_shift.py), applied when
    # the site loads its data; absent or 0 = the data as stored.
    shift: dict[str, float] = field(default_factory=dict)
    shift_seed: int = 0  # with the site id, fixes the shift's parameters

    @property
    def n_train(self) -> int:
        return len(self.train_rows)

    @property
    def n_test(self) -> int:
        return len(self.test_rows)


Planner = Callable[[Corpus, ExperimentConfig], list[SitePlan]]
PLANNERS: Registry[Planner] = Registry("site planner")


@dataclass(frozen=True)
class Step:
    """A planner step: `apply` transforms a plan; `active` says whether the config asks for it."""

    apply: Callable[[list[SitePlan], Corpus, ExperimentConfig], list[SitePlan]]
    active: Callable[[ExperimentConfig], bool]


STEPS: Registry[Step] = Registry("planner step")


def held_modalities(plan: SitePlan, corpus: Corpus) -> SitePlan:
    """Keep only the modalities the site's samples actually have. Planners list a task's
    inputs, but real data may lack one everywhere (WDBC rows are tabular, without pathology):
    a site must not report, train or average an encoder it holds no data for."""
    rows = np.concatenate([plan.train_rows, plan.test_rows])
    manifest = corpus.manifest
    held = tuple(
        m
        for m in plan.modalities  # a manifest without the column (planning tests) says nothing
        if index_column(m) not in manifest or (manifest[index_column(m)].to_numpy()[rows] >= 0).any()
    )
    if held == plan.modalities:
        return plan
    return dataclasses.replace(plan, modalities=held, shift={m: v for m, v in plan.shift.items() if m in held})


def check_plan(plans: list[SitePlan], min_samples: int = 1, zero_shot: bool = False) -> None:
    """Refuse plans that cannot be trained or scored."""
    trained = {t for p in plans if p.role == Role.TRAIN for t in p.tasks}
    if not trained:
        raise PlanError("no training site holds any task")
    for p in plans:
        if p.role == Role.HELD_OUT:
            orphan = sorted(set(p.tasks) - trained)
            if orphan and not zero_shot:
                raise PlanError(
                    f"held-out site {p.site} ({p.archetype}) holds tasks no training site holds: "
                    f"{orphan}; its OOD score would measure nothing the federation learned "
                    f"(set sites.zero_shot=true to score such tasks anyway)"
                )
            if p.n_test == 0:
                raise PlanError(f"held-out site {p.site} has no samples to evaluate")
        elif p.n_train < min_samples:
            raise PlanError(
                f"training site {p.site} ({p.archetype}, origin {p.origin_site}) has {p.n_train} "
                f"training samples, fewer than sites.min_samples={min_samples}"
            )


def rows_of(corpus: Corpus, origin_site: str, tasks: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Manifest row positions of an origin site's samples of the given tasks, by split."""
    index = manifest_index(corpus)
    out = {}
    for split in ("train", "test"):
        parts = [index.rows(origin_site, t, split) for t in tasks]
        out[split] = np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    return out


def as_held_out(plan: SitePlan) -> SitePlan:
    """A held-out site is evaluated on everything it has and trains on nothing."""
    rows = np.sort(np.concatenate([plan.train_rows, plan.test_rows]))
    return dataclasses.replace(plan, role=Role.HELD_OUT, train_rows=np.empty(0, dtype=np.int64), test_rows=rows)
