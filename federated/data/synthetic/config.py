"""The generator's configuration: one frozen dataclass, validated on construction.

Validation happens in `__post_init__` so that a bad value fails where the config is built
(CLI, YAML, a test) with the field's name, not deep inside the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from federated.core.multimed import MULTIMED_TASKS

MIN_SAMPLES_PER_TASK_SITE = 5


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate: how many origin sites, samples, which tasks, how strong the shift."""

    seed: int = 0
    n_origin_sites: int = 10  # origin sites are named "site_00", "site_01", ...
    samples_per_task_site: int = 120  # every task gets this many samples at EVERY origin site
    test_fraction: float = 0.2  # this fraction per (task, site) gets split "test"
    origin_shift_severity: float = 1.0  # 0 = all sites acquire identically; 1 = realistic; 2 = strong
    tasks: tuple[str, ...] = ()  # empty = all 11 tasks

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):  # a bare name is one task, not a tuple of letters
            object.__setattr__(self, "tasks", (self.tasks,))
        elif not isinstance(self.tasks, tuple):  # YAML / OmegaConf hand lists
            object.__setattr__(self, "tasks", tuple(self.tasks))
        _check_int("seed", self.seed, minimum=0)
        _check_int("n_origin_sites", self.n_origin_sites, minimum=1)
        _check_int("samples_per_task_site", self.samples_per_task_site, minimum=MIN_SAMPLES_PER_TASK_SITE)
        _check_number("test_fraction", self.test_fraction)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        _check_number("origin_shift_severity", self.origin_shift_severity)
        if not (math.isfinite(self.origin_shift_severity) and self.origin_shift_severity >= 0.0):
            raise ValueError(f"origin_shift_severity must be a finite number >= 0, got {self.origin_shift_severity!r}")
        unknown = [t for t in self.tasks if t not in MULTIMED_TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown task name(s) {unknown}; valid names: {', '.join(MULTIMED_TASKS)}")
        duplicated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if duplicated:
            raise ValueError(f"tasks: {duplicated} listed more than once")

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks to generate, in registry order (so the corpus layout ignores list order)."""
        wanted = set(self.tasks) if self.tasks else set(MULTIMED_TASKS)
        return tuple(t for t in MULTIMED_TASKS if t in wanted)

    @property
    def site_names(self) -> tuple[str, ...]:
        """Zero-padded names ("site_00", ...) so that sorting by name is sorting by index."""
        width = max(2, len(str(self.n_origin_sites - 1)))
        return tuple(f"site_{i:0{width}d}" for i in range(self.n_origin_sites))

    def n_test(self) -> int:
        """Test samples per (task, site): the fraction, rounded, keeping >= 1 of each split."""
        n = self.samples_per_task_site
        return min(n - 1, max(1, round(self.test_fraction * n)))


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
