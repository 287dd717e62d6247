import math
from functools import partial

import numpy as np
import pytest

from strategies.aggregation import (
    ServerOptState,
    coordinate_median,
    groupwise_aggregate,
    groupwise_weighted_mean,
    krum,
    krum_select,
    scaffold_server_step,
    server_opt_step,
    trimmed_mean,
    weighted_mean,
)
from strategies.validation import validate_update


def test_weighted_mean_by_hand():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array(3.0)}
    b = {"w": np.array([4.0, 8.0], dtype=np.float32), "b": np.array(-1.0)}
    out = weighted_mean([a, b], [1, 3])
    # (1*1 + 3*4)/4 = 3.25, (1*2 + 3*8)/4 = 6.5, (3 - 3)/4 = 0
    np.testing.assert_allclose(out["w"], [3.25, 6.5])
    assert out["w"].dtype == np.float32
    assert float(out["b"]) == pytest.approx(0.0)


def test_single_update_is_returned_unchanged():
    a = {"w": np.arange(4.0)}
    np.testing.assert_array_equal(weighted_mean([a], [7])["w"], a["w"])


@pytest.mark.parametrize(
    "updates, weights, pattern",
    [
        ([], [], "at least one"),
        ([{"w": np.ones(2)}], [0], "positive and finite"),
        ([{"w": np.ones(2)}], [float("nan")], "positive and finite"),
        ([{"w": np.ones(2)}, {"w": np.ones(3)}], [1, 1], "shape"),
        ([{"w": np.ones(2)}, {"v": np.ones(2)}], [1, 1], "lacks key 'w'"),
        ([{"w": np.ones(2)}, {"w": np.ones(2), "v": np.ones(1)}], [1, 1], "unexpected keys"),
    ],
)
def test_bad_inputs_are_refused(updates, weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        weighted_mean(updates, weights)


def _group(key: str) -> str:
    return key.split(".")[0]


def test_groupwise_mean_by_hand():
    current = {"enc.w": np.array([0.0, 0.0]), "head.w": np.array([5.0]), "rare.w": np.array([7.0])}
    a = {"enc.w": np.array([2.0, 4.0]), "head.w": np.array([1.0]), "rare.w": np.array([7.0])}
    b = {"enc.w": np.array([6.0, 0.0]), "head.w": np.array([99.0]), "rare.w": np.array([7.0])}
    weights = [{"enc": 1, "head": 10}, {"enc": 3}]  # b did not train head; nobody trained rare
    out = groupwise_weighted_mean(current, [a, b], weights, _group)
    np.testing.assert_allclose(out["enc.w"], [(2 + 18) / 4, (4 + 0) / 4])  # 5.0, 1.0
    np.testing.assert_allclose(out["head.w"], [1.0])  # only a's head, b's untouched copy ignored
    np.testing.assert_allclose(out["rare.w"], [7.0])  # kept


def test_groupwise_mean_is_fedavg_when_everyone_trains_everything():
    rng = np.random.default_rng(0)
    ups = [{"enc.w": rng.normal(size=3), "head.w": rng.normal(size=2)} for _ in range(3)]
    n = [3.0, 1.0, 6.0]
    out = groupwise_weighted_mean(ups[0], ups, [{"enc": w, "head": w} for w in n], _group)
    ref = weighted_mean(ups, n)
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k])


def test_weighted_mean_keeps_dtype_and_shape_of_every_key():
    a = {"s": np.array(1.0), "m": np.ones((2, 3), dtype=np.float32), "e": np.zeros((0,)), "i": np.array([1, 4])}
    b = {"s": np.array(3.0), "m": np.full((2, 3), 3.0, dtype=np.float32), "e": np.zeros((0,)), "i": np.array([3, 8])}
    out = weighted_mean([a, b], [1, 1])
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {k: (v.dtype, v.shape) for k, v in a.items()}
    assert float(out["s"]) == 2.0 and out["m"].tolist() == [[2.0] * 3] * 2 and out["i"].tolist() == [2, 6]


