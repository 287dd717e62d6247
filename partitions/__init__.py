"""Site planners: which samples, modalities and tasks each simulated hospital holds."""

from partitions.plan import HELD_OUT, PLANNERS, TRAIN, PlanError, SitePlan, plan_sites
from partitions import archetypes as _archetypes  # noqa: F401  (registers the planner)

__all__ = ["HELD_OUT", "TRAIN", "PLANNERS", "PlanError", "SitePlan", "plan_sites"]
