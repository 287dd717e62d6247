"""q-FFL by q-FedAvg (Li et al., "Fair Resource Allocation in Federated Learning", ICLR 2020).

q-FFL minimises f_q(w) = sum_k p_k / (q + 1) * F_k(w)^(q + 1): with q > 0 the sites the model
serves worst (large loss F_k) weigh more; q = 0 is FedAvg's objective. q-FedAvg (the paper's
Algorithm 3) turns each site's local run into a gradient estimate and takes one step:

    Delta_k = L (w - w_k)                                        (L = 1 / local learning rate)
    h_k     = q (F_k + eps)^(q - 1) ||Delta_k||^2 + L (F_k + eps)^q
    w_new   = w - sum_k p_k (F_k + eps)^q Delta_k / sum_k p_k h_k

with F_k = F_k(w), the loss of the *received global model* on site k's training data (the
paper's; `SiteRound.training_loss`, measured before local training and sent in the 'qffl'
record). eps = 1e-10 as in Flower's QFedAvg, whose maths `qffl_delta_and_h` reproduces
(tests/strategies/test_qffl.py checks it against flwr.serverapp.strategy.qfedavg).

p_k: the paper samples sites with probability p_k = n_k / n and sums uniformly over the sample
(Flower sums uniformly over whoever replied). Here every sampled site takes part, so p_k enters
as a weight: the group's examples at the site with strategy.weighting=examples, 1 with
uniform. With q = 0, h_k = L and the step is w - sum p_k (w - w_k) / sum p_k, i.e. exactly the
(modality-aware) weighted mean. Flower reads F_k from the local training loss and its
legacy strategy from a central evaluation; both differ from the paper's F_k(w), used here.

L: `strategy.lipschitz`; 0 (the default) means 1 / train.lr, as the paper and Flower set it. The
server is not given the train section, so each site sends 1 / its train.lr with its loss (the
run's one config: they agree) and the server uses the median of the round's values (one site
cannot set it alone).

Parameter groups: the step is taken per group over the sites that trained the group, with
Delta_k, ||Delta_k||^2 and h_k restricted to that group's parameters: a block-coordinate
q-FedAvg step. h_k estimates the curvature along the step actually taken; a whole-model norm
would let a site's large update of an encoder shrink the step of a head it shares with sites
that never hold that modality. With one group (or every site training every group) this is
the paper's step on the whole model. A group nobody trained keeps its value.

Trust: F_k is site-reported (as in the paper): a site claiming a huge loss pulls the model
towards its update. It must be finite and >= 0, or the update is refused.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Message

from federated.core.config.schema import ExperimentConfig, StrategyConfig, StrategySettings
from federated.core.models import group_of
from federated.core.protocol import record_number
from strategies.base import Arrays, MultiMedStrategy, Update
from strategies.client_side import ClientAlgorithm, ClientRound, Record, SiteRound
from strategies.registry import register_strategy
from strategies.secure_sums import SecureSupport

# The site's reply record and the keys in it (site -> server).
QFFL_RECORD = "qffl"
GLOBAL_LOSS = "global-loss"  # F_k: the loss of the global model received this round
LIPSCHITZ = "lipschitz"  # 1 / the site's train.lr

LOSS_EPS = 1e-10  # Flower's offset, keeps F^(q - 1) finite at F = 0


@dataclass(frozen=True)
class QFFLSettings(StrategySettings):
    q: float = 1.0  # fairness: 0 = FedAvg's objective, larger favours the worst-served sites more
    lipschitz: float = 0.0  # L of the step; 0 = 1 / train.lr (sent by the sites)

    def __post_init__(self) -> None:
        self.require("q", math.isfinite(self.q) and self.q >= 0.0, "must be finite and >= 0")
        self.require(
            "lipschitz", math.isfinite(self.lipschitz) and self.lipschitz >= 0.0, "must be finite and >= 0 (0 = 1/lr)"
        )

    def experiment_checks(self, cfg: ExperimentConfig) -> list[tuple[str, bool, str]]:
        # Measured: with Adam (lr 0.002, L = 500) a 2-round smoke run stalled at ID 0.18 against 0.38.
        return [
            (
                "train.optimizer",
                cfg.train.optimizer == "sgd",
                "must be sgd with strategy=qffl: its step reads L(w - w_k) as L x the local gradient steps, "
                "which holds for SGD at lr 1/L, not for Adam's normalised steps",
            )
        ]


# --- pure maths ----------------------------------------------------------------------------


def qffl_delta_and_h(
    current: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray], loss: float, q: float, lipschitz: float
) -> tuple[dict[str, np.ndarray], float]:
    """(F^q Delta, h) of one site, in float64: Delta = L (w - w_k), F = loss + 1e-10,
    h = q F^(q - 1) ||Delta||^2 + L F^q, the norm over all keys given (Flower's
    compute_delta_and_h, on a dict and without modifying its inputs)."""
    if not (math.isfinite(loss) and loss >= 0):
        raise ValueError(f"loss must be finite and >= 0, got {loss}")
    if not (math.isfinite(q) and q >= 0):
        raise ValueError(f"q must be finite and >= 0, got {q}")
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"lipschitz must be finite and > 0, got {lipschitz}")
    grads = {k: lipschitz * (np.asarray(current[k], np.float64) - np.asarray(local[k], np.float64)) for k in current}
    norm = float(sum(np.sum(np.square(g)) for g in grads.values()))
    f = loss + LOSS_EPS
    f_q = float(np.float_power(f, q))
    h = q * float(np.float_power(f, q - 1)) * norm + lipschitz * f_q
    return {k: f_q * g for k, g in grads.items()}, h


def qffl_step(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    losses: Sequence[float],
    weights: Sequence[float],
    q: float,
    lipschitz: float,
) -> dict[str, np.ndarray]:
    """w - sum_k p_k F_k^q Delta_k / sum_k p_k h_k over the given keys (`current`'s), each key
    in `current`'s dtype; p_k = `weights` (positive, finite; their scale cancels)."""
    if not updates:
        raise ValueError("qffl_step needs at least one update")
    if not len(updates) == len(losses) == len(weights):
        raise ValueError(f"{len(updates)} updates, {len(losses)} losses, {len(weights)} weights")
    p = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    for i, u in enumerate(updates):
        for k, v in current.items():
            if k not in u or np.shape(u[k]) != np.shape(v):
                raise ValueError(f"update {i} lacks key {k!r} or has another shape")
    total = {k: np.zeros(np.shape(v)) for k, v in current.items()}
    sum_h = 0.0
    for u, loss, pk in zip(updates, losses, p, strict=True):
        delta, h = qffl_delta_and_h(current, u, loss, q, lipschitz)
        for k in total:
            total[k] += pk * delta[k]
        sum_h += float(pk) * h
    return {
        k: (np.asarray(v, np.float64) - total[k] / sum_h).astype(np.asarray(v).dtype, copy=False)
        for k, v in current.items()
    }


def groupwise_qffl(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    losses: Sequence[float],
    group_weights: Sequence[Mapping[str, float]],
    group_of: Callable[[str], str],
    q: float,
    lipschitz: float,
) -> dict[str, np.ndarray]:
    """`qffl_step` for each parameter group over the updates i with group_weights[i][g] > 0
    (those weights as p_k); a group no update trained keeps its current value."""
    if not len(updates) == len(losses) == len(group_weights):
        raise ValueError(f"{len(updates)} updates, {len(losses)} losses, {len(group_weights)} group weight maps")
    by_group: dict[str, list[str]] = {}
    for key in current:
        by_group.setdefault(group_of(key), []).append(key)
    out: dict[str, np.ndarray] = {}
    for group, keys in by_group.items():
        part = {k: current[k] for k in keys}
        trainers = [(i, float(gw.get(group, 0.0))) for i, gw in enumerate(group_weights)]
        trainers = [(i, w) for i, w in trainers if w > 0]
        if not trainers:
            out.update({k: np.asarray(v) for k, v in part.items()})
            continue
        out.update(
            qffl_step(
                part,
                [updates[i] for i, _ in trainers],
                [losses[i] for i, _ in trainers],
                [w for _, w in trainers],
                q,
                lipschitz,
            )
        )
    return out


# --- site side -----------------------------------------------------------------------------


class QFFLRound(ClientRound):
    def __init__(self, global_loss: float, lipschitz: float) -> None:
        super().__init__()
        self.global_loss, self.lipschitz = global_loss, lipschitz

    def after_train(self, steps: int) -> dict[str, Record]:
        return {QFFL_RECORD: ConfigRecord({GLOBAL_LOSS: self.global_loss, LIPSCHITZ: self.lipschitz})}


class QFFLClient(ClientAlgorithm):
    """Measures F_k(w) of the received global model before training; sends it with 1 / lr."""

    def before_train(self, site: SiteRound) -> ClientRound:
        with torch.no_grad():
            loss = float(site.training_loss())
        return QFFLRound(loss, 1.0 / site.train.lr)


# --- server side ---------------------------------------------------------------------------


def _number(record: ConfigRecord, key: str, positive: bool) -> float | str:
    value = record.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"'{QFFL_RECORD}' record: {key} is {value!r}, not a number"
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    bound = "> 0" if positive else ">= 0"
    return float(value) if ok else f"'{QFFL_RECORD}' record: {key}={value} must be finite and {bound}"


@register_strategy("qffl", QFFLSettings, client=QFFLClient)
class QFFL(MultiMedStrategy):
    SECURE = SecureSupport.refused("weighs each site's update by its own loss")

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.settings = cfg.settings_as(QFFLSettings)
        self.last_lipschitz = math.nan  # the L of the last step

    def parse(self, msg: Message, current: Arrays) -> Update | str:
        parsed = super().parse(msg, current)
        if isinstance(parsed, str):
            return parsed
        record = msg.content.config_records.get(QFFL_RECORD)
        if record is None:
            return f"no '{QFFL_RECORD}' record (q-FFL sites must send the global model's loss)"
        for key, positive in ((GLOBAL_LOSS, False), (LIPSCHITZ, True)):
            value = _number(record, key, positive)
            if isinstance(value, str):
                return value
        return parsed

    def aggregate_updates(self, current: Arrays, updates: list[Update]) -> Arrays:
        records = [u.message.content.config_records[QFFL_RECORD] for u in updates]
        losses = [record_number(r, GLOBAL_LOSS) for r in records]
        lipschitz = self.settings.lipschitz or statistics.median(record_number(r, LIPSCHITZ) for r in records)
        self.last_lipschitz = lipschitz
        if self.cfg.weighting == "uniform":
            group_weights = [{g: 1.0 for g, n in u.group_examples.items() if n > 0} for u in updates]
        else:
            group_weights = [dict(u.group_examples) for u in updates]
        return groupwise_qffl(
            current, [u.arrays for u in updates], losses, group_weights, group_of, self.settings.q, lipschitz
        )
