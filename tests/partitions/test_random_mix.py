"""Random task mix: overlap guaranteed, sites sharing an origin split it disjointly."""

import numpy as np
import pytest

from federated.core.config import load_config
from federated.core.multimed import MULTIMED_TASKS
from federated.data.format import Corpus
from partitions import PlanError, plan_sites
from partitions.random_mix import draw_task_mix

MIX = ["scale=smoke", "sites.planner=random_mix", "sites.holdout=random", "sites.holdout_k=3"]


def test_every_held_task_reaches_the_minimum_overlap():
    rng = np.random.default_rng(0)
    for min_overlap in (1, 2, 4):
        mix = draw_task_mix(MULTIMED_TASKS, 12, 2, min_overlap, rng)
        holders = {t: sum(t in s for s in mix) for t in MULTIMED_TASKS}
        assert all(n == 0 or n >= min_overlap for n in holders.values()), holders
        assert all(len(s) >= 2 for s in mix)


def test_more_sites_than_origins_split_each_origin_disjointly(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    cfg = load_config([*MIX, "sites.n_sites=30", "sites.tasks_per_site=4", "sites.min_samples=2"])
    plans = plan_sites(corpus, cfg)
    assert len(plans) == 30 and sum(p.role == "held_out" for p in plans) == 3
    m = corpus.manifest
    all_rows = np.concatenate([np.concatenate([p.train_rows, p.test_rows]) for p in plans])
    assert len(all_rows) == len(set(all_rows.tolist()))  # no sample at two sites
    for p in plans:
        rows = np.concatenate([p.train_rows, p.test_rows])
        assert set(m["origin_site"].iloc[rows]) == {p.origin_site}
        assert set(m["task"].iloc[rows]) == set(p.tasks)
    again = plan_sites(corpus, cfg)
    assert all(
        a.tasks == b.tasks and np.array_equal(a.train_rows, b.train_rows) for a, b in zip(plans, again, strict=True)
    )


def test_impossible_mixes_are_refused(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    with pytest.raises(PlanError, match="tasks_per_site=12 exceeds"):
        plan_sites(corpus, load_config([*MIX, "sites.tasks_per_site=12"]))
    with pytest.raises(PlanError, match="min_overlap=11 exceeds sites.n_sites=10"):
        plan_sites(corpus, load_config([*MIX, "sites.min_overlap=11"]))
