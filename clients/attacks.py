"""Simulated bad sites: a ClientApp mod that corrupts the training replies of chosen sites.

For robustness studies only (`attack.kind`, `attack.sites`); a no-op otherwise. With x the
global model the site received and y what it trained:
    sign_flip          sends x - f (y - x)   (f = 10)
    scale              sends x + f (y - x)   (f = 1000)
    nan                sends NaN in every parameter
    huge               sends 3e38 (finite, near float32's maximum) in every parameter of the
                       groups it trained (factor: another value)
    inflate_count      claims f times its example count (f = 1000)
    inflate_handshake  declares f times its training examples at the handshake and claims as
                       many in every round (f = 10^6)
    undeclared_group   moves, and claims to have trained, the encoder of a modality it does not
                       hold by f (f = 1000)
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from federated.core.arrays import pack_arrays, record_to_numpy
from federated.core.models import group_of
from federated.core.protocol import (
    ARRAYS_RECORD,
    GROUP_EXAMPLES,
    GROUPS,
    METRICS_RECORD,
    NUM_EXAMPLES,
    PROFILE_N_TRAIN,
    PROFILE_RECORD,
    TRAINED_RECORD,
    record_number,
)

HUGE = 3e38  # finite in float32 (max 3.4e38), so only a norm bound can tell it from a real value
DEFAULT_FACTORS = {
    "sign_flip": 10.0,
    "scale": 1000.0,
    "inflate_count": 1000.0,
    "nan": 0.0,
    "huge": HUGE,
    "inflate_handshake": 1e6,
    "undeclared_group": 1000.0,
}


def corrupt(
    kind: str, factor: float, sent: dict[str, np.ndarray], trained: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    f = factor or DEFAULT_FACTORS[kind]
    if kind == "sign_flip":
        return {k: (sent[k] - f * (trained[k] - sent[k])).astype(trained[k].dtype) for k in trained}
    if kind == "scale":
        return {k: (sent[k] + f * (trained[k] - sent[k])).astype(trained[k].dtype) for k in trained}
    if kind == "nan":
        return {k: np.full_like(v, np.nan) for k, v in trained.items()}
    return trained


def fill_groups(update: dict[str, np.ndarray], groups: set[str], value: float) -> dict[str, np.ndarray]:
    """`update` with every floating-point parameter of `groups` set to `value`."""
    return {
        k: np.full_like(v, value) if group_of(k) in groups and np.issubdtype(v.dtype, np.floating) else v
        for k, v in update.items()
    }


def shift_group(update: dict[str, np.ndarray], group: str, by: float) -> dict[str, np.ndarray]:
    """`update` with every floating-point parameter of `group` moved by `by`."""
    return {
        k: (v + by).astype(v.dtype) if group_of(k) == group and np.issubdtype(v.dtype, np.floating) else v
        for k, v in update.items()
    }


def foreign_encoder(modalities: tuple[str, ...] | list[str], model_modalities: list[str]) -> str:
    """The encoder group of the first modality of the model (in schema order) a site does not hold."""
    return next(f"encoder/{m}" for m in model_modalities if m not in modalities)


def _inflate_profile(reply: Message, factor: float) -> Message:
    profile = reply.content.config_records[PROFILE_RECORD]
    profile[PROFILE_N_TRAIN] = int(record_number(profile, PROFILE_N_TRAIN) * factor)
    return reply


def _claim_group(content: RecordDict, group: str) -> None:
    """Add `group`, with all the reply's examples, to its 'trained' record."""
    n = int(record_number(content.metric_records[METRICS_RECORD], NUM_EXAMPLES))
    trained = content.config_records.get(TRAINED_RECORD)
    groups = [str(g) for g in trained[GROUPS]] if trained is not None else []  # type: ignore[union-attr]  # a list
    counts = [int(c) for c in trained[GROUP_EXAMPLES]] if trained is not None else []  # type: ignore[union-attr]  # a list
    content[TRAINED_RECORD] = ConfigRecord({GROUPS: [*groups, group], GROUP_EXAMPLES: [*counts, n]})


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    kind = msg.metadata.message_type
    if kind not in (MessageType.TRAIN, MessageType.QUERY) or reply.has_error():
        return reply
    from clients.site_runtime import site_runtime  # lazy: keeps the mod importable alone

    rt = site_runtime(dict(context.run_config), dict(context.node_config))
    attack = rt.cfg.attack
    if attack.kind == "none" or rt.plan.site not in attack.sites:
        return reply
    f = attack.factor or DEFAULT_FACTORS.get(attack.kind, 0.0)
    if kind == MessageType.QUERY:
        return _inflate_profile(reply, f) if attack.kind == "inflate_handshake" else reply
    content = reply.content
    if attack.kind in ("inflate_count", "inflate_handshake"):
        metrics = content.metric_records[METRICS_RECORD]
        metrics[NUM_EXAMPLES] = int(record_number(metrics, NUM_EXAMPLES) * f)
        return reply
    sent = record_to_numpy(msg.content.array_records[ARRAYS_RECORD])
    trained = record_to_numpy(content.array_records[ARRAYS_RECORD])
    if attack.kind == "huge":
        own = {"fusion"} | {f"encoder/{m}" for m in rt.plan.modalities} | {f"head/{t}" for t in rt.plan.tasks}
        corrupted = fill_groups(trained, own, f)
    elif attack.kind == "undeclared_group":
        group = foreign_encoder(rt.plan.modalities, rt.model.modality_names)
        corrupted = shift_group(trained, group, f)
        _claim_group(content, group)
    else:
        corrupted = corrupt(attack.kind, attack.factor, sent, trained)
    content[ARRAYS_RECORD] = pack_arrays(corrupted)
    return reply
