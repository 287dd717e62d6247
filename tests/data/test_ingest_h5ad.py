"""The h5ad adapter: AnnData files made in the test, gene selection, and every bad input named."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from federated.data.format import Corpus
from federated.data.ingest import IngestError
from federated.data.ingest.spec import run_spec

anndata = pytest.importorskip("anndata")

TYPES = ["T cell", "B cell", "NK"]


def _h5ad(path, cells=30, genes=300, nan_cell=None, label_of=None, donors=("d1", "d2", "d3")):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(cells, genes)).astype(np.float32)
    x[:, :10] *= 5.0  # ten genes with 25x the variance of the others
    if nan_cell is not None:
        x[nan_cell, 3] = np.nan
    labels = [label_of(i) if label_of else TYPES[i % 3] for i in range(cells)]
    obs = pd.DataFrame(
        {"cell_type": labels, "donor": [donors[i % len(donors)] for i in range(cells)]},
        index=[f"BC{i:03d}" for i in range(cells)],
    )
    var = pd.DataFrame(
        {"highly_variable": [j % 2 == 0 for j in range(genes)]}, index=[f"GENE{j}" for j in range(genes)]
    )
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
    _expect_failure(tmp_path, r"cells\.h5ad cell BC004: label \(cell_type\) is not a class of cell_type")
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


def _scrna_by_site(out) -> dict[str, np.ndarray]:
    corpus = Corpus.open(out)
    m, x = corpus.manifest, corpus.array("scrna")
    return {
        site: x[m.loc[m["origin_site"] == site, "idx_scrna"].to_numpy()] for site in sorted(m["origin_site"].unique())
    }


@pytest.mark.parametrize("sparse", [False, True])
def test_reading_in_small_blocks_gives_the_same_corpus(tmp_path, monkeypatch, sparse):
    """The file is read backed, block by block: a block of 7 cells (5 blocks of a 30-cell file)
    gives exactly what one block does, dense or sparse (CSR) on disk."""
    import federated.data.ingest.h5ad as h5ad_adapter

    _h5ad(tmp_path / "cells.h5ad")
    if sparse:
        from scipy import sparse as sp

        data = anndata.read_h5ad(tmp_path / "cells.h5ad")
        data.X = sp.csr_matrix(np.where(np.abs(data.X) < 1.0, 0.0, data.X).astype(np.float32))
        data.write_h5ad(tmp_path / "cells.h5ad")
    whole, _ = run_spec(_spec(tmp_path), tmp_path / "whole")
    monkeypatch.setattr(h5ad_adapter, "BLOCK_VALUES", 7 * 300)
    blocks, _ = run_spec(_spec(tmp_path), tmp_path / "blocks")
    a, b = Corpus.open(whole), Corpus.open(blocks)
    assert a.spec["provenance"]["notes"] == b.spec["provenance"]["notes"]
    np.testing.assert_array_equal(a.array("scrna"), b.array("scrna"))
    # and both hold what the plain in-memory computation selects
    x = anndata.read_h5ad(tmp_path / "cells.h5ad").X
    x = x.toarray() if hasattr(x, "toarray") else x
    top = sorted(np.argsort(-x.astype(np.float64).var(axis=0), kind="stable")[:256])
    assert a.spec["provenance"]["notes"][0]["genes"] == [f"GENE{j}" for j in top]


def test_expression_is_stored_as_read_and_scale_is_refused_naming_preprocess_statistics(tmp_path):
    """The genes are raw features, standardised at load time by the run's statistics: ingest
    stores each cell's values as the file holds them (one donor's batch effect included), and the
    old per-site `scale:` would standardise them twice, so it is refused by key."""
    _h5ad(tmp_path / "cells.h5ad")
    data = anndata.read_h5ad(tmp_path / "cells.h5ad")
    data.X[(data.obs["donor"] == "d2").to_numpy()] += 100.0  # one donor's batch effect
    data.write_h5ad(tmp_path / "cells.h5ad")
    corpus = Corpus.open(run_spec(_spec(tmp_path, "    genes: [GENE0, GENE1, GENE2, GENE20]\n"), tmp_path / "a")[0])
    stored = corpus.array("scrna")[corpus.manifest["idx_scrna"].to_numpy()]
    np.testing.assert_array_equal(stored[:, :4], np.asarray(data.X)[:, [0, 1, 2, 20]])
    assert (stored[:, 4:] == 0).all()
    _expect_failure(
        tmp_path, r"sources\[0\]: `scale`: .*`preprocess\.statistics`.*remove `scale:`", "    scale: true\n"
    )
    _expect_failure(tmp_path, r"`scale`: ingest no longer standardises expression", "    scale: false\n")


def test_the_genes_are_the_modalitys_features_and_the_handshake_refuses_other_genes(tmp_path):
    """Two hospitals whose files choose other genes for one column (here the same genes in
    another order) wrote schemas the handshake could not tell apart: the genes are now the
    features, so the hospital whose genes differ is refused, naming the first gene that differs."""
    from federated.server.evaluation import SiteProfile
    from federated.server.site_agreement import agree

    _h5ad(tmp_path / "cells.h5ad")
    corpora = {}
    for name, genes in (("a", "[GENE0, GENE1, GENE2]"), ("b", "[GENE0, GENE1, GENE2]"), ("c", "[GENE0, GENE2, GENE1]")):
        corpora[name] = Corpus.open(run_spec(_spec(tmp_path, f"    genes: {genes}\n"), tmp_path / name)[0])
    scrna = corpora["a"].schema.modality("scrna")
    assert [(f.name, f.column, f.kind) for f in scrna.features] == [
        (g, g, "numeric") for g in ("GENE0", "GENE1", "GENE2")
    ]
    assert scrna.impute == "" and scrna.shape == (256,)  # no NaN is stored: nothing to impute
    assert corpora["a"].spec["provenance"]["notes"][0]["genes"] == ["GENE0", "GENE1", "GENE2"]
    profiles = [
        SiteProfile(name, "train", "natural", ["scrna"], ["cell_type"], 20, 10, schema=c.schema, version="1")
        for name, c in corpora.items()
    ]
    agreement = agree(profiles, "1", per_site_tasks=True)
    assert list(agreement.incompatible) == ["c"]
    assert "feature 2 is 'GENE2' here and 'GENE1' in the federation's" in agreement.incompatible["c"]


def test_two_sources_filling_scrna_with_other_genes_are_refused_in_one_corpus(tmp_path):
    _h5ad(tmp_path / "cells.h5ad")
    spec = _spec(tmp_path, "    genes: [GENE0, GENE1]\n")
    second = SOURCE.format(extra="    genes: [GENE1, GENE0]\n").removeprefix("sources:\n")
    spec.write_text(spec.read_text() + second)
    with pytest.raises(IngestError, match=r"modality scrna is filled by two sources that encode it differently"):
        run_spec(spec, tmp_path / "c")


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_a_gene_named_twice_among_the_chosen_columns_is_refused(tmp_path):
    _h5ad(tmp_path / "cells.h5ad", genes=12)
    data = anndata.read_h5ad(tmp_path / "cells.h5ad")
    data.var_names = [f"GENE{j % 6}" for j in range(12)]  # a file whose var_names repeat
    data.write_h5ad(tmp_path / "cells.h5ad")
    _expect_failure(tmp_path, r"cells\.h5ad: gene\(s\) \['GENE0', .*name more than one chosen column")


def test_a_damaged_block_inside_a_readable_file_is_named(tmp_path):
    """The file opens (its header is intact) but one compressed block of X is zeroed: the read
    that reaches it fails, and the error names the file."""
    import h5py

    _h5ad(tmp_path / "cells.h5ad")
    data = anndata.read_h5ad(tmp_path / "cells.h5ad")
    data.write_h5ad(tmp_path / "cells.h5ad", compression="gzip")
    with h5py.File(tmp_path / "cells.h5ad") as f:
        chunk = f["X"].id.get_chunk_info(0)
    raw = bytearray((tmp_path / "cells.h5ad").read_bytes())
    raw[chunk.byte_offset + 16 : chunk.byte_offset + chunk.size] = bytes(chunk.size - 16)
    (tmp_path / "cells.h5ad").write_bytes(bytes(raw))
    _expect_failure(tmp_path, r"cells\.h5ad: unreadable expression matrix \(OSError")


def test_obs_keys_and_class_mapping_are_checked_before_the_matrix_is_read(tmp_path, monkeypatch):
    from federated.core.multimed import CATALOGUE
    from federated.data.ingest import h5ad

    _h5ad(tmp_path / "cells.h5ad")

    def unread(*args):
        raise AssertionError("the matrix was read before the settings were checked")

    monkeypatch.setattr(h5ad, "_matrix", unread)
    base = {"adapter": "h5ad", "task": "cell_type", "path": "cells.h5ad", "label_key": "cell_type"}
    cases = [
        ({"label_key": None}, r"missing key 'label_key' \(the obs column holding each cell's type\)"),
        ({"site_key": "hospital"}, r"cells\.h5ad: no obs column 'hospital' \(obs: cell_type, donor\)"),
        ({"classes": {"T cell": "t_cell"}}, r"classes maps to \['t_cell'\], which are not classes of cell_type"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            h5ad.h5ad({**base, **change}, tmp_path, h5ad.Problems(), CATALOGUE)


def test_a_dictionary_gene_list_fixes_the_columns_and_names_the_genes_a_file_lacks(tmp_path):
    """Two hospitals' files hold their genes in different orders, one lacks a gene: with the
    dictionary's list both write its genes in its order, the lacking one as zeros, named in the report."""
    _h5ad(tmp_path / "cells.h5ad")
    data = anndata.read_h5ad(tmp_path / "cells.h5ad")
    reordered = data[:, ::-1].copy()  # another hospital: the same genes in the reverse order
    reordered[:, [g for g in reordered.var_names if g != "GENE7"]].copy().write_h5ad(tmp_path / "other.h5ad")
    (tmp_path / "dictionary.yaml").write_text("genes: [GENE7, GENE0, GENE3]\n")
    source = "    dictionary: dictionary.yaml\n"
    a = Corpus.open(run_spec(_spec(tmp_path, source), tmp_path / "a")[0])
    spec_b = _spec(tmp_path, source).read_text().replace("cells.h5ad", "other.h5ad")
    (tmp_path / "b.yaml").write_text(spec_b)
    b = Corpus.open(run_spec(tmp_path / "b.yaml", tmp_path / "b")[0])
    for corpus in (a, b):
        assert corpus.spec["provenance"]["notes"][0]["genes"] == ["GENE7", "GENE0", "GENE3"]
    x = np.asarray(data.X)
    xa, xb = a.array("scrna"), b.array("scrna")
    np.testing.assert_array_equal(xa[:, :3], x[:, [7, 0, 3]])
    np.testing.assert_array_equal(xb[:, 1:3], x[:, [0, 3]])  # the same columns from a file in another order
    assert (xb[:, 0] == 0).all() and (xa[:, 3:] == 0).all()
    # the genes are the features of both, the one a file lacks (zeros) included
    assert a.schema.modality("scrna").features == b.schema.modality("scrna").features
    assert [f.name for f in b.schema.modality("scrna").features] == ["GENE7", "GENE0", "GENE3"]
    assert a.spec["provenance"]["warnings"] == []
    warning = b.spec["provenance"]["warnings"][0]
    assert (
        warning["warning"] == "1 of the data dictionary's 3 genes are not in the file (GENE7): their columns are zeros"
    )
    _expect_failure(
        tmp_path,
        r"both `genes:` and the data dictionary .*'s genes choose the columns",
        source + "    genes: [GENE1]\n",
    )
    (tmp_path / "dictionary.yaml").write_text("columns: {age: {type: numeric}}\n")
    _expect_failure(tmp_path, r"sources\[0\]: the data dictionary .*dictionary\.yaml has no `genes:`", source)
