"""A site's acquisition shift is applied when it loads its data, never stored in the corpus."""

import numpy as np

from clients.site_data import SiteData
from federated.core.config import load_config
from federated.data.format import Corpus, index_column
from partitions import plan_sites
from partitions.acquisition_shift import shift_array


def test_shift_is_applied_on_load_and_the_corpus_is_untouched(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    stored_before = np.array(corpus.array("mri"))
    clean = plan_sites(corpus, load_config(["scale=smoke"]))[2]  # neuro clinic: eeg + mri
    shifted = plan_sites(corpus, load_config(["scale=smoke", "sites.load_shift_severity=1"]))[2]
    assert not clean.shift and set(shifted.shift) == {"eeg", "mri"}
    a = SiteData(corpus, clean).split("brain_tumor_classification", "train")
    b = SiteData(corpus, shifted).split("brain_tumor_classification", "train")
    assert np.array_equal(a.targets, b.targets)
    # the shifted inputs are exactly the site's transform of the stored ones
    rows = shifted.train_rows[corpus.manifest["task"].to_numpy()[shifted.train_rows] == "brain_tumor_classification"]
    stored = np.asarray(corpus.array("mri"))[corpus.manifest[index_column("mri")].to_numpy()[rows]]
    expected = shift_array(
        corpus.schema.modality("mri"),
        stored,
        shifted.shift["mri"],
        shifted.site,
        shifted.shift_seed,
        key="brain_tumor_classification/train",
    )
    assert np.allclose(b.inputs["mri"].numpy(), expected)
    assert np.allclose(a.inputs["mri"].numpy(), stored)
    assert float(np.abs(b.inputs["mri"].numpy() - stored).mean()) > 0.05
    assert np.array_equal(np.array(corpus.array("mri")), stored_before)  # nothing written back
