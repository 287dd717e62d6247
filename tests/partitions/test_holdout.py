"""Held-out site selection: listed, named, k at random, by archetype, leave-one-site-out."""

import numpy as np
import pytest

from federated.core.config import load_config
from federated.data.format import Corpus
from partitions import PlanError, plan_sites
from partitions.holdout import leave_one_site_out_overrides

SMOKE = ["scale=smoke"]


def _held(plans):
    return [p.site for p in plans if p.role == "held_out"]


def test_listed_named_random_and_archetype(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    assert _held(plan_sites(corpus, load_config(SMOKE))) == ["site_08", "site_09"]
    named = plan_sites(corpus, load_config([*SMOKE, "sites.holdout=named", "sites.holdout_sites=[site_03]"]))
    assert _held(named) == ["site_03"]
    # the listed held-out sites train when another selection is asked for, on their train split
    eye = named[8]
    assert eye.role == "train" and eye.n_train > 0
    assert (corpus.manifest["split"].iloc[eye.test_rows] == "test").all()
    rand = load_config([*SMOKE, "sites.holdout=random", "sites.holdout_k=3"])
    picked = _held(plan_sites(corpus, rand))
    assert len(picked) == 3 and picked == _held(plan_sites(corpus, rand))  # seeded
    other_seed = load_config([*SMOKE, "sites.holdout=random", "sites.holdout_k=3", "corpus.seed=5"])
    assert len(_held(plan_sites(corpus, other_seed))) == 3
    by_type = plan_sites(
        corpus, load_config([*SMOKE, "sites.holdout=archetype", "sites.holdout_archetypes=[eye_clinic,cancer_centre]"])
    )
    assert _held(by_type) == ["site_07", "site_08"]
    for p in by_type:
        if p.role == "held_out":
            assert p.n_train == 0 and p.n_test > 0


def test_leave_one_site_out_holds_out_each_site_once(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    runs = leave_one_site_out_overrides(corpus, load_config(SMOKE))
    assert len(runs) == 10
    held = []
    for overrides in runs:
        try:
            held.append(_held(plan_sites(corpus, load_config([*SMOKE, *overrides]))))
        except PlanError as e:  # a site whose task nobody else trains cannot be held out alone
            assert "no training site holds" in str(e)
            held.append(None)
    done = [h for h in held if h is not None]
    assert all(len(h) == 1 for h in done) and len({h[0] for h in done}) == len(done) >= 8


def test_bad_selections_name_what_is_wrong(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    with pytest.raises(PlanError, match=r"unknown sites \['site_42'\]"):
        plan_sites(corpus, load_config([*SMOKE, "sites.holdout=named", "sites.holdout_sites=[site_42]"]))
    with pytest.raises(PlanError, match="needs sites.holdout_sites"):
        plan_sites(corpus, load_config([*SMOKE, "sites.holdout=named"]))
    with pytest.raises(PlanError, match="holdout_k=10"):
        plan_sites(corpus, load_config([*SMOKE, "sites.holdout=random", "sites.holdout_k=10"]))
    with pytest.raises(PlanError, match="no site of archetype"):
        plan_sites(corpus, load_config([*SMOKE, "sites.holdout=archetype", "sites.holdout_archetypes=[spa]"]))


def test_zero_shot_lets_a_held_out_site_keep_an_untrained_task(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    base = [*SMOKE, "sites.train=[neuro_clinic]", "sites.held_out=[genomics_lab]"]
    with pytest.raises(PlanError, match="sites.zero_shot=true"):
        plan_sites(corpus, load_config(base))
    plans = plan_sites(corpus, load_config([*base, "sites.zero_shot=true"]))
    assert plans[1].role == "held_out" and np.all(plans[1].train_rows.size == 0)


def test_a_training_site_under_the_minimum_size_is_refused(smoke_corpus):
    with pytest.raises(PlanError, match=r"site_00 .* fewer than sites.min_samples=1000"):
        plan_sites(Corpus.open(smoke_corpus), load_config([*SMOKE, "sites.min_samples=1000"]))


def test_every_holdout_mode_the_config_accepts_has_a_selector():
    from federated.core.config.schema import HOLDOUT_MODES
    from partitions.holdout import SELECTORS

    assert tuple(SELECTORS) == HOLDOUT_MODES


def test_an_unknown_mode_and_an_empty_archetype_list_are_named(smoke_corpus):
    import dataclasses

    from partitions import PLANNERS
    from partitions.holdout import assign_roles

    corpus = Corpus.open(smoke_corpus)
    cfg = load_config(SMOKE)
    plans = PLANNERS.get(cfg.sites.planner)(corpus, cfg)
    bogus = dataclasses.replace(cfg, sites=dataclasses.replace(cfg.sites, holdout="coin_flip"))
    with pytest.raises(PlanError, match="unknown sites.holdout 'coin_flip'; choices: listed, named, random, archetype"):
        assign_roles(plans, bogus)
    with pytest.raises(PlanError, match=r"holdout_archetypes=\[\]: no site of archetype \(none given\)"):
        plan_sites(corpus, load_config([*SMOKE, "sites.holdout=archetype", "sites.holdout_archetypes=[]"]))
