"""Studies: grid expansion, one results row per run, means that match the rows, resume, plots."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from federated.app.studies.spec import StudyError, load_study
from federated.app.studies.study import run_study

TINY = """
name: tiny
title: Tiny study
description: two conditions, two seeds, one round
base: [scale=smoke, rounds=1, "sites.train=[imaging_centre,neuro_clinic]", "sites.held_out=[eye_clinic]",
       sites.zero_shot=true]
seeds: 2
processes: 2
axes:
  lr:
    small: [train.lr=0.001]
    large: [train.lr=0.01]
"""


def test_spec_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseedz: 3\n")
    with pytest.raises(StudyError, match=r"unknown key\(s\) \['seedz'\]"):
        load_study(str(bad))
    bad.write_text("name: x\nseeds: 0\n")
    with pytest.raises(StudyError, match="seeds must be an integer >= 1"):
        load_study(str(bad))
    bad.write_text("axes:\n  a: [x=1]\n")
    with pytest.raises(StudyError, match="axes.a must map labels"):
        load_study(str(bad))
    with pytest.raises(StudyError, match="unknown study 'nope'; available: .*leave_one_site_out"):
        load_study("nope")
    bad.write_text("name: [unclosed\n")
    with pytest.raises(StudyError, match=r"bad\.yaml is not valid YAML"):
        load_study(str(bad))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(StudyError, match=r"bad\.yaml: a study is a mapping of keys"):
        load_study(str(bad))


def test_every_shipped_study_expands(tmp_path):
    from federated.core.config import load_config
    from federated.app.studies.spec import available

    names = available()
    assert {"leave_one_site_out", "missing_modality", "privacy_utility", "strategies"} <= set(names)
    for name in names:
        study = load_study(name)
        for quick in (False, True):
            runs = study.runs(quick, {"held_out": {"site_00": ["sites.holdout=named", "sites.holdout_sites=[site_00]"]}}
                              if study.generated_axes else None)
            assert runs and len({r.run_id for r in runs}) == len(runs)
            load_config(runs[0].overrides)  # every override is a valid config key


@pytest.mark.slow
def test_a_study_writes_one_row_per_run_resumes_and_plots(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = tmp_path / "out"
    df = run_study(str(spec), out)
    results = pd.read_csv(out / "results.csv")
    assert len(results) == len(df) == 4 and results["run_id"].is_unique
    assert results["error"].isna().all()  # an empty error column reads back as NaN
    summary = pd.read_csv(out / "summary.csv")
    for _, row in summary.iterrows():
        runs = results[results["lr"] == row["lr"]]
        assert row["n"] == 2
        assert row["id_mean"] == pytest.approx(runs["id"].mean())
        assert row["ood_sd"] == pytest.approx(runs["ood"].std(ddof=0))
    report = (out / "report.md").read_text()
    assert "Tiny study" in report and "| lr |" in report and "scores.png" in report
    import matplotlib.pyplot as plt

    image = plt.imread(out / "scores.png")
    assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.01  # a real picture
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))

    # a study killed after some runs: those keep their outputs and are not run again
    victim = results["run_id"].iloc[0]
    (out / "runs" / victim / "summary.json").unlink()
    kept = {r: os.path.getmtime(out / "runs" / r / "summary.json") for r in results["run_id"] if r != victim}
    run_study(str(spec), out)
    assert (out / "runs" / victim / "summary.json").exists()
    assert {r: os.path.getmtime(out / "runs" / r / "summary.json") for r in kept} == kept
    again = pd.read_csv(out / "results.csv")
    assert len(again) == 4


def test_study_command_refuses_an_unknown_study(tmp_path):
    from federated.app.cli import main

    assert main(["study", "nope", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_a_study_runs_its_grid_on_the_ray_engine_with_the_same_scores(tmp_path):
    """`engine=ray` as a study override: the run goes through Flower's Ray simulation in the
    study's worker process and scores what the in-process engine scores."""
    import json

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.replace("seeds: 2", "seeds: 1").replace("    large: [train.lr=0.01]\n", ""))
    scores = {}
    for engine in ("inprocess", "ray"):
        out = tmp_path / engine
        df = run_study(str(spec), out, processes=1, overrides=[f"engine={engine}"])
        assert len(df) == 1 and not df["error"].astype(bool).any()
        summary = json.loads((out / "runs" / df["run_id"].iloc[0] / "summary.json").read_text())
        assert summary["engine"] == engine
        assert "±" not in (out / "summary.md").read_text()  # one run per condition: no spread shown
        scores[engine] = (summary["final"]["id"]["score"], summary["final"]["ood"]["score"])
    assert scores["ray"] == pytest.approx(scores["inprocess"], abs=1e-6)
