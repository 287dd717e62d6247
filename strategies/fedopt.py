"""FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021): a server optimiser on the averaged update.

The (modality-aware) average minus the current model is a pseudo-gradient; the server keeps
first and second moments across rounds (`state`, saved in checkpoints) and takes an adaptive
step with `strategy.server_lr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from federated.core.config.schema import StrategyConfig, StrategySettings
from strategies.aggregation import ServerOptState, server_opt_step
from strategies.base import Arrays, MultiMedStrategy
from strategies.registry import register_strategy
from strategies.secure_sums import GROUPED, SecureSupport


@dataclass(frozen=True)
class FedOptSettings(StrategySettings):
    server_lr: float = 0.01  # the server optimiser's step size on the pseudo-gradient (the mean update)
    beta1: float = 0.9  # first-moment decay
    beta2: float = 0.99  # second-moment decay (adam, yogi)
    tau: float = 0.001  # adaptivity: the second moment starts at tau^2 and the step divides by sqrt(v) + tau

    def __post_init__(self) -> None:
        self.require("server_lr", math.isfinite(self.server_lr) and self.server_lr > 0.0, "must be finite and > 0")
        self.require("beta1", 0.0 <= self.beta1 < 1.0, "must be in [0, 1)")
        self.require("beta2", 0.0 <= self.beta2 < 1.0, "must be in [0, 1)")
        self.require("tau", math.isfinite(self.tau) and self.tau > 0.0, "must be finite and > 0")


class FedOpt(MultiMedStrategy):
    STATE = ("state",)
    SECURE = SecureSupport.sums(GROUPED)  # the server step needs only the group-wise mean
    variant = ""  # adam | yogi | adagrad (strategies.aggregation.SERVER_OPT_VARIANTS)

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.settings = cfg.settings_as(FedOptSettings)
        self.state: ServerOptState | None = None

    def server_update(self, current: Arrays, aggregated: Arrays) -> Arrays:
        s = self.settings
        new, self.state = server_opt_step(
            current, aggregated, self.state, self.variant, lr=s.server_lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau
        )
        return new


@register_strategy("fedadam", FedOptSettings)
class FedAdam(FedOpt):
    variant = "adam"


@register_strategy("fedyogi", FedOptSettings)
class FedYogi(FedOpt):
    variant = "yogi"


@register_strategy("fedadagrad", FedOptSettings)
class FedAdagrad(FedOpt):
    variant = "adagrad"
