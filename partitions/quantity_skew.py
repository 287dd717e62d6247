"""Quantity skew: training sites of very different sizes, log-normal, with a floor.

A planner step. Site i keeps the fraction s_i / max(s) of each of its tasks' rows (train and
test alike), with s_i ~ LogNormal(0, sigma) drawn from the corpus seed and the site id; a site
never drops below `sites.min_samples` rows per task (or all it has, if fewer). sigma = 1 gives
sizes spread over about an order of magnitude. Held-out sites are untouched.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions.index import manifest_index
from partitions.site_plan import STEPS, PlanError, SitePlan, Step
from partitions.steps import step_rng


def _subsample(rows: np.ndarray, of_task: np.ndarray, keep_n: int, rng: np.random.Generator) -> np.ndarray:
    chosen = rng.choice(of_task, size=keep_n, replace=False) if keep_n < len(of_task) else of_task
    return rows[np.sort(chosen)]


def apply_quantity_skew(
    plans: list[SitePlan], corpus: Corpus, sigma: float, min_samples: int, seed: int
) -> list[SitePlan]:
    if sigma <= 0:
        raise PlanError(f"sites.quantity_skew_sigma must be > 0 (got {sigma}); omit it for equal sizes")
    index = manifest_index(corpus)
    train_sites = [p for p in plans if p.role == Role.TRAIN]
    sizes = {p.site: step_rng(seed, "quantity", p.site).lognormal(0.0, sigma) for p in train_sites}
    biggest = max(sizes.values())
    out = []
    for p in plans:
        if p.role != Role.TRAIN:
            out.append(p)
            continue
        frac = sizes[p.site] / biggest
        rng = step_rng(seed + 1, "quantity", p.site)
        kept = {}
        for split, rows in (("train", p.train_rows), ("test", p.test_rows)):
            parts = []
            for t in p.tasks:
                idx = index.task_rows(rows, t)
                floor = min(len(idx), min_samples if split == "train" else max(1, min_samples // 4))
                parts.append(_subsample(rows, idx, max(floor, int(round(frac * len(idx)))), rng))
            kept[split] = np.sort(np.concatenate(parts)) if parts else rows[:0]
        out.append(dataclasses.replace(p, train_rows=kept["train"], test_rows=kept["test"]))
    return out


STEPS.add(
    "quantity_skew",
    Step(
        lambda plans, corpus, cfg: apply_quantity_skew(
            plans, corpus, cfg.sites.quantity_skew_sigma, cfg.sites.min_samples, cfg.corpus.seed
        ),
        lambda cfg: bool(cfg.sites.quantity_skew_sigma),
    ),
)
