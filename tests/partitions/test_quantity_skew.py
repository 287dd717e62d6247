"""Quantity skew: sizes spread with sigma, never below the floor, rows only dropped, seeded."""

import numpy as np
import pytest

from federated.core.config import ConfigError, load_config
from federated.data.format import Corpus
from partitions import plan_sites


def _train_sizes(plans):
    return np.array([p.n_train for p in plans if p.role == "train"])


def test_sizes_spread_with_sigma_and_respect_the_floor(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    base = ["scale=smoke"]
    equal = plan_sites(corpus, load_config(base))
    skewed = plan_sites(corpus, load_config([*base, "sites.quantity_skew_sigma=1.5", "sites.min_samples=4"]))
    # per-task rows of every training site: equal plan 16 each; skewed between the floor and 16
    m = corpus.manifest["task"].to_numpy()
    per_task = [np.bincount(np.unique(m[p.train_rows], return_inverse=True)[1]) for p in skewed if p.role == "train"]
    assert all(((c >= 4) & (c <= 16)).all() for c in per_task)
    frac = _train_sizes(skewed) / _train_sizes(equal)
    assert frac.max() == pytest.approx(1.0) and frac.min() < 0.5  # the biggest keeps all; spread is real
    for a, b in zip(equal, skewed, strict=True):
        assert set(b.train_rows) <= set(a.train_rows) and set(b.test_rows) <= set(a.test_rows)
        if a.role == "held_out":
            assert np.array_equal(a.test_rows, b.test_rows)
    again = plan_sites(corpus, load_config([*base, "sites.quantity_skew_sigma=1.5", "sites.min_samples=4"]))
    assert all(np.array_equal(a.train_rows, b.train_rows) for a, b in zip(skewed, again, strict=True))


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="sites.quantity_skew_sigma"):
        load_config(["sites.quantity_skew_sigma=-1"])
    with pytest.raises(ConfigError, match="sites.min_samples must be >= 1"):
        load_config(["sites.min_samples=0"])
