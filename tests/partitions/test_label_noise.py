"""Label noise: the measured flip rate matches the configured one; test splits stay clean."""

import numpy as np
import pytest

from clients.site_data import SiteData
from federated.core.config import load_config
from federated.data.format import Corpus
from partitions import plan_sites
from partitions.label_noise import transition_matrix


def test_transition_matrix_rows_are_distributions_with_the_given_diagonal():
    t = transition_matrix(4, 0.3, np.random.default_rng(0))
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(t), 0.7)


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_measured_noise_rate_matches_and_test_labels_are_clean(smoke_corpus, rate):
    corpus = Corpus.open(smoke_corpus)
    clean = plan_sites(corpus, load_config(["scale=smoke"]))
    noisy = plan_sites(corpus, load_config(["scale=smoke", f"sites.label_noise_rate={rate}"]))
    flipped = total = 0
    for a, b in zip(clean, noisy, strict=True):
        if a.role != "train":
            continue
        da, db = SiteData(corpus, a), SiteData(corpus, b)
        for (task, split), part in da.splits.items():
            if task not in b.relabelled:
                continue
            diff = (part.targets != db.splits[(task, split)].targets).numpy()
            if split == "test":
                assert not diff.any()
            else:
                flipped += int(diff.sum())
                total += len(diff)
    # ~900 training labels at smoke scale: 3 binomial sd is about 0.05 at rate 0.4
    assert abs(flipped / total - rate) < 0.06
