"""The Flower ClientApp every site runs, under every engine.

query    -> the site's profile (the server's handshake)
            or, asked with PROFILE_REQUEST (`multimed-fl stats`), aggregates of its data, never a row
            (clients/site_profile.py)
train    -> load the global arrays, train locally, reply with arrays + example counts (under
            secure aggregation, masked: clients/secure_aggregation.py). The
            strategy's site side (strategies/client_side.py: FedProx's proximal term, SCAFFOLD's
            control variates, FedBN/FedPer's local parameters) wraps the local training; the
            privacy mode picks the trainer (clients/local_trainers.py: DP-SGD adds a 'privacy'
            record with the site's cumulative epsilon and whether its budget stopped it)
evaluate -> per-task metrics of the global model on the site's test split, of the site's
            personalised model when its strategy keeps one, and at a held-out site in the last
            round, of the model adapted to its unlabelled inputs (ood.adapt, clients/test_time.py);
            in a deployment a train message may ask for this first, of the model it brings
            (engine.evaluate_with_train)
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import site_state
from clients.attacks import attack_mod
from clients.faults import fault_mod
from clients.folded_messages import folding_mod
from clients.local_trainers import LOCAL_TRAINERS, LocalJob
from clients.secure_aggregation import masked_update_mod, secure_aggregation_gate
from clients.site_profile import profile_reply
from clients.site_runtime import RELEASES_STATE, SiteRuntime, site_runtime
from clients.test_time import adapt_site_model
from clients.trainer import evaluate_site, mean_train_loss
from federated import __version__
from federated.core import protocol as P
from federated.core.arrays import pack_arrays, record_to_torch
from federated.core.compute import model_device
from federated.core.config.protected import protected_settings
from federated.core.models import MultiMedModel
from federated.core.protocol import Role, record_round
from partitions.site_local import SITE_LOCAL
from strategies.client_side import SiteRound

# Outermost first: folding_mod unfolds what a deployment's server folded before any other mod
# reads it (clients/folded_messages.py); clients/secure_aggregation.py says why the rest are in
# this order.
app = ClientApp(mods=[folding_mod, secure_aggregation_gate, fault_mod, masked_update_mod, attack_mod])


def _runtime(context: Context) -> SiteRuntime:
    return site_runtime(dict(context.run_config), dict(context.node_config))


_decoded: list[ArrayRecord | dict[str, torch.Tensor] | None] = [None, None]  # the last record decoded, its tensors
_decode_lock = threading.Lock()
_HOLDS = "_holds"  # the ArrayRecord whose weights a model holds now, in the model's __dict__


def global_weights(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record's tensors, read-only. The in-process engine hands one ArrayRecord object to
    every site of a round; decoding it once instead of per site took a 100-site round from
    about 21 s of decoding to 0.2 s (profiled). Other engines deliver a fresh object anyway."""
    with _decode_lock:
        if _decoded[0] is not record:
            _decoded[0], _decoded[1] = record, record_to_torch(record)
        weights = _decoded[1]
        assert isinstance(weights, dict)
        return weights


