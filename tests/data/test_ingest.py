"""Ingest: fixtures of each format built in the test; every bad input names its file and row,
and a failed ingest leaves no corpus folder behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from federated.app.cli import main
from federated.data.format import Corpus
from federated.data.ingest import IngestError
from federated.data.ingest.spec import run_spec


def _png_folders(root, classes=("glioma", "no_tumor"), n=6, size=48):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / c / f"img{i}.png")


def _spec(tmp_path, body: str):
    path = tmp_path / "spec.yaml"
    path.write_text(body)
    return path


def _breast_csv(path, n=20, nan_row=None, bad_label_row=None):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(size=(n, 5)), columns=[f"f{i}" for i in range(5)])
    frame["diagnosis"] = ["B", "M"] * (n // 2)
    frame["clinic"] = ["north", "north", "south", "south"] * (n // 4)  # both classes at each
    if nan_row is not None:
        frame.loc[nan_row, "f2"] = np.nan
    if bad_label_row is not None:
        frame.loc[bad_label_row, "diagnosis"] = "X"
    frame.to_csv(path, index=False)


TABULAR = """
  - adapter: tabular
    task: breast_cancer_classification
    path: wdbc.csv
    label_column: diagnosis
    labels: {B: benign, M: malignant}
    site_column: clinic
"""
IMAGES = """
  - adapter: image_folders
    task: brain_tumor_classification
    path: mri
    classes: {glioma: glioma, no_tumor: no_tumor}
    origin_site: hospital_a
