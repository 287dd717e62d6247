"""Ingest at scale (issue 28): tables are read column by column, not row by row, and give the
corpus the row-by-row reading gives. The reference here is that straightforward reading: each
vectorised step swapped for a per-row loop (labels and one-hot levels cell by cell, sites and
patients by `.iloc`, samples added one at a time, simulated sites and the test split drawn with
sets and dicts, the manifest built a dict per row). Timings live in experiments/bench/ingest_scale.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from federated.core.multimed import CATALOGUE
from federated.core.targets import REGRESSION
from federated.data.format import Corpus, index_column, write_corpus
from federated.data.ingest import dictionary, tabular
from federated.data.ingest import spec as spec_module
from federated.data.ingest.core import SampleSet, schema_with_features
from federated.data.ingest.spec import run_spec

SPEC = """name: mixed
seed: 3
test_fraction: 0.3
sources:
  - adapter: tabular
    task: preterm_birth
    path: trial.csv
    label_column: outcome
    labels: {"Yes": preterm, "No": term}
    site_column: hospital
    patient_column: patient
    feature_columns: [age, bmi]
    categorical_columns: [sex, smoker]
    impute: median
    on_error: skip
  - adapter: tabular
    task: birthweight
    path: trial.csv
    label_column: weight
    site_column: hospital
    patient_column: patient
    feature_columns: [age, bmi]
    categorical_columns: [sex, smoker]
    impute: median
    on_error: skip
  - adapter: tabular
    task: breast_cancer_classification
    path: wdbc.csv
    label_column: diagnosis
    simulated_sites: 3
    on_error: skip
  - adapter: image_folders
    task: brain_tumor_classification
    path: mri
    simulated_sites: 2