def load_global(model: MultiMedModel, record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Load the round's global weights into the model, unless it holds exactly them already
    (in-process, the sites of a round are evaluated one after another on one shared model)."""
    weights = global_weights(record)
    if model.__dict__.get(_HOLDS) is not record:
        model.load_state_dict(weights)
        model.__dict__[_HOLDS] = record
    return weights


def on_device(weights: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The round's global weights where the model is, for the strategy's site side (FedProx's
    proximal term, SCAFFOLD's start point); the decoded host tensors themselves on CPU."""
    if device.type == "cpu":
        return weights
    return {k: v.to(device) for k, v in weights.items()}


def _forget_weights(model: MultiMedModel) -> None:
    """The model's weights are about to change: the next load_global must load them."""
    model.__dict__[_HOLDS] = None


def round_seed(seed: int, site: str, server_round: int) -> int:
    """A per-site, per-round seed that does not depend on process or scheduling."""
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _statistics(rt: SiteRuntime, config: ConfigRecord, context: Context) -> MetricRecord | None:
    """The federated statistics rounds (federated/server/federated_stats.py, feature_round.py):
    aggregates of this site's regression training targets or raw features, one value per task or
    per feature (per feature and bin for a histogram), never a row; None when the query asks for none.
    What the feature queries released is kept in the run's Context.state (_releases), so each is
    answered once per run whichever process serves the next message."""
    if P.FEATURE_MOMENTS in config:
        request = _json(config, P.FEATURE_MOMENTS, dict)
        return MetricRecord(dict(rt.feature_moments_reply(request, _releases(context))))
    if P.FEATURE_HISTOGRAM in config:
        request = _json(config, P.FEATURE_HISTOGRAM, dict)
        return MetricRecord(dict(rt.feature_histogram_reply(request, _releases(context))))
    if P.STATS_REQUEST in config:
        tasks = _json(config, P.STATS_REQUEST, list)
        values: dict[str, int | float | list[int] | list[float]] = {}
        for t in (t for t in tasks if t in rt.data.regression_tasks):
            n, mean, m2 = rt.data.target_moments(t)
            values |= {f"{t}/n": float(n), f"{t}/mean": mean, f"{t}/m2": m2}
        return MetricRecord(values)
    if P.STATS_CENTRE in config:
        centres = _json(config, P.STATS_CENTRE, dict)
        held = [t for t in centres if t in rt.data.regression_tasks]
        return MetricRecord({f"{t}/absdev": rt.data.abs_deviation(t, float(centres[t])) for t in held})
    return None


def _releases(context: Context) -> ConfigRecord:
    """This run's record of the feature statistics this site released (site_runtime.RELEASES_STATE)."""
    record = context.state.config_records.get(RELEASES_STATE)
    if record is None:
        record = context.state[RELEASES_STATE] = ConfigRecord()
    return record


def _json(config: ConfigRecord, key: str, kind: type) -> Any:
    try:
        value = json.loads(str(config[key]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}: not JSON ({e})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{key}: expected a JSON {kind.__name__}")
    return value


def _site_local(rt: SiteRuntime, msg: Message) -> None:
    """What rides on every train and evaluate message: in site-local mode the federation's schema
    and target scales; where the site holds raw features and preprocess.statistics is federated or
    pooled, the feature statistics (a message without them is refused: the data would be raw)."""
    config = msg.content.config_records.get(P.CONFIG_RECORD) or ConfigRecord()
    if rt.cfg.sites.planner == SITE_LOCAL:
        if P.SCHEMA_KEY not in config or P.TARGET_SCALES not in config:
            raise ValueError(f"site {rt.plan.site}: a site-local message without the federation's schema and scales")
        rt.apply_site_local(str(config[P.SCHEMA_KEY]), str(config[P.TARGET_SCALES]))
    if not rt.data.raw_modalities or rt.cfg.preprocess.statistics == "per_site":
        return  # nothing raw, or the site's own statistics, applied when it loaded
    if P.FEATURE_STATS not in config:
        raise ValueError(
            f"site {rt.plan.site}: a {msg.metadata.message_type} message without the feature statistics "
            f"(preprocess.statistics={rt.cfg.preprocess.statistics}); modality {rt.data.raw_modalities[0]} is "
            "stored raw and is not trained or scored on raw values"
        )
    rt.apply_feature_stats(str(config[P.FEATURE_STATS]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    rt = _runtime(context)
    p = rt.plan
    config = msg.content.config_records.get(P.CONFIG_RECORD)
    if config is not None and P.PROFILE_REQUEST in config:  # `multimed-fl stats`: aggregates only
        return Message(profile_reply(rt, str(config[P.PROFILE_REQUEST]), context), reply_to=msg)
    stats = _statistics(rt, config, context) if config is not None else None
    if stats is not None:
        return Message(RecordDict({P.METRICS_RECORD: stats}), reply_to=msg)
    if rt.cfg.engine.checkpoint_every > 0:  # it will save its state: a key it cannot use is refused now
        site_state.check_can_save(context, p.site)
    if config is not None and P.RESTORE_ROUND in config:  # a resumed run: this site's own saved state
        restore_round = record_round(config, P.RESTORE_ROUND)
        site_state.restore(context, p.site, restore_round, rt.cfg.privacy, protected_settings(rt.cfg))
    profile = ConfigRecord(
        {
            P.PROFILE_SITE: p.site,
            P.PROFILE_ROLE: p.role.value,
            P.PROFILE_ARCHETYPE: p.archetype,
            P.PROFILE_ORIGIN_SITE: p.origin_site,
            P.PROFILE_MODALITIES: list(p.modalities),
            P.PROFILE_TASKS: list(p.tasks),
            P.PROFILE_N_TRAIN: p.n_train,
            P.PROFILE_N_TEST: p.n_test,
            P.SCHEMA_KEY: json.dumps(rt.data.schema.to_dict()),
            P.VERSION_KEY: __version__,
        }
    )
    return Message(RecordDict({P.PROFILE_RECORD: profile}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    rt = _runtime(context)
    _site_local(rt, msg)
    config = msg.content.config_records[P.CONFIG_RECORD]
    # engine.evaluate_with_train: the model received is the one the server would send next in an
    # evaluate message; scored here first, before training changes anything, it saves a round trip.
    evaluated = RecordDict()
    if P.EVALUATE_ROUND in config:
        evaluated = _evaluation(rt, msg, context, record_round(config, P.EVALUATE_ROUND))
    start = on_device(load_global(rt.model, msg.content.array_records[P.ARRAYS_RECORD]), model_device(rt.model))
    _forget_weights(rt.model)
    precision = rt.cfg.train.precision
    site_round = SiteRound(
        rt.model, start, msg.content, context, rt.cfg.train, lambda: mean_train_loss(rt.model, rt.data, precision)
    )
    this_round = rt.algorithm.before_train(site_round)
    server_round = record_round(config)
    seed = round_seed(rt.cfg.seed, rt.plan.site, server_round)
    trainer = LOCAL_TRAINERS.get(rt.cfg.privacy.name)
    objective = this_round.objective if this_round.changes_objective else None
    trained = trainer(LocalJob(rt.model, rt.data, rt.cfg, seed, context, server_round, this_round.hooks, objective))
    result = trained.result
    reply = RecordDict(
        {
            P.ARRAYS_RECORD: pack_arrays(rt.model.state_dict()),
            P.METRICS_RECORD: MetricRecord(
                {P.NUM_EXAMPLES: result.num_examples, P.TRAIN_LOSS: result.mean_loss, P.STEPS: result.steps}
            ),
            P.TRAINED_RECORD: ConfigRecord(
                {P.GROUPS: list(result.group_examples), P.GROUP_EXAMPLES: list(result.group_examples.values())}
            ),
        }
    )
    for name, record in {**trained.records, **this_round.after_train(result.steps)}.items():
        reply[name] = record
    for name, scored in evaluated.items():
        reply[P.EVALUATED + name] = scored
    return Message(reply, reply_to=msg)


def _flat(results: dict[str, dict[str, float]], n_test: int) -> MetricRecord:
    flat: dict[str, int | float | list[int] | list[float]] = {P.NUM_EXAMPLES: n_test}
    for task, values in results.items():
        for name, value in values.items():
            flat[f"{task}/{name}"] = float(value)
    return MetricRecord(flat)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rt = _runtime(context)
    _site_local(rt, msg)
    server_round = record_round(msg.content.config_records[P.CONFIG_RECORD])
    return Message(_evaluation(rt, msg, context, server_round), reply_to=msg)


def _evaluation(rt: SiteRuntime, msg: Message, context: Context, server_round: int) -> RecordDict:
    """The site's evaluation of the message's arrays as round `server_round`'s global model (and
    its saved state, at a checkpoint round): the records of an evaluate reply."""
    every = rt.cfg.engine.checkpoint_every
    if every and server_round and (server_round % every == 0 or server_round == rt.cfg.rounds):
        site_state.save(context, rt.plan.site, server_round, protected_settings(rt.cfg))
    load_global(rt.model, msg.content.array_records[P.ARRAYS_RECORD])
    precision = rt.cfg.train.precision
    reply = RecordDict(
        {P.METRICS_RECORD: _flat(evaluate_site(rt.model, rt.data, "test", precision=precision), rt.plan.n_test)}
    )
    if rt.plan.role == Role.TRAIN and rt.algorithm.load_personal(rt.model, context):
        _forget_weights(rt.model)  # it holds this site's personal parameters now
        personal = evaluate_site(rt.model, rt.data, "test", precision=precision)
        reply[P.PERSONAL_RECORD] = _flat(personal, rt.plan.n_test)
    if rt.plan.role == Role.HELD_OUT and rt.cfg.ood.adapt != "none" and server_round == rt.cfg.rounds:
        seed = round_seed(rt.cfg.seed, rt.plan.site, server_round)
        adapted = adapt_site_model(rt.model, rt.data, rt.cfg.ood, seed)  # a copy: the global model stays
        reply[P.ADAPTED_RECORD] = _flat(evaluate_site(adapted, rt.data, "test", precision=precision), rt.plan.n_test)
    return reply
