"""FedProx (Li et al. 2020): modality-aware averaging, plus a proximal term at every site.

Sites add (mu / 2) * ||w - w_global||^2 over the parameters they train (clients/trainer.py),
which keeps heterogeneous sites from drifting far from the global model in one round.
"""

from __future__ import annotations

from strategies.base import MultiMedStrategy

PROXIMAL_MU_KEY = "proximal-mu"  # the config key Flower's own FedProx uses


class FedProx(MultiMedStrategy):
    def train_config(self, server_round: int) -> dict[str, float | int | str]:
        return {PROXIMAL_MU_KEY: float(self.cfg.proximal_mu)}
