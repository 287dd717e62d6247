"""Server strategies (Flower Strategy subclasses) and the pure aggregation maths they use.

Select with `strategy=NAME`; every strategy validates updates first (strategies/base.py).
"""

from __future__ import annotations

from collections.abc import Callable

from federated.core.config.schema import StrategyConfig
from federated.core.registry import Registry
from strategies.base import MultiMedStrategy, TooFewValidReplies
from strategies.fedavg import FedAvg, ModalityFedAvg
from strategies.fedopt import FedOpt
from strategies.fedprox import FedProx
from strategies.robust import Krum, Median, TrimmedMean
from strategies.scaffold import Scaffold

StrategyFactory = Callable[[StrategyConfig, int], MultiMedStrategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")

STRATEGIES.add("fedavg", FedAvg)
STRATEGIES.add("modality_fedavg", ModalityFedAvg)
STRATEGIES.add("fedprox", FedProx)
STRATEGIES.add("fedadam", lambda cfg, n: FedOpt(cfg, n, "adam"))
STRATEGIES.add("fedyogi", lambda cfg, n: FedOpt(cfg, n, "yogi"))
STRATEGIES.add("fedadagrad", lambda cfg, n: FedOpt(cfg, n, "adagrad"))
STRATEGIES.add("scaffold", Scaffold)
# Personalisation is client-side (clients/personalisation.py); the server averages as usual.
STRATEGIES.add("fedbn", ModalityFedAvg)
STRATEGIES.add("fedper", ModalityFedAvg)
STRATEGIES.add("median", Median)
STRATEGIES.add("trimmed_mean", TrimmedMean)
STRATEGIES.add("krum", Krum)


def build_strategy(cfg: StrategyConfig, n_train_sites: int) -> MultiMedStrategy:
    return STRATEGIES.get(cfg.name)(cfg, n_train_sites)


__all__ = ["STRATEGIES", "MultiMedStrategy", "TooFewValidReplies", "build_strategy"]
