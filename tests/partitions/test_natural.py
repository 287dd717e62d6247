"""Natural sites: one per origin site, small origins grouped up to the minimum size."""

import numpy as np
import pytest

from federated.core.config import load_config
from partitions import PlanError, plan_sites
from partitions.natural import group_small_origins

NATURAL = ["sites.planner=natural", "sites.holdout=named"]


def test_grouping_keeps_big_origins_and_merges_small_ones_in_name_order():
    sizes = {"A": 100, "B": 10, "C": 30, "D": 25, "E": 5, "F": 60}
    assert group_small_origins(sizes, 50) == [["A"], ["F"], ["B", "C", "D", "E"]]
    assert group_small_origins(sizes, 20) == [["A"], ["C"], ["D"], ["F"], ["B", "E"]]


def test_sites_are_disjoint_cover_each_origin_and_hold_out_by_origin_name(manifest_corpus):
    sizes = {"KY": 300, "MN": 200, "MS": 150, "NY": 20, "TX": 40}
    corpus = manifest_corpus(sizes)
    cfg = load_config([*NATURAL, "sites.holdout_sites=[MS]", "sites.min_site_size=50"])
    plans = plan_sites(corpus, cfg)
    assert [p.origin_site for p in plans] == ["KY", "MN", "MS", "NY+TX"]
    assert [p.role for p in plans] == ["train", "train", "held_out", "train"]
    m = corpus.manifest
    seen = np.concatenate([np.concatenate([p.train_rows, p.test_rows]) for p in plans])
    assert len(seen) == len(set(seen.tolist())) == len(m)  # disjoint and covering
    for p in plans:
        rows = np.concatenate([p.train_rows, p.test_rows])
        assert set(m["origin_site"].iloc[rows]) == set(p.origin_site.split("+"))
        assert set(m["task"].iloc[rows]) == set(p.tasks)
        if p.role == "train":
            assert (m["split"].iloc[p.train_rows] == "train").all()
    held = plans[2]
    assert held.n_train == 0 and held.n_test == sizes["MS"]


def test_too_small_even_grouped_is_refused_with_the_sites_named(manifest_corpus):
    corpus = manifest_corpus({"KY": 300, "NY": 20, "TX": 10})
    with pytest.raises(PlanError, match=r"NY\+TX have 30 samples together.*min_site_size=50"):
        plan_sites(corpus, load_config([*NATURAL, "sites.holdout_sites=[KY]", "sites.min_site_size=50"]))


def test_without_a_holdout_every_natural_site_trains(manifest_corpus):
    corpus = manifest_corpus({"KY": 300, "MN": 200})
    plans = plan_sites(corpus, load_config(["sites.planner=natural"]))
    assert [p.role for p in plans] == ["train", "train"]
