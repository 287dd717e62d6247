"""The server side of one federated run: handshake, rounds, ID/OOD evaluation.

The round loop calls the Flower strategy's configure_train / aggregate_train (so any
`flwr.serverapp.strategy` Strategy plugs in) but is our own, not Strategy.start: training
goes to the training sites only, evaluation to every site (ID and OOD). One training round is
`train_round` (configure, exchange, aggregate, collect what the sites reported; under secure
aggregation, `secure_train_round`) followed by an evaluation; messages travel through
federated/server/transport.py; side effects (progress, TensorBoard, metrics tables, checkpoints) are callbacks
invoked once per round (federated/server/callbacks.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp.grid import Grid

from federated.core.arrays import pack_arrays, record_to_numpy
from federated.core.config.protected import protected_settings
from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema, SchemaError
from federated.core.models import build_model, group_of
from federated.core.models.init_weights import load_init_weights
from federated.core.protocol import (
    ADAPTED_RECORD,
    ARRAYS_RECORD,
    CONFIG_RECORD,
    EVALUATE_ROUND,
    EVALUATED,
    FEATURE_STATS,
    METRICS_RECORD,
    NUM_EXAMPLES,
    PERSONAL_RECORD,
    PRIVACY_RECORD,
    PROFILE_RECORD,
    RESTORE_ROUND,
    SCHEMA_KEY,
    SECURE_CLIP,
    SECURE_CLIP_NORM,
    SECURE_GROUPS_RECORD,
    SECURE_LAYOUT,
    SECURE_MAX_NORM,
    SECURE_MAX_WEIGHT,
    SECURE_UNIFORM,
    SECURE_WEIGHTS,
    SECURE_WITHHELD,
    SERVER_ROUND,
    STEPS,
    TARGET_SCALES,
    TRAIN_LOSS,
    VERSION_KEY,
    Role,
    report_from_record,
)
from federated.core.replies import error_reason
from federated.core.targets import REGRESSION
from federated.server import transport
from federated.server.callbacks import Callback, SavedStrategyState, ServerState
from federated.server.checkpoint import Checkpoint, checkpointers, restore_python_rng
from federated.server.evaluation import SiteEvaluation, SiteProfile, summarize
from federated.server.feature_round import FeatureStatistics, run_statistics
from federated.server.federated_stats import target_scales
from federated.server.records import FederationResult, FederationTiming, RoundRecord, TrainStats
from federated.server.results import PrivacyReport
from federated.server.secure_round import SecureSum, secure_sum
from federated.server.site_agreement import FederationError, agreed_schema
from federated.server.site_roster import (
    SHORTFALL_QUERY_S,
    expected_site_names,
    node_site_lines,
    registered_names,
    shortfall_message,
)
from federated.server.transport import (
    NodeSubsetGrid,
    exchange,
    lost_reply,
    over_superlink,
    wait_for_nodes,
)
from partitions.site_local import SITE_LOCAL
from strategies.secure_sums import (
    GROUPED,
    Layout,
    check_secure_strategy,
    declaration_problem,
    lone_contributions,
    quantization_levels,
    sum_problems,
    weight_resolution,
    withheld_groups,
)
from strategies.site_dp import build_private_strategy, server_privacy_report

__all__ = ["Callback", "FederationError", "FederationResult", "RoundRecord", "run_federation"]

# The least time the handshake's query gets after the wait for nodes, whatever is left of
# engine.handshake_timeout_s: a node that connected just in time still loads its site and answers.
HANDSHAKE_REPLY_MIN_S = 30.0


def handshake(
    grid: Grid,
    restore_round: int | None = None,
    expected: int = 0,
    timeout_s: float = 300.0,
    expected_names: Sequence[str] = (),
) -> dict[int, SiteProfile]:
    """Ask every node for its site profile; a node that cannot answer stops the run, and so do
    fewer than `expected` nodes within timeout_s (naming the sites that are missing: site_roster).
    On resume, each site is also told to restore its own state of `restore_round`. The run's log
    gets one line per node: its id, its site, and the name its key was registered under.
    In a deployment timeout_s bounds the whole handshake, from the start of the wait for nodes to
    the last profile (a node that connected late still gets HANDSHAKE_REPLY_MIN_S to answer); a
    node whose ClientApp does not answer by then is named."""
    deadline = time.monotonic() + timeout_s
    nodes = wait_for_nodes(grid, expected, timeout_s)
    registered = registered_names(grid)
    if len(nodes) < expected:
        _too_few_sites(grid, nodes, expected, timeout_s, expected_names, registered)
    content = (
        RecordDict()
        if restore_round is None
        else RecordDict({CONFIG_RECORD: ConfigRecord({RESTORE_ROUND: restore_round})})
    )
    # over a SuperLink a connected node's ClientApp may never answer; a simulated site always does
    wait = max(deadline - time.monotonic(), HANDSHAKE_REPLY_MIN_S) if over_superlink(grid) else None
    queries = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = exchange(grid, queries, wait, setting="engine.handshake_timeout_s")

    def named(node: int) -> str:
        return f"node {node} (registered as {registered[node]})" if node in registered else f"node {node}"

    profiles: dict[int, SiteProfile] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            raise FederationError(f"handshake: {named(node)} failed: {error_reason(msg)}")
        p: dict[str, Any] = dict(msg.content.config_records[PROFILE_RECORD])
        profiles[node] = SiteProfile(
            site=str(p["site"]),
            role=Role(str(p["role"])),
            archetype=str(p["archetype"]),
            modalities=list(p["modalities"]),
            tasks=list(p["tasks"]),
            n_train=int(p["n_train"]),
            n_test=int(p["n_test"]),
            origin_site=str(p["origin_site"]),
            schema=_profile_schema(p, f"handshake: node {node} (site {p['site']})"),
            version=str(p.get(VERSION_KEY, "")),
        )
    missing = set(nodes) - set(profiles)
    if missing:
        raise FederationError(
            f"handshake: no reply within engine.handshake_timeout_s={timeout_s:g} from "
            f"{', '.join(named(n) for n in sorted(missing))}: its SuperNode is connected but its ClientApp "
            "did not answer (on that machine, check the ClientApp process and its log; a site that loads a "
            "large corpus may need a longer engine.handshake_timeout_s)"
        )
    sites = [p.site for p in profiles.values()]
    twice = sorted({s for s in sites if sites.count(s) > 1})
    if twice:
        raise FederationError(
            f"handshake: sites {twice} answered from more than one node; "
            "each node must run a different site (node config 'site')"
        )
    profiles = dict(sorted(profiles.items(), key=lambda kv: kv[1].site))
    roles = {n: str(p.role.value) for n, p in profiles.items()}
    for line in node_site_lines({n: p.site for n, p in profiles.items()}, roles, registered):
        log(INFO, line)  # `flwr log RUN_ID`: which node is which site (`flwr supernode ls` shows ids only)
    return profiles


def _too_few_sites(
    grid: Grid,
    nodes: list[int],
    expected: int,
    timeout_s: float,
    expected_names: Sequence[str],
    registered: dict[int, str],
) -> NoReturn:
    """Stop the run: fewer than `expected` nodes connected. In a deployment, first ask the nodes that
    did which site they are (a plain query: nothing is restored), so the error names who is missing."""
    sites: dict[int, str | None] = dict.fromkeys(nodes)
    deployment = over_superlink(grid)
    if deployment and nodes:
        query = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for msg in exchange(grid, query, SHORTFALL_QUERY_S):
            if not msg.has_error() and PROFILE_RECORD in msg.content.config_records:
                site = msg.content.config_records[PROFILE_RECORD].get("site")
                sites[msg.metadata.src_node_id] = str(site) if site else None
    raise FederationError(shortfall_message(expected, timeout_s, sites, expected_names, deployment, registered))


def _profile_schema(profile: dict[str, Any], where: str) -> CorpusSchema:
    """The corpus schema a site sent, checked like one read from disk (a peer is not trusted)."""
    raw = profile.get(SCHEMA_KEY)
    if not isinstance(raw, str):
        raise FederationError(f"{where}: the profile carries no corpus schema ({SCHEMA_KEY!r})")
    try:
        return CorpusSchema.from_dict(json.loads(raw), f"{where}: schema")
    except json.JSONDecodeError as e:
        raise FederationError(f"{where}: the schema is not JSON ({e})") from None
    except SchemaError as e:
        raise FederationError(str(e)) from None


def _parse_metrics(record: Any, into: dict[str, dict[str, float]]) -> None:
    """A site's "<task>/<metric>" values into task -> metric -> value."""
    for key, value in record.items():
        if "/" in key:
            task, metric = key.split("/", 1)
            into.setdefault(task, {})[metric] = float(value)


