"""Missing modalities: measured rates match the configured ones; every sample keeps an input."""

import numpy as np
import pytest

from clients.site_data import SiteData
from federated.core.config import ConfigError, load_config
from federated.data.format import Corpus
from partitions import plan_sites

BASE = ["scale=smoke", "corpus.samples_per_task_site=200"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from federated.data.synthetic import GeneratorConfig, build_synthetic_corpus

    path = tmp_path_factory.mktemp("missing") / "c"  # 200 per site: rates measured on ~2,000 samples
    return Corpus.open(build_synthetic_corpus(path, GeneratorConfig(samples_per_task_site=200)))


def _present(corpus, plans):
    """(modality -> fraction present) over multimodal-task samples, and whether any sample has none."""
    shares, empty = {}, False
    for p in plans:
        data = SiteData(corpus, p)
        for (task, _), split in data.splits.items():
            if len(corpus.schema.task(task).inputs) < 2:
                continue
            stack = np.stack([split.present[m].numpy() for m in corpus.schema.task(task).inputs], axis=1)
            empty |= bool((~stack.any(axis=1)).any())
            for j, m in enumerate(corpus.schema.task(task).inputs):
                shares.setdefault(m, []).append(stack[:, j])
    return {m: float(np.concatenate(v).mean()) for m, v in shares.items()}, empty


def test_sample_rate_is_measured_as_configured(corpus):
    rate = 0.3
    plans = plan_sites(corpus, load_config([*BASE, f"sites.missing_sample_rate={rate}"]))
    shares, empty = _present(corpus, plans)
    expected_missing = rate * (1 - rate / 2)  # see the module docstring
    for m, present in shares.items():
        assert abs((1 - present) - expected_missing) < 0.04, m
    assert not empty


def test_site_rate_one_drops_one_modality_per_multimodal_task_at_every_site(corpus):
    plans = plan_sites(corpus, load_config([*BASE, "sites.missing_site_rate=1"]))
    for p in plans:
        data = SiteData(corpus, p)
        for t in p.tasks:
            inputs = corpus.schema.task(t).inputs
            if len(inputs) < 2:
                continue
            split = data.split(t, "test")
            lacking = [m for m in inputs if not split.present[m].any()]
            assert len(lacking) == 1, (p.site, t)  # exactly one lost, the other always there
    _shares, empty = _present(corpus, plans)
    assert not empty


def test_no_missingness_by_default_and_rates_are_checked(corpus):
    shares, _ = _present(corpus, plan_sites(corpus, load_config(BASE)))
    assert all(v == 1.0 for v in shares.values())
    with pytest.raises(ConfigError, match="sites.missing_sample_rate must be in \\[0, 1\\]"):
        load_config(["sites.missing_sample_rate=1.5"])
