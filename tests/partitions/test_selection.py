"""Study selections: single tasks, local-only training, pooled (centralised) training, unimodal."""

import numpy as np
import pytest

from federated.core.config import load_config
from federated.data.format import Corpus
from partitions import PlanError, plan_sites

SMOKE = ["scale=smoke"]


def test_tasks_only_keeps_the_task_and_drops_sites_without_it(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    plans = plan_sites(corpus, load_config([*SMOKE, "sites.tasks_only=[motor_imagery]"]))
    assert [p.site for p in plans] == ["site_02", "site_09"]  # the two neuro clinics
    tasks = corpus.manifest["task"].to_numpy()
    for p in plans:
        assert p.tasks == ("motor_imagery",) and p.modalities == ("eeg",)
        assert set(tasks[np.concatenate([p.train_rows, p.test_rows])]) == {"motor_imagery"}
    with pytest.raises(PlanError, match="unknown tasks"):
        plan_sites(corpus, load_config([*SMOKE, "sites.tasks_only=[dance]"]))


def test_train_only_keeps_the_others_as_id_evaluation_sites(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    plans = plan_sites(corpus, load_config([*SMOKE, "sites.train_only=[site_05]", "sites.zero_shot=true"]))
    roles = {p.site: p.role for p in plans}
    assert roles["site_05"] == "train" and roles["site_08"] == "held_out"
    assert sum(r == "id_eval" for r in roles.values()) == 7
    with pytest.raises(PlanError, match="not training sites"):
        plan_sites(corpus, load_config([*SMOKE, "sites.train_only=[site_09]"]))


def test_pool_merges_every_training_site(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    sites = plan_sites(corpus, load_config(SMOKE))
    pooled = plan_sites(corpus, load_config([*SMOKE, "sites.pooled=true"]))
    assert [p.site for p in pooled] == ["pooled", "site_08", "site_09"]
    train = [p for p in sites if p.role == "train"]
    assert pooled[0].n_train == sum(p.n_train for p in train)
    assert np.array_equal(pooled[0].test_rows, np.sort(np.concatenate([p.test_rows for p in train])))
    assert set(pooled[0].tasks) == {t for p in train for t in p.tasks}


def test_unimodal_masks_every_input_but_the_first(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    plans = plan_sites(corpus, load_config([*SMOKE, "sites.unimodal=true"]))
    tasks = corpus.manifest["task"].to_numpy()
    checked = 0
    for p in plans:
        rows = np.concatenate([p.train_rows, p.test_rows])
        for t in p.tasks:
            inputs = corpus.schema.task(t).inputs
            of_task = rows[tasks[rows] == t]
            for m in inputs[1:]:
                assert np.isin(of_task, p.masked[m]).all()
                checked += 1
            assert inputs[0] in p.modalities
    assert checked >= 4