def evaluate_all(
    grid: Grid,
    arrays: ArrayRecord,
    server_round: int,
    profiles: dict[int, SiteProfile],
    timeout: float | None = None,
    extra: dict[str, str] | None = None,
    late: Collection[int] = (),
) -> tuple[list[SiteEvaluation], dict[str, str]]:
    """Every site evaluates `arrays`: their evaluations (in site order) and site -> why one failed.
    The `late` nodes (no reply to this round's training in time) are awaited briefly (exchange),
    over a SuperLink only: a simulated site is not dead, only slow, and keeps the whole timeout."""
    late = set(late) if over_superlink(grid) else set()
    replies = exchange(grid, evaluate_messages(list(profiles), arrays, server_round, extra), timeout, late)
    return site_evaluations(replies, profiles, timeout, late=late)


def evaluate_messages(
    nodes: Sequence[int], arrays: ArrayRecord, server_round: int, extra: dict[str, str] | None = None
) -> list[Message]:
    """Messages asking each node to evaluate `arrays` as round `server_round`'s global model."""
    config = ConfigRecord({SERVER_ROUND: server_round, **(extra or {})})
    content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: config})
    return [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]


def site_evaluations(
    replies: list[Message],
    profiles: dict[int, SiteProfile],
    timeout: float | None,
    prefix: str = "",
    late: Collection[int] = (),
) -> tuple[list[SiteEvaluation], dict[str, str]]:
    """The evaluations in `replies` (records named `prefix` + the evaluate reply's record names),
    in site order, and site -> why a site's is missing (an error reply, or no reply: within the
    timeout, or for the `late` nodes the short wait they were given)."""
    evals: dict[int, SiteEvaluation] = {}
    answered = {m.metadata.src_node_id for m in replies}
    failures: dict[str, str] = {
        profiles[n].site: (
            f"no reply within {transport.LATE_WAIT_S:g} s (transport.LATE_WAIT_S: it gave none to this round's "
            "training in time, so it was not awaited the whole engine.round_timeout_s again)"
            if n in late
            else f"no reply within {timeout} s"
        )
        for n in profiles
        if n not in answered
    }
    for msg in replies:
        node = msg.metadata.src_node_id
        profile = profiles[node]
        if msg.has_error():
            failures[profile.site] = error_reason(msg)
            continue
        records = msg.content.metric_records
        if prefix + METRICS_RECORD not in records:
            failures[profile.site] = f"the reply holds no {prefix + METRICS_RECORD!r} record"
            continue
        ev = SiteEvaluation(profile)
        _parse_metrics(records[prefix + METRICS_RECORD], ev.per_task)
        if prefix + PERSONAL_RECORD in records:
            ev.personal = {}
            _parse_metrics(records[prefix + PERSONAL_RECORD], ev.personal)
        if prefix + ADAPTED_RECORD in records:
            ev.adapted = {}
            _parse_metrics(records[prefix + ADAPTED_RECORD], ev.adapted)
        evals[node] = ev
    return [evals[n] for n in profiles if n in evals], failures


