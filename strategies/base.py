"""The template every MultiMed strategy follows: validate, aggregate, update the server model.

A Flower FedAvg subclass, so sampling, messages and the Strategy interface are Flower's; what
differs per algorithm is three small hooks:

    train_config(round)                 extra config sent to sites (e.g. FedProx's mu)
    aggregate(current, updates, ...)    pure maths from strategies.aggregation
    server_update(current, aggregated)  server-side optimiser step (FedAdam & co.)

Every reply passes `validate_update` first (finite values, the global model's keys, shapes and
dtypes, a plausible example count against what the site declared in the handshake), then the
checks against what the server knows from the handshake (`know_sites`): a site may move and
claim only the parameter groups of the modalities and tasks it declared, a site that declared
more than `strategy.max_site_weight_share` of all training examples has every update refused,
and an update whose norm exceeds `strategy.max_update_norm` (or, per sqrt(training example),
`max_update_norm_ratio` x the round's median, default 4) is refused: finite values of 3e38 pass
the finiteness check but not the first, a scaled or sign-flipped update passes the first but not
the ratio. Rejected replies are logged with their reason and kept in `last_rejections` for the
run's metrics, every screened update's norm and ratio in `last_update_norms`. A round left with
fewer valid replies than `strategy.min_valid_replies` raises TooFewValidReplies, or, with
`strategy.on_too_few_valid=skip`, returns no model so the round loop records the round as
skipped: never a silent reuse of the old model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from federated.core.arrays import pack_arrays, record_to_numpy
from federated.core.config.schema import StrategyConfig
from federated.core.models import group_of
from federated.core.protocol import (
    ARRAYS_RECORD,
    GROUP_EXAMPLES,
    GROUPS,
    METRICS_RECORD,
    NUM_EXAMPLES,
    TRAINED_RECORD,
    record_number,
)
from federated.core.replies import error_reason
from strategies.aggregation import groupwise_weighted_mean
from strategies.secure_sums import Layout, SecureSupport, apply_sums
from strategies.validation import (
    Rejection,
    declared_groups,
    norm_outliers,
    norm_ratios,
    over_declared,
    undeclared_claims,
    undeclared_moves,
    update_norm,
    validate_update,
)

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class TooFewValidReplies(RuntimeError):
    """A round that cannot produce a trustworthy model."""


@dataclass(frozen=True)
class Update:
    """One validated training reply."""

    message: Message
    arrays: Arrays
    num_examples: float
    group_examples: dict[str, float]


class MultiMedStrategy(FlowerFedAvg):
    # Attributes that carry state across rounds (server-optimiser moments, control variates):
    # what a checkpoint must hold for a resumed run to continue exactly.
    STATE: tuple[str, ...] = ()
    # Under secure aggregation the server sees only sums: the vector layout whose sums this
    # strategy's aggregation needs (strategies/secure_sums.py), or what more it needs. A subclass
    # that aggregates the default group-wise mean and nothing else declares SecureSupport.sums(GROUPED).
    SECURE: ClassVar[SecureSupport] = SecureSupport.refused(
        "aggregates more than a (group-wise) weighted mean of the updates"
    )
    # True when every update was clipped to one L2 norm before this strategy screens it
    # (privacy=dp_fedavg: strategies/site_dp.py): its norm no longer grows with the site's data,
    # so the relative bound compares plain norms, not norms per sqrt(example).
    clipped_updates: bool = False

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self.STATE:
            setattr(self, name, state[name])

    def __init__(self, cfg: StrategyConfig, n_train_sites: int) -> None:
        min_sites = min(cfg.min_train_sites, n_train_sites)
        super().__init__(fraction_train=cfg.fraction_train, min_train_nodes=min_sites, min_available_nodes=min_sites)
        self.cfg = cfg
        self.current: ArrayRecord | None = None
        self.declared_examples: dict[int, int] = {}  # node -> n_train from the handshake
        self.site_names: dict[int, str] = {}
        self.allowed_groups: dict[int, frozenset[str]] = {}  # node -> groups of its declared modalities, tasks
        self.handshake_problems: dict[int, str] = {}  # node -> why every update of it is refused
        self.last_rejections: list[Rejection] = []
        # site -> (L2 norm, ratio per sqrt(example) to the round's median or None) of each update
        # screened in the last round, rejected ones included: what the relative bound compares.
        self.last_update_norms: dict[str, tuple[float, float | None]] = {}
        # What the aggregation of the last round could not do as its rule needs (robust rules
        # over too few trainers), one line each, logged as warnings too.
        self.last_fallbacks: list[str] = []
        self.round = 0
        self._said_no_ratio = False

    # --- hooks ------------------------------------------------------------------------
    def train_config(self, server_round: int) -> dict[str, float | int | str]:
        return {}

    def aggregate(
        self, current: Arrays, updates: list[Arrays], weights: list[float], group_weights: list[dict[str, float]]
    ) -> Arrays:
        """Default: each parameter group averaged over the sites that trained it."""
        return groupwise_weighted_mean(current, updates, group_weights, group_of)

    def server_update(self, current: Arrays, aggregated: Arrays) -> Arrays:
        return aggregated

    def aggregate_updates(self, current: Arrays, updates: list[Update]) -> Arrays:
        """Override to read more than arrays and counts from the replies (SCAFFOLD)."""
        if self.cfg.weighting == "uniform":  # every site counts once, whatever its size
            return self.aggregate(
                current,
                [u.arrays for u in updates],
                [1.0] * len(updates),
                [dict.fromkeys(u.group_examples, 1.0) for u in updates],
            )
        return self.aggregate(
            current, [u.arrays for u in updates], [u.num_examples for u in updates], [u.group_examples for u in updates]
        )

    # --- Flower Strategy ----------------------------------------------------------------
    def know_sites(
        self,
        node_sites: Mapping[int, str],
        declared_examples: Mapping[int, int],
        declared_data: Mapping[int, tuple[Sequence[str], Sequence[str]]] | None = None,
    ) -> None:
        """Called after the handshake: what each site said it holds bounds what it may send.

        `declared_examples` (the training sites' n_train) caps each site's example count, and is
        itself bounded: a site declaring more than strategy.max_site_weight_share of all the
        training sites' examples has every update refused (the server of a deployment holds no
        data to check a count against; the others' declarations are what it knows).
        `declared_data` (node -> its modalities, tasks) gives the parameter groups a site may
        move or claim; a node missing from it is not group-checked.
        """
        self.site_names = dict(node_sites)
        self.declared_examples = dict(declared_examples)
        self.allowed_groups = {n: declared_groups(m, t) for n, (m, t) in (declared_data or {}).items()}
        self.handshake_problems = over_declared(self.declared_examples, self.cfg.max_site_weight_share)
        for node, why in self.handshake_problems.items():
            log.warning("handshake: %s %s; its updates will be refused", self.site_names.get(node, node), why)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        for key, value in self.train_config(server_round).items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        current = record_to_numpy(self.current)
        self.round, self.last_rejections, self.last_fallbacks = server_round, [], []
        self.last_update_norms = {}
        accepted, idle, failed = self._screen(server_round, replies, current)
        if not accepted and idle and not self.last_rejections:
            log.info("round %d: no site trained (%d idle); the model stays as it was", server_round, idle)
            return self.current, MetricRecord({})
        if len(accepted) < max(1, self.cfg.min_valid_replies):
            reasons = "; ".join([*failed, *(f"{r.site}: {r.reason}" for r in self.last_rejections)]) or "no replies"
            text = (
                f"round {server_round}: {len(accepted)} valid training replies, fewer than "
                f"strategy.min_valid_replies={self.cfg.min_valid_replies} ({reasons})"
            )
            if self.cfg.on_too_few_valid == "skip":
                log.warning("%s; skipping the round (strategy.on_too_few_valid=skip)", text)
                return None, None
            raise TooFewValidReplies(text)
        new = self.server_update(current, self.aggregate_updates(current, accepted))
        contents = [u.message.content for u in accepted]
        return (
            pack_arrays({k: np.asarray(v) for k, v in new.items()}),
            self.train_metrics_aggr_fn(contents, self.weighted_by_key),
        )

    def aggregate_masked_sum(
        self, server_round: int, summed: np.ndarray, layout: Layout, min_weight: float, n_sites: int
    ) -> ArrayRecord | None:
        """Secure aggregation: the new model from the sum of `n_sites` sites' vectors (the server
        never saw one of them, so nothing is screened: the sites clipped their own updates). Each
        group moves by its weighted mean difference, then the server update (FedAdam & co.) runs
        as on a plain round. Too few sites: as `aggregate_train` (raise, or None to skip)."""
        if self.current is None:
            raise RuntimeError("aggregate_masked_sum called before configure_train")
        self.round, self.last_rejections, self.last_fallbacks = server_round, [], []
        self.last_update_norms = {}  # the server never sees one update
        if self.cfg.max_update_norm_ratio and not self._said_no_ratio:
            self._said_no_ratio = True
            log.info(
                "secure aggregation: strategy.max_update_norm_ratio=%g is not applied (the server sees no single "
                "update); each site checks strategy.max_update_norm=%g and clips its update itself",
                self.cfg.max_update_norm_ratio,
                self.cfg.max_update_norm,
            )
        if n_sites < max(1, self.cfg.min_valid_replies):
            text = (
                f"round {server_round}: {n_sites} sites in the secure sum, fewer than "
                f"strategy.min_valid_replies={self.cfg.min_valid_replies}"
            )
            if self.cfg.on_too_few_valid == "skip":
                log.warning("%s; skipping the round (strategy.on_too_few_valid=skip)", text)
                return None
            raise TooFewValidReplies(text)
        current = record_to_numpy(self.current)
        mean, totals = apply_sums(layout, current, summed, min_weight)
        if all(t < min_weight for t in totals.values()):
            log.info("round %d: no site trained; the model stays as it was", server_round)
            return self.current
        new = self.server_update(current, mean)
        return pack_arrays({k: np.asarray(v) for k, v in new.items()})

    def _screen(
        self, server_round: int, replies: Iterable[Message], current: Arrays
    ) -> tuple[list[Update], int, list[str]]:
        """The round's usable updates, how many sites trained nothing, and which sites failed;
        every refused update is logged and kept in `last_rejections`."""
        parsed: list[Update] = []
        idle, failed = 0, []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # a failed site: counted by the round loop, nothing to validate
                failed.append(f"{self.site_names.get(node, str(node))} failed: {error_reason(msg)}")
            elif _trained_nothing(msg):
                idle += 1  # e.g. a site whose privacy budget is spent: it sends no update
            else:
                update = self.parse(msg, current)
                if isinstance(update, str):
                    self._reject(server_round, node, update)
                else:
                    parsed.append(update)
        norms = {i: update_norm(u.arrays, current) for i, u in enumerate(parsed)}
        ratios = norm_ratios(norms, {i: 1.0 if self.clipped_updates else u.num_examples for i, u in enumerate(parsed)})
        for i, u in enumerate(parsed):
            node = u.message.metadata.src_node_id
            self.last_update_norms[self.site_names.get(node, str(node))] = (norms[i], ratios[i])
        too_large = norm_outliers(norms, ratios, self.cfg.max_update_norm, self.cfg.max_update_norm_ratio)
        for i, why in too_large.items():
            self._reject(server_round, parsed[i].message.metadata.src_node_id, why)
        return [u for i, u in enumerate(parsed) if i not in too_large], idle, failed

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        rejection = Rejection(node, self.site_names.get(node, str(node)), reason)
        log.warning("round %d: rejected the update of %s: %s", server_round, rejection.site, reason)
        self.last_rejections.append(rejection)

    def parse(self, msg: Message, current: Arrays) -> Update | str:
        """The reply's arrays, example count and per-group examples, or why it is unusable."""
        content = msg.content
        missing = self._missing_record(content)
        if missing:
            return missing
        node = msg.metadata.src_node_id
        if node in self.handshake_problems:
            return self.handshake_problems[node]
        update = record_to_numpy(content.array_records[ARRAYS_RECORD])
        n = record_number(content.metric_records[METRICS_RECORD], self.weighted_by_key)
        reason = validate_update(update, current, n, self._example_limit(node))
        if reason:
            return reason
        allowed = self.allowed_groups.get(node)
        groups = _trained_groups(content, update, n, allowed)
        if isinstance(groups, str):
            return groups
        if allowed is not None:
            reason = undeclared_claims(groups, allowed) or undeclared_moves(update, current, allowed, group_of)
            if reason:
                return reason
        return Update(msg, update, n, groups)

    def _missing_record(self, content: RecordDict) -> str | None:
        """Why the reply lacks what `parse` reads (its arrays, its example count), if it does."""
        if ARRAYS_RECORD not in content.array_records:
            return f"no {ARRAYS_RECORD!r} record in the reply"
        if METRICS_RECORD not in content.metric_records or self.weighted_by_key not in content[METRICS_RECORD]:
            return f"no '{self.weighted_by_key}' in the reply's metrics"
        return None

    def _example_limit(self, node: int) -> float | None:
        """The most examples a node may claim: what its site declared in the handshake, times the
        configured slack; None (no limit) for a node that declared nothing."""
        declared = self.declared_examples.get(node)
        return declared * self.cfg.max_examples_factor if declared is not None else None


