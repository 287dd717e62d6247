"""FedProx (Li et al. 2020): modality-aware averaging, plus a proximal term at every site.

Sites add (mu / 2) * ||w - w_global||^2 over the parameters they train (clients/trainer.py),
which keeps heterogeneous sites from drifting far from the global model in one round.
"""

from __future__ import annotations

from federated.core.protocol import PROXIMAL_MU
from strategies.base import MultiMedStrategy


class FedProx(MultiMedStrategy):
    def train_config(self, server_round: int) -> dict[str, float | int | str]:
        return {PROXIMAL_MU: float(self.cfg.proximal_mu)}