def test_weighted_mean_accumulates_in_float64():
    # float32 inputs 2^25, 1, 1, 1 with equal weights: exact mean 2^23 + 0.75 -> 8388609 in
    # float32 (spacing 1 there). Accumulating in float32 would give 2^23: each + 0.25 rounds away.
    ups = [{"w": np.array([v], dtype=np.float32)} for v in (2.0**25, 1.0, 1.0, 1.0)]
    assert weighted_mean(ups, [1, 1, 1, 1])["w"].tolist() == [8388609.0]


# --- coordinate median -------------------------------------------------------------


def test_coordinate_median_by_hand():
    ups = [
        {"w": np.array([1.0, 10.0], dtype=np.float32)},
        {"w": np.array([2.0, -4.0], dtype=np.float32)},
        {"w": np.array([7.0, 0.0], dtype=np.float32)},
    ]
    out = coordinate_median(ups, [1, 1, 100])  # weights are ignored
    # sorted columns: (1, 2, 7) -> 2; (-4, 0, 10) -> 0
    assert out["w"].tolist() == [2.0, 0.0] and out["w"].dtype == np.float32
    ups.append({"w": np.array([3.0, 5.0], dtype=np.float32)})
    # even count: (1, 2, 3, 7) -> (2 + 3) / 2 = 2.5; (-4, 0, 5, 10) -> (0 + 5) / 2 = 2.5
    assert coordinate_median(ups, [1] * 4)["w"].tolist() == [2.5, 2.5]


def test_coordinate_median_matches_numpy_across_blocks(monkeypatch):
    import strategies.aggregation as agg

    monkeypatch.setattr(agg, "_BLOCK", 4 * 7)  # 7 coordinates per block: several, one ragged
    rng = np.random.default_rng(1)
    ups = [{"a": rng.normal(size=(5, 6)), "b": rng.normal(size=3).astype(np.float32)} for _ in range(4)]
    out = coordinate_median(ups, [1] * 4)
    for k in ("a", "b"):
        ref = np.median(np.stack([u[k].astype(np.float64) for u in ups]), axis=0).astype(ups[0][k].dtype)
        np.testing.assert_array_equal(out[k], ref)


# --- trimmed mean ------------------------------------------------------------------

_FIVE = [{"w": np.array([v, u])} for v, u in [(1.0, -5.0), (2.0, 0.0), (3.0, 10.0), (4.0, 5.0), (100.0, 5.0)]]


@pytest.mark.parametrize(
    "fraction, expected",
    [
        (0.0, [110 / 5, 15 / 5]),  # nothing trimmed: plain means 22, 3
        (0.2, [3.0, 10 / 3]),  # floor(1.0) = 1 from each end: (2, 3, 4) and (0, 5, 5)
        (0.39, [3.0, 10 / 3]),  # floor(1.95) = 1
        (0.4, [3.0, 5.0]),  # floor(2.0) = 2: the middle value only
    ],
)
def test_trimmed_mean_by_hand(fraction, expected):
    np.testing.assert_allclose(trimmed_mean(_FIVE, [1] * 5, fraction)["w"], expected)


@pytest.mark.parametrize("fraction", [0.5, -0.1, 0.7])
def test_trimmed_mean_refuses_fractions_outside_zero_to_half(fraction):
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean(_FIVE, [1] * 5, fraction)


def test_trimmed_mean_keeps_dtype_and_refuses_mismatched_input():
    ups = [{"w": np.array([float(i)], dtype=np.float32)} for i in range(4)]
    assert trimmed_mean(ups, [1] * 4, 0.25)["w"].dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        trimmed_mean([*ups, {"w": np.ones(2, dtype=np.float32)}], [1] * 5, 0.2)
    with pytest.raises(ValueError, match="4 updates but 3 weights"):
        trimmed_mean(ups, [1] * 3, 0.2)
    with pytest.raises(ValueError, match="at least one"):
        trimmed_mean([], [], 0.2)


