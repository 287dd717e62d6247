"""Leak and quality checks at ingest (issue 29): a column derived from the label is refused by name
unless the source allows it; constant and mostly missing columns are named in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from federated.core.multimed import CATALOGUE
from federated.data.format import Corpus
from federated.data.ingest import IngestError, leaks
from federated.data.ingest.leaks import (
    MIN_ROWS,
    auroc,
    classification_leak,
    hanley_mcneil_se,
    lower_bound,
    regression_leak,
)
from federated.data.ingest.spec import run_spec


def _pairs_auroc(x: np.ndarray, positive: np.ndarray) -> float:
    """AUROC by its definition: the share of (positive, negative) pairs ordered right, ties 1/2."""
    pos, neg = x[positive], x[~positive]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_auroc_is_the_share_of_pairs_ordered_right():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 6, 40).astype(float)  # many ties
        positive = rng.random(40) < 0.4
        assert auroc(x, positive) == pytest.approx(_pairs_auroc(x, positive), abs=1e-12)


def test_either_direction_and_one_class_against_the_rest_count():
    labels = np.repeat([0, 1, 2], 10)
    rng = np.random.default_rng(1)
    low_for_class_2 = np.where(labels == 2, -5.0, 0.0) + rng.normal(0, 0.1, 30)
    found = classification_leak(low_for_class_2, labels)
    assert found is not None and found[0] == pytest.approx(1.0) and found[1] == 2
    noise = classification_leak(rng.normal(size=30), labels)
    assert noise is not None and noise[0] < 0.99
    assert classification_leak(labels[: MIN_ROWS - 1].astype(float), labels[: MIN_ROWS - 1]) is None  # too few rows
    y = rng.normal(50, 10, 40)
    assert regression_leak(y.copy(), y) == ("equal values", 1.0)
    kind, r = regression_leak(1000 - 2.54 * y, y) or ("", 0.0)
    assert kind == "|correlation|" and r == pytest.approx(1.0)
    assert regression_leak(y + rng.normal(0, 5, 40), y) is None


def _table(path: Path, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    label = rng.integers(0, 2, n)
    frame = pd.DataFrame(
        {
            "diagnosis": np.where(label == 1, "M", "B"),
            "radius": rng.normal(14, 3, n) + 2 * label,  # a real, imperfect predictor
            "texture": rng.normal(19, 4, n),
            "coded_outcome": np.where(label == 1, rng.uniform(50, 60, n), rng.uniform(0, 10, n)),  # derived from it
            "site_flag": np.where(label == 1, "yes", "no"),  # a categorical copy of it
            "ward": ["a"] * n,  # constant
            "biopsy_score": np.where(rng.random(n) < 0.7, np.nan, rng.normal(size=n)),  # 70% missing
            "weight_kg": rng.normal(70, 10, n),
        }
    )
    frame["weight_lb"] = frame["weight_kg"] * 2.20462
    frame.to_csv(path, index=False)
    return frame


def _spec(tmp_path: Path, **source) -> Path:
    body = {
        "sources": [
            {
                "adapter": "tabular",
                "task": "breast_cancer_classification",
                "path": "t.csv",
                "label_column": "diagnosis",
                "labels": {"B": "benign", "M": "malignant"},
                **source,
            }
        ]
    }
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(body))
    return path


def test_a_label_derived_column_is_refused_naming_column_task_and_auroc(tmp_path):
    _table(tmp_path / "t.csv")
    with pytest.raises(IngestError) as caught:
        run_spec(_spec(tmp_path, feature_columns=["radius", "texture", "coded_outcome"]), tmp_path / "c")
    message = str(caught.value)
    assert "t.csv: column 'coded_outcome' alone predicts task breast_cancer_classification's label" in message
    assert "AUROC 1.0000 (>= 0.99), its lower 95% bound 0.99" in message and "allow_leaks: [coded_outcome]" in message
    assert not (tmp_path / "c").exists()
    # by default every other numeric column is taken: the leak is caught there too
    with pytest.raises(IngestError, match=r"column 'coded_outcome' alone predicts"):
        run_spec(_spec(tmp_path), tmp_path / "c")
    # a categorical copy: its indicator is named by column, never by level
    with pytest.raises(IngestError) as caught:
        run_spec(_spec(tmp_path, feature_columns=["radius"], categorical_columns=["site_flag"]), tmp_path / "c")
    message = str(caught.value)
    assert (
        "column 'site_flag' (the indicator of one of its levels) reproduces task breast_cancer_classification's "
        in message
    )
    assert "site_flag=" not in message and "yes" not in message.replace(str(tmp_path), "")


def test_allow_leaks_lets_a_named_column_through(tmp_path):
    frame = _table(tmp_path / "t.csv")
    spec = _spec(tmp_path, feature_columns=["radius", "coded_outcome"], allow_leaks=["coded_outcome"])
    corpus = Corpus.open(run_spec(spec, tmp_path / "c")[0])
    stored = corpus.array("tabular")[corpus.manifest["idx_tabular"].to_numpy()]
    order = corpus.manifest["patient_id"].str.removeprefix("t.csv:row").astype(int).to_numpy()
    np.testing.assert_array_equal(stored[:, 1], frame["coded_outcome"].to_numpy(np.float32)[order])


def test_a_regression_label_reproduced_by_a_column_is_refused(tmp_path):
    _table(tmp_path / "t.csv")
    body = {
        "tasks": {"weight": {"inputs": ["tabular"], "target": "regression", "unit": "kg"}},
        "sources": [
            {
                "adapter": "tabular",
                "task": "weight",
                "path": "t.csv",
                "label_column": "weight_kg",
                "feature_columns": ["radius", "weight_lb"],
            },
        ],
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(body))
    with pytest.raises(IngestError, match=r"column 'weight_lb' reproduces task weight's label \(\|correlation\| 1\.0"):
        run_spec(tmp_path / "spec.yaml", tmp_path / "c")
    body["sources"][0]["allow_leaks"] = ["weight_lb"]
    (tmp_path / "spec.yaml").write_text(json.dumps(body))
    assert Corpus.open(run_spec(tmp_path / "spec.yaml", tmp_path / "c")[0]).spec["n_samples"] == 60


def test_constant_and_mostly_missing_columns_are_named_in_the_report(tmp_path, capsys):
    share = _table(tmp_path / "t.csv")["biopsy_score"].isna().mean()
    spec = _spec(
        tmp_path,
        feature_columns=["radius", "biopsy_score"],
        categorical_columns=["ward"],
        impute="median",
        max_missing_share=0.6,
    )
    corpus = Corpus.open(run_spec(spec, tmp_path / "c")[0])
    warnings = [w["warning"] for w in corpus.spec["provenance"]["warnings"]]
    missing = f"column 'biopsy_score' is missing in {share:.0%} of the labelled rows (more than max_missing_share 0.6)"
    assert share > 0.6 and missing in warnings
    assert "column 'ward' holds one value in every labelled row: it carries no information" in warnings
    assert not any("radius" in w for w in warnings)
    assert "note: " in capsys.readouterr().out
    relaxed = _spec(tmp_path, feature_columns=["radius", "biopsy_score"], impute="median", max_missing_share=0.9)
    quiet = Corpus.open(run_spec(relaxed, tmp_path / "d")[0]).spec["provenance"]["warnings"]
    assert not any("biopsy_score" in w["warning"] for w in quiet)


def test_a_small_table_is_not_refused_by_chance():
    """Below MIN_ROWS a perfect separation happens by chance too often to refuse a column on."""
    labels = np.array([0, 1] * 5)
    assert classification_leak(labels.astype(float), labels) is None
    assert CATALOGUE.task("breast_cancer_classification").is_classification


def test_the_hanley_mcneil_bound_by_hand():
    """A = 0.8, 50 against 50: Q1 = 0.8 / 1.2, Q2 = 2 * 0.64 / 1.8, SE^2 = (0.16 + 49 (Q1 - 0.64)
    + 49 (Q2 - 0.64)) / 2500 = 0.0019804, SE = 0.044502; a perfect separation's bound is taken at
    half a pair ordered wrong (A = 1 - 1 / (2 * 6 * 34)), never at SE = 0."""
    assert float(hanley_mcneil_se(np.array(0.8), 50, 50)) == pytest.approx(0.044502, abs=1e-6)
    assert float(hanley_mcneil_se(np.array(1.0), 6, 34)) == 0.0
    a = 1 - 1 / (2 * 6 * 34)
    expected = a - 1.6448536269514722 * float(hanley_mcneil_se(np.array(a), 6, 34))
    assert float(lower_bound(np.array(1.0), 6, 34)) == pytest.approx(expected, abs=1e-12)
    assert 0.97 < expected < 0.98  # a perfect separation in 40 rows is not sure enough to refuse
    assert float(lower_bound(np.array(1.0), 100, 100)) > 0.99  # in 200 it is


def test_a_genuine_predictor_at_a_small_hospital_is_not_refused_by_chance():
    """AUROC 0.95 (binormal) with 6 positives in 40 rows: a point AUROC of 0.99 or more comes up
    in about a fifth of samples, which the point rule refused; the bound refuses none of them,
    and still refuses a derived column at a hospital of 200."""
    rng = np.random.default_rng(0)
    d = np.sqrt(2) * 1.6448536269514722  # binormal separation of AUROC 0.95
    labels = np.repeat([1, 0], [6, 34])
    found = [classification_leak(np.r_[rng.normal(d, 1, 6), rng.normal(0, 1, 34)], labels) for _ in range(500)]
    reached = sum(f is not None and f.auroc >= 0.99 for f in found)
    assert reached > 50 and not any(f is not None and f.refused for f in found)
    big = np.repeat([1, 0], [100, 100])
    derived = classification_leak(np.where(big == 1, rng.uniform(50, 60, 200), rng.uniform(0, 10, 200)), big)
    assert derived is not None and derived.refused and not derived.exact


def _small_hospital(path: Path) -> None:
    """40 admissions, 6 malignant; `separating` is a measurement that happens to separate them
    perfectly (no two values equal), `copied` is the diagnosis recoded."""
    rng = np.random.default_rng(4)
    label = np.repeat([1, 0], [6, 34])
    pd.DataFrame(
        {
            "diagnosis": np.where(label == 1, "M", "B"),
            "separating": np.where(label == 1, rng.uniform(20, 30, 40), rng.uniform(0, 19, 40)),
            "copied": np.where(label == 1, 7.0, 3.0),
            "texture": rng.normal(19, 4, 40),
        }
    ).to_csv(path, index=False)


def test_a_perfect_separation_in_a_small_table_is_a_named_warning_a_copy_is_refused(tmp_path):
    _small_hospital(tmp_path / "t.csv")
    corpus = Corpus.open(run_spec(_spec(tmp_path, feature_columns=["separating", "texture"]), tmp_path / "c")[0])
    warnings = [w["warning"] for w in corpus.spec["provenance"]["warnings"]]
    said = [w for w in warnings if w.startswith("column 'separating' alone predicts")]
    assert len(said) == 1 and "AUROC 1.0000 (>= 0.99), but with 6 rows of class malignant against 34" in said[0]
    assert "lower 95% bound is 0.97" in said[0] and "`allow_leaks: [separating]` silences this" in said[0]
    with pytest.raises(IngestError, match=r"column 'copied' reproduces task breast_cancer_classification's label "):
        run_spec(_spec(tmp_path, feature_columns=["copied", "texture"]), tmp_path / "d")
    quiet = _spec(tmp_path, feature_columns=["separating", "texture"], allow_leaks=["separating"])
    assert not Corpus.open(run_spec(quiet, tmp_path / "e")[0]).spec["provenance"]["warnings"]


def test_a_label_encoded_in_whether_a_value_is_recorded_is_refused(tmp_path):
    """Onset time recorded only for the malignant: every recorded value is of one class, so the
    values alone say nothing, but whether the cell is blank gives the label away; kept (impute)
    blanks are scored, and allow_leaks lets the column through."""
    rng = np.random.default_rng(5)
    label = rng.integers(0, 2, 80)
    pd.DataFrame(
        {
            "diagnosis": np.where(label == 1, "M", "B"),
            "radius": rng.normal(14, 3, 80),
            "onset_h": np.where(label == 1, rng.uniform(0, 48, 80), np.nan),
        }
    ).to_csv(tmp_path / "t.csv", index=False)
    source = {"feature_columns": ["radius", "onset_h"], "impute": "median", "max_missing_share": 1}
    with pytest.raises(IngestError) as caught:
        run_spec(_spec(tmp_path, **source), tmp_path / "c")
    assert "t.csv: whether column 'onset_h' is recorded (its missing cells) reproduces task " in str(caught.value)
    assert "allow_leaks: [onset_h]" in str(caught.value)
    assert Corpus.open(run_spec(_spec(tmp_path, **source, allow_leaks=["onset_h"]), tmp_path / "c")[0])


def test_a_monotone_copy_of_a_regression_label_is_refused_by_its_spearman_correlation():
    rng = np.random.default_rng(6)
    weight = rng.normal(3300, 600, 400).clip(500, 5500)
    kind, rho = regression_leak(np.log(weight), weight) or ("", 0.0)
    assert kind == "|Spearman correlation|" and rho == pytest.approx(1.0)
    assert regression_leak(weight + rng.normal(0, 400, 400), weight) is None  # a genuine, noisy predictor


def test_each_feature_is_ranked_once_whatever_the_number_of_classes(monkeypatch):
    """Ten classes, three features: three rankings (each class's AUROC from one bincount of the
    ranks), and every class's AUROC as the pairs define it."""
    from federated.core.corpus_schema import Task
    from federated.core.features import Feature
    from federated.data.ingest.core import Problems

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 10, 400)
    values = rng.normal(size=(400, 3))
    values[:, 2] += 0.8 * (labels == 4)  # class 4 is the best separated by the third feature
    calls = []
    real = leaks.rankdata
    monkeypatch.setattr(leaks, "rankdata", lambda x: calls.append(len(x)) or real(x))
    task = Task("t", ("tabular",), "multiclass", ("accuracy",), tuple(f"c{i}" for i in range(10)))
    features = [Feature(f"f{j}", f"f{j}", "numeric") for j in range(3)]
    leaks.check_leaks(values, features, labels, task, set(), "t.csv", Problems())
    assert calls == [400, 400, 400]
    found = classification_leak(values[:, 2], labels)
    best = max((max(a, 1 - a), c) for c in range(10) for a in [_pairs_auroc(values[:, 2], labels == c)])
    assert found is not None and found.label == best[1] and found.auroc == pytest.approx(best[0], abs=1e-12)
