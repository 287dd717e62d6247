"""Label skew: each training site's class mix per task, Dirichlet(alpha) or k classes only.

A planner step applied after the site planner. For every training site and every task with a
scalar class label, p ~ Dirichlet(alpha * 1) is drawn and the site keeps, of class c, the
fraction p_c / max(p) of its rows (train and test alike, so its ID test split has its own
label mix). Small alpha gives sites dominated by one or two classes; large alpha leaves the
mix close to the corpus's. Held-out sites are untouched: they are scored on what they have.
Rows are only dropped, never copied, so a plan stays index arrays.

Pathological skew (`sites.label_skew_classes=k`, McMahan et al. 2017's "2 shards per client")
keeps only k classes per task at each training site, chosen at random.

Flower Datasets' DirichletPartitioner splits one shared pool among partitions; here every
site already has its own data (its origin site), so the skew is a per-site subsample instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from federated.core.config.schema import ExperimentConfig
from federated.data.format import Corpus
from partitions.index import manifest_index
from partitions.site_plan import STEPS, PlanError, SitePlan, Step
from partitions.steps import at_training_sites, class_count, step_rng


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
    labels = corpus.manifest["label"].to_numpy()
    index = manifest_index(corpus)

    def skew(plan: SitePlan) -> SitePlan:
        keep_train = np.ones(len(plan.train_rows), dtype=bool)
        keep_test = np.ones(len(plan.test_rows), dtype=bool)
        for t in plan.tasks:
            n_classes = class_count(corpus.schema.task(t))
            if n_classes is None:
                continue
            frac = keep_fractions(alpha, n_classes, _rng(seed, plan.site, t))
            draw = _rng(seed + 1, plan.site, t)
            for rows, keep in ((plan.train_rows, keep_train), (plan.test_rows, keep_test)):
                of_task = index.task_rows(rows, t)
                cls = labels[rows[of_task]].astype(np.int64)
                u = draw.random(len(of_task))
                keep[of_task[u >= frac[np.clip(cls, 0, n_classes - 1)]]] = False
        return dataclasses.replace(plan, train_rows=plan.train_rows[keep_train], test_rows=plan.test_rows[keep_test])

    return at_training_sites(plans, skew)


def apply_pathological_skew(plans: list[SitePlan], corpus: Corpus, k: int, seed: int) -> list[SitePlan]:
    """Each training site keeps the rows of k classes per task (all classes if it has <= k)."""
    if k < 1:
        raise PlanError(f"sites.label_skew_classes must be >= 1 (got {k}); omit it for no skew")
    labels = corpus.manifest["label"].to_numpy()
    index = manifest_index(corpus)

    def keep_k_classes(plan: SitePlan) -> SitePlan:
        kept = {}
        for split, rows in (("train", plan.train_rows), ("test", plan.test_rows)):
            keep = np.ones(len(rows), dtype=bool)
            for t in plan.tasks:
                n_classes = class_count(corpus.schema.task(t))
                if n_classes is None or n_classes <= k:
                    continue
                chosen = step_rng(seed, "pathological", plan.site, t).choice(n_classes, size=k, replace=False)
                of_task = index.task_rows(rows, t)
                keep[of_task] = np.isin(labels[rows[of_task]], chosen)
            kept[split] = rows[keep]
        return dataclasses.replace(plan, train_rows=kept["train"], test_rows=kept["test"])

    return at_training_sites(plans, keep_k_classes)


def _apply(plans: list[SitePlan], corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    alpha, k = cfg.sites.label_skew_alpha, cfg.sites.label_skew_classes
    if alpha and k:
        raise PlanError(
            "sites.label_skew_alpha and sites.label_skew_classes are two kinds of label skew; set one of them"
        )
    if k:
        return apply_pathological_skew(plans, corpus, k, cfg.corpus.seed)
    return apply_label_skew(plans, corpus, alpha, cfg.corpus.seed)


STEPS.add("label_skew", Step(_apply, lambda cfg: bool(cfg.sites.label_skew_alpha or cfg.sites.label_skew_classes)))
