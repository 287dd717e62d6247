"""A training round under secure aggregation (secure_aggregation=secaggplus).

The server gets the sum of the sites' masked vectors and the scalar metrics, never one site's
update: the keys each site needs to build its vector, then SecAgg+'s stages
(federated/server/secure_round.py), the checks before and after unmasking
(federated/server/secure_checks.py), and the strategy's aggregation of the sum.
"""

from __future__ import annotations

import json
import time
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from federated.core.arrays import record_to_numpy
from federated.core.models import group_of
from federated.core.protocol import (
    CONFIG_RECORD,
    SECURE_CLIP,
    SECURE_CLIP_NORM,
    SECURE_LAYOUT,
    SECURE_MAX_NORM,
    SECURE_MAX_WEIGHT,
    SECURE_UNIFORM,
    SECURE_WITHHELD,
)
from federated.server.round import Federation, TrainOutcome, collect_replies
from federated.server.secure_checks import Declarations, bad_declarations, declared_weights, lone_groups, refused_sum
from federated.server.secure_round import SecureSum, secure_sum
from federated.server.transport import exchange
from strategies.secure_sums import GROUPED, Layout, quantization_levels, weight_resolution, withheld_groups


def secure_keys(fed: Federation, nodes: list[int]) -> dict[str, Any]:
    """What the round's sites (`nodes`) need to build their vectors (strategies/secure_sums.py): the
    layout; the weight cap W, the largest training set they declared x strategy.max_examples_factor
    (1 for uniform weights); the clip; the norm bound each checks itself; with site-level DP, the
    norm each clips its update to; and the groups fewer than secure_aggregation.min_sites_per_group
    of them declared, which none sends (their sum would be one site's update)."""
    uniform = fed.strategy.cfg.weighting == "uniform"
    declared = max((fed.strategy.declared_examples.get(n, 1) for n in nodes), default=1)
    layout = str(fed.strategy.SECURE.layout)
    keys: dict[str, Any] = {
        SECURE_LAYOUT: layout,
        SECURE_MAX_WEIGHT: 1.0 if uniform else float(declared * fed.cfg.strategy.max_examples_factor),
        SECURE_UNIFORM: int(uniform),
        SECURE_CLIP: float(fed.cfg.secure_aggregation.clipping_range),
        SECURE_MAX_NORM: float(fed.cfg.strategy.max_update_norm),
        SECURE_WITHHELD: "[]",
    }
    if layout == GROUPED:
        groups = list(dict.fromkeys(group_of(k) for k in fed.model_keys))
        holders = [fed.strategy.allowed_groups.get(n) for n in nodes]
        keys[SECURE_WITHHELD] = json.dumps(
            withheld_groups(groups, holders, fed.cfg.secure_aggregation.min_sites_per_group)
        )
    if fed.cfg.privacy.name == "dp_fedavg":
        keys[SECURE_CLIP_NORM] = float(fed.cfg.privacy.clipping_norm)
    return keys


def secure_train_round(fed: Federation, rnd: int, arrays: ArrayRecord) -> TrainOutcome:
    """A training round under SecAgg+ (federated/server/secure_round.py): the server gets the sum of
    the sites' masked vectors and the scalar metrics, never one site's update. A site refused at the
    handshake (its declared weight share) is not asked: once inside the sum it could not be refused."""
    t0 = time.perf_counter()
    sampled = list(fed.strategy.configure_train(rnd, arrays, ConfigRecord(dict(fed.site_config)), fed.training_grid))
    refused = {m.metadata.dst_node_id for m in sampled} & set(fed.strategy.handshake_problems)
    nodes = [m.metadata.dst_node_id for m in sampled if m.metadata.dst_node_id not in refused]
    keys = secure_keys(fed, nodes)
    if keys[SECURE_WITHHELD] != fed.secure_withheld:
        fed.secure_withheld = str(keys[SECURE_WITHHELD])
        log(
            WARNING, "round %d: secure aggregation leaves out groups too few sites hold: %s", rnd, keys[SECURE_WITHHELD]
        )
    messages = [
        Message(
            RecordDict({**m.content, CONFIG_RECORD: ConfigRecord({**m.content.config_records[CONFIG_RECORD], **keys})}),
            dst_node_id=m.metadata.dst_node_id,
            message_type=MessageType.TRAIN,
        )
        for m in sampled
        if m.metadata.dst_node_id in nodes
    ]
    sa = fed.cfg.secure_aggregation
    levels = quantization_levels(len(nodes), sa.quantization_range, sa.modulus_range)
    unresolved = weight_resolution(len(nodes), sa.clipping_range, levels, float(keys[SECURE_MAX_WEIGHT]))
    layout = Layout.of(record_to_numpy(arrays), str(keys[SECURE_LAYOUT]))
    refusal: list[str] = []  # why the round is refused: a site's declaration, or the unmasked sum
    declared: Declarations = {}  # each site's declaration, read once, checked before unmasking

    def before_unmask(collected: dict[int, RecordDict]) -> str | None:
        parsed = {node: declared_weights(content) for node, content in collected.items()}
        bad = bad_declarations(fed, parsed, keys, layout)  # names the site; nothing else reads a bad one
        if bad:
            refusal.append(bad)
            return bad
        declared.update({node: weights for node, weights in parsed.items() if isinstance(weights, dict)})
        return lone_groups(fed, declared)  # privacy: such a sum would be one site's update

    result = (
        SecureSum(None, [], [], reason=unresolved)
        if unresolved
        else secure_sum(lambda ms: exchange(fed.grid, ms, fed.timeout), messages, sa, fed.cfg.seed + rnd, before_unmask)
    )
    t1 = time.perf_counter()
    new_arrays = None
    if result.summed is not None:
        why_refused = refused_sum(fed, keys, result, layout, declared)
        if why_refused:
            refusal.append(why_refused)
        else:
            min_weight = 0.5 / float(keys[SECURE_MAX_WEIGHT])  # half the least weight of a site that trained
            new_arrays = fed.strategy.aggregate_masked_sum(
                rnd, result.summed, layout, min_weight, len(result.survivors)
            )
    t2 = time.perf_counter()
    fed.timing.train_s += t1 - t0
    fed.timing.aggregate_s += t2 - t1
    outcome = TrainOutcome(new_arrays, train_s=t1 - t0, aggregate_s=t2 - t1, refused=bool(refusal))
    collect_replies(fed, [m for m in messages if m.metadata.dst_node_id in result.survivors], result.replies, outcome)
    outcome.unanswered |= result.unanswered  # silent in a stage: awaited briefly in the round's evaluation
    for node, why in result.failures.items():
        outcome.failures[f"train:{fed.site(node)}"] = why
    for node, why in result.late.items():  # its update is in the aggregate: not a training failure
        outcome.failures[f"unmask:{fed.site(node)}"] = f"{why} (its masked update is in the aggregate)"
    if result.reason or refusal:
        outcome.failures["secure_aggregation"] = result.reason or refusal[0]
        if refusal:
            log(WARNING, "round %d: %s", rnd, outcome.failures["secure_aggregation"])
    for node in sorted(refused):
        outcome.rejections[fed.site(node)] = fed.strategy.handshake_problems[node]
    return outcome
