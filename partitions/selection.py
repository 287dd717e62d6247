"""Selection steps for studies: which tasks and training sites take part, pooled or not.

    tasks_only   every site keeps only the listed tasks (single-task runs); sites left with
                 none are dropped
    train_only   only the listed training sites train (local-only runs: one site); the other
                 training sites are still scored on their test split as ID (role id_eval), so a
                 local model is judged on every site's test data (the FLamby protocol)
    pool         all training sites become one site, "pooled" (centralised training: the
                 upper reference of the FLamby protocol); held-out sites stay
    unimodal     each multimodal task reads only its first modality: the others are masked for
                 every sample (the unimodal arm of MultiMed's ablation)
Like every step, they only select index arrays; nothing is copied.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions.index import manifest_index
from partitions.site_plan import STEPS, PlanError, SitePlan, Step


def _keep_tasks(plan: SitePlan, tasks: tuple[str, ...], corpus: Corpus) -> SitePlan:
    index = manifest_index(corpus)

    def rows(r: np.ndarray) -> np.ndarray:
        parts = [r[index.task_rows(r, t)] for t in tasks]
        return np.sort(np.concatenate(parts)) if parts else r[:0]

    return dataclasses.replace(
        plan,
        tasks=tasks,
        modalities=tuple(corpus.schema.modalities_of(tasks)),
        train_rows=rows(plan.train_rows),
        test_rows=rows(plan.test_rows),
    )


def tasks_only(plans: list[SitePlan], corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    wanted = list(cfg.sites.tasks_only)
    unknown = [t for t in wanted if t not in corpus.schema.tasks]
    if unknown:
        raise PlanError(
            f"sites.tasks_only names unknown tasks {unknown}; tasks of the corpus: {', '.join(corpus.schema.tasks)}"
        )
    out = [_keep_tasks(p, tuple(t for t in p.tasks if t in wanted), corpus) for p in plans]
    return [p for p in out if p.tasks]


def train_only(plans: list[SitePlan], corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    wanted = set(cfg.sites.train_only)
    training = {p.site for p in plans if p.role == Role.TRAIN}
    unknown = sorted(wanted - training)
    if unknown:
        raise PlanError(
            f"sites.train_only names {unknown}, which are not training sites; "
            f"training sites: {', '.join(sorted(training))}"
        )
    return [p if p.role != Role.TRAIN or p.site in wanted else dataclasses.replace(p, role=Role.ID_EVAL) for p in plans]


def pool(plans: list[SitePlan], corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    train = [p for p in plans if p.role == Role.TRAIN]
    tasks = tuple(t for t in corpus.schema.tasks if any(t in p.tasks for p in train))
    pooled = SitePlan(
        site="pooled",
        role=Role.TRAIN,
        archetype="pooled",
        origin_site="+".join(p.origin_site for p in train),
        tasks=tasks,
        modalities=tuple(corpus.schema.modalities_of(tasks)),
        train_rows=np.sort(np.concatenate([p.train_rows for p in train])),
        test_rows=np.sort(np.concatenate([p.test_rows for p in train])),
    )
    return [pooled, *(p for p in plans if p.role != Role.TRAIN)]


def unimodal(plans: list[SitePlan], corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    index = manifest_index(corpus)
    out = []
    for p in plans:
        masked = {m: [r] for m, r in p.masked.items()}
        rows = np.concatenate([p.train_rows, p.test_rows])
        for t in p.tasks:
            for m in corpus.schema.task(t).inputs[1:]:
                masked.setdefault(m, []).append(rows[index.task_rows(rows, t)])
        used = {corpus.schema.task(t).inputs[0] for t in p.tasks}
        out.append(
            dataclasses.replace(
                p,
                masked={m: np.unique(np.concatenate(v)) for m, v in masked.items()},
                modalities=tuple(m for m in p.modalities if m in used),
            )
        )
    return out


STEPS.add("tasks_only", Step(tasks_only, lambda cfg: bool(cfg.sites.tasks_only)))
STEPS.add("train_only", Step(train_only, lambda cfg: bool(cfg.sites.train_only)))
STEPS.add("pool", Step(pool, lambda cfg: cfg.sites.pooled))
STEPS.add("unimodal", Step(unimodal, lambda cfg: cfg.sites.unimodal))
