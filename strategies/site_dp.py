"""Site-level differential privacy (privacy=dp_fedavg): protect a whole hospital's contribution.

Composition, not flags: Flower's DifferentialPrivacyServerSideFixedClipping wraps the
strategy. Each round it clips every site's update (reply - global, all arrays jointly) to
L2 norm C, lets the inner strategy average them, and adds Gaussian noise of std sigma*C/n to
the result (n = sites sampled per round). That std is right only for an unweighted mean of the
n clipped updates, so the inner strategy must be plain FedAvg (the config loader refuses any
other strategy with privacy=dp_fedavg) with uniform weighting (`build_private_strategy` sets it).

Accounting: Flower's own RdpAccountant refuses strategies that override aggregate_train, so
an Opacus accountant counts one Gaussian mechanism per round. Sampling assumption, stated in
every report: no amplification by subsampling (sample_rate 1), i.e. every round is counted as
a full release even when fewer sites are sampled -- an upper bound on the true epsilon.
With privacy.target_epsilon the noise is calibrated for the planned rounds; a round that
would exceed the budget is not released (the model stays as it was).

Failure handling differs from non-private runs: Flower's wrapper drops a round in which any
site failed (its noise was calibrated for n replies), so a failed site skips the round under
strategy.on_too_few_valid=skip and stops the run otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from federated.core.arrays import pack_arrays, plain_record, record_to_numpy
from federated.core.config.schema import ExperimentConfig, StrategyConfig
from federated.core.flower_door import add_server_noise, check_server_noise_hook
from strategies.base import MultiMedStrategy, TooFewValidReplies
from strategies.registry import build_strategy
from strategies.round_strategy import RoundStrategy
from strategies.secure_sums import Layout, SecureSupport
from strategies.validation import Rejection

log = logging.getLogger(__name__)

SAMPLING_ASSUMPTION = (
    "no amplification: every round counted as a full release of all sites' clipped updates (sample_rate=1)"
)
EPS_TOLERANCE = 1e-6


def sampled_sites(fraction_train: float, min_train_sites: int, n_train_sites: int) -> int:
    """How many sites Flower's FedAvg samples per round (its configure_train rule)."""
    return max(int(n_train_sites * fraction_train), min(min_train_sites, n_train_sites))


class SiteLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping + an accountant that spans the whole run."""

    strategy: MultiMedStrategy  # the wrapped strategy (Flower's wrapper types it as any Strategy)

    def __init__(self, inner: MultiMedStrategy, cfg: ExperimentConfig, n_train_sites: int) -> None:
        p = cfg.privacy
        n = sampled_sites(cfg.strategy.fraction_train, cfg.strategy.min_train_sites, n_train_sites)
        if p.noise_multiplier is not None:
            sigma = float(p.noise_multiplier)
        else:
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=p.target_epsilon,
                    target_delta=p.delta,
                    sample_rate=1.0,
                    steps=cfg.rounds,
                    accountant=p.accountant,
                    epsilon_tolerance=0.01,
                )
            )
        check_server_noise_hook(SiteLevelDP)
        super().__init__(inner, noise_multiplier=sigma, clipping_norm=p.clipping_norm, num_sampled_clients=n)
        self.privacy, self.sigma = p, sigma
        self.ledger = create_accountant(p.accountant)
        self.released = 0
        self.stopped_round = 0
        np.random.seed(cfg.seed)  # Flower draws the noise from numpy's global generator

    # --- what the round loop reads (strategies/round_strategy.py): the wrapped strategy's ------
    @property
    def SECURE(self) -> SecureSupport:  # the wrapped class's declaration
        return self.strategy.SECURE

    @property
    def cfg(self) -> StrategyConfig:
        return self.strategy.cfg

    @property
    def declared_examples(self) -> Mapping[int, int]:
        return self.strategy.declared_examples

    @property
    def allowed_groups(self) -> Mapping[int, frozenset[str]]:
        return self.strategy.allowed_groups

    @property
    def handshake_problems(self) -> Mapping[int, str]:
        return self.strategy.handshake_problems

    @property
    def last_rejections(self) -> Sequence[Rejection]:
        return self.strategy.last_rejections

    @property
    def last_update_norms(self) -> Mapping[str, tuple[float, float | None]]:
        return self.strategy.last_update_norms

    def know_sites(
        self,
        node_sites: Mapping[int, str],
        declared_examples: Mapping[int, int],
        declared_data: Mapping[int, tuple[Sequence[str], Sequence[str]]] | None = None,
    ) -> None:
        self.strategy.know_sites(node_sites, declared_examples, declared_data)

    def epsilon(self, extra_rounds: int = 0) -> float:
        acc = create_accountant(self.privacy.accountant)
        acc.history = list(self.ledger.history)
        if extra_rounds:
            acc.history.append((self.sigma, 1.0, extra_rounds))
        if acc.history and self.sigma == 0:
            return float("inf")  # no noise, no guarantee
        return float(acc.get_epsilon(self.privacy.delta)) if acc.history else 0.0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._budget_spent(server_round):
            return self.strategy.current, MetricRecord({})
        # Flower's wrapper clips each Array of every reply record against the current model's:
        # it must see one Array per tensor, not pack_arrays' single buffer.
        self.current_arrays = plain_record(self.current_arrays)
        for reply in replies:
            if reply.has_content():
                for name, record in list(reply.content.array_records.items()):
                    reply.content[name] = plain_record(record)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.ledger.step(noise_multiplier=self.sigma, sample_rate=1.0)
            self.released += 1
        return arrays, metrics

    def _budget_spent(self, server_round: int) -> bool:
        """Would releasing this round exceed privacy.target_epsilon? (Then the model stays.)"""
        budget = self.privacy.target_epsilon
        if self.stopped_round or (budget is not None and self.epsilon(1) > budget + EPS_TOLERANCE):
            self.stopped_round = self.stopped_round or server_round
            log.warning(
                "round %d: site-level privacy budget epsilon=%s would be exceeded; the model is not updated",
                server_round,
                budget,
            )
            self.strategy.last_rejections, self.strategy.last_update_norms = [], {}
            return True
        return False

    def aggregate_masked_sum(
        self, server_round: int, summed: np.ndarray, layout: Layout, min_weight: float, n_sites: int
    ) -> ArrayRecord | None:
        """Secure aggregation with site-level DP: the sites clipped their own updates to
        privacy.clipping_norm before masking (clients/secure_aggregation.py), the inner FedAvg
        takes the unweighted mean from the sum, and the server adds the same noise as without
        masking, sigma*C/n, after unmasking. The accountant's assumption is unchanged, plus one: the
        server adds the noise honestly (it sees the noiseless sum, never one site's update). A round
        with fewer sites than the noise was calibrated for is not released, as Flower's wrapper
        drops a round with a failure."""
        if self._budget_spent(server_round):
            return self.strategy.current
        if n_sites < self.num_sampled_clients:
            self.strategy.last_rejections, self.strategy.last_update_norms = [], {}
            text = (
                f"round {server_round}: {n_sites} of {self.num_sampled_clients} sites in the secure sum; "
                "the site-level DP noise is calibrated for all of them"
            )
            if self.strategy.cfg.on_too_few_valid == "skip":
                log.warning("%s; skipping the round (strategy.on_too_few_valid=skip)", text)
                return None
            raise TooFewValidReplies(text)
        arrays = self.strategy.aggregate_masked_sum(server_round, summed, layout, min_weight, n_sites)
        if arrays is None:
            return None
        noised = self._add_noise_to_aggregated_arrays(arrays)
        self.ledger.step(noise_multiplier=self.sigma, sample_rate=1.0)
        self.released += 1
        return noised

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Flower's noise, drawn per tensor in the model's order (as for an ordinary record); the
        noised model then travels packed again."""
        noised = add_server_noise(self, plain_record(aggregated_arrays))
        return pack_arrays(record_to_numpy(noised))

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.strategy.state_dict(),
            "history": list(self.ledger.history),
            "released": self.released,
            "stopped_round": self.stopped_round,
            "numpy_rng": np.random.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["inner"])
        self.ledger.history = list(state["history"])
        self.released, self.stopped_round = state["released"], state["stopped_round"]
        np.random.set_state(state["numpy_rng"])

    def report(self) -> dict[str, Any]:
        return {
            "mechanism": "dp_fedavg (site-level)",
            "epsilon": self.epsilon(),
            "delta": self.privacy.delta,
            "accountant": self.privacy.accountant,
            "noise_multiplier": self.sigma,
            "clipping_norm": self.privacy.clipping_norm,
            "steps": self.released,
            "sample_rate": 1.0,
            "sampled_sites_per_round": self.num_sampled_clients,
            "sampling_assumption": SAMPLING_ASSUMPTION,
            "stopped_by_budget": self.stopped_round > 0,
            "stopped_round": self.stopped_round,
            "budget_epsilon": self.privacy.target_epsilon if self.privacy.target_epsilon is not None else -1.0,
        }


def build_private_strategy(cfg: ExperimentConfig, n_train_sites: int) -> RoundStrategy:
    """The run's strategy, wrapped for site-level DP when privacy=dp_fedavg (the config loader
    refuses any strategy but fedavg with it: its noise is calibrated for an unweighted mean)."""
    if cfg.privacy.name != "dp_fedavg":
        return build_strategy(cfg.strategy, n_train_sites)
    inner = build_strategy(dataclasses.replace(cfg.strategy, weighting="uniform"), n_train_sites)
    inner.clipped_updates = True  # Flower's wrapper clips every update to C before inner screens it
    return SiteLevelDP(inner, cfg, n_train_sites)


def server_privacy_report(strategy: RoundStrategy, sites: list[str]) -> dict[str, dict[str, Any]]:
    """Site-level DP protects each site that took part with the same guarantee."""
    if not isinstance(strategy, SiteLevelDP):
        return {}
    report = strategy.report()
    return {site: dict(report) for site in sites}
