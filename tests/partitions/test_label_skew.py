"""Dirichlet label skew: large alpha stays near the global mix, small alpha is skewed (mean KL)."""

import numpy as np
import pytest

from federated.core.config import load_config
from federated.data.format import Corpus
from partitions import PlanError, plan_sites


def _mean_kl(corpus, plans, task="brain_tumor_classification"):
    m = corpus.manifest
    labels, tasks = m["label"].to_numpy(), m["task"].to_numpy()
    kls = []
    for p in plans:
        if p.role != "train" or task not in p.tasks:
            continue
        rows = p.train_rows[tasks[p.train_rows] == task]
        q = np.bincount(labels[rows].astype(int), minlength=4) / len(rows)
        kls.append(float(np.sum(q[q > 0] * np.log(q[q > 0] / 0.25))))  # vs the balanced global mix
    return float(np.mean(kls))


def test_small_alpha_skews_and_large_alpha_does_not(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    base = ["scale=smoke"]
    none = plan_sites(corpus, load_config(base))
    large = plan_sites(corpus, load_config([*base, "sites.label_skew_alpha=1000"]))
    small = plan_sites(corpus, load_config([*base, "sites.label_skew_alpha=0.1"]))
    assert _mean_kl(corpus, none) < 0.05  # 16 train rows per site: not exactly balanced
    assert _mean_kl(corpus, large) < 0.15
    assert _mean_kl(corpus, small) > 0.5
    # only rows are dropped, held-out sites untouched, and the same seed gives the same plan
    for a, b in zip(none, small, strict=True):
        assert set(b.train_rows) <= set(a.train_rows)
        if a.role == "held_out":
            assert np.array_equal(a.test_rows, b.test_rows)
    again = plan_sites(corpus, load_config([*base, "sites.label_skew_alpha=0.1"]))
    assert all(np.array_equal(a.train_rows, b.train_rows) for a, b in zip(small, again, strict=True))


def test_alpha_must_be_positive():
    from federated.core.config import ConfigError

    with pytest.raises(ConfigError, match="sites.label_skew_alpha must be > 0"):
        load_config(["sites.label_skew_alpha=-1"])


def test_pathological_skew_keeps_k_classes_per_training_site(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    plans = plan_sites(corpus, load_config(["scale=smoke", "sites.label_skew_classes=2"]))
    m = corpus.manifest
    labels, tasks = m["label"].to_numpy(), m["task"].to_numpy()
    checked = 0
    for p in plans:
        rows = np.concatenate([p.train_rows, p.test_rows])
        for t in p.tasks:
            n_classes = {"brain_tumor_classification": 4, "cell_type": 12}.get(t)
            if n_classes is None:
                continue
            present = np.unique(labels[rows[tasks[rows] == t]])
            if p.role == "train":
                assert len(present) <= 2
                checked += 1
            else:
                assert len(present) > 2  # held-out sites keep their own mix
    assert checked >= 5
    with pytest.raises(PlanError, match="two kinds of label skew"):
        plan_sites(corpus, load_config(["scale=smoke", "sites.label_skew_classes=2", "sites.label_skew_alpha=1"]))


def test_class_count_reads_the_task_declaration():
    """Label skew needs a count of scalar classes: from the corpus's declaration, whatever the task's name."""
    from federated.core.multimed import MULTIMED, Task
    from partitions.steps import class_count

    assert class_count(MULTIMED.task("brain_tumor_classification")) == 4
    assert class_count(MULTIMED.task("breast_cancer_classification")) == 2
    assert class_count(MULTIMED.task("medical_vqa")) == 7
    for t in ("bone_age", "radiographic_findings", "protein_structure"):  # no one class per sample
        assert class_count(MULTIMED.task(t)) is None
    own = Task("triage", ("vitals",), "multiclass", ("accuracy",), ("green", "yellow", "orange", "red", "black"))
    assert class_count(own) == 5