@dataclass
class Federation:
    """The parts of a run that every round uses: who answered the handshake, the strategy, the timing."""

    grid: Grid
    cfg: ExperimentConfig
    profiles: dict[int, SiteProfile]  # node id -> profile, in site order
    strategy: Any  # a Flower Strategy with the MultiMed extensions (strategies/)
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


def _strategy(cfg: ExperimentConfig, node_profiles: dict[int, SiteProfile], train_nodes: list[int]) -> Any:
    """The run's strategy, told which node is which site and how much each holds."""
    strategy = build_private_strategy(cfg, len(train_nodes))
    check_secure_strategy(cfg, strategy.SECURE_SUMS)
    strategy.know_sites(
        {n: p.site for n, p in node_profiles.items()},
        {n: node_profiles[n].n_train for n in train_nodes},
        {n: (p.modalities, p.tasks) for n, p in node_profiles.items()},
    )
    return strategy


def _collect_replies(fed: Federation, messages: list[Message], replies: list[Message], into: TrainOutcome) -> None:
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


def secure_keys(fed: Federation, nodes: list[int]) -> dict[str, Any]:
    """What the round's sites (`nodes`) need to build their vectors (strategies/secure_sums.py): the
    layout; the weight cap W, the largest training set they declared x strategy.max_examples_factor
    (1 for uniform weights); the clip; the norm bound each checks itself; with site-level DP, the
    norm each clips its update to; and the groups fewer than secure_aggregation.min_sites_per_group
    of them declared, which none sends (their sum would be one site's update)."""
    uniform = fed.strategy.cfg.weighting == "uniform"
    declared = max((fed.strategy.declared_examples.get(n, 1) for n in nodes), default=1)
    layout = str(fed.strategy.SECURE_SUMS)
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


