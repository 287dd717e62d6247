import dataclasses

import numpy as np
import pytest

from strategies.validation import Rejection, validate_update

REF = {
    "enc.w": np.zeros((2, 3), dtype=np.float32),
    "enc.b": np.zeros(3, dtype=np.float32),
    "head.w": np.zeros(4, dtype=np.float32),
    "head.b": np.zeros((), dtype=np.float32),
    "steps": np.zeros(1, dtype=np.int64),
}


def _good(**changes: object) -> dict:
    update: dict = {k: np.ones_like(v) for k, v in REF.items()}
    update.update(changes)
    return update


def test_a_good_update_passes():
    assert validate_update(_good(), REF, 120, 200) is None
    assert validate_update(_good(), REF, 120, 120) is None  # the limit itself is plausible
    assert validate_update(_good(), REF, 0.5, None) is None  # no limit given


def test_missing_keys_are_named_up_to_three():
    update = {"enc.w": np.ones((2, 3), dtype=np.float32)}
    assert validate_update(update, REF, 10, None) == "missing 4 key(s): 'enc.b', 'head.w', 'head.b' and 1 more"
    update = _good()
    del update["head.b"]
    assert validate_update(update, REF, 10, None) == "missing 1 key(s): 'head.b'"


def test_unknown_keys_are_named():
    assert validate_update(_good(extra=np.ones(1)), REF, 10, None) == "1 unknown key(s): 'extra'"


def test_a_non_array_value_is_refused():
    assert (
        validate_update(_good(**{"enc.b": [1.0, 1.0, 1.0]}), REF, 10, None)
        == "key 'enc.b' is a list, not a numpy array"
    )


def test_wrong_shape_names_key_got_and_expected():
    assert (
        validate_update(_good(**{"enc.w": np.ones((3, 2), dtype=np.float32)}), REF, 10, None)
        == "key 'enc.w' has shape (3, 2), expected (2, 3)"
    )


def test_wrong_dtype_names_key_got_and_expected():
    assert (
        validate_update(_good(**{"head.w": np.ones(4)}), REF, 10, None)
        == "key 'head.w' has dtype float64, expected float32"
    )


@pytest.mark.parametrize(
    "bad, count",
    [
        (np.array([np.nan, 1, 1, 1], dtype=np.float32), 1),
        (np.array([np.inf, -np.inf, np.nan, 0], dtype=np.float32), 3),
    ],
)
def test_non_finite_values_are_counted(bad, count):
    assert (
        validate_update(_good(**{"head.w": bad}), REF, 10, None) == f"key 'head.w' has {count} non-finite value(s) of 4"
    )


def test_a_non_finite_scalar_parameter_is_caught():
    assert (
        validate_update(_good(**{"head.b": np.array(np.inf, dtype=np.float32)}), REF, 10, None)
        == "key 'head.b' has 1 non-finite value(s) of 1"
    )


@pytest.mark.parametrize("n", [0, -3, float("nan"), float("inf"), "10", None, True])
def test_example_count_must_be_a_positive_finite_number(n):
    assert validate_update(_good(), REF, n, None) == f"num_examples must be a positive finite number, got {n!r}"


def test_numpy_counts_are_numbers():
    assert validate_update(_good(), REF, np.int64(7), 10) is None
    assert validate_update(_good(), REF, np.float32(7.5), 10.0) is None


def test_an_implausible_example_count_is_refused():
    assert validate_update(_good(), REF, 5000, 1200) == "implausible example count 5000 > 1200 declared"
    assert validate_update(_good(), REF, 130.5, 120) == "implausible example count 130.5 > 120 declared"


def test_cheap_checks_come_before_the_finiteness_scan():
    nan = np.full(4, np.nan, dtype=np.float32)
    assert validate_update(_good(**{"head.w": nan}), REF, 0, None).startswith("num_examples")
    assert validate_update(_good(**{"head.w": nan}), REF, 500, 100).startswith("implausible")
    assert "dtype" in validate_update(_good(**{"head.w": nan.astype(np.float64)}), REF, 10, None)
    assert "shape" in validate_update(_good(**{"head.w": nan[:3]}), REF, 10, None)


def test_rejection_is_a_frozen_record():
    r = Rejection(node_id=3, site="site_3", reason="missing 1 key(s): 'w'")
    assert (r.node_id, r.site, r.reason) == (3, "site_3", "missing 1 key(s): 'w'")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.reason = "fine"  # type: ignore[misc]  # the point: a frozen dataclass refuses


def test_checks_run_in_order_keys_layout_count_and_name_the_first_problem():
    float64 = np.ones(4)
    no_key = _good(**{"head.w": float64})
    del no_key["enc.b"]
    assert validate_update(no_key, REF, 0, None) == "missing 1 key(s): 'enc.b'"
    assert validate_update(_good(**{"head.w": float64}), REF, 0, None) == (
        "key 'head.w' has dtype float64, expected float32"
    )
    two_bad = _good(**{"enc.w": np.ones(6, dtype=np.float32), "head.w": float64})
    assert validate_update(two_bad, REF, 10, None) == "key 'enc.w' has shape (6,), expected (2, 3)"  # reference order


def test_integer_arrays_are_not_scanned_for_non_finite_values():
    assert validate_update(_good(steps=np.array([-(2**62)], dtype=np.int64)), REF, 10, None) is None
