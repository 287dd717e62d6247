"""Site-local mode end to end in simulation: each site opens only its own corpus folder; the
federation agrees on one schema, scales regression targets from a statistics round that moves
no rows, and refuses (or leaves out) a site whose task definitions differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from federated.app.cli import main
from federated.data.format import Corpus
from federated.data.synthetic import GeneratorConfig, build_synthetic_corpus

RUN = ["sites.planner=site_local", "rounds=1", "train.batch_size=16", "model.dim=16", "model.heads=2"]
HELD = ["sites.holdout=named", "sites.holdout_sites=[site_03]"]


@pytest.fixture(scope="module")
def site_corpora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four origin sites of a small synthetic corpus, split into one corpus folder each."""
    root = tmp_path_factory.mktemp("site_local")
    cfg = GeneratorConfig(samples_per_task_site=20, n_origin_sites=4, tasks=("bone_age", "cell_type", "motor_imagery"))
    full = build_synthetic_corpus(root / "full", cfg)
    assert main(["corpus", "split", str(full), "--out", str(root / "sites"), "sites.min_site_size=10"]) == 0
    return root / "sites"


def run(out: Path, folder: Path, *extra: str) -> dict:
    assert main(["run", "--out", str(out), "--no-progress", f"corpus.site_corpora={folder}", *RUN, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_each_site_holds_only_its_rows(site_corpora: Path) -> None:
    sites = sorted(p.name for p in site_corpora.iterdir())
    assert sites == ["site_00", "site_01", "site_02", "site_03"]
    seen: set[str] = set()
    for site in sites:
        corpus = Corpus.open(site_corpora / site)
        ids = set(corpus.manifest["sample_id"])
        assert not ids & seen and corpus.spec["origin_sites"] == [site]
        seen |= ids


def test_regression_scale_is_the_pooled_training_statistic_without_rows_moving(site_corpora: Path, tmp_path) -> None:
    summary = run(tmp_path / "run", site_corpora, *HELD)
    values = []
    for site in ("site_00", "site_01", "site_02"):  # the training sites; held-out site_03 contributes nothing
        corpus = Corpus.open(site_corpora / site)
        m = corpus.manifest
        rows = m[(m["task"] == "bone_age") & (m["split"] == "train")]["target_row"].to_numpy()
        values.append(np.asarray(corpus.targets("bone_age"))[rows].astype(np.float64))
    pooled = np.concatenate(values)
    scale = summary["target_scales"]["bone_age"]
    assert scale["mean"] == pytest.approx(pooled.mean(), abs=1e-9)
    assert scale["std"] == pytest.approx(pooled.std(), abs=1e-9)
    assert scale["mad"] == pytest.approx(np.abs(pooled - pooled.mean()).mean(), abs=1e-9)
    roles = {r["site"]: r["role"] for r in summary["per_site"]}
    assert roles == {"site_00": "train", "site_01": "train", "site_02": "train", "site_03": "held_out"}
    assert "bone_age" in summary["final"]["ood"]["per_task"]


def _relabel(folder: Path, site: str, task: str, classes: list[str]) -> None:
    spec_file = folder / site / "spec.json"
    spec = json.loads(spec_file.read_text())
    for entry in spec["schema"]["tasks"]:
        if entry["name"] == task:
            entry["classes"] = classes
    spec_file.write_text(json.dumps(spec))


def test_a_site_with_other_classes_is_refused_by_name_or_left_out(site_corpora: Path, tmp_path, capsys) -> None:
    folder = tmp_path / "sites"
    shutil.copytree(site_corpora, folder)
    types = [f"type_{i}" for i in range(10)]
    _relabel(folder, "site_01", "cell_type", [*types[:-1], "plasma_cell"])  # one class named differently
    code = main(["run", "--out", str(tmp_path / "fail"), "--no-progress", f"corpus.site_corpora={folder}", *RUN])
    assert code == 2
    err = capsys.readouterr().err
    assert "site_01" in err and "cell_type" in err and "plasma_cell" in err
    summary = run(tmp_path / "exclude", folder, "engine.on_incompatible_site=exclude")
    assert set(summary["excluded_sites"]) == {"site_01"} and "plasma_cell" in summary["excluded_sites"]["site_01"]
    assert "site_01" not in {r["site"] for r in summary["per_site"]}


def test_simulation_only_steps_are_refused_with_the_reason(site_corpora: Path, tmp_path, capsys) -> None:
    code = main(
        ["run", "--out", str(tmp_path / "r"), f"corpus.site_corpora={site_corpora}", *RUN, "sites.label_noise_rate=0.2"]
    )
    assert code == 2
    assert "sites.label_noise_rate is simulation-only (corrupts labels)" in capsys.readouterr().err
