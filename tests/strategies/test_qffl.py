"""q-FFL (q-FedAvg): the step by hand, q = 0 as FedAvg, Flower's maths, per-group steps, a real run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.qfedavg import compute_delta_and_h

from federated.core.arrays import record_to_numpy
from federated.core.config import load_config
from federated.core.config.schema import ConfigError, TrainConfig
from federated.core.config.strategy_section import strategy_config
from federated.core.models import group_of
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from strategies import SiteRound, build_strategy, client_algorithm
from strategies.aggregation import groupwise_weighted_mean
from strategies.qffl import GLOBAL_LOSS, LIPSCHITZ, QFFL, QFFL_RECORD, groupwise_qffl, qffl_delta_and_h, qffl_step

KEYS = ("encoders.eeg.w", "encoders.ct.w", "fusion.w", "heads.bone_age.w")
ZERO = {k: [0.0] for k in KEYS}
ALL = {"encoder/eeg": 10, "encoder/ct": 10, "fusion": 10, "head/bone_age": 10}
EPS = 1e-10


# --- pure maths ----------------------------------------------------------------------------


def test_delta_and_h_by_hand():
    # w = (1, 2), w_k = (0, 0), L = 2: Delta = (2, 4), ||Delta||^2 = 20; F = 0.5, q = 2
    delta, h = qffl_delta_and_h({"a": np.array([1.0, 2.0])}, {"a": np.array([0.0, 0.0])}, 0.5, 2.0, 2.0)
    f = 0.5 + EPS
    assert delta["a"] == pytest.approx(f**2 * np.array([2.0, 4.0]))
    assert h == pytest.approx(2 * f * 20 + 2 * f**2)  # q F^(q-1) ||Delta||^2 + L F^q = 20.5


def test_delta_and_h_match_flowers_qfedavg():
    rng = np.random.default_rng(0)
    current = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    local = {k: v + rng.normal(size=v.shape) * 0.1 for k, v in current.items()}
    for q, loss, lipschitz in [(0.0, 0.7, 100.0), (1.0, 0.7, 100.0), (2.5, 1.9, 10.0), (1.0, 0.0, 5.0)]:
        delta, h = qffl_delta_and_h(current, local, loss, q, lipschitz)
        flower_delta, flower_h = compute_delta_and_h(
            [current["a"].copy(), current["b"].copy()], [local["a"].copy(), local["b"].copy()], q, lipschitz, loss
        )
        assert h == pytest.approx(flower_h, rel=1e-12)
        np.testing.assert_allclose(delta["a"], flower_delta[0], rtol=1e-12)
        np.testing.assert_allclose(delta["b"], flower_delta[1], rtol=1e-12)


def test_qffl_step_by_hand():
    # w = 0; sites at 1 and 3 with F = 1 and 4, q = 1, L = 1, equal weights.
    # Delta = (-1, -3); F^q Delta = (-1, -12); h = q F^0 ||Delta||^2 + L F = (1 + 1, 9 + 4) = (2, 13)
    # w_new = 0 - (-13) / 15 = 13 / 15 (FedAvg would give 2; the high-loss site pulls harder)
    new = qffl_step({"x": np.array([0.0], np.float32)}, [{"x": [1.0]}, {"x": [3.0]}], [1.0, 4.0], [1.0, 1.0], 1.0, 1.0)
    assert new["x"].dtype == np.float32
    assert new["x"][0] == pytest.approx(13 / 15, rel=1e-6)


def test_q_zero_is_the_weighted_mean():
    current = {"x": np.array([1.0, -1.0]), "y": np.array([0.5])}
    updates = [{"x": np.array([2.0, 0.0]), "y": np.array([1.0])}, {"x": np.array([5.0, 3.0]), "y": np.array([-1.0])}]
    # q = 0: h_k = L, so w - sum p_k (w - w_k) / sum p_k = (1 * w_1 + 3 * w_2) / 4, whatever L and F
    new = qffl_step(current, updates, [0.3, 7.0], [1.0, 3.0], 0.0, 50.0)
    np.testing.assert_allclose(new["x"], [(2 + 15) / 4, (0 + 9) / 4])
    np.testing.assert_allclose(new["y"], [(1 - 3) / 4])


def test_q_zero_groupwise_equals_modality_fedavg():
    rng = np.random.default_rng(1)
    current = {k: rng.normal(size=3) for k in KEYS}
    updates = [{k: v + rng.normal(size=3) for k, v in current.items()} for _ in range(3)]
    group_weights = [ALL, {"fusion": 20, "head/bone_age": 20}, {"encoder/eeg": 5, "fusion": 5}]
    q0 = groupwise_qffl(current, updates, [0.1, 2.0, 0.5], group_weights, group_of, 0.0, 100.0)
    mean = groupwise_weighted_mean(current, updates, group_weights, group_of)
    for k in KEYS:
        np.testing.assert_allclose(q0[k], mean[k], rtol=1e-10)


def test_each_group_steps_over_its_own_trainers_with_its_own_norms():
    current = {"encoders.eeg.w": np.array([0.0]), "fusion.w": np.array([0.0]), "heads.bone_age.w": np.array([0.0])}
    a = {"encoders.eeg.w": np.array([10.0]), "fusion.w": np.array([1.0]), "heads.bone_age.w": np.array([7.0])}
    b = {"encoders.eeg.w": np.array([0.0]), "fusion.w": np.array([3.0]), "heads.bone_age.w": np.array([0.0])}
    out = groupwise_qffl(
        current, [a, b], [1.0, 4.0], [{"encoder/eeg": 1, "fusion": 1}, {"fusion": 1}], group_of, 1.0, 1.0
    )
    # fusion: as in test_qffl_step_by_hand, site a's large eeg move does not enter its fusion h
    assert out["fusion.w"][0] == pytest.approx(13 / 15)
    # eeg: site a alone; Delta = -10, h = 100 + 1 -> 0 - (-10) / 101
    assert out["encoders.eeg.w"][0] == pytest.approx(10 / 101)
    assert out["heads.bone_age.w"][0] == 0.0  # nobody trained it


def test_qffl_refuses_bad_input():
    with pytest.raises(ValueError, match="loss"):
        qffl_delta_and_h({"x": np.zeros(1)}, {"x": np.zeros(1)}, math.nan, 1.0, 1.0)
    with pytest.raises(ValueError, match="lipschitz"):
        qffl_delta_and_h({"x": np.zeros(1)}, {"x": np.zeros(1)}, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="weights"):
        qffl_step({"x": np.zeros(1)}, [{"x": np.zeros(1)}], [1.0], [0.0], 1.0, 1.0)
    with pytest.raises(ValueError, match="lacks key"):
        qffl_step({"x": np.zeros(1)}, [{"y": np.zeros(1)}], [1.0], [1.0], 1.0, 1.0)


# --- server, through real Flower messages ------------------------------------------------


def _arrays(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(node: int, value: float, n: int, groups: dict, qffl: dict | None) -> Message:
    claim_server_identity(1)
    content = RecordDict(
        {
            "arrays": _arrays({k: [value] for k in KEYS}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5}),
            "trained": ConfigRecord({"groups": list(groups), "examples": list(groups.values())}),
        }
    )
    if qffl is not None:
        content[QFFL_RECORD] = ConfigRecord(qffl)
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    request.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=request)


def _aggregate(replies: list[Message], **settings) -> tuple[QFFL, dict]:
    # steps worked by hand: the relative norm bound (tests/strategies/test_update_checks.py) is off
    values = {"min_train_sites": 1, "max_update_norm_ratio": 0.0, **settings}
    strategy = build_strategy(strategy_config("qffl", values), n_train_sites=3)
    assert isinstance(strategy, QFFL)
    strategy.know_sites({i: f"site_{i}" for i in (1, 2, 3)}, {1: 100, 2: 100, 3: 100})
    grid = InProcessGrid(client_app=None, node_configs=[{}] * 3, run_config={})  # type: ignore[arg-type]  # messages only
    list(strategy.configure_train(1, _arrays(ZERO), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return strategy, {k: float(a[0]) for k, a in record_to_numpy(arrays).items()}


def test_server_step_by_hand_with_the_sites_lipschitz_median():
    # fusion: sites at 1 (F = 1, 10 examples) and 3 (F = 4, 30 examples), q = 1, L = median(1, 1, 500) = 1
    # Delta = (-1, -3); p F Delta = (-10, -360); p h = (10 * 2, 30 * 13) -> 370 / 410
    strategy, out = _aggregate(
        [
            _reply(1, 1.0, 10, {"fusion": 10, "encoder/eeg": 10}, {GLOBAL_LOSS: 1.0, LIPSCHITZ: 1.0}),
            _reply(2, 3.0, 30, {"fusion": 30}, {GLOBAL_LOSS: 4.0, LIPSCHITZ: 1.0}),
            _reply(3, 9.0, 10, {"head/bone_age": 10}, {GLOBAL_LOSS: 1.0, LIPSCHITZ: 500.0}),
        ],
        q=1.0,
    )
    assert strategy.last_lipschitz == 1.0
    assert out["fusion.w"] == pytest.approx(370 / 410, rel=1e-6)
    assert out["encoders.eeg.w"] == pytest.approx(1 / 2, rel=1e-6)  # one site: 0 - (-1) / (1 + 1)
    assert out["heads.bone_age.w"] == pytest.approx(9 / 82, rel=1e-6)  # Delta = -9, h = 81 + 1
    assert out["encoders.ct.w"] == 0.0


def test_server_setting_overrides_the_sites_lipschitz_and_uniform_weighting_counts_sites_once():
    # L = 2 from the settings; uniform: p = 1 each. fusion: Delta = (-2, -6), F^q Delta = (-2, -24),
    # h = (4 + 2, 36 + 8) = (6, 44) -> 26 / 50
    strategy, out = _aggregate(
        [
            _reply(1, 1.0, 10, {"fusion": 10}, {GLOBAL_LOSS: 1.0, LIPSCHITZ: 7.0}),
            _reply(2, 3.0, 30, {"fusion": 30}, {GLOBAL_LOSS: 4.0, LIPSCHITZ: 7.0}),
        ],
        q=1.0,
        lipschitz=2.0,
        weighting="uniform",
    )
    assert strategy.last_lipschitz == 2.0
    assert out["fusion.w"] == pytest.approx(26 / 50, rel=1e-6)


@pytest.mark.parametrize(
    "qffl, reason",
    [
        (None, "no 'qffl' record"),
        ({GLOBAL_LOSS: -0.1, LIPSCHITZ: 1.0}, "must be finite and >= 0"),
        ({GLOBAL_LOSS: math.inf, LIPSCHITZ: 1.0}, "must be finite and >= 0"),
        ({GLOBAL_LOSS: 1.0, LIPSCHITZ: 0.0}, "must be finite and > 0"),
        ({GLOBAL_LOSS: 1.0}, "not a number"),
    ],
)
def test_replies_without_a_usable_loss_are_refused(qffl, reason):
    strategy, _ = _aggregate(
        [_reply(1, 1.0, 10, ALL, qffl), _reply(2, 2.0, 10, ALL, {GLOBAL_LOSS: 1.0, LIPSCHITZ: 1.0})]
    )
    assert [r.site for r in strategy.last_rejections] == ["site_1"]
    assert reason in strategy.last_rejections[0].reason


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="strategy.q"):
        strategy_config("qffl", {"q": -1.0})
    with pytest.raises(ConfigError, match="lipschitz"):
        strategy_config("qffl", {"lipschitz": math.inf})


# --- site side -----------------------------------------------------------------------------


def test_site_sends_the_global_models_loss_measured_before_training_and_one_over_lr():
    model = torch.nn.Linear(1, 1)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    calls: list[float] = []

    def loss() -> float:
        calls.append(float(model.weight.item()))
        return 0.75

    site = SiteRound(model, {}, RecordDict(), context, TrainConfig(lr=0.004), loss)  # type: ignore[arg-type]
    this_round = client_algorithm(strategy_config("qffl", {})).before_train(site)
    assert len(calls) == 1  # measured at before_train, on the global model
    record = this_round.after_train(steps=5)[QFFL_RECORD]
    assert dict(record) == {GLOBAL_LOSS: 0.75, LIPSCHITZ: pytest.approx(250.0)}
    assert len(calls) == 1


# --- end to end ----------------------------------------------------------------------------


def test_qffl_refuses_adam_whose_steps_are_not_lr_times_the_gradient():
    with pytest.raises(ConfigError, match="train.optimizer must be sgd with strategy=qffl"):
        load_config(["scale=smoke", "strategy=qffl"])
