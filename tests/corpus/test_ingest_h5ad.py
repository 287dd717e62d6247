"""The h5ad adapter: AnnData files made in the test, gene selection, and every bad input named."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from federated.corpus.format import Corpus
from federated.corpus.ingest import IngestError
from federated.corpus.ingest.spec import run_spec

anndata = pytest.importorskip("anndata")

TYPES = ["T cell", "B cell", "NK"]


def _h5ad(path, cells=30, genes=300, nan_cell=None, label_of=None, donors=("d1", "d2", "d3")):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(cells, genes)).astype(np.float32)
    x[:, :10] *= 5.0  # ten genes with 25x the variance of the others
    if nan_cell is not None:
        x[nan_cell, 3] = np.nan
    labels = [label_of(i) if label_of else TYPES[i % 3] for i in range(cells)]
    obs = pd.DataFrame({"cell_type": labels, "donor": [donors[i % len(donors)] for i in range(cells)]},
                       index=[f"BC{i:03d}" for i in range(cells)])
    var = pd.DataFrame({"highly_variable": [j % 2 == 0 for j in range(genes)]},
                       index=[f"GENE{j}" for j in range(genes)])
    anndata.AnnData(x, obs=obs, var=var).write_h5ad(path)


SOURCE = """sources:
  - adapter: h5ad
    task: cell_type
    path: cells.h5ad
    label_key: cell_type
    classes: {{"T cell": type_0, "B cell": type_1, NK: type_2}}
    site_key: donor
{extra}"""


def _spec(tmp_path, extra=""):
    path = tmp_path / "spec.yaml"
    path.write_text(SOURCE.format(extra=extra))
    return path


def test_cells_become_scrna_samples_with_donor_sites(tmp_path):
    _h5ad(tmp_path / "cells.h5ad")
    out, skipped = run_spec(_spec(tmp_path), tmp_path / "corpus")
    corpus = Corpus.open(out)
    m = corpus.manifest
    assert skipped == [] and len(m) == 30
    assert sorted(m["origin_site"].unique()) == ["d1", "d2", "d3"]
    assert (corpus.targets("cell_type")[m["target_row"]] == np.arange(30) % 3).all()
    genes = corpus.spec["provenance"]["notes"][0]["genes"]
    assert len(genes) == 256 and {f"GENE{j}" for j in range(10)} <= set(genes)  # the most variable kept
    x = corpus.array("scrna")
    assert x.shape == (30, 256) and np.isfinite(x).all()


def test_gene_lists_and_highly_variable(tmp_path):
    _h5ad(tmp_path / "cells.h5ad")
    out, _ = run_spec(_spec(tmp_path, "    genes: [GENE5, GENE1]\n"), tmp_path / "a")
    c = Corpus.open(out)
    assert c.spec["provenance"]["notes"][0]["genes"] == ["GENE5", "GENE1"]
    assert (c.array("scrna")[:, 2:] == 0).all()  # fewer genes than 256: zero-padded
    out, _ = run_spec(_spec(tmp_path, "    genes: highly_variable\n"), tmp_path / "b")
    chosen = Corpus.open(out).spec["provenance"]["notes"][0]["genes"]
    assert len(chosen) == 150 and all(int(g[4:]) % 2 == 0 for g in chosen)


def _expect_failure(tmp_path, match, extra=""):
    out = tmp_path / "corpus"
    with pytest.raises(IngestError, match=match):
        run_spec(_spec(tmp_path, extra), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus")]


def test_bad_cells_and_files_are_named(tmp_path):
    _h5ad(tmp_path / "cells.h5ad", label_of=lambda i: "Platelet" if i == 4 else TYPES[i % 3])
    _expect_failure(tmp_path, r"cells\.h5ad cell BC004: label 'Platelet' is not a class of cell_type")
    _h5ad(tmp_path / "cells.h5ad", nan_cell=7)
    _expect_failure(tmp_path, r"cells\.h5ad cell BC007: expression has NaN")
    _h5ad(tmp_path / "cells.h5ad", label_of=lambda i: TYPES[i % 2])  # no NK cell at all
    _expect_failure(tmp_path, r"cells\.h5ad: declared class\(es\) \['type_2'\] of task cell_type have no sample")
    _expect_failure(tmp_path, r"genes not in the file: \['NOPE'\]", "    genes: [NOPE]\n")
    _expect_failure(tmp_path, r"no obs column 'batch'", "    patient_key: batch\n")
    (tmp_path / "cells.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    _expect_failure(tmp_path, r"cells\.h5ad: unreadable or corrupt \.h5ad")
    (tmp_path / "cells.h5ad").unlink()
    _expect_failure(tmp_path, r"cells\.h5ad: file does not exist")


def test_skip_mode_lists_the_bad_cell(tmp_path):
    _h5ad(tmp_path / "cells.h5ad", nan_cell=7)
    out, skipped = run_spec(_spec(tmp_path, "    on_error: skip\n"), tmp_path / "corpus")
    assert [s["item"].rsplit(" ", 1)[-1] for s in skipped] == ["BC007"]
    assert len(Corpus.open(out).manifest) == 29


def test_missing_anndata_names_the_install_command(tmp_path, monkeypatch):
    _h5ad(tmp_path / "cells.h5ad")
    monkeypatch.setitem(sys.modules, "anndata", None)
    _expect_failure(tmp_path, r"pip install 'multimed-fl\[h5ad\]'")
