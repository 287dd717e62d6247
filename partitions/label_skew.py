"""Label skew: each training site's class mix per task drawn from Dirichlet(alpha).

A planner step applied after the site planner. For every training site and every task with a
scalar class label, p ~ Dirichlet(alpha * 1) is drawn and the site keeps, of class c, the
fraction p_c / max(p) of its rows (train and test alike, so its ID test split has its own
label mix). Small alpha gives sites dominated by one or two classes; large alpha leaves the
mix close to the corpus's. Held-out sites are untouched: they are scored on what they have.
Rows are only dropped, never copied, so a plan stays index arrays.

Flower Datasets' DirichletPartitioner splits one shared pool among partitions; here every
site already has its own data (its origin site), so the skew is a per-site subsample instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from federated.corpus.format import Corpus
from partitions.plan import TRAIN, PlanError, SitePlan
from partitions.steps import class_count


def _rng(seed: int, site: str, task: str) -> np.random.Generator:
    """Label skew's own stream (older than partitions.steps.step_rng; kept so the recorded
    strategy table in experiments/results reproduces exactly)."""
    digest = np.frombuffer(f"{site}/{task}".encode(), dtype=np.uint8).astype(np.uint64)
    return np.random.default_rng(np.random.SeedSequence([seed, *digest.tolist()]))


def keep_fractions(alpha: float, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    p = rng.dirichlet(np.full(n_classes, alpha))
    return p / p.max()


def apply_label_skew(plans: list[SitePlan], corpus: Corpus, alpha: float, seed: int) -> list[SitePlan]:
    if alpha <= 0:
        raise PlanError(f"sites.label_skew_alpha must be > 0 (got {alpha}); omit it for no skew")
    m = corpus.manifest
    tasks, labels = m["task"].to_numpy(), m["label"].to_numpy()
    out = []
    for plan in plans:
        if plan.role != TRAIN:
            out.append(plan)
            continue
        keep_train = np.ones(len(plan.train_rows), dtype=bool)
        keep_test = np.ones(len(plan.test_rows), dtype=bool)
        for t in plan.tasks:
            n_classes = class_count(t)
            if n_classes is None:
                continue
            frac = keep_fractions(alpha, n_classes, _rng(seed, plan.site, t))
            draw = _rng(seed + 1, plan.site, t)
            for rows, keep in ((plan.train_rows, keep_train), (plan.test_rows, keep_test)):
                of_task = np.flatnonzero(tasks[rows] == t)
                cls = labels[rows[of_task]].astype(np.int64)
                u = draw.random(len(of_task))
                keep[of_task[u >= frac[np.clip(cls, 0, n_classes - 1)]]] = False
        out.append(dataclasses.replace(plan, train_rows=plan.train_rows[keep_train],
                                       test_rows=plan.test_rows[keep_test]))
    return out
