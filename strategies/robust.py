"""Robust aggregation: coordinate-wise median, trimmed mean, Krum and multi-Krum.

Each applies per parameter group over the sites that trained it (`strategy.groupwise`, the
default): otherwise the untouched copies of sites that never ran an encoder would outvote the
sites that did. Update validation (strategies.base) runs first, so a NaN never reaches them.
"""

from __future__ import annotations


from federated.core.models import group_of
from strategies.aggregation import coordinate_median, groupwise_aggregate, krum, trimmed_mean
from strategies.base import Arrays, MultiMedStrategy


class RobustStrategy(MultiMedStrategy):
    def rule(self, updates: list[Arrays], weights: list[float]) -> Arrays:
        raise TypeError(f"{type(self).__name__} must define rule()")

    def aggregate(self, current: Arrays, updates: list[Arrays], weights: list[float],
                  group_weights: list[dict[str, float]]) -> Arrays:
        if self.cfg.groupwise:
            return groupwise_aggregate(current, updates, group_weights, group_of, self.rule)
        return self.rule(updates, weights)


class Median(RobustStrategy):
    def rule(self, updates: list[Arrays], weights: list[float]) -> Arrays:
        return coordinate_median(updates, weights)


class TrimmedMean(RobustStrategy):
    def rule(self, updates: list[Arrays], weights: list[float]) -> Arrays:
        return trimmed_mean(updates, weights, self.cfg.trim_fraction)


class Krum(RobustStrategy):
    def rule(self, updates: list[Arrays], weights: list[float]) -> Arrays:
        # Krum needs n > 2f + 2; a group trained by fewer sites cannot be screened by it, and
        # falls back to the median, which is robust for any n with a strict honest majority.
        f = self.cfg.n_byzantine
        if len(updates) <= 2 * f + 2:
            return coordinate_median(updates, weights)
        return krum(updates, weights, n_byzantine=f, n_selected=min(self.cfg.krum_selected, len(updates) - f))
