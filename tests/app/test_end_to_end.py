"""`multimed-fl run` end to end on a tiny corpus: the summary contract, learning, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from federated.app.cli import main
from federated.core.config import config_from_yaml, load_config

pytestmark = pytest.mark.slow

# Small but long enough to learn: the smoke corpus, a few rounds, 2 local epochs.
ARGS = ["scale=smoke", "rounds=4", "train.local_epochs=2", "corpus.samples_per_task_site=30"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "smoke"
    assert main(["run", "--out", str(out), "--no-progress", *ARGS]) == 0
    return out


def test_summary_contract(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["rounds_completed"] == 4
    for group in ("id", "ood"):
        assert 0.0 <= s["final"][group]["score"] <= 1.0
        assert s["final"][group]["per_task"]
    assert s["final"]["gap"] == pytest.approx(
        sum(s["final"]["id"]["per_task"][t] - s["final"]["ood"]["per_task"][t] for t in s["final"]["gap_tasks"])
        / len(s["final"]["gap_tasks"])
    )
    assert {"site", "score"} <= set(s["final"]["worst_site"])
    roles = [row["role"] for row in s["per_site"]]
    assert roles.count("train") == 8 and roles.count("held_out") == 2
    for row in s["per_site"]:
        assert {"site", "role", "modalities", "tasks", "n_train", "n_test", "score", "per_task"} <= set(row)
        assert set(row["per_task"]) == set(row["tasks"])
        assert row["n_test"] > 0 and (row["n_train"] > 0) == (row["role"] == "train")
    # every task some training site holds has an ID score; every held-out task an OOD score
    held = {t for row in s["per_site"] if row["role"] == "train" for t in row["tasks"]}
    assert set(s["final"]["id"]["per_task"]) == held
    assert s["privacy"] == {}
    assert {"wall_s", "train_s", "aggregate_s"} <= set(s["timing"])


def test_training_beats_initialisation_on_id_and_ood(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["final"]["id"]["score"] > s["initial"]["id"]["score"] + 0.1
    assert s["final"]["ood"]["score"] > s["initial"]["ood"]["score"] + 0.05


def test_metrics_table_and_other_outputs(run_dir):
    m = pd.read_parquet(run_dir / "metrics.parquet")
    assert list(m.columns) == ["round", "site", "role", "task", "metric", "value"]
    assert sorted(m["round"].unique()) == [0, 1, 2, 3, 4]
    evals = m[m["metric"] != "train_loss"]
    # one row per round x site x task x metric: no duplicates
    assert not evals.duplicated(["round", "site", "task", "metric"]).any()
    s = json.loads((run_dir / "summary.json").read_text())
    n_site_tasks = sum(len(r["tasks"]) for r in s["per_site"])
    assert evals[(evals["round"] == 4) & (evals["metric"] == "score")].shape[0] == n_site_tasks
    assert (m[m["metric"] == "train_loss"]["round"] >= 1).all()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert config_from_yaml((run_dir / "config.yaml").read_text()) == load_config(ARGS)


def test_same_config_and_seed_give_identical_scores(run_dir, tmp_path):
    out = tmp_path / "again"
    assert main(["run", "--out", str(out), "--no-progress", *ARGS]) == 0
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    for key in ("final", "initial", "per_site", "history"):
        assert a[key] == b[key], key


def test_rerun_into_a_finished_run_is_refused(run_dir, capsys):
    before = (run_dir / "summary.json").read_text()
    assert main(["run", "--out", str(run_dir), "--no-progress", *ARGS]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == before


def test_console_script_reports_config_errors():
    proc = subprocess.run(
        [sys.executable, "-m", "federated.app.cli", "run", "--out", "unused", "colour=red"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown key 'colour'" in proc.stderr


def test_run_uses_the_configured_planner_holdout_and_steps(tmp_path):
    """A run with a random task mix, random held-out sites, label skew and acquisition shift."""
    out = tmp_path / "mix"
    overrides = [
        "scale=smoke",
        "rounds=1",
        "sites.planner=random_mix",
        "sites.n_sites=6",
        "sites.tasks_per_site=3",
        "sites.holdout=random",
        "sites.holdout_k=2",
        "sites.label_skew_classes=2",
        "sites.load_shift_severity=1",
        "sites.zero_shot=true",
    ]
    assert main(["run", "--out", str(out), "--no-progress", *overrides]) == 0
    s = json.loads((out / "summary.json").read_text())
    roles = [row["role"] for row in s["per_site"]]
    assert len(roles) == 6 and roles.count("held_out") == 2
    assert all(row["site"].startswith("site_") for row in s["per_site"])
    trained = {t for row in s["per_site"] if row["role"] == "train" for t in row["tasks"]}
    for row in s["per_site"]:
        assert len(row["tasks"]) >= 3
        # a training site's 2-class test split may lack a task's rows; held-out sites score all
        assert set(row["per_task"]) <= set(row["tasks"])
        if row["role"] == "held_out":
            assert set(row["per_task"]) == set(row["tasks"])
    zero_shot = {t for row in s["per_site"] if row["role"] == "held_out" for t in row["tasks"]} - trained
    assert zero_shot <= set(s["final"]["ood"]["per_task"])
