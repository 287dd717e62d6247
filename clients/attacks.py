"""Simulated bad sites: a ClientApp mod that corrupts the training replies of chosen sites.

For robustness studies only (`attack.kind`, `attack.sites`); a no-op otherwise. With x the
global model the site received and y what it trained:
    sign_flip      sends x - f (y - x)   (f = 10)
    scale          sends x + f (y - x)   (f = 1000)
    nan            sends NaN in every parameter
    inflate_count  claims f times its example count (f = 1000)
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from federated.core.arrays import record_to_numpy
from federated.core.protocol import ARRAYS_RECORD, METRICS_RECORD, NUM_EXAMPLES, record_number

DEFAULT_FACTORS = {"sign_flip": 10.0, "scale": 1000.0, "inflate_count": 1000.0, "nan": 0.0}


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


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    from clients.site_runtime import site_runtime  # lazy: keeps the mod importable alone

    rt = site_runtime(dict(context.run_config), dict(context.node_config))
    attack = rt.cfg.attack
    if attack.kind == "none" or rt.plan.site not in attack.sites:
        return reply
    content = reply.content
    if attack.kind == "inflate_count":
        f = attack.factor or DEFAULT_FACTORS["inflate_count"]
        metrics = content.metric_records[METRICS_RECORD]
        metrics[NUM_EXAMPLES] = int(record_number(metrics, NUM_EXAMPLES) * f)
        return reply
    sent = record_to_numpy(msg.content.array_records[ARRAYS_RECORD])
    trained = record_to_numpy(content.array_records[ARRAYS_RECORD])
    corrupted = corrupt(attack.kind, attack.factor, sent, trained)
    content[ARRAYS_RECORD] = ArrayRecord({k: Array(v) for k, v in corrupted.items()})
    return reply
