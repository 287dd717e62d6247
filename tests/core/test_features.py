"""Features in the schema and the feature statistics' maths, with hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from federated.core.corpus_schema import CorpusSchema, Modality, SchemaError, Task
from federated.core.feature_stats import (
    BLOCKS,
    HIST_BINS,
    Moments,
    Standardiser,
    combine,
    grid,
    histogram,
    laplace_blocks,
    laplace_moments,
    quantile,
)
from federated.core.features import Feature, FeatureError, first_feature_difference

AGE = Feature("age", "age", unit="years", low=18, high=110)
SEX_M = Feature("sex=M", "sex", kind="indicator", level="M", low=0, high=1)
SEX_F = Feature("sex=F", "sex", kind="indicator", level="F", low=0, high=1)


def test_a_vector_modality_carries_its_features_through_spec_json() -> None:
    clinical = Modality("clinical", "vector", (4,), features=(AGE, SEX_M), impute="median")
    task = Task("sepsis", ("clinical",), "binary", ("auroc",), ("no", "yes"))
    schema = CorpusSchema({"clinical": clinical}, {"sepsis": task})
    back = CorpusSchema.from_dict(schema.to_dict())
    assert back == schema and back.modality("clinical").features[0].low == 18.0
    assert back.modality("clinical").raw_features


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "image", "shape": (1, 4, 4), "features": (AGE,)}, "vector modalities only"),
        ({"kind": "vector", "shape": (1,), "features": (AGE, SEX_M)}, "2 features for a vector of 1"),
        ({"kind": "vector", "shape": (3,), "features": (AGE, AGE)}, "appear more than once"),
        ({"kind": "vector", "shape": (3,), "impute": "median"}, "impute needs the modality's features"),
        ({"kind": "vector", "shape": (3,), "features": (AGE,), "impute": "mode"}, "impute 'mode'"),
    ],
)
def test_a_feature_list_that_cannot_describe_the_modality_is_refused(kwargs, message) -> None:
    with pytest.raises(SchemaError, match=message):
        Modality("m", **kwargs)


def test_a_feature_names_what_is_wrong_with_it() -> None:
    with pytest.raises(FeatureError, match="an indicator names its level"):
        Feature("sex", "sex", kind="indicator")
    with pytest.raises(FeatureError, match="low 5.0 is above high 1.0"):
        Feature("x", "x", low=5, high=1)
    with pytest.raises(FeatureError, match="unknown field"):
        Feature.from_dict({"name": "x", "column": "x", "code": "print()"})


def test_the_first_difference_in_meaning_is_named_before_units_and_ranges() -> None:
    plain_age = Feature("age", "age")
    why = first_feature_difference((plain_age, SEX_F), (AGE, SEX_M))
    assert why.startswith("feature 2 is 'sex=F' here and 'sex=M' there (differs in name, level)")
    assert "1 other feature(s) differ too" in why
    assert first_feature_difference((AGE,), (AGE, SEX_M)) == "1 features here, 2 there (first unmatched: 'sex=M')"
    assert first_feature_difference((AGE, SEX_M), (AGE, SEX_M)) == ""


def test_moments_merge_to_the_pooled_ones_hand_computed() -> None:
    # group a: 1, 3 (n 2, mean 2, M2 2); group b: 5 (n 1, mean 5, M2 0); pooled 1, 3, 5: mean 3, M2 8
    a = Moments.of(np.array([[1.0], [3.0], [np.nan]]))
    b = Moments.of(np.array([[5.0]]))
    assert (a.n[0], a.mean[0], a.m2[0]) == (2, 2, 2)
    both = combine([a, b])
    assert (both.n[0], both.mean[0], both.m2[0]) == (3, 3, 8)
    assert both.std[0] == pytest.approx(np.sqrt(8 / 3))
    empty = Moments.of(np.array([[7.0]])).suppressed(2)  # one value: under min_count 2, not sent
    assert (empty.n[0], empty.mean[0], empty.m2[0]) == (0, 0, 0)
    assert combine([both, empty]).mean[0] == 3


def test_a_histogram_median_and_the_transform() -> None:
    values = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    m = Moments.of(values)
    lo, width = grid(m.mean, m.std)
    counts = histogram(values, lo, width)
    assert counts.sum() == 5
    assert quantile(counts[0], lo[0], width[0], 0.5) == pytest.approx(3.0, abs=width[0])
    std = Standardiser.of(m, "median", np.array([3.0]))
    out = std.apply(np.array([[np.nan, 0.0], [3.0, 0.0]]))  # the second column is padding: stays 0
    np.testing.assert_allclose(out[:, 0], (3.0 - m.mean[0]) / m.std[0], rtol=1e-6)
    assert (out[:, 1] == 0).all()
    # an indicator is filled with its level's share, whatever the method: a 0/1 median picks one level
    ind = Moments.of(np.array([[0.0], [0.0], [1.0]]))
    assert Standardiser.of(ind, "median", np.array([0.0]), np.array([True])).fill[0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="std must be finite"):
        Standardiser.from_lists({"mean": [0.0], "std": [0.0], "fill": [0.0]}, 1, "message")


def test_statistics_that_would_overflow_or_leave_holes_are_refused_naming_the_feature() -> None:
    names = ["age", "lactate"]
    ok = {"mean": [50.0, 2.0], "std": [10.0, 1.0], "fill": [50.0, 2.0]}
    assert Standardiser.from_lists(ok, 2, "message", names, "mean").std[1] == 1.0
    for bad, impute, match in [
        (ok | {"std": [10.0, 1e-300]}, "mean", "std of feature 'lactate' is under 1e-12"),
        (ok | {"mean": [1e6, 2.0], "std": [1e-7, 1.0]}, "mean", "std of feature 'age' is under 1e-12"),  # relative
        (ok | {"fill": [50.0, float("nan")]}, "median", "no fill for feature 'lactate', and the modality imputes"),
        (ok | {"fill": [1e300, 2.0]}, "mean", "the fill of feature 'age' standardises beyond a float32"),
    ]:
        with pytest.raises(ValueError, match=match):
            Standardiser.from_lists(bad, 2, "message", names, impute)
    nan = float("nan")
    assert np.isnan(Standardiser.from_lists(ok | {"fill": [nan, nan]}, 2, "message", names, "").fill).all()


def test_noisy_moments_stay_within_what_the_declared_range_allows() -> None:
    """Clamping is post-processing: n in [1, n_max], the mean in [low, high], SD <= (high - low) / 2."""
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 10, size=(30, 3))
    low, high = np.zeros(3), np.full(3, 10.0)
    for _ in range(50):
        m = laplace_moments(values, low, high, 0.05, rng, n_max=30)  # a tiny epsilon: huge noise
        assert ((m.n >= 1) & (m.n <= 30)).all() and ((m.mean >= 0) & (m.mean <= 10)).all()
        assert (m.std <= 5 + 1e-9).all()
    wild = Standardiser(np.array([-3.0, 4.0]), np.array([40.0, 1.0]), np.array([12.0, np.nan]))
    held = wild.clamped(np.array([0.0, np.nan]), np.array([10.0, np.nan]))  # the second declares no range
    assert held.mean.tolist() == [0.0, 4.0] and held.std.tolist() == [5.0, 1.0]
    assert held.fill[0] == 10.0 and np.isnan(held.fill[1])


def test_histogram_noise_is_drawn_per_block_the_finest_cell_a_site_releases() -> None:
    counts = np.zeros((2, HIST_BINS))
    counts[0, 5] = 64.0
    noisy = laplace_blocks(counts, 1.0, np.random.default_rng(1))
    blocks = noisy.reshape(2, BLOCKS, HIST_BINS // BLOCKS)
    assert (noisy >= 0).all() and (blocks == blocks[:, :, :1]).all()  # one value across each block's bins
    assert blocks[0, 0].sum() == pytest.approx(64.0, abs=20)  # the block's count, plus Laplace(1) noise
