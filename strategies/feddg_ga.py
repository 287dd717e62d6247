"""FedDG-GA (Zhang et al., "Federated Domain Generalization with Generalization Adjustment", CVPR 2023).

Aggregation weights a_k, one per training site, kept across rounds and moved each round by the
site's generalisation gap, so that sites the global model fits worst get more say.

Gap (paper Eq. 7): G_k = L_k(theta) - L_k(theta_k), on site k's own training data, with theta the
global model and theta_k the site's local model trained from the previous global model. Here the
site computes L_k(theta^{r-1}) of the global model it receives in round r (`SiteRound.training_loss`,
in before_train) and, after its training in round r-1, L_k(theta_k^{r-1}) of its local model,
kept in its Flower Context until the next round (saved with the site's state, so a resumed run
continues exactly). theta^{r-1} was aggregated from exactly those theta_k^{r-1}: the pair the
paper's gap compares. The site sends both losses; the server forms G_k. Round 1 has no gaps
(no local model yet), so its weights are the initial ones.

Weight update (paper Eq. 9-10, Algorithm 1), at round r over the sites that reported a gap:
    a_k <- a_k + d_r * (G_k - mean_j G_j) / max_j |G_j - mean_j G_j|
then a_k <- max(a_k, 0) and a <- a / sum(a) over all training sites; a site that reported no gap
this round keeps its a_k (before renormalisation). When every centred gap is 0 nothing moves.
Step size (paper Sec. 4.3, linear decay): d_r = d * (1 - (r - 1) / R) for the adjustment at
round r (it uses the gaps of the model of round r - 1, the paper's d^{r-1}), d =
`strategy.step_size` (0.1, as in the paper), R = `strategy.rounds_for_schedule`; the strategy is
not told the run's number of rounds (it gets only its own config section), so R is a setting and
0 (the default) means no decay. Initial weights: n_k / n over the training sites' declared
examples (strategy.weighting=examples), or 1/K (uniform): round 1 is modality_fedavg.

Parameter groups: each group is averaged over the sites that trained it, with their a_k
renormalised over those sites. A group only some sites train is thus weighted by those sites'
relative gaps only; a site's a_k is one number for all its groups (the paper has one model per
site). If every trainer of a group has a_k = 0, its trainers are averaged with equal weights
(the limit of equal tiny weights; logged in `last_fallbacks`), never frozen.

Departures from the paper and its code (github.com/MediaBrain-SJTU/FedDG-GA): the losses are
training losses (the paper's code evaluates the sites' validation splits; sites here hold only a
train and a test split, and the test split scores the run). The official code divides d by the
number of sites (set strategy.step_size=d/K to follow it: with many sites, d = 0.1 against
weights near 1/K can zero a site's weight within a few rounds) and omits the centring of G
before the max-normalisation; this follows the paper's equations. With strategy.fraction_train
< 1 a site's local loss may be from an older round than r - 1 (its latest local model): its gap
then compares the current global model with that older local model. The gap is a site-reported
number: a site can claim a large one, but the max-normalisation bounds any site's move per
round to d_r.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message

from federated.core.config.schema import StrategyConfig, StrategySettings
from federated.core.models import group_of
from federated.core.protocol import CONFIG_RECORD, record_number, record_round
from strategies.aggregation import groupwise_weighted_mean
from strategies.base import Arrays, MultiMedStrategy, Update
from strategies.client_side import ClientAlgorithm, ClientRound, Record, SiteRound
from strategies.registry import register_strategy
from strategies.secure_sums import SecureSupport

log = logging.getLogger(__name__)

# The site's reply record and the keys in it (site -> server), and its own state across rounds.
GA_RECORD = "feddg-ga"
GLOBAL_LOSS = "global-loss"  # L_k of the global model received this round
LOCAL_LOSS = "local-loss"  # L_k of the site's local model after its last training
LOCAL_ROUND = "local-round"  # the round that local model was trained in
GA_STATE = "feddg-ga-local"  # Context.state: {LOCAL_LOSS, LOCAL_ROUND} of the last training


@dataclass(frozen=True)
class FedDGGASettings(StrategySettings):
    step_size: float = 0.1  # d, the paper's step size of the weight adjustment
    rounds_for_schedule: int = 0  # R of the linear decay d_r = d (1 - (r - 1) / R); 0 = no decay

    def __post_init__(self) -> None:
        self.require("step_size", math.isfinite(self.step_size) and 0.0 < self.step_size <= 1.0, "must be in (0, 1]")
        self.require("rounds_for_schedule", self.rounds_for_schedule >= 0, "must be >= 0 (0 = no decay)")


# --- pure maths ----------------------------------------------------------------------------


def ga_step_size(step_size: float, server_round: int, rounds_for_schedule: int) -> float:
    """d_r = d * (1 - (r - 1) / R) for the adjustment made at server round r >= 1, floored at 0;
    d itself when R = 0 (no decay)."""
    if rounds_for_schedule <= 0:
        return step_size
    return step_size * max(0.0, 1.0 - (server_round - 1) / rounds_for_schedule)


def adjust_weights(weights: Mapping[str, float], gaps: Mapping[str, float], step: float) -> dict[str, float]:
    """One generalisation adjustment: a_k += step * (G_k - mean G) / max |G - mean G| for the sites
    in `gaps` (means over them), then clipped at 0 and renormalised over all of `weights`.

    Sites without a gap keep their weight before renormalisation. Nothing moves when every
    centred gap is 0 (one reporter, or equal gaps). The centred gaps sum to 0, so before
    clipping the total is unchanged and after it is >= 1: the renormalisation never divides by 0.
    """
    unknown = sorted(set(gaps) - set(weights))
    if unknown:
        raise ValueError(f"gaps of sites without a weight: {unknown}")
    a = {k: float(v) for k, v in weights.items()}
    if any(not math.isfinite(v) or v < 0 for v in a.values()) or sum(a.values()) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {a}")
    total = sum(a.values())
    a = {k: v / total for k, v in a.items()}
    if not gaps:
        return a
    names = list(gaps)
    g = np.asarray([gaps[k] for k in names], dtype=np.float64)
    if not np.all(np.isfinite(g)):
        raise ValueError(f"gaps must be finite, got {dict(gaps)}")
    centred = g - g.mean()
    scale = float(np.max(np.abs(centred)))
    if scale == 0.0:
        return a
    for name, c in zip(names, centred, strict=True):
        a[name] = max(0.0, a[name] + step * float(c) / scale)
    total = sum(a.values())
    return {k: v / total for k, v in a.items()}


def site_group_weights(
    site_weights: Sequence[float], group_examples: Sequence[Mapping[str, float]]
) -> tuple[list[dict[str, float]], list[str]]:
    """Per update, {group: its site's weight} over the groups it trained (examples > 0), for
    `groupwise_weighted_mean`, which renormalises them over each group's trainers; and the
    groups whose trainers all have weight 0: they get weight 1 each (an equal mean) instead."""
    if len(site_weights) != len(group_examples):
        raise ValueError(f"{len(site_weights)} site weights but {len(group_examples)} group maps")
    trainers: dict[str, list[int]] = {}
    for i, groups in enumerate(group_examples):
        for g, n in groups.items():
            if n > 0:
                trainers.setdefault(g, []).append(i)
    zero = sorted(g for g, idx in trainers.items() if all(site_weights[i] <= 0 for i in idx))
    out: list[dict[str, float]] = [{} for _ in site_weights]
    for g, idx in trainers.items():
        for i in idx:
            out[i][g] = 1.0 if g in zero else float(site_weights[i])
    return out, zero


# --- site side -----------------------------------------------------------------------------


class FedDGGARound(ClientRound):
    def __init__(self, site: SiteRound, server_round: int, global_loss: float) -> None:
        super().__init__()
        self.site, self.server_round, self.global_loss = site, server_round, global_loss
        self.previous = site.context.state.config_records.get(GA_STATE)

    def after_train(self, steps: int) -> dict[str, Record]:
        values = ConfigRecord({GLOBAL_LOSS: self.global_loss})
        if self.previous is not None:
            values[LOCAL_LOSS] = record_number(self.previous, LOCAL_LOSS)
            values[LOCAL_ROUND] = int(record_number(self.previous, LOCAL_ROUND))
        if steps > 0:  # the model now holds this round's local model
            self.site.context.state[GA_STATE] = ConfigRecord(
                {LOCAL_LOSS: self.site.training_loss(), LOCAL_ROUND: self.server_round}
            )
        return {GA_RECORD: values}


class FedDGGAClient(ClientAlgorithm):
    """Measures the received global model's loss before training and the local model's after."""

    def before_train(self, site: SiteRound) -> ClientRound:
        server_round = record_round(site.content.config_records[CONFIG_RECORD])
        return FedDGGARound(site, server_round, site.training_loss())


# --- server side ---------------------------------------------------------------------------


def _loss_value(record: ConfigRecord, key: str) -> float | str:
    value = record.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"'{GA_RECORD}' record: {key} is {value!r}, not a number"
    if not math.isfinite(value) or value < 0:
        return f"'{GA_RECORD}' record: {key}={value} must be finite and >= 0"
    return float(value)


@register_strategy("feddg_ga", FedDGGASettings, client=FedDGGAClient)
class FedDGGA(MultiMedStrategy):
    SECURE = SecureSupport.refused("reweights each site by its own generalisation gap after seeing its update")
    STATE = ("site_weights",)

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        super().__init__(cfg, n_train_sites)
        self.settings = cfg.settings_as(FedDGGASettings)
        self.site_weights: dict[str, float] | None = None  # site name -> a_k, summing to 1
        self.last_gaps: dict[str, float] = {}

    def parse(self, msg: Message, current: Arrays) -> Update | str:
        parsed = super().parse(msg, current)
        if isinstance(parsed, str):
            return parsed
        record = msg.content.config_records.get(GA_RECORD)
        if record is None:
            return f"no '{GA_RECORD}' record (FedDG-GA sites must send their losses)"
        for key in (GLOBAL_LOSS, LOCAL_LOSS) if LOCAL_LOSS in record else (GLOBAL_LOSS,):
            value = _loss_value(record, key)
            if isinstance(value, str):
                return value
        return parsed

    def _initial_weights(self, names: Sequence[str], updates: Sequence[Update]) -> dict[str, float]:
        """n_k / n over the declared training sites (1/K with weighting=uniform); without a
        handshake, over this round's updates."""
        if self.declared_examples:
            sizes = {self.site_names.get(n, str(n)): float(x) for n, x in self.declared_examples.items()}
        else:
            sizes = {name: u.num_examples for name, u in zip(names, updates, strict=True)}
        if self.cfg.weighting == "uniform":
            sizes = dict.fromkeys(sizes, 1.0)
        total = sum(sizes.values())
        return {k: v / total for k, v in sizes.items()}

    def aggregate_updates(self, current: Arrays, updates: list[Update]) -> Arrays:
        nodes = [u.message.metadata.src_node_id for u in updates]
        names = [self.site_names.get(n, str(n)) for n in nodes]
        weights = dict(self.site_weights) if self.site_weights is not None else self._initial_weights(names, updates)
        for name in names:  # a site the handshake did not declare: the mean weight, then renormalised
            if name not in weights:
                weights[name] = sum(weights.values()) / max(1, len(weights)) or 1.0
        gaps: dict[str, float] = {}
        for name, u in zip(names, updates, strict=True):
            record = u.message.content.config_records[GA_RECORD]
            if LOCAL_LOSS in record:
                gaps[name] = record_number(record, GLOBAL_LOSS) - record_number(record, LOCAL_LOSS)
        step = ga_step_size(self.settings.step_size, self.round, self.settings.rounds_for_schedule)
        self.site_weights = adjust_weights(weights, gaps, step)
        self.last_gaps = gaps
        if gaps:
            log.info(
                "round %d: FedDG-GA gaps %s, step %.4g -> weights %s",
                self.round,
                {k: round(v, 4) for k, v in gaps.items()},
                step,
                {k: round(v, 4) for k, v in self.site_weights.items()},
            )
        group_weights, zero = site_group_weights(
            [self.site_weights[n] for n in names], [u.group_examples for u in updates]
        )
        for g in zero:
            line = f"round {self.round}: every trainer of {g} has FedDG-GA weight 0; averaged with equal weights"
            log.warning(line)
            self.last_fallbacks.append(line)
        return groupwise_weighted_mean(current, [u.arrays for u in updates], group_weights, group_of)
