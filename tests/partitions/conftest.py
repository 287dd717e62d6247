"""Planner-test fixtures: manifest-only corpora of any number of origin sites and sizes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from federated.data.format import Corpus


def _manifest_corpus(
    sizes: dict[str, int], tasks=("brain_tumor_classification", "cell_type"), test_fraction: float = 0.2, seed: int = 0
) -> Corpus:
    """`sizes[origin]` samples per origin, spread over `tasks`, with random class labels."""
    rng = np.random.default_rng(seed)
    origin = np.repeat(list(sizes), list(sizes.values()))
    n = len(origin)
    frame = pd.DataFrame(
        {
            "origin_site": origin,
            "task": rng.choice(list(tasks), size=n),
            "split": np.where(rng.random(n) < test_fraction, "test", "train"),
            "label": rng.integers(0, 4, size=n).astype(float),
        }
    )
    return Corpus.from_manifest(frame, list(tasks))


@pytest.fixture
def manifest_corpus():
    """A factory: manifest_corpus({"KY": 300, ...}) -> a Corpus with a manifest and no arrays."""
    return _manifest_corpus
