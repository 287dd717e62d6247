"""Property tests (Hypothesis) of the invariants every aggregation rule must keep.

Sites are interchangeable (permuting them leaves the result unchanged), only relative weights
matter (scaling all weights by c > 0 leaves it unchanged), a site alone gets its own update
back, and an average never leaves the per-coordinate range of what it averages. Where the
rule sums in a different order after a permutation or a rescaling, the comparison allows an
explicit float64 rounding bound (`_tol`); where it only sorts and selects, it must be exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from strategies.aggregation import (
    coordinate_median,
    groupwise_weighted_mean,
    krum,
    krum_select,
    trimmed_mean,
    weighted_mean,
)

# Modest and without a deadline: the default tier stays quick and a slow shared machine does
# not turn a pass into a flake. No example database: nothing is written into the checkout.
FAST = settings(max_examples=40, deadline=None, database=None)

Update = dict[str, np.ndarray]
KEYS = ("enc.w", "enc.b", "fusion.w", "head.w")
WEIGHT = st.floats(1e-3, 1e3)
FACTOR = st.floats(1e-3, 1e3)
EPS = float(np.finfo(np.float64).eps)


@st.composite
def site_updates(
    draw: st.DrawFn, min_sites: int = 1, max_sites: int = 6, dtype: type[np.floating] = np.float64
) -> list[Update]:
    """1-4 keys of small shapes (scalars to 4x4), the same for every site, finite values."""
    shapes = draw(st.dictionaries(st.sampled_from(KEYS), array_shapes(min_dims=0, max_dims=2, max_side=4), min_size=1))
    n = draw(st.integers(min_sites, max_sites))
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32 if dtype == np.float32 else 64)
    return [{k: draw(arrays(dtype, shape, elements=elements)) for k, shape in shapes.items()} for _ in range(n)]


def _tol(updates: Sequence[Update]) -> float:
    """Rounding bound for two float64 weighted sums of the same terms in another order or with
    weights normalised from rescaled values: a few ulps per term at the largest magnitude."""
    biggest = max((float(np.max(np.abs(v))) for u in updates for v in u.values() if np.size(v)), default=0.0)
    return 16 * len(updates) * EPS * (1.0 + biggest)


def _assert_close(a: Update, b: Update, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=tol, err_msg=k)


def _assert_equal(a: Update, b: Update) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _assert_within_range(result: Update, updates: Sequence[Update], tol: float) -> None:
    for k in result:
        stack = np.stack([u[k] for u in updates])
        assert np.all(result[k] >= stack.min(axis=0) - tol), k
        assert np.all(result[k] <= stack.max(axis=0) + tol), k


def _permute(data: st.DataObject, n: int) -> list[int]:
    return data.draw(st.permutations(range(n)), label="permutation")


# --- weighted mean (FedAvg) ------------------------------------------------------------------


@FAST
@given(st.data())
def test_weighted_mean_ignores_the_order_of_sites(data: st.DataObject) -> None:
    updates = data.draw(site_updates())
    weights = data.draw(st.lists(WEIGHT, min_size=len(updates), max_size=len(updates)))
    order = _permute(data, len(updates))
    _assert_close(
        weighted_mean([updates[i] for i in order], [weights[i] for i in order]),
        weighted_mean(updates, weights),
        _tol(updates),
    )


@FAST
@given(st.data(), FACTOR)
def test_weighted_mean_depends_only_on_relative_weights(data: st.DataObject, factor: float) -> None:
    updates = data.draw(site_updates())
    weights = data.draw(st.lists(WEIGHT, min_size=len(updates), max_size=len(updates)))
    _assert_close(weighted_mean(updates, [w * factor for w in weights]), weighted_mean(updates, weights), _tol(updates))


@FAST
@given(site_updates(max_sites=1, dtype=np.float32) | site_updates(max_sites=1), WEIGHT)
def test_weighted_mean_of_one_site_is_its_update_exactly(updates: list[Update], weight: float) -> None:
    _assert_equal(weighted_mean(updates, [weight]), updates[0])


@FAST
@given(st.data())
def test_weighted_mean_stays_within_each_coordinates_range(data: st.DataObject) -> None:
    updates = data.draw(site_updates())
    weights = data.draw(st.lists(WEIGHT, min_size=len(updates), max_size=len(updates)))
    _assert_within_range(weighted_mean(updates, weights), updates, _tol(updates))


@FAST
@given(site_updates(), st.integers(1, 6))
def test_weighted_mean_of_identical_sites_is_that_update(updates: list[Update], n: int) -> None:
    copies = [updates[0]] * n
    _assert_close(weighted_mean(copies, [1.0 + i for i in range(n)]), updates[0], _tol(copies))


# --- group-wise weighted mean (modality-aware FedAvg) ----------------------------------------


def _group(key: str) -> str:
    return key.split(".")[0]


@st.composite
def groupwise_case(draw: st.DrawFn, min_sites: int = 1) -> tuple[Update, list[Update], list[dict[str, float]]]:
    """A current model, site updates of the same layout, and per site a weight for each group it
    trained (0 or absent: it did not train that group)."""
    updates = draw(site_updates(min_sites=min_sites + 1, max_sites=7))
    current, updates = updates[0], updates[1:]
    groups = sorted({_group(k) for k in current})
    maps = [draw(st.dictionaries(st.sampled_from(groups), WEIGHT | st.just(0.0))) for _ in updates]
    return current, updates, maps


def _trainers(group: str, maps: Sequence[dict[str, float]]) -> list[int]:
    return [i for i, m in enumerate(maps) if m.get(group, 0.0) > 0]


@FAST
@given(groupwise_case(), st.data())
def test_groupwise_mean_ignores_the_order_of_sites(case: tuple, data: st.DataObject) -> None:
    current, updates, maps = case
    order = _permute(data, len(updates))
    permuted = groupwise_weighted_mean(current, [updates[i] for i in order], [maps[i] for i in order], _group)
    _assert_close(permuted, groupwise_weighted_mean(current, updates, maps, _group), _tol([current, *updates]))


@FAST
@given(groupwise_case(), FACTOR)
def test_groupwise_mean_depends_only_on_relative_weights(case: tuple, factor: float) -> None:
    current, updates, maps = case
    scaled = [{g: w * factor for g, w in m.items()} for m in maps]
    _assert_close(
        groupwise_weighted_mean(current, updates, scaled, _group),
        groupwise_weighted_mean(current, updates, maps, _group),
        _tol([current, *updates]),
    )


@FAST
@given(groupwise_case(min_sites=1))
def test_groupwise_mean_of_one_site_is_its_update_where_it_trained(case: tuple) -> None:
    current, updates, maps = case
    out = groupwise_weighted_mean(current, updates[:1], maps[:1], _group)
    for k in current:
        expected = updates[0][k] if maps[0].get(_group(k), 0.0) > 0 else current[k]
        np.testing.assert_array_equal(out[k], expected, err_msg=k)


@FAST
@given(groupwise_case())
def test_groupwise_mean_stays_within_the_range_of_each_groups_trainers(case: tuple) -> None:
    current, updates, maps = case
    out = groupwise_weighted_mean(current, updates, maps, _group)
    for k in current:
        trainers = _trainers(_group(k), maps)
        pool = [updates[i] for i in trainers] or [current]  # untrained: the current value, kept
        _assert_within_range({k: out[k]}, [{k: u[k]} for u in pool], _tol([current, *updates]))


# --- coordinate-wise median and trimmed mean (unweighted) ------------------------------------

TRIM = st.floats(0.0, 0.49)
RULES: dict[str, Callable[..., Update]] = {"median": coordinate_median, "trimmed_mean": trimmed_mean}


@pytest.mark.parametrize("name", sorted(RULES))
@FAST
@given(st.data(), TRIM)
def test_robust_rules_ignore_the_order_of_sites_and_the_weights(
    name: str, data: st.DataObject, fraction: float
) -> None:
    updates = data.draw(site_updates())
    weights = data.draw(st.lists(WEIGHT, min_size=len(updates), max_size=len(updates)))
    order = _permute(data, len(updates))
    rule = RULES[name]
    kwargs = {"trim_fraction": fraction} if name == "trimmed_mean" else {}
    reference = rule(updates, [1.0] * len(updates), **kwargs)
    permuted = rule([updates[i] for i in order], [weights[i] for i in order], **kwargs)
    if name == "median":  # a sort and the mean of at most two values: exact in any order
        _assert_equal(permuted, reference)
    else:  # the kept values are summed in the order the partition leaves them
        _assert_close(permuted, reference, _tol(updates))


@pytest.mark.parametrize("name", sorted(RULES))
@FAST
@given(site_updates(max_sites=1, dtype=np.float32) | site_updates(max_sites=1), TRIM)
def test_robust_rules_give_one_site_its_own_update_exactly(name: str, updates: list[Update], fraction: float) -> None:
    kwargs = {"trim_fraction": fraction} if name == "trimmed_mean" else {}
    _assert_equal(RULES[name](updates, [1.0], **kwargs), updates[0])


@FAST
@given(site_updates(), TRIM)
def test_median_and_trimmed_mean_stay_within_the_kept_values(updates: list[Update], fraction: float) -> None:
    n = len(updates)
    k = math.floor(fraction * n)
    median = coordinate_median(updates, [1.0] * n)
    trimmed = trimmed_mean(updates, [1.0] * n, trim_fraction=fraction)
    for key in updates[0]:
        ordered = np.sort(np.stack([u[key] for u in updates]), axis=0)
        # the median lies between the two middle values; the trimmed mean between the
        # smallest and largest value it keeps after cutting k from each end
        assert np.all(median[key] >= ordered[(n - 1) // 2]) and np.all(median[key] <= ordered[n // 2]), key
        tol = _tol(updates)
        assert np.all(trimmed[key] >= ordered[k] - tol) and np.all(trimmed[key] <= ordered[n - k - 1] + tol), key


# --- Krum and multi-Krum ---------------------------------------------------------------------


def _krum_scores(updates: Sequence[Update], f: int) -> np.ndarray:
    """Krum's scores by brute force (the definition, not the Gram-matrix shortcut)."""
    flat = np.stack([np.concatenate([np.ravel(u[k]).astype(np.float64) for k in sorted(u)]) for u in updates])
    dist = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(dist, np.inf)
    return np.sort(dist, axis=1)[:, : len(updates) - f - 2].sum(axis=1)


