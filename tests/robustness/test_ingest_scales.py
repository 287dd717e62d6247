"""Issue 28, finding 7: a 1,000,000-row, 1-feature CSV with `simulated_sites: 3` did not finish
ingesting in 200 s (100,000 rows: 31 s). The cause: every sample added re-made a list as long as
the samples before it (quadratic), and every row went through Python one step at a time.
Without timing anything, these show both are gone; the seconds are in
experiments/bench/ingest_scale.py (1M rows: 5.0 s on 2 cores)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd

from federated.core.multimed import CATALOGUE
from federated.data.format import Corpus
from federated.data.ingest import tabular
from federated.data.ingest.core import SampleSet
from federated.data.ingest.spec import run_spec

SPEC = """name: scale
sources:
  - adapter: tabular
    task: breast_cancer_classification
    path: table.csv
    label_column: y
    simulated_sites: 3
"""


def test_the_probes_table_is_ingested_without_a_python_step_per_row(tmp_path, monkeypatch):
    rows = 50_000
    rng = np.random.default_rng(0)
    pd.DataFrame({"x0": rng.normal(size=rows), "y": rng.integers(0, 2, rows)}).to_csv(
        tmp_path / "table.csv", index=False
    )
    (tmp_path / "spec.yaml").write_text(SPEC)
    labels_read = []
    read_label = tabular._label
    monkeypatch.setattr(tabular, "_label", lambda *a: labels_read.append(a) or read_label(*a))

    def one_by_one(*_: object) -> None:
        raise AssertionError("a table's rows are added one sample at a time")

    monkeypatch.setattr(SampleSet, "add", one_by_one)
    path, skipped = run_spec(tmp_path / "spec.yaml", tmp_path / "corpus")
    corpus = Corpus.open(path)
    assert corpus.spec["n_samples"] == rows and not skipped
    assert corpus.spec["origin_sites"] == ["simulated_1", "simulated_2", "simulated_3"]
    assert len(labels_read) == 2  # once per distinct label cell (0 and 1), not once per row


def test_adding_a_sample_costs_the_same_however_many_came_before():
    """The quadratic part: `add` allocated a list of n Nones on every call (8n bytes at n samples)."""
    samples = SampleSet("breast_cancer_classification", CATALOGUE)
    x = np.zeros(16, dtype=np.float32)
    for i in range(20_000):
        samples.add({"tabular": x}, i % 2, "a", f"p{i}", "src")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        samples.add({"tabular": x}, 1, "a", "last", "src")
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 8 * 20_000 / 4, f"one add allocated {peak} bytes with 20,000 samples before it"
    assert len(samples) == 20_001