"""


def mixed_sources(root: Path, n: int = 120) -> Path:
    """A trial table (hospital numbers as sites, patients with two rows, categoricals with blanks and
    padded text, missing features, missing and unknown labels) read for two tasks, a table without
    sites or patients dealt into simulated sites, and image folders; the spec naming them."""
    rng = np.random.default_rng(7)
    trial = pd.DataFrame(
        {
            "hospital": rng.choice([11, 12, 13], n),
            "patient": [f"P{i % (n - 10):04d}" for i in range(n)],
            "age": rng.normal(30, 5, n).round(1),
            "bmi": rng.normal(25, 4, n).round(2),
            "sex": rng.choice(["F", "M ", "", "M"], n),
            "smoker": rng.choice(["yes", "no", "no"], n),
            "outcome": rng.choice(["Yes", "No", "No", ""], n),
            "weight": rng.normal(3200, 400, n).round(0),
        }
    )
    trial.loc[[3, 17, 40], "bmi"] = np.nan
    trial.loc[5, "age"] = np.nan
    trial.loc[[8, 60], "weight"] = np.nan
    trial.loc[11, "outcome"] = "Maybe"
    trial.to_csv(root / "trial.csv", index=False)
    wdbc = pd.DataFrame(rng.normal(size=(n, 4)), columns=[f"f{i}" for i in range(4)])
    wdbc["diagnosis"] = rng.integers(0, 2, n)
    wdbc.loc[9, "f2"] = np.nan
    wdbc.to_csv(root / "wdbc.csv", index=False)
    for c in ("glioma", "no_tumor"):
        (root / "mri" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "mri" / c / f"i{i}.png")
    (root / "spec.yaml").write_text(SPEC)
    return root / "spec.yaml"


# --- the straightforward reference: one Python step per row --------------------------------------


def _extend_row_by_row(
    self: SampleSet, inputs: dict[str, np.ndarray], targets: np.ndarray, sites: Any, patients: Any, source: str
) -> None:
    for i in range(len(targets)):
        self.add({m: x[i] for m, x in inputs.items()}, targets[i], sites[i], patients[i], source)


def _simulated_sites_by_dict(samples: SampleSet, k: int, seed: int) -> None:
    patients = sorted(set(samples.patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    site_of = {patients[j]: f"simulated_{1 + rank % k}" for rank, j in enumerate(order)}
    samples.origin_sites = [site_of[p] for p in samples.patient_ids]
    samples.notes["simulated_sites"] = k


def _test_patients_by_set(sets: list[SampleSet], test_fraction: float, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    patients = sorted({p for s in sets for p in s.patient_ids})
    n_test = round(test_fraction * len(patients))
    test = set(rng.choice(patients, size=n_test, replace=False)) if n_test else set()
    for s in sets:
        own = sorted(set(s.patient_ids))
        if len(own) < 2:
            continue
        mine = [p for p in own if p in test]
        if not mine:
            test.add(own[int(rng.integers(len(own)))])
        elif len(mine) == len(own):
            test.discard(mine[int(rng.integers(len(mine)))])
    return test


def _ingest_row_by_row(sets, out_dir, name, provenance, schema, test_fraction=0.2, seed=0, overwrite=False):
    schema = schema_with_features(sets, schema)  # what each table's columns mean, as ingest declares it
    test = _test_patients_by_set(sets, test_fraction, seed)
    rows: list[dict[str, Any]] = []
    arrays: dict[str, list[np.ndarray]] = {m: [] for m in schema.modalities}
    targets: dict[str, list[np.ndarray]] = {}
    for s in sets:
        offset = len(targets.get(s.task, []))
        block = s.block()
        nth = {m: 0 for m in block.inputs}
        for i in range(len(s)):
            target = block.targets[i]
            targets.setdefault(s.task, []).append(target)
            row = {
                "sample_id": f"{s.task}/{offset + i:07d}",
                "dataset": block.sources[i],
                "task": s.task,
                "patient_id": block.patient_ids[i],
                "origin_site": block.origin_sites[i],
                "split": "test" if block.patient_ids[i] in test else "train",
                "label": float(target) if np.ndim(target) == 0 else np.nan,
                "target_row": offset + i,
            }
            for m in schema.task(s.task).inputs:
                has, values = block.inputs[m]
                row[index_column(m)] = -1
                if has[i]:
                    row[index_column(m)] = len(arrays[m])
                    arrays[m].append(values[nth[m]])
                    nth[m] += 1
            rows.append(row)
    manifest = pd.DataFrame(rows)
    for col in [c for c in manifest if c.startswith("idx_")]:
        manifest[col] = manifest[col].fillna(-1).astype("int64")
    stacked = {
        t: np.stack(v).astype(np.float32 if schema.task(t).target == REGRESSION else np.int64)
        for t, v in targets.items()
    }
    out_arrays = {m: np.stack(v) for m, v in arrays.items() if v}
    return write_corpus(out_dir, manifest, out_arrays, stacked, name, provenance, schema=schema, overwrite=overwrite)


def _straightforward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap every vectorised step of a tabular ingest for its per-row reading."""
    monkeypatch.setattr(tabular, "distinct_cells", lambda column: (np.arange(len(column)), column.tolist()))
    monkeypatch.setattr(tabular, "cell_texts", lambda column: [str(column.iloc[i]) for i in range(len(column))])
    monkeypatch.setattr(dictionary, "distinct_cells", lambda column: (np.arange(len(column)), column.tolist()))
    monkeypatch.setattr(SampleSet, "extend", _extend_row_by_row)
    monkeypatch.setattr(spec_module, "assign_simulated_sites", _simulated_sites_by_dict)
    monkeypatch.setattr(spec_module, "ingest", _ingest_row_by_row)


# --- the tests -----------------------------------------------------------------------------------


def test_the_vectorised_ingest_writes_the_corpus_the_row_by_row_reading_writes(tmp_path, monkeypatch):
    spec = mixed_sources(tmp_path)
    fast, fast_skipped = run_spec(spec, tmp_path / "fast")
    with monkeypatch.context() as m:
        _straightforward(m)
        slow, slow_skipped = run_spec(spec, tmp_path / "slow")
    a, b = Corpus.open(fast), Corpus.open(slow)
    pd.testing.assert_frame_equal(a.manifest, b.manifest)
    for t in a.tasks:
        np.testing.assert_array_equal(a.targets(t), b.targets(t))
    for m in a.modalities:
        np.testing.assert_array_equal(a.array(m), b.array(m))
    assert fast_skipped == slow_skipped
    assert a.fingerprint == b.fingerprint  # spec.json (provenance included), manifest, every array
    # what the fixture is there to exercise
    assert {"11", "12", "13", "simulated_1", "simulated_2", "simulated_3"} <= set(a.manifest["origin_site"])
    assert set(a.manifest["task"]) == {"preterm_birth", "birthweight", "breast_cancer_classification",
                                       "brain_tumor_classification"}  # fmt: skip
    reasons = {s["reason"] for s in fast_skipped}
    assert any("is missing" in r for r in reasons) and any("not a class" in r for r in reasons)
    assert any("NaN or infinite" in r for r in reasons)
    both = a.manifest.groupby("patient_id")["split"].nunique()
    assert (both == 1).all()  # a patient in two tasks is on one side in both
    # a blank is missing (NaN on its column's indicators, imputed at load), not a level of its own
    assert a.spec["provenance"]["notes"][0]["features"] == ["age", "bmi", "sex=F", "smoker=yes"]
    assert a.schema.modality("obstetric") == b.schema.modality("obstetric") and a.schema.modality("obstetric").features


