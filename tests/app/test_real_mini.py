"""The real_mini study end to end on stand-ins for its four sources: files with the real
datasets' names, layouts and columns (made here: tests download nothing), through the real
ingest spec (conf/corpus/ingest/real_mini.yaml) and the real study definition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from federated.app.cli import main
from federated.app.studies.spec import StudyError
from federated.app.studies.study import run_study
from federated.data.format import Corpus
from federated.data.ingest.spec import run_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "conf" / "corpus" / "ingest" / "real_mini.yaml"
PBMC_TYPES = [
    "Dendritic",
    "CD14+ Monocyte",
    "CD19+ B",
    "CD4+/CD25 T Reg",
    "CD8+ Cytotoxic T",
    "CD8+/CD45RA+ Naive Cytotoxic",
    "CD56+ NK",
    "CD4+/CD45RO+ Memory",
    "CD34+",
    "CD4+/CD45RA+/CD25- Naive T",
]
BREAST = [
    "mean radius",
    "mean texture",
    "mean perimeter",
    "mean area",
    "mean smoothness",
    "mean compactness",
    "mean concavity",
    "mean concave points",
    "mean symmetry",
    "mean fractal dimension",
    "worst radius",
    "worst texture",
    "worst perimeter",
    "worst area",
    "worst smoothness",
    "worst concave points",
]


def _sources(data: Path, rng: np.random.Generator) -> None:
    for label, n in (("yes", 24), ("no", 24)):  # Br35H: JPEG class folders
        (data / "br35h" / label).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 255, (48, 40), dtype=np.uint8) // (2 if label == "no" else 1)
            Image.fromarray(img).save(data / "br35h" / label / f"{label}{i}.jpg")
    import anndata

    cells = 60
    obs = pd.DataFrame(
        {"bulk_labels": pd.Categorical([PBMC_TYPES[i % 10] for i in range(cells)])},
        index=[f"CELL{i}-1" for i in range(cells)],
    )
    anndata.AnnData(
        rng.normal(size=(cells, 300)).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(300)])
    ).write_h5ad(data / "10x_pbmc68k_reduced.h5ad")
    breast = pd.DataFrame(rng.normal(size=(60, len(BREAST))), columns=BREAST)
    breast.insert(0, "diagnosis", ["malignant", "benign"] * 30)
    breast.insert(0, "patient", [f"wdbc{i:03d}" for i in range(60)])
    breast.to_csv(data / "breast_cancer.csv", index=False)
    n = 80
    opt = pd.DataFrame(
        {
            "PID": range(100, 100 + n),
            "Clinic": ["KY", "MN", "MS", "NY"] * (n // 4),
            "Group": ["C", "T"] * (n // 2),
            "Age": rng.integers(18, 40, n),
            "BMI": np.where(np.arange(n) % 9 == 0, np.nan, rng.normal(25, 4, n)),
            "N.prev.preg": rng.integers(0, 4, n).astype(float),
            "BL.GE": rng.normal(1.5, 0.2, n),
            "BL..BOP": rng.normal(60, 10, n),
            "BL.PD.avg": rng.normal(2.8, 0.3, n),
            "BL.CAL.avg": rng.normal(1.3, 0.3, n),
            **{
                c: rng.choice(["Yes", "No "], n)
                for c in ("Black", "White", "Public.Asstce", "Diabetes", "Use.Tob", "Prev.preg")
            },
            "Hypertension": rng.choice(["Y", "N"], n),
            "Preg.ended...37.wk": ["Yes", "No ", "No ", "No ", "Yes"] * (n // 5),  # both at every clinic
            "Birthweight": np.where(np.arange(n) == 5, np.nan, rng.normal(3200, 500, n)),
        }
    )
    opt.loc[7, "Preg.ended...37.wk"] = " "  # an unrecorded outcome: skipped, and listed
    opt.to_csv(data / "opt.csv", index=False)


@pytest.mark.slow
def test_real_mini_spec_and_study_run_on_stand_in_sources(tmp_path):
    data = tmp_path / "data"
    _sources(data, np.random.default_rng(0))
    corpus_dir, skipped = run_spec(SPEC, tmp_path / "corpus", data_root=data)
    assert sorted(s["item"].rsplit(" ", 1)[-1] for s in skipped) == ["7", "9"]  # rows 7 and 9
    corpus = Corpus.open(corpus_dir)
    m = corpus.manifest
    assert sorted(m["origin_site"].unique()) == ["KY", "MN", "MS", "NY", "simulated_1", "simulated_2", "simulated_3"]
    assert (
        m.groupby("task").size()
        == pd.Series(
            {
                "birthweight": 79,
                "brain_tumor_detection": 48,
                "breast_cancer_classification": 60,
                "cell_type": 60,
                "preterm_birth": 79,
            }
        )
    ).all()
    # a woman's two outcomes are on the same side of the split
    opt = m[m["task"].isin(["birthweight", "preterm_birth"])]
    assert (opt.groupby("patient_id")["split"].nunique() == 1).all()
    assert corpus.array("scrna").shape == (60, 256)

    out = tmp_path / "study"
    df = run_study(
        "real_mini",
        out,
        quick=True,
        overrides=[f"corpus.path={corpus_dir}", "sites.min_site_size=10", "sites.min_samples=2", "train.batch_size=8"],
    )
    assert len(df) == 3 and not df["error"].astype(bool).any()
    # natural sites keep their clinic's name: in the study's conditions, summaries and metrics
    assert set(df["training"]) == {"federated", "pooled", "local:KY"}
    sites = {"KY", "MN", "MS", "NY", "simulated_1", "simulated_2", "simulated_3", "pooled"}  # pooled: one site
    for run_dir in (out / "runs").iterdir():
        summary = json.loads((run_dir / "summary.json").read_text())
        per_site = {r["site"]: (r["origin_site"], r["role"]) for r in summary["per_site"]}
        assert set(per_site) <= sites and all(o == s for s, (o, _) in per_site.items() if s != "pooled")
        assert per_site["MS"][1] == per_site["simulated_3"][1] == "held_out"
        if run_dir.name.startswith("training=federated"):
            assert set(per_site) == sites - {"pooled"}
        assert set(pd.read_parquet(run_dir / "metrics.parquet")["site"]) <= sites
    report = (out / "report.md").read_text()
    assert "OOD (held-out sites) score per task" in report and "brain_tumor_detection" in report
    per_task = pd.read_csv(out / "per_task_ood.csv", index_col="task")
    assert set(per_task.index) == {
        "birthweight",
        "brain_tumor_detection",
        "breast_cancer_classification",
        "cell_type",
        "preterm_birth",
    }
    with pytest.raises(StudyError, match="overrides"):  # the folder belongs to those overrides
        run_study("real_mini", out, quick=True)


def test_a_missing_real_corpus_names_the_setup_command(tmp_path):
    with pytest.raises(StudyError, match=r"does not exist; build it with experiments/real_mini/setup\.sh"):
        run_study("real_mini", tmp_path / "s", quick=True, overrides=[f"corpus.path={tmp_path / 'none'}"])
    assert not (tmp_path / "s" / "study_overrides.json").exists()  # a corrected rerun may use this folder
    assert (
        main(["study", "real_mini", "--quick", "--out", str(tmp_path / "t"), f"corpus.path={tmp_path / 'none'}"]) == 2
    )
