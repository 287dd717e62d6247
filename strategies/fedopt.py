"""FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021): a server optimiser on the averaged update.

The (modality-aware) average minus the current model is a pseudo-gradient; the server keeps
first and second moments across rounds (`state`, saved in checkpoints) and takes an adaptive
step with `strategy.server_lr`.
"""

from __future__ import annotations

from federated.core.config.schema import StrategyConfig
from strategies.aggregation import ServerOptState, server_opt_step
from strategies.base import Arrays, MultiMedStrategy


class FedOpt(MultiMedStrategy):
    STATE = ("state",)

    def __init__(self, cfg: StrategyConfig, n_train_sites: int, variant: str) -> None:
        super().__init__(cfg, n_train_sites)
        self.variant = variant
        self.state: ServerOptState | None = None

    def server_update(self, current: Arrays, aggregated: Arrays) -> Arrays:
        new, self.state = server_opt_step(current, aggregated, self.state, self.variant,
                                          lr=self.cfg.server_lr, beta1=self.cfg.beta1,
                                          beta2=self.cfg.beta2, tau=self.cfg.tau)
        return new
