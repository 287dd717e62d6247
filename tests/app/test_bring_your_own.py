"""Bring your own data and model, end to end (issue 15): a research group's own tasks, shapes and
weights, declared in an ingest spec and a config, with no code change. Every dataset is built
inside the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from federated.app.cli import main
from federated.data.format import Corpus

HOSPITALS = ("st_anne", "riverside", "north_gen", "lakeview")
RUN = ["rounds=3", "model.dim=16", "model.heads=2", "train.batch_size=16", "engine.torch_threads=1"]


def clinical_csv(path: Path, n_per_site: int = 60, seed: int = 0) -> Path:
    """A sepsis table: 12 clinical variables (3 categorical, 2 with missing values) at 4 hospitals;
    the label depends on lactate, white cells and age, with a per-hospital shift in lactate."""
    rng = np.random.default_rng(seed)
    rows = []
    for h, hospital in enumerate(HOSPITALS):
        for i in range(n_per_site):
            lactate = rng.gamma(2.0, 1.0) + 0.3 * h
            wbc = rng.normal(9, 3)
            age = rng.integers(18, 90)
            risk = 1.2 * (lactate - 2.0 - 0.3 * h) + 0.3 * (wbc - 9) + 0.03 * (age - 55)
            rows.append(
                {
                    "patient": f"{hospital}-{i:03d}",
                    "hospital": hospital,
                    "age": age,
                    "sex": rng.choice(["F", "M"]),
                    "heart_rate": rng.normal(90, 15),
                    "resp_rate": rng.normal(18, 4),
                    "temperature": rng.normal(37.5, 0.8),
                    "sbp": rng.normal(120, 20),
                    "wbc": wbc,
                    "lactate": lactate if rng.random() > 0.15 else np.nan,  # not always measured
                    "creatinine": rng.normal(1.1, 0.4) if rng.random() > 0.1 else np.nan,
                    "platelets": rng.normal(250, 60),
                    "smoker": rng.choice(["yes", "no", ""]),
                    "admission": rng.choice(["emergency", "elective", "transfer"]),
                    "sepsis": int(risk + rng.normal(0, 0.7) > 0),
                    "length_of_stay": float(np.clip(3 + 1.5 * lactate + rng.normal(0, 1), 0.5, None)),
                }
            )
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


TABULAR_SOURCE = {
    "adapter": "tabular",
    "path": "icu.csv",
    "site_column": "hospital",
    "patient_column": "patient",
    "categorical_columns": ["sex", "smoker", "admission"],
    "feature_columns": [
        "age",
        "heart_rate",
        "resp_rate",
        "temperature",
        "sbp",
        "wbc",
        "lactate",
        "creatinine",
        "platelets",
    ],
    "impute": "median",
}


# The coordinator's data dictionary (README, "Bring your own data"): every hospital encodes by it.
# A white-cell count or creatinine below zero is implausible: missing, imputed at load time.
SEPSIS_DICTIONARY = {
    "columns": {
        "age": {"type": "numeric", "unit": "years", "range": [18, 110]},
        "heart_rate": {"type": "numeric", "unit": "beats/min", "range": [20, 250]},
        "resp_rate": {"type": "numeric", "unit": "breaths/min", "range": [0, 80]},
        "temperature": {"type": "numeric", "unit": "degC", "range": [30, 45]},
        "sbp": {"type": "numeric", "unit": "mmHg", "range": [30, 260]},
        "wbc": {"type": "numeric", "unit": "10^9/L", "range": [0, 200], "out_of_range": "missing"},
        "lactate": {"type": "numeric", "unit": "mmol/L", "range": [0, 30]},
        "creatinine": {"type": "numeric", "unit": "mg/dL", "range": [0, 20], "out_of_range": "missing"},
        "platelets": {"type": "numeric", "unit": "10^9/L", "range": [0, 2000]},
        "sex": {"type": "categorical", "levels": ["F", "M"], "reference": "F"},
        "smoker": {"type": "categorical", "levels": ["no", "yes"], "reference": "no"},
        "admission": {"type": "categorical", "levels": ["elective", "emergency", "transfer"], "reference": "elective"},
    }
}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def sepsis_spec(folder: Path, table: str = "icu.csv", dictionary: bool = True) -> Path:
    if table == "icu.csv":
        clinical_csv(folder / "icu.csv")
    write_spec(folder / "sepsis_dictionary.yaml", SEPSIS_DICTIONARY)
    return write_spec(
        folder / f"spec_{Path(table).stem}.yaml",
        {
            "name": "sepsis_demo",
            **({"dictionary": "sepsis_dictionary.yaml"} if dictionary else {}),
            "test_fraction": 0.25,
            "modalities": {"clinical": {"kind": "vector", "features": 16}},
            "tasks": {
                "sepsis": {
                    "inputs": ["clinical"],
                    "target": "binary",
                    "classes": ["no_sepsis", "sepsis"],
                    "metrics": ["auroc", "accuracy"],
                    "description": "ICU admissions of four hospitals",
                }
            },
            "sources": [
                {
                    **TABULAR_SOURCE,
                    "path": table,
                    "task": "sepsis",
                    "label_column": "sepsis",
                    "labels": {0: "no_sepsis", 1: "sepsis"},
                }
            ],
        },
    )


def test_four_hospitals_ingesting_their_own_rows_with_the_dictionary_declare_the_same_features(tmp_path: Path) -> None:
    """Each hospital ingests only its own rows: with the coordinator's dictionary all four declare
    one feature list (names, units, ranges) and encode every row as the whole table does; without
    it, lakeview (more men, more elective admissions) picks other reference levels."""
    ingest(sepsis_spec(tmp_path), tmp_path / "all")
    table = pd.read_csv(tmp_path / "icu.csv")
    whole = Corpus.open(tmp_path / "all")
    features = whole.schema.modality("clinical").features
    assert [f.name for f in features][9:] == ["sex=M", "smoker=yes", "admission=emergency", "admission=transfer"]
    assert features[0].unit == "years" and whole.schema.modality("clinical").impute == "median"
    rows = pd.Series(whole.manifest["idx_clinical"].to_numpy(), index=whole.manifest["patient_id"])
    for hospital in HOSPITALS:
        table[table["hospital"] == hospital].to_csv(tmp_path / f"{hospital}.csv", index=False)
        own = ingest(sepsis_spec(tmp_path, f"{hospital}.csv"), tmp_path / hospital)
        assert own.schema.modality("clinical") == whole.schema.modality("clinical")
        mine = pd.Series(own.manifest["idx_clinical"].to_numpy(), index=own.manifest["patient_id"])
        np.testing.assert_array_equal(own.array("clinical")[mine], whole.array("clinical")[rows[mine.index]])
        plain = ingest(sepsis_spec(tmp_path, f"{hospital}.csv", dictionary=False), tmp_path / f"{hospital}_plain")
        names = [f.name for f in plain.schema.modality("clinical").features]
        assert ("sex=F" in names) == (hospital == "lakeview")  # its reference level is M: most of its patients


def ingest(spec: Path, out: Path) -> Corpus:
    assert main(["corpus", "ingest", str(spec), "--out", str(out)]) == 0
    return Corpus.open(out)


def run(out: Path, corpus: Path, *overrides: str) -> dict:
    code = main(["run", "--out", str(out), "--no-progress", f"corpus.path={corpus}", *RUN, *overrides])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def test_csv_with_a_hospital_column_to_a_per_site_report_and_an_ood_score(tmp_path: Path) -> None:
    corpus = ingest(sepsis_spec(tmp_path), tmp_path / "corpus")
    task = corpus.schema.task("sepsis")
    assert (task.target, task.classes, task.metrics) == ("binary", ("no_sepsis", "sepsis"), ("auroc", "accuracy"))
    assert corpus.spec["origin_sites"] == sorted(HOSPITALS)
    assert corpus.array("clinical").shape[1:] == (16,)

    natural = ["sites.planner=natural", "sites.min_site_size=10"]
    summary = run(tmp_path / "natural", tmp_path / "corpus", *natural)
    assert summary["tasks"]["sepsis"]["metrics"] == ["auroc", "accuracy"]
    assert {r["origin_site"] for r in summary["per_site"]} == set(HOSPITALS)
    for row in summary["per_site"]:
        assert row["tasks"] == ["sepsis"]
        assert set(row["per_task"]["sepsis"]) >= {"auroc", "accuracy", "score"}
    assert summary["final"]["id"]["per_task"]["sepsis"] > 0.5  # the signal is learnable

    held = run(
        tmp_path / "held", tmp_path / "corpus", *natural, "sites.holdout=named", "sites.holdout_sites=[lakeview]"
    )
    ood = [r for r in held["per_site"] if r["role"] == "held_out"]
    assert [r["origin_site"] for r in ood] == ["lakeview"]
    assert held["final"]["ood"]["per_task"]["sepsis"] == pytest.approx(ood[0]["per_task"]["sepsis"]["auroc"])


def image_folders(root: Path, size: int, per_class: int = 6) -> None:
    """Two hospitals' lesion photos, one folder per class; the class is a bright blob or none."""
    rng = np.random.default_rng(1)
    for site in ("derm_a", "derm_b", "derm_c"):
        for label in ("benign", "malignant"):
            folder = root / site / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = rng.normal(100, 20, (size, size, 3))
                if label == "malignant":
                    c = rng.integers(size // 4, 3 * size // 4, 2)
                    yy, xx = np.mgrid[:size, :size]
                    img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size // 6) ** 2] += 90
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def derm_spec(folder: Path, size: int) -> Path:
    image_folders(folder / "images", 48)  # the files' own size; ingest resamples to the declared one
    return write_spec(
        folder / f"spec_{size}.yaml",
        {
            "name": "derm",
            "modalities": {"dermoscopy": {"kind": "image", "shape": [3, size, size]}},
            "tasks": {
                "melanoma": {
                    "inputs": ["dermoscopy"],
                    "target": "binary",
                    "classes": ["benign", "malignant"],
                    "metrics": ["auroc", "accuracy"],
                }
            },
            "sources": [
                {"adapter": "image_folders", "task": "melanoma", "path": f"images/{site}", "origin_site": site}
                for site in ("derm_a", "derm_b", "derm_c")
            ],
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "resnet18"])
def test_an_image_folder_corpus_at_64px_trains_with_either_model(tmp_path: Path, model: str) -> None:
    corpus = ingest(derm_spec(tmp_path, 64), tmp_path / "corpus")
    assert corpus.array("dermoscopy").shape[1:] == (3, 64, 64)
    summary = run(
        tmp_path / "run",
        tmp_path / "corpus",
        f"model.name={model}",
        "rounds=1",
        "sites.planner=natural",
        "sites.min_site_size=4",
    )
    assert summary["tasks"]["melanoma"]["target"] == "binary"
    assert all("melanoma" in r["per_task"] for r in summary["per_site"])
    final_model = np.load(tmp_path / "run" / "final_model.npz")
    resnet_keys = [k for k in final_model.files if k.startswith("encoders.dermoscopy.trunk")]
    assert bool(resnet_keys) == (model == "resnet18")


def test_128px_is_a_spec_change_only(tmp_path: Path) -> None:
    for size in (64, 128):
        folder = tmp_path / str(size)
        folder.mkdir()
        corpus = ingest(derm_spec(folder, size), folder / "corpus")
        assert corpus.array("dermoscopy").shape[1:] == (3, size, size)
        assert corpus.schema.modality("dermoscopy").shape == (3, size, size)


def findings_folder(root: Path, n: int = 36) -> None:
    """Skin photos with a CSV of three 0/1 findings; each finding brightens one colour channel."""
    rng = np.random.default_rng(2)
    (root / "skin").mkdir(parents=True)
    rows = []
    for i in range(n):
        found = rng.random(3) < 0.5
        found[i % 3] = True  # every finding has positives
        img = rng.normal(90, 15, (24, 24, 3))
        img[..., found] += 80
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "skin" / f"{i}.png")
        rows.append(
            {
                "file": f"{i}.png",
                "clinic": f"clinic_{i % 3}",
                "Pigment": int(found[0]),
                "Vessels": int(found[1]),
                "Scale": int(found[2]),
            }
        )
    pd.DataFrame(rows).to_csv(root / "skin.csv", index=False)


