"""The site plan and the planner registry.

A plan is a list of SitePlan: per site its role (train or held_out), the tasks and
modalities it holds, and the manifest row indices of its train and test samples. Plans hold
index arrays into the corpus manifest, never copies of data, so they are cheap to build in
every process (each ClientApp rebuilds the same plan from the same config and seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from federated.config.schema import ExperimentConfig
from federated.corpus.format import Corpus
from federated.registry import Registry

TRAIN, HELD_OUT = "train", "held_out"


class PlanError(ValueError):
    """A site plan that cannot work; the message says why."""


@dataclass(frozen=True)
class SitePlan:
    site: str
    role: str  # TRAIN or HELD_OUT
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

    @property
    def n_train(self) -> int:
        return int(len(self.train_rows))

    @property
    def n_test(self) -> int:
        return int(len(self.test_rows))


Planner = Callable[[Corpus, ExperimentConfig], list[SitePlan]]
PLANNERS: Registry[Planner] = Registry("site planner")


def plan_sites(corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    plans = PLANNERS.get(cfg.sites.planner)(corpus, cfg)
    # Planner steps, each its own module, applied in this order when configured.
    if cfg.sites.label_skew_alpha:
        from partitions.label_skew import apply_label_skew

        plans = apply_label_skew(plans, corpus, cfg.sites.label_skew_alpha, cfg.corpus.seed)
    if cfg.sites.quantity_skew_sigma:
        from partitions.quantity_skew import apply_quantity_skew

        plans = apply_quantity_skew(plans, corpus, cfg.sites.quantity_skew_sigma,
                                    cfg.sites.min_samples, cfg.corpus.seed)
    if cfg.sites.label_noise_rate:
        from partitions.label_noise import apply_label_noise

        plans = apply_label_noise(plans, corpus, cfg.sites.label_noise_rate, cfg.corpus.seed)
    if cfg.sites.missing_site_rate or cfg.sites.missing_sample_rate:
        from partitions.missing_modalities import apply_missing_modalities

        plans = apply_missing_modalities(plans, corpus, cfg.sites.missing_site_rate,
                                         cfg.sites.missing_sample_rate, cfg.corpus.seed)
    check_plan(plans)
    return plans


def check_plan(plans: list[SitePlan]) -> None:
    """Refuse plans that cannot be trained or scored."""
    trained = {t for p in plans if p.role == TRAIN for t in p.tasks}
    if not trained:
        raise PlanError("no training site holds any task")
    for p in plans:
        if p.role == HELD_OUT:
            orphan = sorted(set(p.tasks) - trained)
            if orphan:
                raise PlanError(
                    f"held-out site {p.site} ({p.archetype}) holds tasks no training site holds: "
                    f"{orphan}; its OOD score would measure nothing the federation learned")
            if p.n_test == 0:
                raise PlanError(f"held-out site {p.site} has no samples to evaluate")
        elif p.n_train == 0:
            raise PlanError(f"training site {p.site} ({p.archetype}) has no training samples")


def rows_of(corpus: Corpus, origin_site: str, tasks: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Manifest row positions of an origin site's samples of the given tasks, by split."""
    m = corpus.manifest
    mask = (m["origin_site"].to_numpy() == origin_site) & m["task"].isin(tasks).to_numpy()
    split = m["split"].to_numpy()
    return {s: np.flatnonzero(mask & (split == s)) for s in ("train", "test")}
