"""FedGMA (Tenison, Sreeramadas, Mugunthan, Oyallon, Rish, Belilovsky, "Gradient Masked Averaging
for Federated Learning", TMLR 2023): damp the coordinates on which the sites disagree.

Server only. With the sites' updates Delta_k = w_k - w of one round (Sec. 3 of the paper, after
the AND-mask of Parascandolo et al. 2021):

    agreement   A_j = |sum_k sign(Delta_kj)| / n            (unweighted, over the n sites)
    soft mask   m_j = 1 if A_j >= tau else A_j
    server step w <- w + server_lr * m * sum_k p_k Delta_k  (p_k: the FedAvg weights)

This is the paper's soft mask (its default variant, what its experiments use): a coordinate most
sites push the same way moves as FedAvg would, one they disagree on is scaled by its agreement
rather than zeroed as the hard AND-mask [A_j >= tau] would. tau = `strategy.mask_threshold`
(0 gives FedAvg times server_lr, 1 masks every coordinate short of unanimity), the server step
size `strategy.server_lr`. The agreement counts each site once whatever its size, as in the
paper; the averaged update keeps the run's weighting (`strategy.weighting`: examples or uniform).
sign(0) = 0: a coordinate a site trained but did not move counts against agreement.

Parameter groups. Everything is per group (`encoder/<modality>`, `fusion`, `head/<task>`), over
the sites that trained that group this round: a site's untouched copy of an encoder it never ran
has Delta = 0 there and would otherwise dilute the agreement of the sites that did. So n is the
group's number of trainers; a group trained by one site has A = 1 wherever that site moved and
takes its update unmasked (one site cannot disagree with itself); a group nobody trained keeps
its value. Departure: none in the maths; the paper has every parameter trained by every client,
and the per-group agreement is what that definition means when a group has its own trainers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from federated.core.config.schema import StrategyConfig, StrategySettings
from federated.core.models import group_of
from strategies.aggregation import groupwise_aggregate, normalised_weights, same_layout
from strategies.base import Arrays, MultiMedStrategy
from strategies.registry import register_strategy
from strategies.secure_sums import SecureSupport


@dataclass(frozen=True)
class FedGMASettings(StrategySettings):
    mask_threshold: float = 0.4  # tau: agreement at or above it keeps the coordinate whole
    server_lr: float = 1.0  # server step size on the masked mean update

    def __post_init__(self) -> None:
        self.require("mask_threshold", 0.0 <= self.mask_threshold <= 1.0, "must be in [0, 1]")
        self.require("server_lr", math.isfinite(self.server_lr) and self.server_lr > 0.0, "must be finite and > 0")


# --- maths -----------------------------------------------------------------------------------


def sign_agreement(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """A = |sum_k sign(Delta_k)| / n, element-wise over n same-shaped updates, in [0, 1]."""
    if not deltas:
        raise ValueError("sign_agreement needs at least one update")
    total = np.zeros(np.shape(deltas[0]))
    for d in deltas:
        total += np.sign(np.asarray(d, dtype=np.float64))
    return np.abs(total) / len(deltas)


def soft_mask(agreement: np.ndarray, threshold: float) -> np.ndarray:
    """FedGMA's soft mask: 1 where agreement >= threshold, the agreement itself elsewhere."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    a = np.asarray(agreement, dtype=np.float64)
    return np.where(a >= threshold, 1.0, a)


def gma_step(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    threshold: float,
    server_lr: float = 1.0,
) -> dict[str, np.ndarray]:
    """w + server_lr * soft_mask(A, threshold) * sum_k p_k (w_k - w), for every key of `current`.

    `updates` are the sites' models w_k (their keys and shapes those of `current`), `weights`
    their positive weights (normalised to p_k). Computed in float64, each key cast back to
    `current`'s dtype. A NaN in any update makes that coordinate NaN.
    """
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be positive and finite, got {server_lr}")
    layout = same_layout(updates, "gma_step", reference=current)
    p = normalised_weights(weights, len(updates))
    out: dict[str, np.ndarray] = {}
    for key, (_, dtype) in layout.items():
        w = np.asarray(current[key], dtype=np.float64)
        deltas = [np.asarray(u[key], dtype=np.float64) - w for u in updates]
        mean = sum((pk * d for pk, d in zip(p, deltas, strict=True)), np.zeros_like(w))
        mask = soft_mask(sign_agreement(deltas), threshold)
        out[key] = (w + server_lr * mask * mean).astype(dtype, copy=False)
    return out


def groupwise_gma_step(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    group_weights: Sequence[Mapping[str, float]],
    threshold: float,
    server_lr: float = 1.0,
) -> dict[str, np.ndarray]:
    """gma_step per parameter group, over the updates with a positive weight for that group;
    a group no update trained keeps its current value."""

    def step(group_updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        group_current = {k: current[k] for k in group_updates[0]}
        return gma_step(group_current, group_updates, weights, threshold, server_lr)

    return groupwise_aggregate(current, updates, group_weights, group_of, step)


# --- server --------------------------------------------------------------------------------


@register_strategy("fedgma", FedGMASettings)
class FedGMA(MultiMedStrategy):
    SECURE = SecureSupport.refused("masks coordinates by the agreement of the sites' individual update signs")

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.settings = cfg.settings_as(FedGMASettings)

    def aggregate(
        self, current: Arrays, updates: list[Arrays], weights: list[float], group_weights: list[dict[str, float]]
    ) -> Arrays:
        s = self.settings
        return groupwise_gma_step(current, updates, group_weights, s.mask_threshold, s.server_lr)