@pytest.mark.slow
def test_a_new_regression_and_a_new_multilabel_task_run_with_their_metrics(tmp_path: Path) -> None:
    clinical_csv(tmp_path / "icu.csv", n_per_site=30)
    findings_folder(tmp_path)
    spec = write_spec(
        tmp_path / "spec.yaml",
        {
            "name": "los_and_skin",
            "modalities": {
                "clinical": {"kind": "vector", "features": 16},
                "dermoscopy": {"kind": "image", "channels": 3, "size": 24},
            },
            "tasks": {
                "length_of_stay": {"inputs": ["clinical"], "target": "regression", "unit": "days"},
                "skin_findings": {
                    "inputs": ["dermoscopy"],
                    "target": "multilabel",
                    "classes": ["pigment", "vessels", "scale"],
                    "metrics": ["mean_auroc", "micro_f1"],
                },
            },
            "sources": [
                {**TABULAR_SOURCE, "task": "length_of_stay", "label_column": "length_of_stay"},
                {
                    "adapter": "images_csv",
                    "task": "skin_findings",
                    "path": "skin",
                    "labels": "skin.csv",
                    "image_column": "file",
                    "site_column": "clinic",
                    "finding_columns": {"pigment": "Pigment", "vessels": "Vessels", "scale": "Scale"},
                },
            ],
        },
    )
    corpus = ingest(spec, tmp_path / "corpus")
    assert corpus.schema.task("length_of_stay").metrics == ("mae", "pearson")  # the regression default
    assert corpus.schema.task("skin_findings").label_shape == (3,)
    summary = run(tmp_path / "run", tmp_path / "corpus", "sites.planner=natural", "sites.min_site_size=10")
    assert summary["tasks"]["length_of_stay"]["unit"] == "days"
    by_task: dict[str, set[str]] = {}
    for row in summary["per_site"]:
        for task, metrics in row["per_task"].items():
            by_task.setdefault(task, set()).update(metrics)
    assert by_task["length_of_stay"] >= {"mae", "pearson", "score"}
    assert by_task["skin_findings"] >= {"mean_auroc", "micro_f1", "score"}
    for task in ("length_of_stay", "skin_findings"):
        assert 0.0 <= summary["final"]["id"]["per_task"][task] <= 1.0


