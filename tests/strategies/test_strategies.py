"""Each strategy on a 2-3 site toy whose result is computed by hand, through real Flower messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from federated.core.arrays import record_to_numpy
from federated.core.config.strategy_section import strategy_config
from federated.engines.inprocess import InProcessGrid, claim_server_identity
from strategies import TooFewValidReplies, build_strategy
from strategies.aggregation import scaffold_server_step
from strategies.fedprox import PROXIMAL_MU
from strategies.scaffold import CONTROL_DELTA_RECORD, CONTROL_RECORD

KEYS = ("encoders.eeg.w", "encoders.ct.w", "fusion.w", "heads.bone_age.w")


def _arrays(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(node: int, values: dict, n: int, groups: dict | None = None, extra: dict | None = None) -> Message:
    claim_server_identity(1)
    content = RecordDict({"arrays": _arrays(values), "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5})})
    if groups is not None:
        content["trained"] = ConfigRecord({"groups": list(groups), "examples": list(groups.values())})
    for name, vals in (extra or {}).items():
        content[name] = _arrays(vals)
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    request.metadata.__dict__["_message_id"] = f"m{node}"
    reply = Message(content, reply_to=request)
    return reply


def _start(name: str, current: dict, n_sites: int = 3, **cfg) -> tuple:
    strategy = build_strategy(strategy_config(name, {"min_train_sites": 1, **cfg}), n_train_sites=n_sites)
    strategy.know_sites({i: f"site_{i}" for i in range(1, n_sites + 1)}, {i: 100 for i in range(1, n_sites + 1)})
    grid = InProcessGrid(client_app=None, node_configs=[{}] * n_sites, run_config={})  # type: ignore[arg-type]  # no ClientApp: only messages are built
    messages = list(strategy.configure_train(1, _arrays(current), ConfigRecord(), grid))
    return strategy, messages


def _out(arrays: ArrayRecord) -> dict:
    return {k: a.tolist() for k, a in record_to_numpy(arrays).items()}


ZERO = {k: [0.0] for k in KEYS}
ALL = {"encoder/eeg": 10, "encoder/ct": 10, "fusion": 10, "head/bone_age": 10}


def test_fedprox_sends_mu_and_averages_like_modality_fedavg():
    strategy, messages = _start("fedprox", ZERO, proximal_mu=0.5)
    assert all(m.content["config"][PROXIMAL_MU] == 0.5 for m in messages)
    arrays, _ = strategy.aggregate_train(
        1,
        [
            _reply(1, {k: [2.0] for k in KEYS}, 10, {"fusion": 10}),
            _reply(2, {k: [4.0] for k in KEYS}, 30, {"fusion": 30}),
        ],
    )
    assert _out(arrays) == {
        "encoders.eeg.w": [0.0],
        "encoders.ct.w": [0.0],
        "fusion.w": [3.5],
        "heads.bone_age.w": [0.0],
    }


def test_fedadam_takes_the_adaptive_step_by_hand():
    strategy, _ = _start("fedadam", ZERO, server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.001)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, {k: [1.0] for k in KEYS}, 10, ALL)])
    # d = 1; m = 0.1; v = 0.99 * tau^2 + 0.01 = 0.01000099; step = 0.1 * 0.1 / (sqrt(v) + 0.001)
    expected = 0.1 * 0.1 / (np.sqrt(0.99 * 1e-6 + 0.01) + 0.001)
    for v in _out(arrays).values():
        assert v[0] == pytest.approx(expected, rel=1e-5)
    assert strategy.state is not None and strategy.state.step == 1


@pytest.mark.parametrize(
    "name, settings", [("median", {}), ("trimmed_mean", {"trim_fraction": 0.2}), ("krum", {"n_byzantine": 1})]
)
def test_robust_aggregators_ignore_one_wild_site(name, settings):
    # the relative norm bound off, so the robust rule itself meets the wild site
    strategy, _ = _start(name, ZERO, n_sites=5, max_update_norm_ratio=0.0, **settings)
    honest = [1.0, 1.1, 0.9, 1.0]
    replies = [_reply(i + 1, {k: [v] for k in KEYS}, 10, ALL) for i, v in enumerate(honest)]
    replies.append(_reply(5, {k: [1000.0] for k in KEYS}, 10, ALL))
    arrays, _ = strategy.aggregate_train(1, replies)
    for v in _out(arrays).values():
        assert 0.9 <= v[0] <= 1.1


def test_scaffold_moves_model_and_control_by_hand():
    strategy, messages = _start("scaffold", ZERO, n_sites=4, global_lr=1.0)
    assert CONTROL_RECORD in messages[0].content.array_records  # the server control travels
    ones = {k: [1.0] for k in KEYS}
    a = _reply(1, {k: [2.0] for k in KEYS}, 10, ALL, {CONTROL_DELTA_RECORD: ones})
    b = _reply(
        2,
        {**{k: [4.0] for k in KEYS}, "encoders.eeg.w": [0.0]},
        10,
        {"encoder/ct": 10, "fusion": 10, "head/bone_age": 10},
        {CONTROL_DELTA_RECORD: {**{k: [3.0] for k in KEYS}, "encoders.eeg.w": [0.0]}},
    )
    arrays, _ = strategy.aggregate_train(1, [a, b])
    out = _out(arrays)
    assert out["fusion.w"] == [3.0]  # x + mean(y - x) over both
    assert out["encoders.eeg.w"] == [2.0]  # only site 1 trained eeg
    c = strategy.control
    assert c["fusion.w"].tolist() == [pytest.approx(2 / 4 * 2.0)]  # |S|/N * mean(1, 3)
    assert c["encoders.eeg.w"].tolist() == [pytest.approx(1 / 4 * 1.0)]


def test_invalid_updates_are_rejected_with_reasons_and_never_reach_the_model():
    strategy, _ = _start("modality_fedavg", ZERO)
    nan = _reply(1, {**{k: [1.0] for k in KEYS}, "fusion.w": [float("nan")]}, 10, ALL)
    inflated = _reply(2, {k: [1.0] for k in KEYS}, 100_000, ALL)
    missing = _reply(3, {k: [1.0] for k in KEYS[:-1]}, 10, ALL)
    good = _reply(1, {k: [2.0] for k in KEYS}, 10, ALL)
    arrays, _ = strategy.aggregate_train(1, [nan, inflated, missing, good])
    reasons = {r.site: r.reason for r in strategy.last_rejections}
    assert set(reasons) == {"site_1", "site_2", "site_3"}
    assert "fusion.w" in reasons["site_1"] and "implausible" in reasons["site_2"]
    assert "heads.bone_age.w" in reasons["site_3"]
    assert all(np.isfinite(a).all() for a in record_to_numpy(arrays).values())
    assert _out(arrays)["fusion.w"] == [2.0]


def test_too_few_valid_replies_fails_loudly_or_skips_by_config():
    bad = _reply(1, {k: [float("inf")] for k in KEYS}, 10, ALL)
    strategy, _ = _start("fedavg", ZERO)
    with pytest.raises(TooFewValidReplies, match="0 valid training replies.*site_1"):
        strategy.aggregate_train(1, [bad])
    strategy, _ = _start("fedavg", ZERO, on_too_few_valid="skip")
    assert strategy.aggregate_train(1, [bad]) == (None, None)


def test_fedavg_weights_by_example_count_over_every_site():
    strategy, _ = _start("fedavg", ZERO, n_sites=2)
    a = _reply(1, {**{k: [0.0] for k in KEYS}, "encoders.eeg.w": [4.0]}, 30, {"encoder/eeg": 30})
    b = _reply(2, {**{k: [4.0] for k in KEYS}, "encoders.eeg.w": [0.0]}, 10, {"encoder/ct": 10})
    arrays, metrics = strategy.aggregate_train(1, [a, b])
    out = _out(arrays)
    assert out["encoders.eeg.w"] == [3.0]  # (30*4 + 10*0)/40: b's untouched copy dilutes it
    assert out["fusion.w"] == [1.0]
    assert metrics["train_loss"] == 0.5


def test_modality_fedavg_averages_a_group_only_over_its_trainers():
    """Site A (eeg, 10 examples) and site B (ct, 30 examples) share the fusion block."""
    strategy, _ = _start("modality_fedavg", {**ZERO, "heads.bone_age.w": [2.0]}, n_sites=2)
    a = _reply(
        1,
        {"encoders.eeg.w": [4.0], "encoders.ct.w": [0.0], "fusion.w": [4.0], "heads.bone_age.w": [2.0]},
        10,
        {"encoder/eeg": 10, "fusion": 10},
    )
    b = _reply(
        2,
        {"encoders.eeg.w": [0.0], "encoders.ct.w": [8.0], "fusion.w": [0.0], "heads.bone_age.w": [2.0]},
        30,
        {"encoder/ct": 30, "fusion": 30},
    )
    arrays, _ = strategy.aggregate_train(1, [a, b])
    assert _out(arrays) == {
        "encoders.eeg.w": [4.0],  # FedAvg would give 1.0
        "encoders.ct.w": [8.0],  # FedAvg would give 6.0
        "fusion.w": [1.0],  # (10*4 + 30*0) / 40
        "heads.bone_age.w": [2.0],
    }  # nobody trained it: kept


@pytest.mark.parametrize(
    "name, v",
    [
        ("fedadagrad", 1e-6 + 1.0),  # v = tau^2 + d^2
        ("fedyogi", 1e-6 + 0.01 * 1.0),  # v = tau^2 - (1 - beta2) d^2 sign(tau^2 - d^2), tau^2 < d^2
    ],
)
def test_fedadagrad_and_fedyogi_first_step_by_hand(name, v):
    strategy, _ = _start(name, ZERO, server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.001)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, {k: [1.0] for k in KEYS}, 10, ALL)])
    expected = 0.1 * 0.1 / (np.sqrt(v) + 0.001)  # m = (1 - beta1) d = 0.1
    for value in _out(arrays).values():
        assert value[0] == pytest.approx(expected, rel=1e-5)


def test_fedbn_and_fedper_average_on_the_server_like_modality_fedavg():
    """Their personalisation is site-side (tests/clients); the server keeps the global average."""
    for name in ("fedbn", "fedper"):
        strategy, _ = _start(name, ZERO, n_sites=2)
        a = _reply(1, {k: [2.0] for k in KEYS}, 10, {"fusion": 10, "head/bone_age": 10})
        b = _reply(2, {k: [6.0] for k in KEYS}, 30, {"fusion": 30})
        out = _out(strategy.aggregate_train(1, [a, b])[0])
        assert out["fusion.w"] == [5.0] and out["heads.bone_age.w"] == [2.0] and out["encoders.ct.w"] == [0.0]


def test_scaffold_takes_the_pure_server_step_on_each_group_over_its_trainers():
    rng = np.random.default_rng(0)
    current = {k: rng.normal(size=3).tolist() for k in KEYS}
    strategy, _ = _start("scaffold", current, n_sites=5, global_lr=0.7)
    ys = [{k: rng.normal(size=3).tolist() for k in KEYS} for _ in range(3)]
    dcs = [{k: rng.normal(size=3).tolist() for k in KEYS} for _ in range(3)]
    groups = [ALL, ALL, {"fusion": 10, "head/bone_age": 10}]  # site 3 trained neither encoder
    replies = [
        _reply(i + 1, y, 10, g, {CONTROL_DELTA_RECORD: dc})
        for i, (y, g, dc) in enumerate(zip(ys, groups, dcs, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)

    def f32(values: dict, keys) -> dict:
        return {k: np.asarray(values[k], dtype=np.float32) for k in keys}

    control = {k: np.zeros(3, dtype=np.float32) for k in KEYS}
    for keys, sites in [(KEYS[:2], [0, 1]), (KEYS[2:], [0, 1, 2])]:
        x, c = scaffold_server_step(
            f32(current, keys),
            [f32(ys[i], keys) for i in sites],
            f32(control, keys),
            [f32(dcs[i], keys) for i in sites],
            n_total_clients=5,
            global_lr=0.7,
        )
        for k in keys:
            np.testing.assert_array_equal(record_to_numpy(arrays)[k], x[k])
            np.testing.assert_array_equal(strategy.control[k], c[k])


MALFORMED_COUNTS = "malformed 'trained' record (group examples must be finite, >= 0 and <= num-examples)"


@pytest.mark.parametrize(
    "drop, groups, reason",
    [
        ("arrays", ALL, "no 'arrays' record in the reply"),
        ("metrics", ALL, "no 'num-examples' in the reply's metrics"),
        (None, {"fusion": 10, "head/bone_age": 11}, MALFORMED_COUNTS),  # more than num-examples
        (None, {"fusion": -1}, MALFORMED_COUNTS),
        (None, {"fusion": float("inf")}, MALFORMED_COUNTS),
    ],
)
def test_unusable_replies_are_rejected_with_their_reason(drop, groups, reason):
    strategy, _ = _start("modality_fedavg", ZERO)
    bad = _reply(2, ZERO, 10, groups)
    if drop is not None:
        del bad.content[drop]
    good = _reply(1, {k: [2.0] for k in KEYS}, 10, ALL)
    arrays, _ = strategy.aggregate_train(1, [bad, good])
    assert [(r.site, r.reason) for r in strategy.last_rejections] == [("site_2", reason)]
    assert _out(arrays)["fusion.w"] == [2.0]


def test_a_trained_record_without_lists_is_malformed():
    strategy, _ = _start("modality_fedavg", ZERO)
    reply = _reply(1, ZERO, 10, ALL)
    reply.content["trained"] = ConfigRecord({"groups": "fusion", "examples": 10})
    assert strategy.parse(reply, {k: np.zeros(1, dtype=np.float32) for k in KEYS}) == (
        "malformed 'trained' record (needs a list of groups and a list of their examples)"
    )


def test_a_reply_without_trained_record_trained_every_group_on_all_its_examples():
    strategy, _ = _start("modality_fedavg", ZERO)
    parsed = strategy.parse(_reply(1, ZERO, 10), {k: np.zeros(1, dtype=np.float32) for k in KEYS})
    assert not isinstance(parsed, str)
    assert parsed.group_examples == {"encoder/eeg": 10, "encoder/ct": 10, "fusion": 10, "head/bone_age": 10}


def test_the_example_limit_is_the_declared_count_times_the_factor_and_absent_without_declaration():
    strategy, _ = _start("fedavg", ZERO, max_examples_factor=1.5)
    current = {k: np.zeros(1, dtype=np.float32) for k in KEYS}
    assert not isinstance(strategy.parse(_reply(1, ZERO, 150), current), str)  # declared 100, x 1.5
    assert strategy.parse(_reply(1, ZERO, 151), current) == "implausible example count 151 > 150 declared"
    assert not isinstance(strategy.parse(_reply(9, ZERO, 10**6), current), str)  # node 9 declared nothing


def test_scaffold_refuses_a_missing_or_non_finite_control_change():
    strategy, _ = _start("scaffold", ZERO)
    current = {k: np.zeros(1, dtype=np.float32) for k in KEYS}
    assert strategy.parse(_reply(1, ZERO, 10, ALL), current) == (
        f"no '{CONTROL_DELTA_RECORD}' record (SCAFFOLD sites must send their control change)"
    )
    nan = {**ZERO, "fusion.w": [float("nan")]}
    assert strategy.parse(_reply(1, ZERO, 10, ALL, {CONTROL_DELTA_RECORD: nan}), current) == (
        "control change: key 'fusion.w' has 1 non-finite value(s) of 1"
    )


def test_scaffold_keeps_model_and_control_of_a_group_nobody_trained():
    current = {k: [float(i + 1)] for i, k in enumerate(KEYS)}
    strategy, _ = _start("scaffold", current, n_sites=2)
    strategy.control = {k: np.full(1, -float(i + 1), dtype=np.float32) for i, k in enumerate(KEYS)}
    trained = {"encoder/ct": 10, "fusion": 10, "head/bone_age": 10}  # nobody trained eeg
    moved = {k: [9.0] for k in KEYS}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, moved, 10, trained, {CONTROL_DELTA_RECORD: moved})])
    assert _out(arrays)["encoders.eeg.w"] == [1.0] and strategy.control["encoders.eeg.w"].tolist() == [-1.0]
    assert _out(arrays)["fusion.w"] == [9.0] and strategy.control["fusion.w"].tolist() == [-3.0 + 9.0 / 2]
