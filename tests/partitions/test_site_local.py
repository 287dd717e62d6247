"""A site's own plan in site-local mode: its corpus as stored, its role from the coordinator's config."""

from __future__ import annotations

import numpy as np
import pytest

from federated.core.config import ConfigError, load_config
from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions import PlanError
from partitions.site_local import plan_own_site


def config(*extra: str):
    return load_config(["sites.planner=site_local", *extra])


def test_the_site_is_its_whole_corpus_with_the_stored_split(smoke_corpus) -> None:
    corpus = Corpus.open(smoke_corpus)
    plan = plan_own_site(corpus, "hospital_a", config())
    split = corpus.manifest["split"].to_numpy()
    assert plan.site == "hospital_a" and plan.role == Role.TRAIN and plan.tasks == tuple(corpus.tasks)
    assert np.array_equal(plan.train_rows, np.flatnonzero(split == "train"))
    assert np.array_equal(plan.test_rows, np.flatnonzero(split == "test"))


def test_roles_and_tasks_come_from_the_coordinator_s_config(smoke_corpus) -> None:
    corpus = Corpus.open(smoke_corpus)
    held = plan_own_site(corpus, "hospital_a", config("sites.holdout=named", "sites.holdout_sites=[hospital_a]"))
    assert held.role == Role.HELD_OUT and held.n_train == 0 and held.n_test == len(corpus.manifest)
    only = plan_own_site(corpus, "hospital_a", config("sites.tasks_only=[cell_type]"))
    assert only.tasks == ("cell_type",) and only.modalities == ("scrna",)
    evaluation = plan_own_site(corpus, "hospital_a", config("sites.train_only=[hospital_b]"))
    assert evaluation.role == Role.ID_EVAL


def test_choices_among_sites_are_refused(smoke_corpus) -> None:
    with pytest.raises(PlanError, match="sites.holdout=random needs every site's data in one place"):
        plan_own_site(Corpus.open(smoke_corpus), "a", config("sites.holdout=random"))
    with pytest.raises(ConfigError, match="sites.label_skew_alpha is simulation-only"):
        config("sites.label_skew_alpha=0.5")
