"""engine=ray runs the same apps under Flower's Ray simulation: same outputs, same scores."""

from __future__ import annotations

import contextlib
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


def test_a_run_joins_a_running_ray_cluster_and_scores_as_in_process(tmp_path):
    """engine.ray_address: a Ray head started on loopback plays the cluster; the run joins it
    without sizing it, gives the in-process scores, and leaves the cluster running."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from federated.engines.deployment import free_port
    from federated.engines.deployment.environment import _port_open

    port = free_port()
    ray = Path(sys.executable).parent / "ray"
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # `ray start` notes its head here
    recorded = record.read_bytes() if record.is_file() else None
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - the head writes here until it is killed
    head = subprocess.Popen(
        [str(ray), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", "--block"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _port_open("127.0.0.1", port):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        scores = {}
        for engine, extra in (("inprocess", []), ("ray", [f"engine.ray_address=127.0.0.1:{port}"])):
            out = tmp_path / engine
            assert main(["run", "--out", str(out), "--no-progress", f"engine={engine}", *extra, *THREE_SITES]) == 0
            scores[engine] = json.loads((out / "summary.json").read_text())["final"]
        for group in ("id", "ood"):
            assert scores["ray"][group]["per_task"] == pytest.approx(scores["inprocess"][group]["per_task"], abs=1e-6)
        assert head.poll() is None, "the run stopped the cluster it joined"
        assert not ray_processes()  # nothing of Ray's left in this process group
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        log.close()
        if recorded is None:  # leave no pointer to the stopped head for a later ray.init to follow
            record.unlink(missing_ok=True)
        else:
            record.write_bytes(recorded)
