"""Robust aggregation: coordinate-wise median, trimmed mean, Krum and multi-Krum.

Each applies per parameter group over the sites that trained it (`strategy.groupwise`, the
default): otherwise the untouched copies of sites that never ran an encoder would outvote the
sites that did. Update validation (strategies.base) runs first, so a NaN never reaches them.

A rule screens nothing with too few inputs: the median of two is their mean, a trimmed mean
that trims floor(fraction x n) = 0 values is the mean, Krum needs n >= 2f + 3. A group with
fewer trainers than its rule needs is never silently averaged: by `strategy.too_few_trainers`
it keeps its value (`refuse`, the default), is averaged with a warning (`mean`), or stops the
round (`fail`); each case is logged and kept in `last_fallbacks` with the round and the group.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from federated.core.config.schema import ConfigError, StrategyConfig, StrategySettings
from federated.core.config.values import one_of
from federated.core.models import group_of
from strategies.aggregation import (
    coordinate_median,
    groupwise_aggregate,
    groupwise_weighted_mean,
    krum,
    trimmed_mean,
    weighted_mean,
)
from strategies.base import Arrays, MultiMedStrategy, TooFewValidReplies
from strategies.registry import register_strategy
from strategies.secure_sums import SecureSupport

log = logging.getLogger(__name__)


class TooFewTrainers(TooFewValidReplies):
    """A group (or round) with fewer trainers than the robust rule needs, under too_few_trainers=fail."""


@dataclass(frozen=True)
class RobustSettings(StrategySettings):
    # Aggregate each parameter group over the sites that trained it (true), or over all sites.
    groupwise: bool = True
    # A group with fewer trainers than the rule needs: refuse (it keeps its value), mean (averaged,
    # with a warning) or fail (the round stops).
    too_few_trainers: str = one_of("refuse", "mean", "fail")


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
        settings = cfg.settings_as(RobustSettings)
        self.groupwise, self.too_few = settings.groupwise, settings.too_few_trainers

    def rule(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
        raise TypeError(f"{type(self).__name__} must define rule()")

    def min_trainers(self) -> tuple[int, str]:
        """The fewest inputs the rule screens anything with, and why (for the message)."""
        return 1, type(self).__name__

    def aggregate(
        self, current: Arrays, updates: list[Arrays], weights: list[float], group_weights: list[dict[str, float]]
    ) -> Arrays:
        if not self.groupwise:
            if self._enough("all groups", len(updates)):
                return self.rule(updates, weights)
            return weighted_mean(updates, weights) if self.too_few == "mean" else dict(current)
        trainers: dict[str, int] = {}
        for gw in group_weights:
            for group, w in gw.items():
                trainers[group] = trainers.get(group, 0) + (w > 0)
        short = {g for g, n in trainers.items() if n and not self._enough(g, n)}
        robust = [{g: w for g, w in gw.items() if g not in short} for gw in group_weights]
        out = groupwise_aggregate(current, updates, robust, group_of, self.rule)
        if short and self.too_few == "mean":
            fallback = [{g: w for g, w in gw.items() if g in short} for gw in group_weights]
            means = groupwise_weighted_mean(current, updates, fallback, group_of)
            out.update({k: v for k, v in means.items() if group_of(k) in short})
        return out

    def _enough(self, group: str, n: int) -> bool:
        """Whether `n` trainers suffice for the rule; if not, say so (log, last_fallbacks) or,
        under too_few_trainers=fail, stop the round."""
        need, why = self.min_trainers()
        if n >= need:
            return True
        what = {"refuse": "left unchanged", "mean": "averaged instead (too_few_trainers=mean)", "fail": ""}
        text = f"round {self.round}: group {group!r} has {n} trainer(s), {why} needs at least {need}"
        if self.too_few == "fail":
            raise TooFewTrainers(f"{text} (strategy.too_few_trainers=fail)")
        self.last_fallbacks.append(f"{text}: {what[self.too_few]}")
        log.warning("%s", self.last_fallbacks[-1])
        return False


@register_strategy("median", RobustSettings)
class Median(RobustStrategy):
    SECURE = SecureSupport.refused("takes a coordinate-wise median of the sites' updates")

    def rule(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
        return coordinate_median(updates, weights)

    def min_trainers(self) -> tuple[int, str]:
        return 3, "the median (of 2 it is their mean)"


@register_strategy("trimmed_mean", TrimmedMeanSettings)
class TrimmedMean(RobustStrategy):
    SECURE = SecureSupport.refused("trims the largest and smallest of the sites' updates")

    def rule(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
        return trimmed_mean(updates, weights, self.cfg.settings_as(TrimmedMeanSettings).trim_fraction)

    def min_trainers(self) -> tuple[int, str]:
        t = self.cfg.settings_as(TrimmedMeanSettings).trim_fraction
        if t <= 0.0:
            return 1, "the untrimmed mean (trim_fraction=0)"
        n = 1
        while int(t * n) < 1:  # the same floor(t * n) the rule trims per side
            n += 1
        return n, f"the trimmed mean with trim_fraction={t:g} (to trim one per side)"


@register_strategy("krum", KrumSettings)
class Krum(RobustStrategy):
    SECURE = SecureSupport.refused("scores each update by its distance to the others")

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        f = cfg.settings_as(KrumSettings).n_byzantine
        if n_train_sites < 2 * f + 3:
            raise ConfigError(
                f"strategy.n_byzantine={f}: Krum needs at least 2f + 3 = {2 * f + 3} training sites, "
                f"the run has {n_train_sites}"
            )

    def rule(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
        s = self.cfg.settings_as(KrumSettings)
        f = s.n_byzantine
        return krum(updates, weights, n_byzantine=f, n_selected=min(s.krum_selected, len(updates) - f))

    def min_trainers(self) -> tuple[int, str]:
        f = self.cfg.settings_as(KrumSettings).n_byzantine
        return 2 * f + 3, f"Krum with n_byzantine={f} (2f + 3)"