"""


def test_images_and_a_table_become_one_corpus(tmp_path):
    _png_folders(tmp_path / "mri")
    _breast_csv(tmp_path / "wdbc.csv")
    out, skipped = run_spec(_spec(tmp_path, "name: mini\nsources:" + IMAGES + TABULAR), tmp_path / "corpus")
    corpus = Corpus.open(out)
    m = corpus.manifest
    assert skipped == [] and len(m) == 12 + 20
    assert sorted(m["origin_site"].unique()) == ["hospital_a", "north", "south"]  # natural sites
    mri = corpus.array("mri")
    assert mri.shape == (12, 1, 32, 32) and abs(float(mri.mean())) < 1e-3  # resized, standardised
    assert corpus.array("tabular").shape == (20, 16)
    brain = m[m["task"] == "brain_tumor_classification"]
    assert set(brain["label"]) == {0.0, 3.0}  # glioma, no_tumor
    assert (m.loc[m["task"] == "breast_cancer_classification", "idx_pathology"] == -1).all()


def test_a_corrupt_image_is_named_and_nothing_is_written(tmp_path, expect_failure):
    _png_folders(tmp_path / "mri")
    (tmp_path / "mri" / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    expect_failure("sources:" + IMAGES, r"mri/glioma/broken\.jpg: unreadable or corrupt image")


def test_an_unknown_label_and_a_nan_are_named_with_their_row(tmp_path, expect_failure):
    _breast_csv(tmp_path / "wdbc.csv", bad_label_row=4)
    expect_failure("sources:" + TABULAR, r"wdbc\.csv row 6: label \(diagnosis\) is not a class")
    _breast_csv(tmp_path / "wdbc.csv", nan_row=2)
    expect_failure("sources:" + TABULAR, r"wdbc\.csv row 4: NaN or infinite value in \['f2'\]")


def test_a_mapped_class_without_a_folder_is_named(tmp_path, expect_failure):
    _png_folders(tmp_path / "mri")
    expect_failure(
        "sources:" + IMAGES.replace("no_tumor: no_tumor}", "no_tumor: no_tumor, pit: pituitary}"),
        r"mri: declared class\(es\) \['pituitary'\] of task brain_tumor_classification have no sample",
    )


def test_a_missing_file_and_an_unknown_class_folder_are_named(tmp_path, expect_failure):
    expect_failure("sources:" + TABULAR, r"wdbc\.csv: file does not exist")
    _png_folders(tmp_path / "mri", classes=("glioma", "zebra"))
    expect_failure("sources:" + IMAGES, r"mri/zebra: class 'zebra' is not a class")


def test_on_error_skip_lists_each_skipped_item(tmp_path, capsys):
    _png_folders(tmp_path / "mri")
    (tmp_path / "mri" / "glioma" / "broken.png").write_bytes(b"nope")
    _breast_csv(tmp_path / "wdbc.csv", nan_row=2)
    out, skipped = run_spec(_spec(tmp_path, "on_error: skip\nsources:" + IMAGES + TABULAR), tmp_path / "corpus")
    assert [s["item"].rsplit("/", 1)[-1] for s in skipped] == ["broken.png", "wdbc.csv row 4"]
    assert len(Corpus.open(out).manifest) == 12 + 19
    assert Corpus.open(out).spec["provenance"]["skipped"] == skipped
    assert "skipped" in capsys.readouterr().out


def test_a_spec_that_is_not_a_mapping_or_misspells_a_key_is_named(tmp_path):
    with pytest.raises(IngestError, match=r"spec\.yaml is not valid YAML"):
        run_spec(_spec(tmp_path, "sources: [unclosed\n"), tmp_path / "c")
    with pytest.raises(IngestError, match=r"spec\.yaml: an ingest spec is a mapping of keys"):
        run_spec(_spec(tmp_path, "- a\n- b\n"), tmp_path / "c")
    with pytest.raises(IngestError, match=r"unknown key\(s\) \['sourcse'\]"):
        run_spec(_spec(tmp_path, "sourcse: []\n"), tmp_path / "c")
    _breast_csv(tmp_path / "wdbc.csv")
    with pytest.raises(IngestError, match=r"sources\[0\]: unknown key\(s\) \['label_col'\] for adapter tabular"):
        run_spec(_spec(tmp_path, "sources:" + TABULAR.replace("label_column", "label_col")), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_cli_ingest_and_bad_spec(tmp_path):
    _breast_csv(tmp_path / "wdbc.csv")
    spec = _spec(tmp_path, "sources:" + TABULAR)
    assert main(["corpus", "ingest", str(spec), "--out", str(tmp_path / "c")]) == 0
    assert main(["corpus", "ingest", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "d")]) == 2
    bad = _spec(tmp_path, "sources:\n  - adapter: dicom\n    task: bone_age\n")
    assert main(["corpus", "ingest", str(bad), "--out", str(tmp_path / "e")]) == 2


def test_a_federation_runs_on_an_ingested_corpus_with_natural_sites(tmp_path):
    import json

    _png_folders(tmp_path / "mri", n=10)
    _breast_csv(tmp_path / "wdbc.csv", n=40)
    out, _ = run_spec(_spec(tmp_path, "sources:" + IMAGES + TABULAR), tmp_path / "corpus")
    run = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--out",
                str(run),
                "--no-progress",
                f"corpus.path={out}",
                "rounds=1",
                "sites.planner=natural",
                "sites.min_site_size=5",
                "sites.min_samples=2",
                "sites.holdout=named",
                "sites.holdout_sites=[south]",
                "train.batch_size=8",
            ]
        )
        == 0
    )
    s = json.loads((run / "summary.json").read_text())
    sites = {r["origin_site"] if "origin_site" in r else r["site"]: r["role"] for r in s["per_site"]}
    assert len(s["per_site"]) == 3 and list(sites.values()).count("held_out") == 1
    assert set(s["final"]["ood"]["per_task"]) == {"breast_cancer_classification"}
    # the table's rows have no pathology image: sites hold (train, average) only what they have
    assert {tuple(r["modalities"]) for r in s["per_site"]} == {("mri",), ("tabular",)}


def test_tabular_values_are_stored_raw_and_their_features_enter_the_schema(tmp_path):
    """Ingest neither imputes nor standardises (a load-time transform does, with the run's
    statistics): the stored values are the table's, and spec.json names each column's feature."""
    _breast_csv(tmp_path / "wdbc.csv")
    frame = pd.read_csv(tmp_path / "wdbc.csv")
    frame.loc[frame["clinic"] == "south", "f0"] = frame["f0"] * 10 + 50  # another scanner, another scale
    frame.to_csv(tmp_path / "wdbc.csv", index=False)
    corpus = Corpus.open(run_spec(_spec(tmp_path, "sources:" + TABULAR), tmp_path / "a")[0])
    rows = corpus.manifest["idx_tabular"].to_numpy()
    order = corpus.manifest["patient_id"].str.removeprefix("wdbc.csv:row").astype(int).to_numpy()
    stored = corpus.array("tabular")[rows]
    np.testing.assert_array_equal(stored[:, :5], frame.loc[order, [f"f{i}" for i in range(5)]].to_numpy(np.float32))
    assert (stored[:, 5:] == 0).all()  # zero-padded to the modality's 16
    modality = corpus.schema.modality("tabular")
    assert [f.name for f in modality.features] == [f"f{i}" for i in range(5)]
    assert {f.kind for f in modality.features} == {"numeric"} and modality.impute == ""
    warnings = corpus.spec["provenance"]["warnings"]
    assert "no feature_columns: took every other numeric column (5: f0, f1, f2, f3, f4)" in warnings[0]["warning"]


def test_with_impute_a_missing_value_is_kept_as_nan_and_without_it_is_a_named_problem(tmp_path, expect_failure):
    _breast_csv(tmp_path / "wdbc.csv")
    frame = pd.read_csv(tmp_path / "wdbc.csv")
    frame.loc[frame["clinic"] == "south", "f3"] = np.nan  # south never measured f3
    frame.to_csv(tmp_path / "wdbc.csv", index=False)
    expect_failure(
        "sources:" + TABULAR,
        r"wdbc\.csv row 4: NaN or infinite value in \['f3'\] \(impute: mean or median keeps a row with a missing",
    )
    imputing = TABULAR + "    impute: median\n"
    corpus = Corpus.open(run_spec(_spec(tmp_path, "sources:" + imputing), tmp_path / "nan")[0])
    assert corpus.schema.modality("tabular").impute == "median"
    m = corpus.manifest
    x = corpus.array("tabular")
    assert np.isnan(x[m.loc[m["origin_site"] == "south", "idx_tabular"], 3]).all()  # kept missing, raw
    assert np.isfinite(x[m.loc[m["origin_site"] == "north", "idx_tabular"]]).all()
    assert corpus.check() == []  # a raw modality that imputes may hold NaN, never an infinity
    frame.loc[0, "f4"] = np.inf
    frame.to_csv(tmp_path / "wdbc.csv", index=False)
    expect_failure("sources:" + imputing, r"wdbc\.csv row 2: NaN or infinite value in \['f4'\]$")  # only row 2
    _, skipped = run_spec(_spec(tmp_path, "on_error: skip\nsources:" + imputing), tmp_path / "ok")
    assert [s["item"].rsplit("/", 1)[-1] for s in skipped] == ["wdbc.csv row 2"]


@pytest.mark.parametrize(
    "source, message",
    [
        ("  - {adapter: tabular}", r"sources\[0\]: each source needs `adapter` and `task`"),
        ("  - just a string", r"sources\[0\]: each source needs `adapter` and `task`"),
        ("  - {adapter: dicom, task: bone_age}", r"sources\[0\]: unknown adapter 'dicom'; valid: .*tabular"),
        (
            "  - {adapter: tabular, task: astrology}",
            r"sources\[0\]: task 'astrology' is not declared; declare it under `tasks:` or use a catalogue task "
            r"\(.*bone_age",
        ),
        (
            "  - {adapter: tabular, task: bone_age, path: x.csv, on_error: ignore}",
            r"sources\[0\]: on_error must be stop or skip \(got 'ignore'\)",
        ),
    ],
)
def test_each_source_is_checked_before_its_adapter_runs(tmp_path, expect_failure, source, message):
    expect_failure("sources:\n" + source + "\n", message)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("    statistics: per_site\n", r"sources\[0\]: `statistics`: .*the run's setting `preprocess\.statistics`"),
        ("    impute: mode\n", r"sources\[0\]: impute must be none, mean or median \(got 'mode'\)"),
        ("    max_missing_share: 2\n", r"sources\[0\]: max_missing_share must be a number between 0 and 1"),
        ("    allow_leaks: [f9]\n", r"sources\[0\]: allow_leaks names column\(s\) \['f9'\] that are not features"),
        ("    site_column: hospital\n", r"sources\[0\]: .*wdbc\.csv: no column 'hospital' \(columns: f0, f1"),
    ],
)
def test_tabular_settings_are_refused_by_key(tmp_path, expect_failure, extra, message):
    _breast_csv(tmp_path / "wdbc.csv")
    expect_failure("sources:" + TABULAR.replace("    site_column: clinic\n", "") + extra, message)


def test_an_absent_or_unreadable_table_is_reported_and_skipped(tmp_path):
    from federated.core.multimed import CATALOGUE
    from federated.data.ingest.core import ADAPTERS, Problems

    params = {
        "adapter": "tabular",
        "task": "breast_cancer_classification",
        "path": "wdbc.parquet",
        "label_column": "diagnosis",
    }
    problems = Problems("skip")
    assert len(ADAPTERS.get("tabular")(params, tmp_path, problems, CATALOGUE)) == 0
    (tmp_path / "wdbc.parquet").write_bytes(b"not parquet")
    assert len(ADAPTERS.get("tabular")(params, tmp_path, problems, CATALOGUE)) == 0
    reasons = [s["reason"] for s in problems.skipped]
    assert reasons[0] == "file does not exist" and reasons[1].startswith("unreadable table (")


def test_a_task_without_samples_is_refused_before_writing(tmp_path):
    from federated.core.multimed import CATALOGUE
    from federated.data.ingest.core import SampleSet, ingest

    with pytest.raises(IngestError, match="task bone_age: no sample was ingested"):
        ingest([SampleSet("bone_age", CATALOGUE)], tmp_path / "c", "x", {}, CATALOGUE)
    assert not (tmp_path / "c").exists()


def _split_table(path, shift: int, n: int = 40) -> None:
    rng = np.random.default_rng(shift)
    sides = np.where((np.arange(n) + shift) % 2 == 0, "test", "train")
    pd.DataFrame({"x": rng.normal(size=n), "y": rng.integers(0, 2, n), "split": sides}).to_csv(path, index=False)


def _split_source(table: str, task: str, split: str = "split") -> dict:
    return {
        "adapter": "tabular",
        "task": task,
        "path": table,
        "label_column": "y",
        "labels": {0: "no", 1: "yes"},
        "feature_columns": ["x"],
        "split_column": split,
    }


def _split_spec(tmp_path, *sources: dict) -> Path:
    binary = {"inputs": ["clinical"], "target": "binary", "classes": ["no", "yes"]}
    body = {
        "modalities": {"clinical": {"kind": "vector", "features": 4}},
        "tasks": {"t1": binary, "t2": binary},
        "sources": list(sources),
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(body))
    return tmp_path / "spec.yaml"


def test_without_a_patient_column_two_files_rows_are_two_patients(tmp_path):
    """Row 0 of a.csv and row 0 of b.csv are two patients: with split columns that put them on
    different sides, both files ingest, each row on its own table's side; two sources reading one
    file (two tasks of one table) share its rows' patients."""
    _split_table(tmp_path / "a.csv", 0)
    _split_table(tmp_path / "b.csv", 1)
    (tmp_path / "in").mkdir()
    _split_table(tmp_path / "in" / "a.csv", 1)  # another a.csv, in a folder: other patients again
    spec = _split_spec(
        tmp_path, _split_source("a.csv", "t1"), _split_source("b.csv", "t2"), _split_source("in/a.csv", "t2")
    )
    m = Corpus.open(run_spec(spec, tmp_path / "c")[0]).manifest
    assert m["patient_id"].nunique() == 120 and "a.csv:row0" in set(m["patient_id"])
    assert "in/a.csv:row0" in set(m["patient_id"]) and "b.csv:row0" in set(m["patient_id"])
    for table, shift in (("a.csv", 0), ("b.csv", 1), ("in/a.csv", 1)):
        rows = m[m["patient_id"].str.startswith(f"{table}:row")]
        i = rows["patient_id"].str.removeprefix(f"{table}:row").astype(int)
        assert ((rows["split"] == "test") == ((i + shift) % 2 == 0)).all()
    both = _split_spec(tmp_path, _split_source("a.csv", "t1"), _split_source("a.csv", "t2"))
    m = Corpus.open(run_spec(both, tmp_path / "d")[0]).manifest
    assert m["patient_id"].nunique() == 40 and (m.groupby("patient_id")["split"].nunique() == 1).all()


def test_two_sources_that_put_a_patient_on_two_sides_are_named_with_their_split_columns(tmp_path):
    _split_table(tmp_path / "a.csv", 0)
    frame = pd.read_csv(tmp_path / "a.csv")
    frame["other_split"] = np.where(frame["split"] == "test", "train", "test")
    frame.to_csv(tmp_path / "a.csv", index=False)
    spec = _split_spec(tmp_path, _split_source("a.csv", "t1"), _split_source("a.csv", "t2", "other_split"))
    with pytest.raises(IngestError) as caught:
        run_spec(spec, tmp_path / "c")
    message = str(caught.value)
    assert "spec.yaml sources[0] (split column 'split') and " in message
    assert "spec.yaml sources[1] (split column 'other_split') put a patient on different sides" in message
    assert "row" not in message.replace("sources", "")  # never the patient's id
    assert not (tmp_path / "c").exists()
