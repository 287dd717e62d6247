"""Site planners: which samples, modalities and tasks each simulated hospital holds."""

from partitions.plan import HELD_OUT, PLANNERS, STEPS, TRAIN, PlanError, SitePlan, plan_sites

# Importing a planner or step module registers it.
from partitions import archetypes as _archetypes  # noqa: F401
from partitions import label_skew as _label_skew  # noqa: F401
from partitions import quantity_skew as _quantity_skew  # noqa: F401
from partitions import label_noise as _label_noise  # noqa: F401
from partitions import missing_modalities as _missing_modalities  # noqa: F401
from partitions import acquisition_shift as _acquisition_shift  # noqa: F401
from partitions import natural as _natural  # noqa: F401
from partitions import random_mix as _random_mix  # noqa: F401
from partitions import selection as _selection  # noqa: F401

__all__ = ["HELD_OUT", "TRAIN", "PLANNERS", "STEPS", "PlanError", "SitePlan", "plan_sites"]
