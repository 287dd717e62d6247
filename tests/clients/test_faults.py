"""Sites that crash or stall: the round completes with the others and the failure is counted."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from federated.app.cli import main


def _run(tmp_path, *overrides):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--no-progress", "scale=smoke", *overrides]) == 0
    return json.loads((out / "summary.json").read_text()), pd.read_parquet(out / "metrics.parquet")


def test_a_crashing_site_is_counted_and_the_round_goes_on(tmp_path):
    s, m = _run(tmp_path, "rounds=3", "faults.kind=crash", "faults.sites=[site_00]", "faults.rounds=[2]")
    assert s["rounds_completed"] == 3
    assert list(s["failures"]) == ["2"]
    assert "SimulatedCrash" in s["failures"]["2"]["train:site_00"]
    failed = m[m["metric"] == "train_failed"]
    assert list(zip(failed["round"], failed["site"], strict=True)) == [(2, "site_00")]
    losses = m[(m["metric"] == "train_loss") & (m["round"] == 2)]
    assert len(losses) == 7 and "site_00" not in set(losses["site"])  # the other 7 trained


@pytest.mark.slow  # waits out the timeout and the stall; the unit test: test_federation.py, round_timeout_s
def test_a_straggler_past_the_timeout_is_discarded(tmp_path):
    s, m = _run(
        tmp_path,
        "rounds=2",
        "faults.kind=stall",
        "faults.sites=[site_01]",
        "faults.rounds=[1]",
        "faults.stall_s=8",
        "engine.round_timeout_s=3",
    )
    assert s["rounds_completed"] == 2
    assert "no reply within engine.round_timeout_s=3.0" in s["failures"]["1"]["train:site_01"]
    losses = m[m["metric"] == "train_loss"]
    assert "site_01" not in set(losses[losses["round"] == 1]["site"])  # its late reply was dropped
    assert "site_01" in set(losses[losses["round"] == 2]["site"])  # and it is back in round 2
