"""Robust aggregation: coordinate-wise median, trimmed mean, Krum and multi-Krum.

Each applies per parameter group over the sites that trained it (`strategy.groupwise`, the
default): otherwise the untouched copies of sites that never ran an encoder would outvote the
sites that did. Update validation (strategies.base) runs first, so a NaN never reaches them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from federated.core.config.schema import StrategyConfig, StrategySettings
from federated.core.models import group_of
from strategies.aggregation import coordinate_median, groupwise_aggregate, krum, trimmed_mean
from strategies.base import Arrays, MultiMedStrategy
from strategies.registry import register_strategy


@dataclass(frozen=True)
class RobustSettings(StrategySettings):
    # Aggregate each parameter group over the sites that trained it (true), or over all sites.
    groupwise: bool = True


@dataclass(frozen=True)
class TrimmedMeanSettings(RobustSettings):
    trim_fraction: float = 0.2  # fraction cut from each end, per coordinate

    def __post_init__(self) -> None:
        self.require("trim_fraction", 0.0 <= self.trim_fraction < 0.5, "must be in [0, 0.5)")


@dataclass(frozen=True)
class KrumSettings(RobustSettings):
    n_byzantine: int = 1  # assumed number of bad sites, f
    krum_selected: int = 1  # 1 = Krum, > 1 = multi-Krum (the mean of that many best-scored updates)

    def __post_init__(self) -> None:
        self.require("n_byzantine", self.n_byzantine >= 0, "must be >= 0")
        self.require("krum_selected", self.krum_selected >= 1, "must be >= 1")


class RobustStrategy(MultiMedStrategy):
    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.groupwise = cfg.settings_as(RobustSettings).groupwise

    def rule(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
        raise TypeError(f"{type(self).__name__} must define rule()")

    def aggregate(
        self, current: Arrays, updates: list[Arrays], weights: list[float], group_weights: list[dict[str, float]]
    ) -> Arrays:
        if self.groupwise:
            return groupwise_aggregate(current, updates, group_weights, group_of, self.rule)
        return self.rule(updates, weights)


@register_strategy("median", RobustSettings)
class Median(RobustStrategy):
    def rule(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
        return coordinate_median(updates, weights)


@register_strategy("trimmed_mean", TrimmedMeanSettings)
class TrimmedMean(RobustStrategy):
    def rule(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
        return trimmed_mean(updates, weights, self.cfg.settings_as(TrimmedMeanSettings).trim_fraction)


@register_strategy("krum", KrumSettings)
class Krum(RobustStrategy):
    def rule(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
        # Krum needs n > 2f + 2; a group trained by fewer sites cannot be screened by it, and
        # falls back to the median, which is robust for any n with a strict honest majority.
        s = self.cfg.settings_as(KrumSettings)
        f = s.n_byzantine
        if len(updates) <= 2 * f + 2:
            return coordinate_median(updates, weights)
        return krum(updates, weights, n_byzantine=f, n_selected=min(s.krum_selected, len(updates) - f))
