"""One round of a federation: train (configure, exchange, aggregate), then evaluate.

The round calls the strategy's configure_train / aggregate_train (strategies/round_strategy.py),
so any strategy with that interface plugs in: training goes to the training sites only,
evaluation to every site (ID and OOD). `train_round` is one plain training round,
`train_round_evaluating` the same with the previous model's evaluation in its exchange
(engine.evaluate_with_train); under secure aggregation the round is federated/server/secure_train.py's.
Messages travel through federated/server/transport.py; a round's record goes to the callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp.grid import Grid

from federated.core.arrays import record_to_numpy
from federated.core.config.protected import protected_settings
from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    EVALUATE_ROUND,
    EVALUATED,
    METRICS_RECORD,
    NUM_EXAMPLES,
    PRIVACY_RECORD,
    STEPS,
    TRAIN_LOSS,
    report_from_record,
)
from federated.core.replies import error_reason
from federated.server.callbacks import Callback
from federated.server.evaluation import SiteEvaluation, SiteProfile, summarize
from federated.server.records import FederationTiming, RoundRecord, TrainStats
from federated.server.results import PrivacyReport
from federated.server.round_evaluation import evaluate_all, evaluate_messages, site_evaluations
from federated.server.site_agreement import FederationError
from federated.server.transport import NodeSubsetGrid, exchange, lost_reply
from strategies.round_strategy import RoundStrategy
from strategies.site_dp import server_privacy_report


@dataclass
class Federation:
    """The parts of a run that every round uses: who answered the handshake, the strategy, the timing."""

    grid: Grid
    cfg: ExperimentConfig
    profiles: dict[int, SiteProfile]  # node id -> profile, in site order
    strategy: RoundStrategy  # a registered strategy, or site-level DP's wrapper of one (strategies/)
    training_grid: NodeSubsetGrid  # the training sites only, so the strategy samples among them
    timeout: float | None  # engine.round_timeout_s, None for no limit
    timing: FederationTiming = field(default_factory=FederationTiming)
    site_config: dict[str, str] = field(default_factory=dict)  # what every train/evaluate message carries
    model_keys: list[str] = field(default_factory=list)  # the global model's arrays, in order
    secure_withheld: str = "[]"  # secure aggregation: the groups left out in the last round (JSON)

    def site(self, node: int) -> str:
        return self.profiles[node].site


@dataclass
class TrainOutcome:
    """What one training round produced, before the new model is evaluated."""

    arrays: ArrayRecord | None  # the aggregated model; None when nothing could be aggregated
    train: dict[str, TrainStats] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # "train:site" -> reason
    rejections: dict[str, str] = field(default_factory=dict)  # site -> why its update was refused
    # nodes with no reply within engine.round_timeout_s, or one whose content was lost (transport.lost_reply)
    unanswered: set[int] = field(default_factory=set)
    update_norms: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # site -> (norm, ratio)
    privacy: dict[str, PrivacyReport] = field(default_factory=dict)
    trained_with: dict[str, Any] = field(default_factory=dict)  # the round's privacy/secure-aggregation settings
    train_s: float = 0.0
    aggregate_s: float = 0.0
    # Secure aggregation: the round was refused (a site's declaration, or an unmasked sum that fails
    # the checks on it); the model keeps its value and the run goes on, whatever on_too_few_valid says
    refused: bool = False


def collect_replies(fed: Federation, messages: list[Message], replies: list[Message], into: TrainOutcome) -> None:
    """Training reports, failures (late or erroring sites) and privacy spend, per site."""
    answered = {m.metadata.src_node_id for m in replies}
    for m in messages:  # no reply within engine.round_timeout_s: the round went on without it
        if m.metadata.dst_node_id not in answered:
            into.unanswered.add(m.metadata.dst_node_id)
            into.failures[f"train:{fed.site(m.metadata.dst_node_id)}"] = (
                f"no reply within engine.round_timeout_s={fed.cfg.engine.round_timeout_s}"
            )
    for msg in replies:
        site = fed.site(msg.metadata.src_node_id)
        if msg.has_error():
            into.failures[f"train:{site}"] = error_reason(msg)
            if lost_reply(msg):  # dead or cut off: awaited briefly in the round's evaluation, as no reply
                into.unanswered.add(msg.metadata.src_node_id)
            continue
        stats: dict[str, Any] = dict(msg.content.metric_records[METRICS_RECORD])
        into.train[site] = TrainStats(float(stats[TRAIN_LOSS]), float(stats[NUM_EXAMPLES]), float(stats[STEPS]))
        if PRIVACY_RECORD in msg.content.config_records:
            into.privacy[site] = report_from_record(msg.content.config_records[PRIVACY_RECORD])
    into.privacy.update(
        server_privacy_report(fed.strategy, [fed.site(m.metadata.src_node_id) for m in replies if not m.has_error()])
    )
    into.rejections = {r.site: r.reason for r in fed.strategy.last_rejections}
    into.trained_with = protected_settings(fed.cfg)
    into.update_norms = dict(fed.strategy.last_update_norms)


def train_round(fed: Federation, rnd: int, arrays: ArrayRecord) -> TrainOutcome:
    """One training round in the clear: configure, exchange with the training sites, aggregate, collect."""
    t0 = time.perf_counter()
    messages = list(fed.strategy.configure_train(rnd, arrays, ConfigRecord(dict(fed.site_config)), fed.training_grid))
    replies = exchange(fed.grid, messages, fed.timeout)
    return _aggregated(fed, rnd, messages, replies, t0)


def train_round_evaluating(
    fed: Federation, rnd: int, arrays: ArrayRecord, scored_round: int
) -> tuple[TrainOutcome, list[SiteEvaluation], dict[str, str]]:
    """Round `rnd`'s training and, in the same exchange, round `scored_round`'s evaluation of
    `arrays` (the model round `rnd` starts from): a training site scores it before it trains
    (EVALUATE_ROUND in its train message), every other site gets an evaluate message. Where the
    strategy sends a site other arrays, the evaluation goes first in an exchange of its own (a
    site still scores the model before it trains). Returns the training outcome, the evaluations
    in site order and site -> why one is missing."""
    t0 = time.perf_counter()
    config = ConfigRecord({**fed.site_config, EVALUATE_ROUND: scored_round})
    messages = list(fed.strategy.configure_train(rnd, arrays, config, fed.training_grid))
    if any(m.content.array_records.get(ARRAYS_RECORD) is not arrays for m in messages):
        for m in messages:
            m.content.config_records[CONFIG_RECORD].pop(EVALUATE_ROUND, None)
        evals, failures = timed_evaluation(fed, arrays, scored_round)
        t_evaluated = time.perf_counter()
        replies = exchange(fed.grid, messages, fed.timeout)
        return _aggregated(fed, rnd, messages, replies, t_evaluated), evals, failures
    training = {m.metadata.dst_node_id for m in messages}
    others = [n for n in fed.profiles if n not in training]
    replies = exchange(
        fed.grid, [*evaluate_messages(others, arrays, scored_round, fed.site_config), *messages], fed.timeout
    )
    # Each node got one message; a reply is charged to its node (a SuperLink-made error stub too,
    # whose message type is not the message's).
    trained = [m for m in replies if m.metadata.src_node_id in training]
    evaluated = [m for m in replies if m.metadata.src_node_id not in training]
    by_training = {n: p for n, p in fed.profiles.items() if n in training}
    evals, failures = site_evaluations(evaluated, {n: fed.profiles[n] for n in others}, fed.timeout)
    riding, riding_failures = site_evaluations(trained, by_training, fed.timeout, prefix=EVALUATED)
    failures.update(riding_failures)
    rank = {p.site: i for i, p in enumerate(fed.profiles.values())}
    evals = sorted([*evals, *riding], key=lambda e: rank[e.profile.site])
    for m in trained:  # what the strategy aggregates is a train reply like any other
        if not m.has_error():
            for name in [k for k in m.content if k.startswith(EVALUATED)]:
                del m.content[name]
    return _aggregated(fed, rnd, messages, trained, t0), evals, failures


def _aggregated(fed: Federation, rnd: int, messages: list[Message], replies: list[Message], t0: float) -> TrainOutcome:
    """Aggregate a round's train replies (their exchange began at t0) and collect what sites reported."""
    t1 = time.perf_counter()
    new_arrays, _ = fed.strategy.aggregate_train(rnd, replies)
    t2 = time.perf_counter()
    fed.timing.train_s += t1 - t0
    fed.timing.aggregate_s += t2 - t1
    outcome = TrainOutcome(new_arrays, train_s=t1 - t0, aggregate_s=t2 - t1)
    collect_replies(fed, messages, replies, outcome)
    return outcome