Declarations = dict[int, dict[str, float]]  # node -> the weights it declared in the clear (group -> a_g)


def _lone_groups(fed: Federation, declared: Declarations) -> str | None:
    """Why the sum must not be unmasked: a group fewer than min_sites_per_group sites sent a weight
    for (the sites say which, in the clear), whose sum would be those sites' own update."""
    contributed = {fed.site(node): sorted(weights) for node, weights in declared.items()}
    lone = lone_contributions(contributed, fed.cfg.secure_aggregation.min_sites_per_group)
    if not lone:
        return None
    detail = "; ".join(f"group {g} was sent by {', '.join(sites)} only" for g, sites in sorted(lone.items()))
    return (
        f"{detail}: its sum would be that site's own update "
        f"(secure_aggregation.min_sites_per_group={fed.cfg.secure_aggregation.min_sites_per_group})"
    )


def _declared_weights(content: RecordDict) -> dict[str, float] | str:
    """The weights a site declared in the clear (group -> a_g), or why they cannot be read. The
    groups it sent a weight for are this object's keys (nothing else says which)."""
    record = content.config_records.get(SECURE_GROUPS_RECORD)
    raw = record.get(SECURE_WEIGHTS) if record is not None else None
    try:
        weights = json.loads(str(raw)) if raw is not None else None
    except ValueError:
        weights = None
    if not isinstance(weights, dict) or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in weights.values()
    ):
        return (
            f"sent no readable declaration of its weights ({SECURE_GROUPS_RECORD!r} record, "
            f"{SECURE_WEIGHTS!r}: a JSON object group -> weight)"
        )
    return {str(g): float(a) for g, a in weights.items()}


def _bad_declarations(
    fed: Federation, parsed: dict[int, dict[str, float] | str], keys: dict[str, Any], layout: Layout
) -> str | None:
    """Why the round must not be unmasked because of what a site declared in the clear (this can
    name the site): a declaration that cannot be read (_declared_weights), or weights each bounded
    by what its handshake declared (secure_sums.py, declaration_problem)."""
    layout_groups = frozenset(s.group for s in layout.segments)
    withheld = frozenset(json.loads(str(keys[SECURE_WITHHELD])))
    max_weight, uniform = float(keys[SECURE_MAX_WEIGHT]), bool(keys[SECURE_UNIFORM])
    factor = fed.cfg.strategy.max_examples_factor
    problems = []
    for node, declared in sorted(parsed.items()):
        if isinstance(declared, str):
            problems.append(f"{fed.site(node)} {declared}")
            continue
        examples = fed.strategy.declared_examples.get(node)
        cap = 1.0 if uniform or examples is None else min(1.0, examples * factor / max_weight)
        allowed = fed.strategy.allowed_groups.get(node) if keys[SECURE_LAYOUT] == GROUPED else None
        why = declaration_problem(declared, layout_groups, cap, allowed, withheld)
        if why:
            problems.append(f"{fed.site(node)} {why}")
    if not problems:
        return None
    return "; ".join(problems) + ": the round is refused before unmasking (its sum would not be checkable)"


