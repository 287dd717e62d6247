"""Building a site plan: a planner (PLANNERS, `sites.planner`) proposes sites with train/test
splits; partitions/holdout.py decides which are held out (`sites.holdout`); then the planner
steps named in `sites.steps` (STEPS; each its own module) transform the plan in that order; a
step whose setting is off is skipped. Finally every site keeps only the modalities its samples
have, and the plan is checked.
"""

from __future__ import annotations

from federated.core.config.schema import ExperimentConfig
from federated.data.format import Corpus
from partitions.holdout import assign_roles
from partitions.site_plan import PLANNERS, STEPS, SitePlan, check_plan, held_modalities


def plan_sites(corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    plans = assign_roles(PLANNERS.get(cfg.sites.planner)(corpus, cfg), cfg)
    for name in cfg.sites.steps:
        step = STEPS.get(name)
        if step.active(cfg):
            plans = step.apply(plans, corpus, cfg)
    plans = [held_modalities(p, corpus) for p in plans]
    check_plan(plans, min_samples=cfg.sites.min_samples, zero_shot=cfg.sites.zero_shot)
    return plans
