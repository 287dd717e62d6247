"""The strategy registry: one entry per algorithm, its settings, server side and site side together.

A strategy module registers each strategy it defines with the decorator:

    @register_strategy("fedprox", FedProxSettings, client=FedProxClient)
    class FedProx(MultiMedStrategy): ...

which also registers the settings class with the config loader (STRATEGY_SETTINGS), so that
`strategy=fedprox strategy.proximal_mu=0.1` is typed and checked, and every other strategy's
setting is refused by name. Importing the `strategies` package imports every module in it, so a
new strategy is its module plus conf/strategy/<name>.yaml.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from federated.core.config.schema import STRATEGY_SETTINGS, StrategyConfig, StrategySettings
from federated.core.registry import Registry
from strategies.base import MultiMedStrategy
from strategies.client_side import ClientAlgorithm

ClientFactory = Callable[[StrategyConfig], ClientAlgorithm]
StrategyT = TypeVar("StrategyT", bound=type[MultiMedStrategy])


@dataclass(frozen=True)
class StrategySpec:
    """One algorithm: its settings class, its server strategy and, if it has one, its site side."""

    name: str
    settings: type[StrategySettings]
    server: type[MultiMedStrategy]  # built with (config, number of training sites); its SECURE declaration
    client: ClientFactory = ClientAlgorithm


STRATEGIES: Registry[StrategySpec] = Registry("strategy")


def register_strategy(
    name: str, settings: type[StrategySettings] = StrategySettings, client: ClientFactory = ClientAlgorithm
) -> Callable[[StrategyT], StrategyT]:
    """Class decorator: register the strategy class under `name` with its settings and site side."""
    common = {f.name for f in dataclasses.fields(StrategyConfig)}
    clash = sorted(common & {f.name for f in dataclasses.fields(settings)})
    if clash:
        raise ValueError(f"strategy {name!r}: settings {clash} clash with StrategyConfig's own keys")

    def deco(cls: StrategyT) -> StrategyT:
        STRATEGIES.add(name, StrategySpec(name, settings, cls, client))
        STRATEGY_SETTINGS.add(name, settings)
        return cls

    return deco


def _spec(cfg: StrategyConfig) -> StrategySpec:
    spec = STRATEGIES.get(cfg.name)
    if type(cfg.settings) is not spec.settings:
        raise TypeError(f"strategy {cfg.name!r} reads {spec.settings.__name__}, got {type(cfg.settings).__name__}")
    return spec


def build_strategy(cfg: StrategyConfig, n_train_sites: int) -> MultiMedStrategy:
    """The server strategy of `cfg`, for a run with `n_train_sites` training sites."""
    return _spec(cfg).server(cfg, n_train_sites)


def client_algorithm(cfg: StrategyConfig) -> ClientAlgorithm:
    """The site side of `cfg`'s strategy (the do-nothing base for a server-only strategy)."""
    return _spec(cfg).client(cfg)
