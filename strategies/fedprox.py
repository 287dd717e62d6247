"""FedProx (Li et al. 2020): modality-aware averaging, plus a proximal term at every site.

The server sends `strategy.proximal_mu` with each round's config; sites add the gradient of
(mu / 2) * ||w - w_global||^2 over the parameters they train (FedProxClient), which keeps
heterogeneous sites from drifting far from the global model in one round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from federated.core.config.schema import StrategySettings
from federated.core.models import MultiMedModel
from federated.core.protocol import CONFIG_RECORD, record_number
from strategies.base import MultiMedStrategy
from strategies.client_side import ClientAlgorithm, ClientRound, SiteRound
from strategies.registry import register_strategy
from strategies.secure_sums import GROUPED, SecureSupport

PROXIMAL_MU = "proximal-mu"  # train config key (server -> site): mu; the key Flower's own FedProx uses


@dataclass(frozen=True)
class FedProxSettings(StrategySettings):
    proximal_mu: float = 0.01  # weight of the sites' proximal term; 0 = plain modality_fedavg

    def __post_init__(self) -> None:
        self.require(
            "proximal_mu", math.isfinite(self.proximal_mu) and self.proximal_mu >= 0.0, "must be finite and >= 0"
        )


class ProximalTerm:
    """The gradient of (mu / 2) * ||w - w_global||^2, added to every trained parameter."""

    def __init__(self, global_params: Mapping[str, torch.Tensor], mu: float) -> None:
        self.global_params, self.mu = global_params, mu

    def after_backward(self, model: MultiMedModel) -> None:
        for name, p in model.named_parameters():
            if p.requires_grad and p.grad is not None:
                p.grad.add_(p.detach() - self.global_params[name], alpha=self.mu)


class FedProxClient(ClientAlgorithm):
    """The site side: the proximal term, with the mu the server sent (as Flower's FedProx does)."""

    def before_train(self, site: SiteRound) -> ClientRound:
        mu = record_number(site.content.config_records[CONFIG_RECORD], PROXIMAL_MU, default=0.0)
        return ClientRound(hooks=(ProximalTerm(site.start, mu),) if mu > 0 else ())


@register_strategy("fedprox", FedProxSettings, client=FedProxClient)
class FedProx(MultiMedStrategy):
    SECURE = SecureSupport.sums(GROUPED)  # the proximal term is the site's; the server averages as modality_fedavg

    def train_config(self, server_round: int) -> dict[str, float | int | str]:
        return {PROXIMAL_MU: float(self.cfg.settings_as(FedProxSettings).proximal_mu)}