@pytest.mark.parametrize("rule", [partial(coordinate_median), partial(trimmed_mean, trim_fraction=0.2)])
def test_median_and_trimmed_mean_ignore_one_huge_outlier(rule):
    rng = np.random.default_rng(0)
    honest = [{"w": rng.normal(0.0, 0.1, size=50)} for _ in range(4)]
    attacked = [*honest, {"w": np.full(50, 1e12)}]
    out = rule(attacked, [1] * 5)["w"]
    stacked = np.stack([u["w"] for u in honest])
    assert np.all(out >= stacked.min(axis=0)) and np.all(out <= stacked.max(axis=0))


# --- Krum --------------------------------------------------------------------------


def _points(*xy: tuple[float, float]) -> list[dict[str, np.ndarray]]:
    """2-D points split over two keys, so distances must sum over keys."""
    return [{"a": np.array([float(x)]), "b": np.array([float(y)])} for x, y in xy]


# P0=(0,0) P1=(1,0) P2=(0,2) P3=(5,5) P4=(6,5); squared distances:
#   P0: P1 1, P2 4, P3 50, P4 61     two nearest (n - f - 2 = 5 - 1 - 2): 1 + 4  = 5
#   P1: P0 1, P2 5, P3 41, P4 50                                          1 + 5  = 6
#   P2: P0 4, P1 5, P3 34, P4 45                                          4 + 5  = 9
#   P3: P0 50, P1 41, P2 34, P4 1                                         1 + 34 = 35
#   P4: P0 61, P1 50, P2 45, P3 1                                         1 + 45 = 46
_P = _points((0, 0), (1, 0), (0, 2), (5, 5), (6, 5))


def test_krum_select_by_hand():
    assert krum_select(_P, n_byzantine=1) == [0]
    assert krum_select(_P, n_byzantine=1, n_selected=3) == [0, 1, 2]
    assert krum_select(_P, n_byzantine=1, n_selected=5) == [0, 1, 2, 3, 4]


def test_krum_breaks_ties_by_index():
    # On a line 0, 1, 2, 10, 11 with f = 1: scores 1+4=5, 1+1=2, 1+4=5, 1+64=65, 1+81=82.
    line = [{"w": np.array([x])} for x in (0.0, 1.0, 2.0, 10.0, 11.0)]
    assert krum_select(line, n_byzantine=1, n_selected=3) == [1, 0, 2]


def test_krum_is_the_weighted_mean_of_the_selection():
    # multi-Krum keeps P0, P1; weights 1 and 3 -> a = (0 * 1 + 1 * 3) / 4 = 0.75, b = 0
    out = krum(_P, [1, 3, 1, 1, 1], n_byzantine=1, n_selected=2)
    assert out["a"].tolist() == [0.75] and out["b"].tolist() == [0.0]
    np.testing.assert_array_equal(krum(_P, [1] * 5, n_byzantine=1)["a"], _P[0]["a"])


def test_krum_refuses_too_few_updates_and_bad_selection():
    with pytest.raises(ValueError, match=r"n > 2f \+ 2.*n=4 with f=1.*n >= 5"):
        krum_select(_P[:4], n_byzantine=1)
    with pytest.raises(ValueError, match="n_selected"):
        krum_select(_P, n_byzantine=1, n_selected=0)
    with pytest.raises(ValueError, match="n_selected"):
        krum_select(_P, n_byzantine=1, n_selected=6)
    with pytest.raises(ValueError, match="5 updates but 4 weights"):
        krum(_P, [1] * 4, n_byzantine=1)


def test_krum_never_selects_an_update_1000x_away():
    rng = np.random.default_rng(2)
    ups = [{"a": rng.normal(size=(4, 4)), "b": rng.normal(size=3)} for _ in range(7)]
    ups[3] = {k: 1000 * v for k, v in ups[3].items()}
    for selected in range(1, 6):  # up to n - f with f = 1
        assert 3 not in krum_select(ups, n_byzantine=1, n_selected=selected)


