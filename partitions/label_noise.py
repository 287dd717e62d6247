"""Label noise: each training site mislabels a share of its training samples its own way.

A planner step. For every training site and every task with a scalar class label, the site
draws its own class-transition matrix: a sample of class c keeps its label with probability
1 - rate, and otherwise gets class c' != c with probabilities from a Dirichlet(1) row (so
each site confuses classes in its own, systematic way, as one hospital's coding habits do).
Only training rows are relabelled: test splits stay clean, so ID scores measure the truth.
The plan stores (rows, noisy labels) per task -- index arrays, not copies of the data.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from federated.data.format import Corpus
from partitions.index import manifest_index
from partitions.site_plan import STEPS, SitePlan, Step
from partitions.steps import at_training_sites, class_count, step_rng


def transition_matrix(n_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Row c: P(noisy label | true class c); the diagonal is 1 - rate, the rest of the row is
    rate * Dirichlet(1) over the other classes (drawn at once as normalised exponentials)."""
    off = rng.exponential(size=(n_classes, n_classes))
    np.fill_diagonal(off, 0.0)
    t = rate * off / off.sum(axis=1, keepdims=True)
    np.fill_diagonal(t, 1.0 - rate)
    return t


def apply_label_noise(plans: list[SitePlan], corpus: Corpus, rate: float, seed: int) -> list[SitePlan]:
    labels = corpus.manifest["label"].to_numpy()
    index = manifest_index(corpus)

    def relabel(p: SitePlan) -> SitePlan:
        noisy: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for t in p.tasks:
            n_classes = class_count(corpus.schema.task(t))
            if n_classes is None:
                continue
            rng = step_rng(seed, "noise", p.site, t)
            matrix = transition_matrix(n_classes, rate, rng)
            rows = p.train_rows[index.task_rows(p.train_rows, t)]
            true = labels[rows].astype(np.int64)
            u = rng.random(len(rows))
            new = (u[:, None] > np.cumsum(matrix[true], axis=1)).sum(axis=1)
            changed = new != true
            noisy[t] = (rows[changed], new[changed])
        return dataclasses.replace(p, relabelled=noisy)

    return at_training_sites(plans, relabel)


STEPS.add(
    "label_noise",
    Step(
        lambda plans, corpus, cfg: apply_label_noise(plans, corpus, cfg.sites.label_noise_rate, cfg.corpus.seed),
        lambda cfg: bool(cfg.sites.label_noise_rate),
    ),
)