def test_init_weights_round_trip_scores_at_round_0_what_the_first_run_ended_with(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    ingest(sepsis_spec(tmp_path), corpus)
    plan = ["sites.planner=natural", "sites.min_site_size=10", "sites.holdout=named", "sites.holdout_sites=[lakeview]"]
    first = run(tmp_path / "first", corpus, *plan)
    weights = tmp_path / "first" / "final_model.npz"
    second = run(tmp_path / "second", corpus, *plan, f"model.init_weights={weights}", "seed=7")
    assert second["initial"]["id"]["score"] == pytest.approx(first["final"]["id"]["score"], abs=1e-9)
    assert second["initial"]["ood"]["score"] == pytest.approx(first["final"]["ood"]["score"], abs=1e-9)
    report = second["init_weights"]
    assert report["path"] == str(weights) and report["missing"] == [] and len(report["loaded"]) > 10


def test_init_weights_pointing_at_a_missing_file_is_refused_by_name(tmp_path: Path, capsys) -> None:
    corpus = ingest(sepsis_spec(tmp_path), tmp_path / "corpus")
    missing = tmp_path / "nowhere" / "model.npz"
    code = main(
        [
            "run",
            "--out",
            str(tmp_path / "run"),
            f"corpus.path={corpus.path}",
            *RUN,
            "sites.planner=natural",
            "sites.min_site_size=10",
            f"model.init_weights={missing}",
        ]
    )
    assert code == 2
    assert f"model.init_weights: no such file {missing}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_an_unknown_model_name_lists_the_architectures(tmp_path: Path, capsys) -> None:
    corpus = ingest(sepsis_spec(tmp_path), tmp_path / "corpus")
    code = main(["run", "--out", str(tmp_path / "run"), f"corpus.path={corpus.path}", *RUN, "model.name=vit"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.name" in err and "'vit'" in err and "resnet18" in err
