import numpy as np
import pytest

from strategies.aggregation import groupwise_weighted_mean, weighted_mean


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


@pytest.mark.parametrize("updates, weights, pattern", [
    ([], [], "at least one"),
    ([{"w": np.ones(2)}], [0], "positive and finite"),
    ([{"w": np.ones(2)}], [float("nan")], "positive and finite"),
    ([{"w": np.ones(2)}, {"w": np.ones(3)}], [1, 1], "shape"),
    ([{"w": np.ones(2)}, {"v": np.ones(2)}], [1, 1], "lacks key 'w'"),
    ([{"w": np.ones(2)}, {"w": np.ones(2), "v": np.ones(1)}], [1, 1], "unexpected keys"),
])
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
