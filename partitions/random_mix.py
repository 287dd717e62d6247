"""The `random_mix` planner: many sites, each with a random mix of tasks, with guaranteed overlap.

For studies of "which mix of modalities and tasks" beyond the hand-named archetypes, and for
federations of hundreds of sites. Site i draws `sites.tasks_per_site` of the corpus's tasks at
random; then every task held by fewer than `sites.min_overlap` sites is added to randomly
chosen other sites until it is (so no task is learnt by one site alone). Site i reads origin
site i mod (number of origins): sites that share an origin split its samples of a task
between them, disjointly and at random, so there may be far more sites than origins.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions.index import SPLITS, manifest_index
from partitions.site_plan import PLANNERS, PlanError, SitePlan
from partitions.steps import step_rng


def draw_task_mix(
    tasks: list[str], n_sites: int, per_site: int, min_overlap: int, rng: np.random.Generator
) -> list[set[str]]:
    """Random task sets, then topped up so each held task is held by >= min_overlap sites."""
    if per_site > len(tasks):
        raise PlanError(f"sites.tasks_per_site={per_site} exceeds the corpus's {len(tasks)} tasks")
    if min_overlap > n_sites:
        raise PlanError(f"sites.min_overlap={min_overlap} exceeds sites.n_sites={n_sites}")
    mix = [set(rng.choice(tasks, size=per_site, replace=False).tolist()) for _ in range(n_sites)]
    for t in tasks:
        holders = [i for i in range(n_sites) if t in mix[i]]
        if 0 < len(holders) < min_overlap:
            others = [i for i in range(n_sites) if t not in mix[i]]
            for i in rng.choice(others, size=min_overlap - len(holders), replace=False):
                mix[int(i)].add(t)
    return mix


@PLANNERS.register("random_mix")
def plan_random_mix(corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    s = cfg.sites
    index = manifest_index(corpus)
    origins = [str(o) for o in index.origins]
    mix = draw_task_mix(
        sorted(corpus.tasks), s.n_sites, s.tasks_per_site, s.min_overlap, step_rng(cfg.corpus.seed, "random_mix")
    )
    # Which sites draw on each (origin, task): they split its rows between them.
    sharers: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, tasks in enumerate(mix):
        for t in sorted(tasks):
            sharers[(origins[i % len(origins)], t)].append(i)
    rows: list[dict[str, list[np.ndarray]]] = [{sp: [] for sp in SPLITS} for _ in mix]
    for (origin, t), sites in sharers.items():
        for sp in SPLITS:
            pool = index.rows(origin, t, sp)
            shuffled = step_rng(cfg.corpus.seed, "random_mix", origin, t, sp).permutation(pool)
            for i, part in zip(sites, np.array_split(shuffled, len(sites)), strict=True):
                rows[i][sp].append(part)
    width = max(2, len(str(s.n_sites - 1)))
    plans = []
    for i, tasks in enumerate(mix):
        ordered = tuple(sorted(tasks))
        plans.append(
            SitePlan(
                site=f"site_{i:0{width}d}",
                role=Role.TRAIN,
                archetype="mix:" + "+".join(ordered),
                origin_site=origins[i % len(origins)],
                tasks=ordered,
                modalities=tuple(corpus.schema.modalities_of(ordered)),
                train_rows=np.sort(np.concatenate(rows[i]["train"])),
                test_rows=np.sort(np.concatenate(rows[i]["test"])),
            )
        )
    return plans
