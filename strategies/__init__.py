"""Server strategies (Flower Strategy subclasses) and the pure aggregation maths they use."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import Strategy

from federated.config.schema import StrategyConfig
from federated.registry import Registry
from strategies.fedavg import FedAvg
from strategies.modality_fedavg import ModalityFedAvg

StrategyFactory = Callable[[StrategyConfig, int], Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


@STRATEGIES.register("fedavg")
def _fedavg(cfg: StrategyConfig, n_train_sites: int) -> Strategy:
    min_sites = min(cfg.min_train_sites, n_train_sites)
    # Evaluation is the framework's own (every site, ID and OOD), not the strategy's.
    return FedAvg(fraction_train=cfg.fraction_train, min_train_nodes=min_sites,
                  min_available_nodes=min_sites)


@STRATEGIES.register("modality_fedavg")
def _modality_fedavg(cfg: StrategyConfig, n_train_sites: int) -> Strategy:
    min_sites = min(cfg.min_train_sites, n_train_sites)
    return ModalityFedAvg(fraction_train=cfg.fraction_train, min_train_nodes=min_sites,
                          min_available_nodes=min_sites)


def build_strategy(cfg: StrategyConfig, n_train_sites: int) -> Strategy:
    return STRATEGIES.get(cfg.name)(cfg, n_train_sites)


__all__ = ["STRATEGIES", "build_strategy"]
