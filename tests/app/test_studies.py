"""Studies: grid expansion, one results row per run, means that match the rows, resume, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from federated.app.studies.runner import (
    RUNS_DIR,
    RunOutcome,
    StudyRow,
    log_hparams,
    results_frame,
    run_jobs,
    study_rows,
)
from federated.app.studies.spec import Run, StudyError, load_study
from federated.app.studies.study import run_study

# A summary.json as the code before typed results wrote it (tests/server/test_results.py builds it).
GOLDEN = Path(__file__).parents[1] / "server" / "data" / "summary_before_typing.json"

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
    from federated.app.studies.spec import available
    from federated.core.config import load_config

    names = available()
    assert {"leave_one_site_out", "missing_modality", "privacy_utility", "strategies"} <= set(names)
    for name in names:
        study = load_study(name)
        for quick in (False, True):
            runs = study.runs(
                quick,
                {"held_out": {"site_00": ["sites.holdout=named", "sites.holdout_sites=[site_00]"]}}
                if study.generated_axes
                else None,
            )
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


def test_finished_runs_are_read_back_as_typed_rows_with_the_columns_results_csv_always_had(tmp_path):
    runs = [Run("lr=small__seed=0", {"lr": "small"}, 0, []), Run("lr=big__seed=1", {"lr": "big"}, 1, [])]
    (tmp_path / RUNS_DIR / runs[0].run_id).mkdir(parents=True)
    (tmp_path / RUNS_DIR / runs[0].run_id / "summary.json").write_text(GOLDEN.read_text())
    done = []
    outcomes = run_jobs([(runs[0].run_id, [])], tmp_path, processes=1, on_done=lambda *a: done.append(a))
    assert done == [(runs[0].run_id, True, "")] and not outcomes[runs[0].run_id].ran
    outcomes[runs[1].run_id] = RunOutcome(runs[1].run_id, None, "ValueError: bad\ntrace")
    rows = study_rows(runs, outcomes)
    # what result_row() made of the same summary before rows were typed
    assert [r.to_dict() for r in rows] == [
        {
            "run_id": "lr=small__seed=0",
            "lr": "small",
            "seed": 0,
            "error": "",
            "id": 0.484375,
            "ood": 0.225,
            "gap": 0.4,
            "worst_site": "site_c",
            "worst_site_score": 0.225,
            "id_personal": 0.5972222222222222,
            "ood_adapted": None,
            "max_epsilon": 2.5,
            "rounds": 2,
            "wall_s": 5.5,
            "id/bone_age": 0.625,
            "id/cell_type": 0.34375,
            "ood/bone_age": 0.225,
            "ood_site/site_c": 0.225,
        },
        {"run_id": "lr=big__seed=1", "lr": "big", "seed": 1, "error": "ValueError: bad"},
    ]
    frame = results_frame(rows)
    assert list(frame.columns[:4]) == ["run_id", "lr", "seed", "error"] and frame["id"].isna().tolist() == [False, True]
    log_hparams(tmp_path, runs[1], rows[1])  # a failed run has no scores to log
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads(GOLDEN.read_text())["final"]["worst_site"]["role"] == "held_out"
    assert (
        isinstance(rows[0], StudyRow) and rows[0].scores is not None and rows[0].scores.ood_sites == {"site_c": 0.225}
    )


def test_the_grid_is_expanded_in_axis_order_with_quick_and_generated_values(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "base: [rounds=3]\nquick: [scale=smoke]\nseeds: 2\nquick_seeds: 1\n"
        "axes:\n  lr:\n    small: [train.lr=0.001]\n    large: [train.lr=0.01]\n"
        "  mu:\n    '0': [strategy.mu=0]\n    0.1: [strategy.mu=0.1]\n"
        "quick_axes: {lr: [large]}\n"
    )
    study = load_study(str(path))
    assert study.axes["mu"] == {"0": ["strategy.mu=0"], "0.1": ["strategy.mu=0.1"]}  # labels become strings
    runs = study.runs()
    assert [r.run_id for r in runs[:3]] == [
        "lr=small__mu=0__seed=0",
        "lr=small__mu=0__seed=1",
        "lr=small__mu=0.1__seed=0",
    ]
    assert len(runs) == 2 * 2 * 2
    assert runs[2] == Run(
        "lr=small__mu=0.1__seed=0",
        {"lr": "small", "mu": "0.1"},
        0,
        ["rounds=3", "train.lr=0.001", "strategy.mu=0.1", "seed=0"],
    )
    quick = study.runs(quick=True, generated={"mu": {"site 00": ["x=1"]}, "held_out": {"a": ["y=2"]}})
    assert [r.run_id for r in quick] == [
        "lr=large__mu=0__held_out=a__seed=0",
        "lr=large__mu=0.1__held_out=a__seed=0",
        "lr=large__mu=site-00__held_out=a__seed=0",  # a generated value joins the static axis
    ]
    assert quick[2].overrides == ["rounds=3", "scale=smoke", "train.lr=0.01", "x=1", "y=2", "seed=0"]
    path.write_text("base: rounds=3\n")
    with pytest.raises(StudyError, match=r"grid\.yaml: base must be a list of key=value strings"):
        load_study(str(path))
