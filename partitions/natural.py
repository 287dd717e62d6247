"""The `natural` planner: one site per origin site of the corpus (the hospital a sample came from).

Real multi-site data (ingested with an `origin_site` column) is split the way it was
collected, as FLamby does. Origin sites with fewer than `sites.min_site_size` samples are
grouped, in name order, into sites of at least that size (a site of 12 patients cannot train
or be scored alone); a group's origin_site lists its members joined by '+'. A site holds every
task it has at least `sites.min_samples` training samples of. No site is held out unless
`sites.holdout` says which (named, random or archetype; every site's archetype is "natural").
"""

from __future__ import annotations

import numpy as np

from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions.index import manifest_index
from partitions.site_plan import PLANNERS, PlanError, SitePlan


def group_small_origins(sizes: dict[str, int], min_size: int) -> list[list[str]]:
    """Origins of at least min_size stand alone; smaller ones are merged, in name order,
    into groups of at least min_size (a small remainder joins the last group)."""
    groups = [[o] for o in sorted(sizes) if sizes[o] >= min_size]
    small, current, total = [], [], 0
    for o in sorted(o for o in sizes if sizes[o] < min_size):
        current.append(o)
        total += sizes[o]
        if total >= min_size:
            small.append(current)
            current, total = [], 0
    if current:
        if small:
            small[-1].extend(current)
        else:
            small.append(current)  # everything small together is still small: check_plan says so
    return groups + small


@PLANNERS.register("natural")
def plan_natural(corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    index = manifest_index(corpus)
    sizes = index.origin_sizes.to_dict()
    groups = group_small_origins(sizes, cfg.sites.min_site_size)
    for members in groups:
        total = sum(sizes[o] for o in members)
        if total < cfg.sites.min_site_size:
            raise PlanError(
                f"origin site(s) {'+'.join(members)} have {total} samples together, fewer than "
                f"sites.min_site_size={cfg.sites.min_site_size}; lower it to keep them"
            )
    width = max(2, len(str(len(groups) - 1)))
    plans = []
    for i, members in enumerate(groups):
        rows: dict[str, list[np.ndarray]] = {"train": [], "test": []}
        tasks = []
        for t in sorted({t for o in members for t in index.tasks_at(o)}):
            by_split = {s: np.concatenate([index.rows(o, t, s) for o in members]) for s in rows}
            if len(by_split["train"]) < cfg.sites.min_samples:
                continue  # too few to train on here; the rows stay unused
            tasks.append(t)
            for s in rows:
                rows[s].append(by_split[s])
        if not tasks:
            raise PlanError(
                f"origin site(s) {'+'.join(members)} have no task with at least "
                f"sites.min_samples={cfg.sites.min_samples} training samples"
            )
        plans.append(
            SitePlan(
                site=f"site_{i:0{width}d}",
                role=Role.TRAIN,
                archetype="natural",
                origin_site="+".join(members),
                tasks=tuple(tasks),
                modalities=tuple(corpus.schema.modalities_of(tasks)),
                train_rows=np.sort(np.concatenate(rows["train"])),
                test_rows=np.sort(np.concatenate(rows["test"])),
            )
        )
    return plans
