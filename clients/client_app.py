"""The Flower ClientApp every site runs, under every engine.

query    -> the site's profile (the server's handshake)
train    -> load the global arrays, train locally, reply with arrays + example count
evaluate -> load the global arrays, reply with per-task metrics on the site's test split
"""

from __future__ import annotations

import hashlib

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.site_runtime import site_runtime
from clients.trainer import evaluate_site, train_local

app = ClientApp()


def _runtime(context: Context):
    return site_runtime(dict(context.run_config), dict(context.node_config))


def round_seed(seed: int, site: str, server_round: int) -> int:
    """A per-site, per-round seed that does not depend on process or scheduling."""
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@app.query()
def query(msg: Message, context: Context) -> Message:
    rt = _runtime(context)
    p = rt.plan
    profile = ConfigRecord({
        "site": p.site, "role": p.role, "archetype": p.archetype, "origin_site": p.origin_site,
        "modalities": list(p.modalities), "tasks": list(p.tasks),
        "n_train": p.n_train, "n_test": p.n_test,
    })
    return Message(RecordDict({"profile": profile}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    rt = _runtime(context)
    rt.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    server_round = int(msg.content["config"]["server-round"])
    result = train_local(rt.model, rt.data, rt.cfg.train, round_seed(rt.cfg.seed, rt.plan.site, server_round))
    metrics = MetricRecord({"num-examples": result.num_examples, "train_loss": result.mean_loss,
                            "steps": result.steps})
    reply = RecordDict({"arrays": ArrayRecord(rt.model.state_dict()), "metrics": metrics,
                        "trained": ConfigRecord({"groups": list(result.group_examples),
                                                 "examples": list(result.group_examples.values())})})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rt = _runtime(context)
    rt.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    results = evaluate_site(rt.model, rt.data, "test")
    flat: dict[str, float] = {"num-examples": rt.plan.n_test}
    for task, values in results.items():
        for name, value in values.items():
            flat[f"{task}/{name}"] = float(value)
    return Message(RecordDict({"metrics": MetricRecord(flat)}), reply_to=msg)
