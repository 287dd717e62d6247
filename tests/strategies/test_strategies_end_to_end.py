"""Strategies inside real runs: personalised scores, SCAFFOLD state, bad sites refused."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from federated.app.cli import main

pytestmark = pytest.mark.slow
SMOKE = ["scale=smoke", "--no-progress"]


def _run(tmp_path, name, *overrides):
    out = tmp_path / name
    assert main(["run", "--out", str(out), *SMOKE, *overrides]) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("strategy", ["fedper", "fedbn"])
def test_personalised_strategies_report_global_and_personal_scores(tmp_path, strategy):
    out, s = _run(tmp_path, strategy, f"strategy={strategy}")
    assert 0 <= s["final"]["id_personal"]["score"] <= 1
    for row in s["per_site"]:
        assert ("personal_score" in row) == (row["role"] == "train")
    m = pd.read_parquet(out / "metrics.parquet")
    assert (m["metric"] == "personal_score").any()


@pytest.mark.parametrize("strategy", ["scaffold", "fedprox", "fedyogi", "krum", "trimmed_mean"])
def test_other_strategies_run_end_to_end(tmp_path, strategy):
    extra = ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0"] if strategy == "scaffold" else []
    _, s = _run(tmp_path, strategy, f"strategy={strategy}", *extra)
    assert s["rounds_completed"] == 2 and math.isfinite(s["final"]["id"]["score"])


@pytest.mark.parametrize("kind", ["nan", "inflate_count"])
def test_a_bad_site_is_rejected_every_round_and_counted(tmp_path, kind):
    out, s = _run(tmp_path, kind, "strategy=fedavg", f"attack.kind={kind}", "attack.sites=[site_00]")
    assert [r["round"] for r in s["rejections"]] == [1, 2]
    assert {r["site"] for r in s["rejections"]} == {"site_00"}
    m = pd.read_parquet(out / "metrics.parquet")
    assert m[m["metric"] == "update_rejected"].shape[0] == 2
    assert math.isfinite(s["final"]["id"]["score"])


def test_a_round_without_valid_updates_fails_loudly_or_is_skipped(tmp_path, capsys):
    every = "attack.sites=[" + ",".join(f"site_0{i}" for i in range(8)) + "]"
    assert main(["run", "--out", str(tmp_path / "fail"), *SMOKE, "attack.kind=nan", every]) == 2
    assert "0 valid training replies" in capsys.readouterr().err
    _, s = _run(tmp_path, "skip", "attack.kind=nan", every, "strategy.on_too_few_valid=skip")
    assert s["skipped_rounds"] == [1, 2]
    assert s["final"]["id"] == s["initial"]["id"]  # the model never changed, and the summary says why