def accepted_model(cfg: ExperimentConfig, rnd: int, outcome: TrainOutcome, current: ArrayRecord) -> ArrayRecord:
    """The model the next round starts from: the aggregate, or (strategy.on_too_few_valid=skip, or a
    refused secure round) the current one when nothing could be aggregated. Anything else stops the
    run, naming why."""
    if outcome.arrays is None:
        if cfg.strategy.on_too_few_valid != "skip" and not outcome.refused:
            reasons = {**outcome.failures, **outcome.rejections}
            detail = "; ".join(f"{k}: {v}" for k, v in reasons.items()) or "no replies"
            raise FederationError(f"round {rnd}: no training update could be aggregated ({detail})")
        return current
    bad = [k for k, a in record_to_numpy(outcome.arrays).items() if not np.isfinite(a).all()]
    if bad:  # defence in depth: validation should make this impossible
        raise FederationError(
            f"round {rnd}: the aggregated model has non-finite values in {bad[:3]}; refusing to continue with it"
        )
    return outcome.arrays


def evaluate_round(
    fed: Federation, rnd: int, arrays: ArrayRecord, callbacks: Sequence[Callback], outcome: TrainOutcome | None = None
) -> RoundRecord:
    """Every site evaluates `arrays`; the round's record goes to every callback."""
    evals, failures = timed_evaluation(fed, arrays, rnd, outcome.unanswered if outcome is not None else ())
    return round_record(rnd, evals, failures, callbacks, outcome)