def _refused_sum(
    fed: Federation, keys: dict[str, Any], result: SecureSum, layout: Layout, declared: Declarations
) -> str | None:
    """Why the unmasked sum is not one of honest vectors with the weights the sites declared
    (`declared`, read and checked before unmasking; secure_sums.py, sum_problems), or None. The sum
    cannot say which site's vector broke it."""
    assert result.summed is not None and result.quantised is not None
    totals: dict[str, float] = {}
    for node in result.survivors:  # every site in the sum
        for group, a in declared[node].items():
            totals[group] = totals.get(group, 0.0) + a
    sa, cfg = fed.cfg.secure_aggregation, fed.cfg
    bounds = [b for b in (cfg.strategy.max_update_norm, keys.get(SECURE_CLIP_NORM)) if b]
    problems = sum_problems(
        layout,
        result.summed,
        result.quantised,
        totals,
        len(result.survivors),
        sa.clipping_range,
        result.levels,
        norm_bound=float(min(bounds)) if bounds else None,
        withheld=frozenset(json.loads(str(keys[SECURE_WITHHELD]))),
    )
    if not problems:
        return None
    return (
        "aggregate refused, the model keeps its value this round: the unmasked sum is not what the sites' "
        f"declared weights allow ({'; '.join(problems)}). At least one site sent a vector other than the one "
        "it declared; which one cannot be told: SecAgg+ shows the server only the sum"
    )


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
        parsed = {node: _declared_weights(content) for node, content in collected.items()}
        bad = _bad_declarations(fed, parsed, keys, layout)  # names the site; nothing else reads a bad one
        if bad:
            refusal.append(bad)
            return bad
        declared.update({node: weights for node, weights in parsed.items() if isinstance(weights, dict)})
        return _lone_groups(fed, declared)  # privacy: such a sum would be one site's update

    result = (
        SecureSum(None, [], [], reason=unresolved)
        if unresolved
        else secure_sum(lambda ms: exchange(fed.grid, ms, fed.timeout), messages, sa, fed.cfg.seed + rnd, before_unmask)
    )
    t1 = time.perf_counter()
    new_arrays = None
    if result.summed is not None:
        refused_sum = _refused_sum(fed, keys, result, layout, declared)
        if refused_sum:
            refusal.append(refused_sum)
        else:
            min_weight = 0.5 / float(keys[SECURE_MAX_WEIGHT])  # half the least weight of a site that trained
            new_arrays = fed.strategy.aggregate_masked_sum(
                rnd, result.summed, layout, min_weight, len(result.survivors)
            )
    t2 = time.perf_counter()
    fed.timing.train_s += t1 - t0
    fed.timing.aggregate_s += t2 - t1
    outcome = TrainOutcome(new_arrays, train_s=t1 - t0, aggregate_s=t2 - t1, refused=bool(refusal))
    _collect_replies(fed, [m for m in messages if m.metadata.dst_node_id in result.survivors], result.replies, outcome)
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


def train_round(fed: Federation, rnd: int, arrays: ArrayRecord) -> TrainOutcome:
    """One training round: configure, exchange with the training sites, aggregate, collect."""
    if fed.cfg.secure_aggregation.name != "none":
        return secure_train_round(fed, rnd, arrays)
    t0 = time.perf_counter()
    messages = list(fed.strategy.configure_train(rnd, arrays, ConfigRecord(dict(fed.site_config)), fed.training_grid))
    replies = exchange(fed.grid, messages, fed.timeout)
    return _aggregated(fed, rnd, messages, replies, t0)


def evaluating_with_train(fed: Federation) -> bool:
    """Whether engine.evaluate_with_train applies: in a deployment (a SuperLink), and not under
    secure aggregation, whose train messages are four stages around a masked update."""
    return fed.cfg.engine.evaluate_with_train and fed.cfg.secure_aggregation.name == "none" and over_superlink(fed.grid)


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
    _collect_replies(fed, messages, replies, outcome)
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


