import numpy as np
import pytest

from strategies.aggregation import weighted_mean


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
