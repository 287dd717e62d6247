"""The site side of secure aggregation: Flower's own `secaggplus_mod`, fed one vector per site.

Flower's SecAgg+ mod (flwr.client.mod.secaggplus_mod) does the cryptography unchanged: key pairs,
Shamir shares of the mask seed and private key, quantisation, pairwise and self masks, and the
shares it hands back for unmasking. It is tied to Flower's legacy FitRes in one place: in the
collect stage it reads the inner reply as FitRes records (`fitres.parameters` as ordinary numpy
arrays, `fitres.num_examples`), masks those arrays, and returns every other record unmasked. So:

    secure_aggregation_gate   runs secaggplus_mod only for messages that carry its configs
                              ("secaggplus_configs"); plain messages go straight on
    masked_update_mod         inside the gate, around the training: turns our reply into that
                              FitRes shape, holding ONE vector (strategies/secure_sums.py: each
                              group's weighted, clipped difference from the global model and
                              its weight), and forwards only the scalar metrics, the groups it
                              sent a weight for with those weights (in the clear: the server
                              checks the unmasked sum against them), and the DP report;
                              the model, the per-group examples and any algorithm record are not
                              forwarded. The checks the server would make on the update (finite,
                              strategy.max_update_norm) the site makes first: it cannot see it.
                              A site whose run asks for secure aggregation refuses to answer a
                              plain training message: it never sends an unmasked update.

Order in the ClientApp: [secure_aggregation_gate, fault_mod, masked_update_mod, attack_mod]: a
simulated fault then strikes in the collect stage (the training), the one a real site can die in
after the keys are shared, and an attack corrupts the reply before it is masked.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from federated.core import protocol as P
from federated.core.arrays import record_to_numpy
from strategies.secure_sums import Layout, site_vector, site_weights
from strategies.validation import update_norm, validate_update

log = logging.getLogger(__name__)

# The legacy FitRes records secaggplus_mod reads (flwr.compat.common.recorddict_compat)
FITRES_PARAMETERS = "fitres.parameters"
FITRES_NUM_EXAMPLES = "fitres.num_examples"
FITRES_METRICS = "fitres.metrics"
FITRES_STATUS = "fitres.status"


class UnmaskedUpdateRefused(RuntimeError):
    """A site whose run asks for secure aggregation was asked for a plain training reply."""


class UpdateRefusedAtSite(RuntimeError):
    """The site's own update fails a check the server cannot make on masked data."""


def _check_at_the_site(
    trained: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray], num_examples: float, max_norm: float
) -> None:
    """The server's checks that need one update, made by the site on its own before masking (the
    server sees only the sum): the server's own `validate_update` (keys, shapes, dtypes, finite
    values) and strategy.max_update_norm. A site that fails them raises, so it leaves the round as a
    dropout and its masks are removed by its neighbours' shares, as the server would have refused
    its update. A site that trained nothing sends zeros, and the server would skip it: no check."""
    if num_examples == 0:
        return
    reason = validate_update(trained, global_arrays, num_examples, None)
    if reason:
        raise UpdateRefusedAtSite(f"{reason}; not sent")
    norm = update_norm(trained, global_arrays)
    if max_norm > 0 and norm > max_norm:
        raise UpdateRefusedAtSite(f"update norm {norm:.4g} exceeds strategy.max_update_norm={max_norm:g}; not sent")