def timed_evaluation(
    fed: Federation, arrays: ArrayRecord, rnd: int, late: Collection[int] = ()
) -> tuple[list[SiteEvaluation], dict[str, str]]:
    """evaluate_all in an exchange of its own, its time counted as the run's evaluation time."""
    t0 = time.perf_counter()
    evals, failures = evaluate_all(fed.grid, arrays, rnd, fed.profiles, fed.timeout, fed.site_config, late)
    fed.timing.evaluate_s += time.perf_counter() - t0
    return evals, failures


def round_record(
    rnd: int,
    evals: list[SiteEvaluation],
    failures: dict[str, str],
    callbacks: Sequence[Callback],
    outcome: TrainOutcome | None = None,
) -> RoundRecord:
    """Round `rnd`'s record from its evaluations and its training outcome; every callback gets it."""
    record = RoundRecord(rnd, evals, summarize(evals))
    if outcome is not None:
        record.train, record.failures, record.rejections = outcome.train, outcome.failures, outcome.rejections
        record.update_norms = outcome.update_norms
        record.skipped, record.privacy = outcome.arrays is None, outcome.privacy
        record.trained_with = outcome.trained_with
        record.train_s, record.aggregate_s = outcome.train_s, outcome.aggregate_s
    record.failures.update({f"evaluate:{k}": v for k, v in failures.items()})
    for what, reason in sorted(record.failures.items()):  # in the run's log too (`flwr log`), not only the summary
        log(INFO, "round %d: %s failed: %s", rnd, what, reason)
    for cb in callbacks:
        cb.on_round_end(record)
    return record
