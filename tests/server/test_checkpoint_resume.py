"""Checkpoints and --resume: a run killed mid-way and resumed ends where an uninterrupted one does."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from federated.app.cli import main
from federated.app.runner import run_experiment
from federated.core.config import load_config
from federated.server.checkpoint import CheckpointError, load_checkpoint
from federated.server.federation import Callback

# Server-optimiser moments (fedadam), site DP-SGD ledgers and label skew all carry state.
OVERRIDES = [
    "scale=smoke",
    "rounds=4",
    "engine.checkpoint_every=2",
    "strategy=fedadam",
    "privacy=dp_sgd",
    "privacy.target_epsilon=5",
    "strategy.fraction_train=0.75",
]


class Killed(Exception):
    pass


class KillAfter(Callback):
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round_end(self, record) -> None:
        if record.round == self.rnd:
            raise Killed(f"killed after round {self.rnd}")


def _final(out):
    with np.load(out / "final_model.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_resume_ends_with_the_uninterrupted_model_and_epsilon(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--out", str(full), "--no-progress", *OVERRIDES]) == 0
    # a crash after round 3: the last checkpoint is round 2
    import federated.app.runner as runner

    original = runner.MetricsTable
    monkeypatch.setattr(runner, "MetricsTable", lambda path: _Both(original(path), KillAfter(3)))
    with pytest.raises(Killed):
        run_experiment(load_config(OVERRIDES), cut, progress=False)
    monkeypatch.setattr(runner, "MetricsTable", original)
    assert load_checkpoint(cut).round == 2 and not (cut / "summary.json").exists()
    assert main(["run", "--resume", str(cut), "--no-progress"]) == 0

    a, b = _final(full), _final(cut)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, cut))
    assert sb["resumed_from_round"] == 2 and sb["rounds_completed"] == 4
    assert {s: p["epsilon"] for s, p in sa["privacy"].items()} == pytest.approx(
        {s: p["epsilon"] for s, p in sb["privacy"].items()}, abs=1e-12
    )
    assert sa["final"] == sb["final"]
    ma, mb = (pd.read_parquet(d / "metrics.parquet") for d in (full, cut))
    assert sorted(mb["round"].unique()) == [0, 1, 2, 3, 4]
    key = ["round", "site", "task", "metric"]
    joined = ma.merge(mb, on=key, suffixes=("_a", "_b"))
    assert len(joined) == len(ma) == len(mb)
    assert np.allclose(joined["value_a"], joined["value_b"], equal_nan=True)


class _Both(Callback):
    def __init__(self, table, killer) -> None:
        self.table, self.killer = table, killer

    def on_resume(self, records) -> None:
        self.table.on_resume(records)

    def on_round_end(self, record) -> None:
        self.table.on_round_end(record)
        self.killer.on_round_end(record)

    def on_end(self, result) -> None:
        self.table.on_end(result)


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pkl").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad")
    assert main(["run", "--resume", str(tmp_path / "bad"), "rounds=3"]) == 2
