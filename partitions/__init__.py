"""Site planners: which samples, modalities and tasks each simulated hospital holds."""

# Importing a planner or step module registers it.
from partitions import acquisition_shift as _acquisition_shift  # noqa: F401
from partitions import archetypes as _archetypes  # noqa: F401
from partitions import label_noise as _label_noise  # noqa: F401
from partitions import label_skew as _label_skew  # noqa: F401
from partitions import missing_modalities as _missing_modalities  # noqa: F401
from partitions import natural as _natural  # noqa: F401
from partitions import quantity_skew as _quantity_skew  # noqa: F401
from partitions import random_mix as _random_mix  # noqa: F401
from partitions import selection as _selection  # noqa: F401
from partitions.plan import plan_sites
from partitions.site_plan import PLANNERS, STEPS, PlanError, SitePlan

__all__ = ["PLANNERS", "STEPS", "PlanError", "SitePlan", "plan_sites"]