def _first_state(
    fed: Federation, arrays: ArrayRecord, resume: Checkpoint | None, callbacks: Sequence[Callback]
) -> ServerState:
    """Round 0 evaluated, or the state a checkpoint holds (the sites restore theirs in the handshake)."""
    if resume is None:
        return ServerState(0, arrays, fed.strategy, evaluate_round(fed, 0, arrays, callbacks), [])
    fed.strategy.load_state_dict(resume.strategy_state)
    restore_python_rng(resume.python_rng)
    for cb in callbacks:
        cb.on_resume([resume.initial, *resume.history])
    return ServerState(resume.round, resume.array_record(), fed.strategy, resume.initial, list(resume.history))


def run_round(fed: Federation, state: ServerState, rnd: int, callbacks: Sequence[Callback]) -> None:
    """Train, evaluate, and tell the callbacks the round's record, then the server's new state."""
    outcome = train_round(fed, rnd, state.arrays)
    state.arrays = accepted_model(fed.cfg, rnd, outcome, state.arrays)
    state.history.append(evaluate_round(fed, rnd, state.arrays, callbacks, outcome))
    state.round = rnd
    for cb in callbacks:
        cb.on_server_state(state)


@dataclass
class _Unscored:
    """A round whose model the sites have not scored yet (engine.evaluate_with_train): its
    evaluation rides on the next round's training, and the server's state after it, copied
    before the next round configures anything, goes to the callbacks once its record is complete."""

    round: int
    arrays: ArrayRecord
    outcome: TrainOutcome | None  # None for round 0
    strategy: SavedStrategyState
    python_rng: Any

    @classmethod
    def after(cls, rnd: int, arrays: ArrayRecord, outcome: TrainOutcome | None, strategy: Any) -> _Unscored:
        return cls(rnd, arrays, outcome, SavedStrategyState(copy.deepcopy(strategy.state_dict())), random.getstate())


def _scored(
    unscored: _Unscored,
    evals: list[SiteEvaluation],
    failures: dict[str, str],
    history: list[RoundRecord],
    initial: RoundRecord | None,
    callbacks: Sequence[Callback],
) -> RoundRecord:
    """An unscored round's record, now that its evaluations came, to the callbacks; after a
    training round, the callbacks then get the server's state as it was after that round.
    Returns the run's initial record: this one for round 0, else `initial`."""
    record = round_record(unscored.round, evals, failures, callbacks, unscored.outcome)
    if unscored.outcome is None:
        return record
    history.append(record)
    assert initial is not None  # round 0 is scored in round 1's exchange, before any other
    state = ServerState(unscored.round, unscored.arrays, unscored.strategy, initial, list(history), unscored.python_rng)
    for cb in callbacks:
        cb.on_server_state(state)
    return initial


def run_rounds_evaluating_with_train(
    fed: Federation, arrays: ArrayRecord, resume: Checkpoint | None, callbacks: Sequence[Callback]
) -> ServerState:
    """The round loop with engine.evaluate_with_train: round r's model is scored in round r+1's
    exchange (the last round's on its own), so a deployed round is one exchange, not two. The
    records, checkpoints and scores are those of the plain loop; they reach the callbacks one
    exchange later."""
    if resume is None:
        initial, history, start = None, [], 0
        unscored: _Unscored | None = _Unscored.after(0, arrays, None, fed.strategy)
    else:
        state = _first_state(fed, arrays, resume, callbacks)
        initial, history, start, arrays, unscored = state.initial, state.history, state.round, state.arrays, None
    for rnd in range(start + 1, fed.cfg.rounds + 1):
        if unscored is None:
            outcome = train_round(fed, rnd, arrays)
        else:
            outcome, evals, failures = train_round_evaluating(fed, rnd, arrays, unscored.round)
            initial = _scored(unscored, evals, failures, history, initial, callbacks)
        arrays = accepted_model(fed.cfg, rnd, outcome, arrays)
        unscored = _Unscored.after(rnd, arrays, outcome, fed.strategy)
    if unscored is not None:
        late = unscored.outcome.unanswered if unscored.outcome is not None else set()
        initial = _scored(unscored, *timed_evaluation(fed, arrays, unscored.round, late), history, initial, callbacks)
    assert initial is not None
    return ServerState(fed.cfg.rounds, arrays, fed.strategy, initial, history)


