"""FedAvg and modality-aware FedAvg on 2-site toys through real Flower messages."""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from federated.config.schema import StrategyConfig
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from strategies import build_strategy


def _reply(values: dict, n: int, groups: dict | None = None) -> Message:
    claim_server_identity(1)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()}),
        "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})})
    if groups is not None:
        content["trained"] = ConfigRecord({"groups": list(groups), "examples": list(groups.values())})
    request = Message(RecordDict(), dst_node_id=1, message_type="train")
    request.metadata.__dict__["_message_id"] = "m"
    return Message(content, reply_to=request)


def test_fedavg_weights_by_example_count():
    strategy = build_strategy(StrategyConfig(name="fedavg"), n_train_sites=2)
    arrays, metrics = strategy.aggregate_train(1, [_reply({"w": [0.0, 4.0]}, 30), _reply({"w": [4.0, 0.0]}, 10)])
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 3.0])
    assert metrics["train_loss"] == 1.0


def test_modality_fedavg_averages_a_group_only_over_its_trainers():
    """Site A (eeg, 10 examples) and site B (ct, 30 examples) share the fusion block."""
    keys = {"encoders.eeg.w": [0.0], "encoders.ct.w": [0.0], "fusion.w": [0.0], "heads.bone_age.w": [2.0]}
    current = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in keys.items()})
    strategy = build_strategy(StrategyConfig(name="modality_fedavg"), n_train_sites=2)
    grid = InProcessGrid(client_app=None, node_configs=[{}, {}], run_config={})  # type: ignore[arg-type]
    list(strategy.configure_train(1, current, ConfigRecord(), grid))
    a = _reply({"encoders.eeg.w": [4.0], "encoders.ct.w": [0.0], "fusion.w": [4.0], "heads.bone_age.w": [2.0]},
               10, {"encoder/eeg": 10, "fusion": 10})
    b = _reply({"encoders.eeg.w": [0.0], "encoders.ct.w": [8.0], "fusion.w": [0.0], "heads.bone_age.w": [2.0]},
               30, {"encoder/ct": 30, "fusion": 30})
    arrays, _ = strategy.aggregate_train(1, [a, b])
    out = {k: float(v.numpy()[0]) for k, v in arrays.items()}
    assert out == {"encoders.eeg.w": 4.0,  # FedAvg would give 1.0
                   "encoders.ct.w": 8.0,  # FedAvg would give 6.0
                   "fusion.w": 1.0,  # (10*4 + 30*0) / 40
                   "heads.bone_age.w": 2.0}  # nobody trained it: kept