def test_samples_added_one_by_one_and_at_once_are_the_same_block():
    schema = CATALOGUE
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    one, many = SampleSet("breast_cancer_classification", schema), SampleSet("breast_cancer_classification", schema)
    for i in range(2):
        one.add({"tabular": x[i]}, i % 2, "a", f"p{i}", "src")
    one.add({}, 1, "b", "p2", "src")  # lacks its input
    for i in range(3, 5):
        one.add({"tabular": x[i]}, i % 2, "a", f"p{i}", "src")
    many.extend({"tabular": x[:2]}, np.array([0, 1]), ["a", "a"], ["p0", "p1"], "src")
    many.add({}, 1, "b", "p2", "src")
    many.extend({"tabular": x[3:]}, np.array([1, 0]), ["a", "a"], ["p3", "p4"], "src")
    a, b = one.block(), many.block()
    assert len(one) == len(many) == 5
    for m in ("tabular", "pathology"):
        np.testing.assert_array_equal(a.inputs[m][0], b.inputs[m][0])
        np.testing.assert_array_equal(a.inputs[m][1], b.inputs[m][1])
    np.testing.assert_array_equal(a.inputs["tabular"][0], [True, True, False, True, True])
    np.testing.assert_array_equal(a.targets, b.targets)
    for column in ("origin_sites", "patient_ids", "sources"):
        assert getattr(a, column).tolist() == getattr(b, column).tolist()
    with pytest.raises(ValueError, match="expected"):
        many.extend({"tabular": x[:, :8]}, np.zeros(5), ["a"] * 5, ["p"] * 5, "src")


def test_cells_that_hash_alike_are_still_read_apart():
    """1, 1.0 and True are equal keys to a hash table, as are 0.0 and -0.0; a label or level
    read once per distinct value must not merge them where a per-row reading keeps them apart."""
    mixed = pd.Series([1, 1.0, True, "1", None], dtype=object)
    codes, cells = tabular.distinct_cells(mixed)
    assert [type(cells[c]) for c in codes] == [int, float, bool, str, type(None)]
    zeros = pd.Series([0.0, -0.0, 1.5])
    codes, cells = tabular.distinct_cells(zeros)
    assert [str(cells[c]) for c in codes] == ["0.0", "-0.0", "1.5"]
    text = pd.Series(["a ", "a", np.nan, "b", "a"])
    codes, cells = tabular.distinct_cells(text)
    assert len(cells) == 4 and codes[1] == codes[4]  # read once per distinct cell


def test_sites_and_patients_read_as_iloc_gives_them():
    frame = pd.DataFrame(
        {
            "int": [1, 2],
            "float32": np.array([0.1, 2.5], dtype=np.float32),
            "date": pd.to_datetime(["2020-01-01", "2021-02-03"]),
            "nullable": pd.array([7, None], dtype="Int64"),
            "text": ["north", None],
        }
    )
    for col in frame:
        assert tabular.cell_texts(frame[col]) == [str(frame[col].iloc[i]) for i in range(len(frame))]


def test_a_row_planned_at_two_sites_is_named_as_a_row_by_row_check_names_it():
    from federated.data.format import CorpusFormatError
    from federated.data.split import _refuse_shared_rows

    def by_dict(plan: dict[str, list[int]]) -> str | None:
        taken: dict[int, str] = {}
        for site, rows in plan.items():
            for r in rows:
                if r in taken:
                    return f"manifest row {r} is planned at both {taken[r]} and {site}"
                taken[r] = site
        return None

    plans = [
        {"a": [0, 1, 2], "b": [3, 1, 0]},
        {"a": [4, 4]},
        {"a": [5, 6], "b": [7], "c": [8, 7, 6]},
        {"a": [1, 2], "b": [3], "c": []},
    ]
    for plan in plans:
        expected = by_dict(plan)
        if expected is None:
            _refuse_shared_rows({s: np.array(r) for s, r in plan.items()})
        else:
            with pytest.raises(CorpusFormatError) as e:
                _refuse_shared_rows({s: np.array(r) for s, r in plan.items()})
            assert str(e.value) == expected