def test_multi_krum_keeps_exactly_the_honest_updates_in_a_planted_example():
    rng = np.random.default_rng(3)
    n, f = 9, 3
    byzantine = {1, 4, 7}  # colluding: identical, and 5 away in every coordinate
    ups = [
        {"w": (5.0 if i in byzantine else 0.0) + (0.0 if i in byzantine else rng.normal(0, 0.1, 20)) * np.ones(20)}
        for i in range(n)
    ]
    assert sorted(krum_select(ups, n_byzantine=f, n_selected=n - f)) == sorted(set(range(n)) - byzantine)


def test_krum_distances_survive_large_common_offsets():
    # Models far from the origin but close to each other. On the line 0, 1, 3, 10, 11 (x 1000
    # coordinates) the scores are 1000 * (1+9, 1+4, 4+9, 1+49, 1+64). Uncentred, |x|^2 + |y|^2
    # - 2<x, y> at |x|^2 = 1e19 loses everything (scores come out negative); centring keeps them.
    base = np.full(1000, 1e8)
    line = [{"w": base + x} for x in (0.0, 1.0, 3.0, 10.0, 11.0)]
    assert krum_select(line, n_byzantine=1, n_selected=5) == [1, 0, 2, 3, 4]


# --- what non-finite values do (validation is the guard) ------------------------------