def _site_config(
    grid: Grid,
    cfg: ExperimentConfig,
    schema: CorpusSchema,
    node_profiles: dict[int, SiteProfile],
    train_nodes: list[int],
    resume: Checkpoint | None,
) -> tuple[dict[str, str], FeatureStatistics | None]:
    """What every train and evaluate message carries, from the statistics rounds before round 1
    (no rows move): in site-local mode the federation's schema and the regression targets' scales;
    in every mode, where the schema stores raw features, the feature statistics
    (federated/server/feature_round.py; on resume, the checkpoint's: not asked again)."""
    config: dict[str, str] = {}
    if cfg.sites.planner == SITE_LOCAL:
        regression = [t for t, task in schema.tasks.items() if task.target == REGRESSION]
        scales = target_scales(lambda messages: exchange(grid, messages), train_nodes, regression)
        config = {SCHEMA_KEY: json.dumps(schema.to_dict()), TARGET_SCALES: json.dumps(scales)}
    saved = resume.feature_statistics if resume is not None else None
    features = run_statistics(lambda ms: exchange(grid, ms), train_nodes, schema, cfg, node_profiles, saved)
    if features is not None and features.standardisers:
        config[FEATURE_STATS] = features.message()
    return config, features


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: Path | None = None,
    resume: Checkpoint | None = None,
    planned_sites: Sequence[str] = (),
) -> FederationResult:
    """Run (or, given a checkpoint, continue) a federation. With engine.checkpoint_every = k
    and a checkpoint_dir, the server state is saved every k rounds and after the last one.
    planned_sites: the site names the plan expects, where the caller knows them (to name the
    missing ones if too few connect)."""
    t_start = time.perf_counter()
    random.seed(cfg.seed)  # Flower's node sampling uses Python's global RNG
    node_profiles = handshake(
        grid,
        restore_round=resume.round if resume else None,
        expected=cfg.engine.expected_sites,
        timeout_s=cfg.engine.handshake_timeout_s,
        expected_names=expected_site_names(cfg, planned_sites),
    )
    schema, excluded = agreed_schema(cfg, node_profiles)
    # Agreed: the profiles no longer need their schemas, which every round record (and so every
    # checkpoint) would otherwise carry once per site per round.
    node_profiles = {n: dataclasses.replace(p, schema=None) for n, p in node_profiles.items() if p.site not in excluded}
    train_nodes = [n for n, p in node_profiles.items() if p.role == Role.TRAIN]
    if not train_nodes:
        raise FederationError("no training sites answered the handshake")
    site_config, features = _site_config(grid, cfg, schema, node_profiles, train_nodes, resume)
    hooks = [*callbacks, *checkpointers(cfg, checkpoint_dir, features.to_dict() if features else None)]
    profiles = list(node_profiles.values())
    for cb in hooks:
        cb.on_start(cfg, profiles)
    model = build_model(cfg.model, schema, cfg.seed)
    init_report = load_init_weights(model, cfg.model.init_weights) if cfg.model.init_weights and not resume else None
    if init_report:
        log(INFO, init_report.summary_line())
    arrays = pack_arrays(model.state_dict())  # one object per message, not two per tensor
    fed = Federation(
        grid,
        cfg,
        node_profiles,
        _strategy(cfg, node_profiles, train_nodes),
        NodeSubsetGrid(grid, train_nodes),
        cfg.engine.round_timeout_s or None,
        site_config=site_config,
        model_keys=list(model.state_dict()),
    )
    if evaluating_with_train(fed):
        state = run_rounds_evaluating_with_train(fed, arrays, resume, hooks)
    else:
        state = _first_state(fed, arrays, resume, hooks)
        for rnd in range(state.round + 1, cfg.rounds + 1):
            run_round(fed, state, rnd, hooks)
    fed.timing.wall_s = time.perf_counter() - t_start
    result = FederationResult(
        profiles,
        state.initial,
        state.history,
        state.arrays,
        fed.timing,
        init_report.as_dict() if init_report else None,
        schema,
        excluded,
        json.loads(site_config.get(TARGET_SCALES, "{}")),
        features,
    )
    for cb in hooks:
        cb.on_end(result)
    return result