def _secure(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation_gate(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod for the messages of a secure round; everything else passes.

    The mod's stochastic rounding draws from numpy's global generator, unseeded: the same run would
    round differently each time, and in-process it would move the server's own draws (site-level
    DP noise). So in the collect stage the global generator is seeded per site and round and given
    back as it was. (The masks do not come from it: their seeds are os.urandom and key agreement.)"""
    if not _secure(msg):
        return call_next(msg, context)
    if msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
        return secaggplus_mod(msg, context, call_next)
    saved = np.random.get_state()
    np.random.seed(_rounding_seed(msg, context))
    try:
        return secaggplus_mod(msg, context, call_next)
    finally:
        np.random.set_state(saved)


def _rounding_seed(msg: Message, context: Context) -> int:
    """The run's seed, the site's name and the round: the same under every engine. (An app without
    this project's run config, e.g. a test's toy sites, rounds by node id instead.)"""
    server_round = P.record_round(msg.content.config_records[P.CONFIG_RECORD])
    if P.CONFIG_KEY in context.run_config:
        from clients.site_runtime import site_runtime  # lazy: keeps the mod importable alone

        rt = site_runtime(dict(context.run_config), dict(context.node_config))
        who = f"{rt.cfg.seed}/{rt.plan.site}"
    else:
        who = f"node {context.node_id}"
    digest = hashlib.sha256(f"{who}/{server_round}/secagg-rounding".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def masked_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The training reply as the one vector secaggplus_mod masks (see the module docstring)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if not _secure(msg):
        from clients.site_runtime import site_runtime  # lazy: keeps the mod importable alone

        wanted = site_runtime(dict(context.run_config), dict(context.node_config)).cfg.secure_aggregation.name
        if wanted != "none":
            raise UnmaskedUpdateRefused(
                f"this run sets secure_aggregation={wanted}: the site sends its update only masked, "
                "and this training message is not part of a secure round"
            )
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    config = msg.content.config_records[P.CONFIG_RECORD]
    content = reply.content
    global_arrays = record_to_numpy(msg.content.array_records[P.ARRAYS_RECORD])
    trained = record_to_numpy(content.array_records[P.ARRAYS_RECORD])
    metrics = content.metric_records[P.METRICS_RECORD]
    num_examples = float(P.record_number(metrics, P.NUM_EXAMPLES))
    groups = content.config_records.get(P.TRAINED_RECORD)
    group_examples = (
        dict(zip(map(str, groups[P.GROUPS]), map(float, groups[P.GROUP_EXAMPLES]), strict=True))  # type: ignore[arg-type]
        if groups is not None
        else {}
    )
    _check_at_the_site(trained, global_arrays, num_examples, P.record_number(config, P.SECURE_MAX_NORM, default=0.0))
    kind = str(config[P.SECURE_LAYOUT])
    layout = Layout.of(global_arrays, kind)
    withheld = frozenset(json.loads(str(config.get(P.SECURE_WITHHELD, "[]"))))
    weights = site_weights(group_examples, num_examples, kind, bool(config.get(P.SECURE_UNIFORM, 0)), withheld)
    clip_norm = config.get(P.SECURE_CLIP_NORM)
    max_weight = P.record_number(config, P.SECURE_MAX_WEIGHT)
    vector, clipped, declared = site_vector(
        layout,
        global_arrays,
        trained,
        weights,
        max_weight,
        P.record_number(config, P.SECURE_CLIP),
        float(clip_norm) if isinstance(clip_norm, (int, float)) else None,
    )
    if clipped:  # stays here: how much the clip cut is a property of this site's update
        log.info("secure aggregation: %d of %d update entries clipped to [-c, c]", clipped, vector.size)
    masked = RecordDict(
        {
            FITRES_PARAMETERS: ArrayRecord([vector]),
            # the weights travel inside the vector; Flower's own weight factor is 1 for every site
            FITRES_NUM_EXAMPLES: MetricRecord({"num_examples": 1}),
            FITRES_METRICS: ConfigRecord({}),
            FITRES_STATUS: ConfigRecord({"code": 0, "message": ""}),
            P.METRICS_RECORD: metrics,
            # the weights its vector's weight entries hold, by group (so also which groups it sent): the
            # server unmasks no group one site alone sent, and checks the unmasked sum against them
            P.SECURE_GROUPS_RECORD: ConfigRecord({P.SECURE_WEIGHTS: json.dumps(declared, sort_keys=True)}),
        }
    )
    if P.PRIVACY_RECORD in content.config_records:
        masked[P.PRIVACY_RECORD] = content.config_records[P.PRIVACY_RECORD]
    return Message(masked, reply_to=msg)