def _trained_groups(
    content: RecordDict, update: Arrays, n: float, allowed: frozenset[str] | None = None
) -> dict[str, float] | str:
    """Examples per parameter group the site trained (what a modality-aware mean weighs each
    group by), or why its 'trained' record is unusable. A reply without that record counts as
    having trained every group it declared (every group, when it declared none) on all its
    examples."""
    trained = content.config_records.get(TRAINED_RECORD)
    if trained is None:
        return {g: n for g in dict.fromkeys(map(group_of, update)) if allowed is None or g in allowed}
    names, counts = trained.get(GROUPS), trained.get(GROUP_EXAMPLES)
    if not isinstance(names, list) or not isinstance(counts, list):
        return "malformed 'trained' record (needs a list of groups and a list of their examples)"
    examples = [float(x) for x in counts]
    if len(names) != len(examples) or any(not np.isfinite(x) or x < 0 or x > n for x in examples):
        return "malformed 'trained' record (group examples must be finite, >= 0 and <= num-examples)"
    return {str(g): x for g, x in zip(names, examples, strict=True)}


def _trained_nothing(msg: Message) -> bool:
    """A reply that says it used no examples (and so carries no update to validate)."""
    metrics = msg.content.metric_records.get(METRICS_RECORD)
    count = None if metrics is None else metrics.get(NUM_EXAMPLES)
    return isinstance(count, (int, float)) and float(count) == 0.0
