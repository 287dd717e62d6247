"""Server strategies (Flower Strategy subclasses), their site sides and the pure aggregation maths.

Select with `strategy=NAME`; every strategy validates updates first (strategies/base.py). One
module per algorithm holds its settings dataclass, its server strategy and, where it has one,
its site side, registered together (strategies/registry.py). Importing this package imports
every module in it, so each strategy is registered, for the config loader too, before anything
can ask for one: a new strategy is its module plus conf/strategy/<name>.yaml.
"""

from __future__ import annotations

import importlib
import pkgutil

from strategies.base import MultiMedStrategy, TooFewValidReplies
from strategies.client_side import ClientAlgorithm, ClientRound, GradientHook, SiteRound
from strategies.registry import STRATEGIES, StrategySpec, build_strategy, client_algorithm, register_strategy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "STRATEGIES",
    "ClientAlgorithm",
    "ClientRound",
    "GradientHook",
    "MultiMedStrategy",
    "SiteRound",
    "StrategySpec",
    "TooFewValidReplies",
    "build_strategy",
    "client_algorithm",
    "register_strategy",
]
