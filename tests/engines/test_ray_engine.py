"""engine=ray runs the same apps under Flower's Ray simulation: same outputs, same scores."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from federated.app.cli import main
from federated.engines.ray_engine import ray_processes

pytestmark = pytest.mark.slow

THREE_SITES = [
    "scale=smoke",
    "rounds=2",
    "sites.train=[imaging_centre,neuro_clinic]",
    "sites.held_out=[eye_clinic]",
    "sites.zero_shot=true",
    "engine.checkpoint_every=1",
]


def test_ray_and_inprocess_give_the_same_run(tmp_path):
    runs = {}
    for engine in ("inprocess", "ray"):
        out = tmp_path / engine
        assert main(["run", "--out", str(out), "--no-progress", f"engine={engine}", *THREE_SITES]) == 0
        runs[engine] = (json.loads((out / "summary.json").read_text()), pd.read_parquet(out / "metrics.parquet"))
        for name in ("config.yaml", "final_model.npz", "checkpoint.npz"):
            assert (out / name).is_file(), (engine, name)
        assert any((out / "tensorboard").iterdir())
    (a, ma), (b, mb) = runs["inprocess"], runs["ray"]
    assert b["engine"] == "ray" and b["rounds_completed"] == 2 and len(b["per_site"]) == 3
    for group in ("id", "ood"):
        assert b["final"][group]["score"] == pytest.approx(a["final"][group]["score"], abs=1e-6)
        assert b["final"][group]["per_task"] == pytest.approx(a["final"][group]["per_task"], abs=1e-6)
    key = ["round", "site", "task", "metric"]
    joined = ma.merge(mb, on=key, suffixes=("_a", "_b"))
    assert len(joined) == len(ma) == len(mb)
    assert (joined["value_a"] - joined["value_b"]).abs().max() <= 1e-6
    assert not ray_processes()  # no Ray process outlives the run


def test_a_site_killed_mid_round_is_counted_and_the_run_goes_on(tmp_path):
    """faults.kind=exit kills the site's process (os._exit) while it trains in round 1."""
    out = tmp_path / "kill"
    overrides = [*THREE_SITES, "engine=ray", "faults.kind=exit", "faults.sites=[site_01]", "faults.rounds=[1]"]
    assert main(["run", "--out", str(out), "--no-progress", *overrides]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds_completed"] == 2
    assert "Actor" in s["failures"]["1"]["train:site_01"]  # Ray saw the process die
    assert "2" not in s["failures"] or "train:site_01" not in s["failures"]["2"]  # restarted, back in round 2
    m = pd.read_parquet(out / "metrics.parquet")
    trained = m[m["metric"] == "train_loss"]
    assert set(trained[trained["round"] == 1]["site"]) == {"site_00"}
    assert set(trained[trained["round"] == 2]["site"]) == {"site_00", "site_01"}
    assert not ray_processes()
