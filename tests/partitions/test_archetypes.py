import numpy as np
import pytest

from federated.core.config import load_config
from federated.data.format import Corpus
from partitions import PlanError, plan_sites


def test_default_plan_is_disjoint_and_holds_what_it_claims(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    cfg = load_config(["scale=smoke"])
    plans = plan_sites(corpus, cfg)
    assert [p.role for p in plans] == ["train"] * 8 + ["held_out"] * 2
    assert len({p.origin_site for p in plans}) == 10  # one origin (acquisition) per site
    m = corpus.manifest
    seen: set[int] = set()
    for p in plans:
        rows = np.concatenate([p.train_rows, p.test_rows])
        assert not seen & set(rows.tolist())
        seen |= set(rows.tolist())
        assert set(m["task"].iloc[rows]) == set(p.tasks)
        assert set(m["origin_site"].iloc[rows]) == {p.origin_site}
        if p.role == "train":
            assert (m["split"].iloc[p.train_rows] == "train").all()
            assert (m["split"].iloc[p.test_rows] == "test").all()
        else:
            assert p.n_train == 0 and p.n_test > 0
    # the same config gives the same plan
    again = plan_sites(corpus, cfg)
    assert all(np.array_equal(a.test_rows, b.test_rows) for a, b in zip(plans, again, strict=True))


def test_held_out_site_with_an_untrained_task_is_refused(smoke_corpus):
    cfg = load_config(["scale=smoke", "sites.train=[neuro_clinic]", "sites.held_out=[genomics_lab]"])
    with pytest.raises(PlanError, match="no training site holds"):
        plan_sites(Corpus.open(smoke_corpus), cfg)


def test_unknown_archetype_and_too_many_sites(smoke_corpus):
    with pytest.raises(PlanError, match="unknown site archetype 'spa'"):
        plan_sites(Corpus.open(smoke_corpus), load_config(["sites.train=[spa]"]))
    with pytest.raises(PlanError, match="only 10 origin sites"):
        plan_sites(Corpus.open(smoke_corpus), load_config(["sites.train=" + str(["neuro_clinic"] * 11)]))
