"""FedAvg on a 2-site toy through real Flower messages: the result is the weighted mean."""

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from federated.engines.inprocess import claim_server_identity
from strategies import build_strategy
from federated.config.schema import StrategyConfig


def _reply(values, n):
    claim_server_identity(1)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))}),
                          "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})})
    request = Message(RecordDict(), dst_node_id=1, message_type="train")
    request.metadata.__dict__["_message_id"] = "m"
    return Message(content, reply_to=request)


def test_fedavg_weights_by_example_count():
    strategy = build_strategy(StrategyConfig(name="fedavg"), n_train_sites=2)
    arrays, metrics = strategy.aggregate_train(1, [_reply([0.0, 4.0], 30), _reply([4.0, 0.0], 10)])
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 3.0])
    assert metrics["train_loss"] == 1.0
