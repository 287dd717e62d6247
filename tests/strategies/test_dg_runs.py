"""Each domain-generalisation strategy runs a federation end to end, and changes its outcome:
its final model scores differently from modality_fedavg's with the same seed and optimiser."""

from __future__ import annotations

import json
import math

import pytest

from federated.app.cli import main

SGD = ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0"]  # fedrex and qffl need plain SGD steps
CASES = {
    "feddg_ga": [],
    "fedgma": [],
    "fedsr": [],
    "groupdro": [],
    "fedrex": SGD,
    "qffl": SGD,
}


def _final(tmp_path, strategy: str, extra: list[str]) -> dict:
    out = tmp_path / f"{strategy}{len(extra)}"
    args = ["run", "--out", str(out), "--no-progress", "scale=smoke", "rounds=2", f"strategy={strategy}", *extra]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    return summary["final"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(CASES))
def test_a_dg_strategy_runs_end_to_end_and_differs_from_modality_fedavg(tmp_path, strategy):
    final = _final(tmp_path, strategy, CASES[strategy])
    assert math.isfinite(final["ood"]["score"]) and math.isfinite(final["id"]["score"])
    baseline = _final(tmp_path, "modality_fedavg", CASES[strategy])
    assert final["id"]["per_task"] != baseline["id"]["per_task"]