@st.composite
def krum_case(draw: st.DrawFn) -> tuple[list[Update], int]:
    """Updates and a Byzantine count f with n > 2f + 2 (the rule's own minimum)."""
    f = draw(st.integers(0, 2))
    return draw(site_updates(min_sites=2 * f + 3, max_sites=2 * f + 5)), f


def _score_tol(updates: Sequence[Update]) -> float:
    """Rounding bound for a sum of squared distances computed two ways (Gram vs differences)."""
    size = sum(np.size(v) for v in updates[0].values())
    biggest = max(float(np.max(np.abs(v))) for u in updates for v in u.values() if np.size(v))
    return 64 * len(updates) ** 2 * size * EPS * (1.0 + biggest) ** 2


@FAST
@given(krum_case(), st.data())
def test_krum_picks_a_best_scored_update_whatever_the_order(case: tuple, data: st.DataObject) -> None:
    updates, f = case
    scores = _krum_scores(updates, f)
    tol = _score_tol(updates)
    order = _permute(data, len(updates))
    chosen = order[krum_select([updates[i] for i in order], f)[0]]
    assert scores[chosen] <= scores.min() + tol
    unique_best = np.sum(scores <= scores.min() + 2 * tol) == 1
    if unique_best:  # no tie within rounding: every order picks the same site
        assert chosen == krum_select(updates, f)[0]


@FAST
@given(krum_case(), st.data(), FACTOR)
def test_krum_depends_only_on_relative_weights_and_returns_an_input(
    case: tuple, data: st.DataObject, factor: float
) -> None:
    updates, f = case
    weights = data.draw(st.lists(WEIGHT, min_size=len(updates), max_size=len(updates)))
    single = krum(updates, weights, f)
    # selection ignores the weights; one selected update comes back unchanged, not averaged
    _assert_equal(single, updates[krum_select(updates, f)[0]])
    _assert_equal(krum(updates, [w * factor for w in weights], f), single)
    selected = data.draw(st.integers(1, len(updates)), label="n_selected")
    multi = krum(updates, weights, f, selected)
    _assert_close(krum(updates, [w * factor for w in weights], f, selected), multi, _tol(updates))
    _assert_within_range(multi, [updates[i] for i in krum_select(updates, f, selected)], _tol(updates))
