"""The `archetypes` planner: each site is a named archetype (a list of tasks) at its own origin site.

Site i is the corpus's i-th origin site, so every site carries its own acquisition shift and
held-out sites are out of distribution by construction. Every site keeps the corpus's
train/test split; `sites.held_out` lists the sites that `sites.holdout=listed` (the default)
holds out, after the training sites (partitions/holdout.py merges a held-out site's splits).
"""

from __future__ import annotations

from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions.site_plan import PLANNERS, PlanError, SitePlan, rows_of


def _archetype_tasks(cfg: ExperimentConfig, name: str, corpus: Corpus) -> tuple[str, ...]:
    archetypes = cfg.sites.archetypes
    if name not in archetypes:
        raise PlanError(
            f"unknown site archetype {name!r}; defined in sites.archetypes: {', '.join(sorted(archetypes))}"
        )
    tasks = tuple(archetypes[name])
    for t in tasks:
        if t not in corpus.schema.tasks:
            raise PlanError(
                f"archetype {name!r} names unknown task {t!r}; tasks of the corpus: {', '.join(corpus.schema.tasks)}"
            )
        if t not in corpus.tasks:
            raise PlanError(
                f"archetype {name!r} needs task {t!r}, which the corpus at "
                f"{corpus.path} does not have (it has {', '.join(corpus.tasks)})"
            )
    if not tasks:
        raise PlanError(f"archetype {name!r} holds no tasks")
    return tasks


@PLANNERS.register("archetypes")
def plan_archetypes(corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    roles = [(a, Role.TRAIN) for a in cfg.sites.train] + [(a, Role.HELD_OUT) for a in cfg.sites.held_out]
    origins = corpus.spec["origin_sites"]
    if len(roles) > len(origins):
        raise PlanError(
            f"{len(roles)} sites planned but the corpus has only {len(origins)} "
            f"origin sites; raise corpus.n_origin_sites or plan fewer sites"
        )
    plans = []
    for i, (archetype, role) in enumerate(roles):
        tasks = _archetype_tasks(cfg, archetype, corpus)
        rows = rows_of(corpus, origins[i], tasks)
        plans.append(
            SitePlan(
                site=f"site_{i:02d}",
                role=role,
                archetype=archetype,
                origin_site=origins[i],
                tasks=tasks,
                modalities=tuple(corpus.schema.modalities_of(tasks)),
                train_rows=rows["train"],
                test_rows=rows["test"],
            )
        )
    return plans
