"""The federated statistics round's maths: per-site (n, mean, M2) combined exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from federated.server.federated_stats import combine_moments


def moments(values: np.ndarray) -> tuple[int, float, float]:
    if not len(values):
        return 0, 0.0, 0.0
    return len(values), float(values.mean()), float(((values - values.mean()) ** 2).sum())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=0, max_size=30), min_size=1, max_size=6).filter(
        lambda groups: sum(map(len, groups)) > 0
    )
)
def test_combined_moments_equal_the_pooled_ones(groups: list[list[float]]) -> None:
    pooled = np.concatenate([np.asarray(g, dtype=np.float64) for g in groups])
    n, mean, m2 = combine_moments([moments(np.asarray(g, dtype=np.float64)) for g in groups])
    assert n == len(pooled)
    assert abs(mean - pooled.mean()) <= 1e-9 * max(1.0, abs(pooled.mean()))
    assert abs(m2 - ((pooled - pooled.mean()) ** 2).sum()) <= 1e-7 * max(1.0, float((pooled**2).sum()))


def test_hand_computed_example() -> None:
    # {1, 2, 3} and {10}: n 4, mean 4, M2 = 9 + 4 + 1 + 36 = 50
    assert combine_moments([(3, 2.0, 2.0), (1, 10.0, 0.0), (0, 0.0, 0.0)]) == (4, 4.0, 50.0)