def _with_nan() -> list[dict[str, np.ndarray]]:
    ups = [{"w": np.array([1.0, 1.0]) * v} for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
    ups[4] = {"w": np.array([np.nan, 5.0])}
    return ups


def test_nan_propagates_through_weighted_mean_and_median_at_its_coordinate():
    for out in (weighted_mean(_with_nan(), [1] * 5), coordinate_median(_with_nan(), [1] * 5)):
        assert math.isnan(out["w"][0]) and math.isfinite(out["w"][1])


def test_trimmed_mean_drops_nan_as_largest_only_when_it_trims():
    # column 0 sorted: 1, 2, 3, 4, NaN -> trimming 1 per end keeps (2, 3, 4)
    assert trimmed_mean(_with_nan(), [1] * 5, 0.2)["w"].tolist() == [3.0, 3.0]
    assert math.isnan(trimmed_mean(_with_nan(), [1] * 5, 0.0)["w"][0])
    two_nans = _with_nan()
    two_nans[0] = {"w": np.array([np.nan, 1.0])}  # more NaNs (2) than trimmed per end (1)
    assert math.isnan(trimmed_mean(two_nans, [1] * 5, 0.2)["w"][0])


def test_krum_never_selects_a_non_finite_update_unless_asked_for_all():
    ups = [{"w": np.array([x, 0.0])} for x in (0.0, 1.0, 2.0, 3.0, 4.0)]
    ups[2] = {"w": np.array([np.inf, np.nan])}
    assert 2 not in krum_select(ups, n_byzantine=1, n_selected=4)
    assert krum_select(ups, n_byzantine=1, n_selected=5)[-1] == 2


def test_validation_rejects_the_nan_update_before_any_aggregator_sees_it():
    ups = _with_nan()
    reasons = [validate_update(u, ups[0], 10, None) for u in ups]
    assert reasons[:4] == [None] * 4
    assert reasons[4] == "key 'w' has 1 non-finite value(s) of 2"


# --- groupwise ---------------------------------------------------------------------


def test_groupwise_aggregate_applies_the_rule_per_group_over_its_trainers():
    current = {"enc.w": np.array([0.0]), "head.w": np.array([5.0]), "rare.w": np.array([7.0])}
    ups = [
        {"enc.w": np.array([v]), "head.w": np.array([10 * v]), "rare.w": np.array([-1.0])} for v in (1.0, 2.0, 9.0, 4.0)
    ]
    weights = [{"enc": 1, "head": 1}, {"enc": 1}, {"enc": 1, "head": 1}, {"enc": 1, "head": 0}]
    out = groupwise_aggregate(current, ups, weights, _group, coordinate_median)
    assert out["enc.w"].tolist() == [3.0]  # median of 1, 2, 9, 4 = (2 + 4) / 2
    assert out["head.w"].tolist() == [50.0]  # median of 10 and 90 only (weight 0 is not training)
    assert out["rare.w"] is current["rare.w"]


def test_groupwise_aggregate_with_no_updates_keeps_everything():
    current = {"enc.w": np.array([1.0])}
    assert groupwise_aggregate(current, [], [], _group, weighted_mean)["enc.w"] is current["enc.w"]


def test_groupwise_aggregate_refuses_updates_that_do_not_match_the_model():
    current = {"enc.w": np.zeros(2), "head.w": np.zeros(1)}
    with pytest.raises(ValueError, match="lacks key 'head.w'"):
        groupwise_weighted_mean(current, [{"enc.w": np.ones(2)}], [{"enc": 1}], _group)
    with pytest.raises(ValueError, match="shape"):
        groupwise_weighted_mean(current, [{"enc.w": np.ones(3), "head.w": np.ones(1)}], [{"enc": 1}], _group)
    with pytest.raises(ValueError, match="1 updates but 2 group weight maps"):
        groupwise_weighted_mean(current, [current], [{"enc": 1}, {"enc": 1}], _group)


# --- server optimisers -------------------------------------------------------------


def test_fedadam_two_steps_by_hand():
    # beta1 = beta2 = tau = 0.5, lr = 1; start m = 0, v = tau^2 = 0.25.
    # step 1, d = (0.5, -0.5): m = 0.5 * d = (0.25, -0.25); v = 0.5 * 0.25 + 0.5 * 0.25 = 0.25
    #   x = (1, 0) + m / (0.5 + 0.5) = (1.25, -0.25)
    # step 2, aggregated (4.75, -0.75) -> d = (3.5, -0.5):
    #   m = 0.5 * m + 0.5 * d = (0.125 + 1.75, -0.125 - 0.25) = (1.875, -0.375)
    #   v = 0.5 * 0.25 + 0.5 * d^2 = (0.125 + 6.125, 0.125 + 0.125) = (6.25, 0.25), sqrt (2.5, 0.5)
    #   x = (1.25 + 1.875 / 3, -0.25 - 0.375 / 1) = (1.875, -0.625)
    kw = dict(variant="adam", lr=1.0, beta1=0.5, beta2=0.5, tau=0.5)
    current = {"w": np.array([1.0, 0.0], dtype=np.float32)}
    x1, s1 = server_opt_step(current, {"w": np.array([1.5, -0.5], dtype=np.float32)}, None, **kw)
    assert x1["w"].tolist() == [1.25, -0.25] and x1["w"].dtype == np.float32
    assert s1.step == 1 and s1.m["w"].tolist() == [0.25, -0.25] and s1.v["w"].tolist() == [0.25, 0.25]
    assert s1.m["w"].dtype == np.float64
    x2, s2 = server_opt_step(x1, {"w": np.array([4.75, -0.75], dtype=np.float32)}, s1, **kw)
    assert x2["w"].tolist() == [1.875, -0.625] and s2.step == 2
    assert s2.m["w"].tolist() == [1.875, -0.375] and s2.v["w"].tolist() == [6.25, 0.25]
    assert s1.m["w"].tolist() == [0.25, -0.25]  # the old state is not modified


def test_server_opt_starts_second_moment_at_tau_squared():
    # Defaults beta1 0.9, beta2 0.99, tau 1e-3, lr 0.1, d = 0.5:
    # m = 0.05, v = 0.99 * 1e-6 + 0.01 * 0.25 = 0.00250099 -> x = 1 + 0.1 * 0.05 / (sqrt(v) + 1e-3).
    # (Starting v at 0 would give 1 + 0.005 / 0.051 = 1.0980392, off by 2e-5.)
    x, _ = server_opt_step({"w": np.array([1.0])}, {"w": np.array([1.5])}, None, "adam", lr=0.1)
    assert x["w"][0] == pytest.approx(1 + 0.005 / (math.sqrt(0.00250099) + 1e-3), rel=1e-12)
    assert x["w"][0] == pytest.approx(1.0980202, abs=1e-7)


@pytest.mark.parametrize(
    "variant, d, expected_v, expected_x",
    [
        # adagrad: v = 0.25 + 0.375^2 = 0.390625 = 0.625^2; m = 0.1875; x = 0.1875 / (0.625 + 0.5) = 1/6
        ("adagrad", 0.375, 0.390625, 1 / 6),
        # yogi, v < d^2: v = 0.25 - 0.5 * 4 * sign(0.25 - 4) = 2.25 = 1.5^2; m = 1; x = 1 / (1.5 + 0.5)
        ("yogi", 2.0, 2.25, 0.5),
        # yogi, v > d^2 (d = 0.25): v = 0.25 - 0.5 * 0.0625 = 0.21875; m = 0.125
        ("yogi", 0.25, 0.21875, 0.125 / (math.sqrt(0.21875) + 0.5)),
    ],
)
def test_fedadagrad_and_fedyogi_one_step_by_hand(variant, d, expected_v, expected_x):
    x, state = server_opt_step(
        {"w": np.array([0.0])}, {"w": np.array([d])}, None, variant, lr=1.0, beta1=0.5, beta2=0.5, tau=0.5
    )
    assert state.v["w"][0] == pytest.approx(expected_v) and x["w"][0] == pytest.approx(expected_x)


def test_server_opt_refuses_unknown_variants_and_mismatched_state():
    current = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="'sgd'.*adagrad, adam, yogi"):
        server_opt_step(current, current, None, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="state.m lacks key 'w'"):
        server_opt_step(current, current, ServerOptState(m={}, v={"w": np.ones(2)}, step=1), "adam", lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        server_opt_step(current, {"w": np.zeros(3)}, None, "adam", lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        server_opt_step(current, current, None, "adam", lr=0.0)


def test_server_opt_state_is_frozen():
    _, state = server_opt_step({"w": np.zeros(1)}, {"w": np.ones(1)}, None, "adam", lr=0.1)
    with pytest.raises(AttributeError):
        state.step = 5  # type: ignore[misc]  # the point: a frozen dataclass refuses


# --- SCAFFOLD ----------------------------------------------------------------------


def test_scaffold_server_step_by_hand():
    # x = (1, 2); y1 = (2, 2), y2 = (4, 0): mean(y - x) = ((1, 0) + (3, -2)) / 2 = (2, -1)
    #   global_lr 0.5 -> x_new = (1 + 1, 2 - 0.5) = (2, 1.5)
    # c = (1, 1); dc1 = (2, 0), dc2 = (0, 4): mean (1, 2); |S| / N = 2 / 8 -> c_new = (1.25, 1.5)
    x = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    c = {"w": np.array([1.0, 1.0])}
    x_new, c_new = scaffold_server_step(
        x,
        [{"w": np.array([2.0, 2.0], dtype=np.float32)}, {"w": np.array([4.0, 0.0], dtype=np.float32)}],
        c,
        [{"w": np.array([2.0, 0.0])}, {"w": np.array([0.0, 4.0])}],
        n_total_clients=8,
        global_lr=0.5,
    )
    assert x_new["w"].tolist() == [2.0, 1.5] and x_new["w"].dtype == np.float32
    assert c_new["w"].tolist() == [1.25, 1.5] and c_new["w"].dtype == np.float64


def test_scaffold_refuses_inconsistent_inputs():
    x, c = {"w": np.zeros(2)}, {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="2 updates but 1 control deltas"):
        scaffold_server_step(x, [x, x], c, [c], n_total_clients=4)
    with pytest.raises(ValueError, match="n_total_clients=1"):
        scaffold_server_step(x, [x, x], c, [c, c], n_total_clients=1)
    with pytest.raises(ValueError, match="control lacks key 'w'"):
        scaffold_server_step(x, [x], {"v": np.zeros(2)}, [c], n_total_clients=4)
    with pytest.raises(ValueError, match="control delta 0 key 'w' has shape"):
        scaffold_server_step(x, [x], c, [{"w": np.zeros(3)}], n_total_clients=4)
