"""FedGMA: sign agreement, the soft mask and the masked server step, by hand, per parameter group."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from federated.core.arrays import record_to_numpy
from federated.core.config import ConfigError, load_config
from federated.core.config.strategy_section import strategy_config
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from strategies import build_strategy
from strategies.fedgma import FedGMA, FedGMASettings, gma_step, groupwise_gma_step, sign_agreement, soft_mask

KEYS = ("encoders.eeg.w", "encoders.ct.w", "fusion.w", "heads.bone_age.w")
ALL = {"encoder/eeg": 10, "encoder/ct": 10, "fusion": 10, "head/bone_age": 10}


def _arrays(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(node: int, values: dict, n: int, groups: dict) -> Message:
    claim_server_identity(1)
    content = RecordDict({"arrays": _arrays(values), "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5})})
    content["trained"] = ConfigRecord({"groups": list(groups), "examples": list(groups.values())})
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    request.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=request)


def _start(current: dict, n_sites: int = 3, **cfg) -> FedGMA:
    strategy = build_strategy(strategy_config("fedgma", {"min_train_sites": 1, **cfg}), n_train_sites=n_sites)
    assert isinstance(strategy, FedGMA)
    strategy.know_sites({i: f"site_{i}" for i in range(1, n_sites + 1)}, {i: 100 for i in range(1, n_sites + 1)})
    grid = InProcessGrid(client_app=None, node_configs=[{}] * n_sites, run_config={})  # type: ignore[arg-type]  # no ClientApp: only messages are built
    list(strategy.configure_train(1, _arrays(current), ConfigRecord(), grid))
    return strategy


def test_agreement_is_the_absolute_mean_sign():
    deltas = [np.array([1.0, 2.0, -1.0, 0.0]), np.array([3.0, -2.0, -1.0, 0.0]), np.array([2.0, 4.0, 2.0, 5.0])]
    # signs per coordinate: (+,+,+) (+,-,+) (-,-,+) (0,0,+)
    np.testing.assert_allclose(sign_agreement(deltas), [1.0, 1 / 3, 1 / 3, 1 / 3])
    assert sign_agreement([np.array([-0.5, 0.0])]).tolist() == [1.0, 0.0]  # one site agrees with itself


def test_soft_mask_keeps_agreement_above_the_threshold_and_scales_below_it():
    a = np.array([0.0, 0.2, 0.4, 0.9, 1.0])
    assert soft_mask(a, 0.4).tolist() == [0.0, 0.2, 1.0, 1.0, 1.0]  # A >= tau: whole
    assert soft_mask(a, 0.0).tolist() == [1.0] * 5  # tau = 0: FedAvg
    assert soft_mask(a, 1.0).tolist() == [0.0, 0.2, 0.4, 0.9, 1.0]  # tau = 1: only unanimity is whole
    with pytest.raises(ValueError, match="threshold must be in"):
        soft_mask(a, 1.5)


def test_gma_step_by_hand():
    current = {"w": np.array([1.0, 1.0, 1.0], dtype=np.float32)}
    deltas = [[1.0, 2.0, -1.0], [3.0, -2.0, -1.0], [2.0, 4.0, 2.0]]
    updates = [{"w": current["w"] + np.array(d, dtype=np.float32)} for d in deltas]
    # p = (1, 1, 2) / 4; mean delta = (2.0, 2.0, 0.5); agreement = (1, 1/3, 1/3)
    out = gma_step(current, updates, [1.0, 1.0, 2.0], threshold=0.4, server_lr=0.5)
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(out["w"], [1 + 0.5 * 2.0, 1 + 0.5 * (1 / 3) * 2.0, 1 + 0.5 * (1 / 3) * 0.5], rtol=1e-6)
    # tau = 0.3 <= 1/3: every coordinate moves as FedAvg with server_lr would
    out = gma_step(current, updates, [1.0, 1.0, 2.0], threshold=0.3, server_lr=0.5)
    np.testing.assert_allclose(out["w"], [2.0, 2.0, 1.25], rtol=1e-6)


def test_gma_step_refuses_mismatched_input():
    current = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="lacks key 'w'"):
        gma_step(current, [{"v": np.zeros(2)}], [1.0], 0.4)
    with pytest.raises(ValueError, match="weights must be positive"):
        gma_step(current, [{"w": np.ones(2)}], [0.0], 0.4)
    with pytest.raises(ValueError, match="server_lr must be positive"):
        gma_step(current, [{"w": np.ones(2)}], [1.0], 0.4, server_lr=0.0)


def test_groupwise_agreement_counts_only_the_group_trainers():
    current = {"encoders.eeg.w": np.zeros(1), "fusion.w": np.zeros(1)}
    a = {"encoders.eeg.w": np.array([2.0]), "fusion.w": np.array([2.0])}
    b = {"encoders.eeg.w": np.array([0.0]), "fusion.w": np.array([-1.0])}  # never ran eeg: untouched
    out = groupwise_gma_step(current, [a, b], [{"encoder/eeg": 1.0, "fusion": 1.0}, {"fusion": 1.0}], 0.4)
    assert out["encoders.eeg.w"].tolist() == [2.0]  # one trainer: A = 1, not 1/2
    assert out["fusion.w"].tolist() == [0.0]  # + and -: A = 0, the coordinate stays


def _round(strategy: FedGMA) -> dict:
    replies = [
        _reply(1, {k: [2.0] for k in KEYS}, 10, ALL),
        _reply(
            2,
            {"encoders.eeg.w": [0.0], "encoders.ct.w": [-1.0], "fusion.w": [4.0], "heads.bone_age.w": [-2.0]},
            30,
            {"encoder/ct": 30, "fusion": 30, "head/bone_age": 30},
        ),
        _reply(
            3,
            {"encoders.eeg.w": [0.0], "encoders.ct.w": [0.0], "fusion.w": [-3.0], "heads.bone_age.w": [0.0]},
            10,
            {"fusion": 10},
        ),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and not strategy.last_rejections
    return {k: float(v[0]) for k, v in record_to_numpy(arrays).items()}


def test_fedgma_strategy_masks_each_group_over_its_trainers():
    out = _round(_start({k: [0.0] for k in KEYS}, mask_threshold=0.4, server_lr=1.0))
    assert out["encoders.eeg.w"] == 2.0  # site 1 alone trained eeg: unmasked
    assert out["encoders.ct.w"] == 0.0  # sites 1 and 2 disagree: A = 0
    assert out["heads.bone_age.w"] == 0.0
    # fusion: signs (+, +, -), A = 1/3 < 0.4; mean by examples (10*2 + 30*4 - 10*3) / 50 = 2.2
    assert out["fusion.w"] == pytest.approx(2.2 / 3, rel=1e-6)


def test_fedgma_strategy_keeps_the_run_weighting_for_the_mean():
    out = _round(_start({k: [0.0] for k in KEYS}, weighting="uniform"))
    assert out["fusion.w"] == pytest.approx((2.0 + 4.0 - 3.0) / 3 / 3, rel=1e-6)  # uniform mean 1, A = 1/3
    assert FedGMA.STATE == ()  # nothing carried across rounds


@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"mask_threshold": 1.5}, r"^strategy.mask_threshold=1.5: must be in \[0, 1\]$"),
        ({"mask_threshold": math.nan}, r"^strategy.mask_threshold=nan: must be in \[0, 1\]$"),
        ({"server_lr": 0.0}, r"^strategy.server_lr=0.0: must be finite and > 0$"),
    ],
)
def test_settings_refuse_bad_values(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        FedGMASettings(**values)


def test_config_reads_the_preset_and_overrides():
    cfg = load_config(["scale=smoke", "strategy=fedgma", "strategy.mask_threshold=0.7"])
    assert cfg.strategy.settings == FedGMASettings(mask_threshold=0.7, server_lr=1.0)
