"""Differential privacy through whole runs: what summary.json and metrics.parquet report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from clients.client_app import app as client_app
from federated.app.cli import main
from federated.core.arrays import record_to_numpy
from federated.core.config import config_to_yaml, load_config
from federated.core.models import build_model
from federated.data.format import Corpus
from federated.engines.inprocess import InProcessGrid
from federated.server.loop import run_federation


def _summary(tmp_path, *overrides):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--no-progress", "scale=smoke", *overrides]) == 0
    return json.loads((out / "summary.json").read_text()), pd.read_parquet(out / "metrics.parquet")


@pytest.mark.slow  # a whole 3-round run; the accounting itself: test_dp_sgd.py
def test_dp_sgd_reports_cumulative_epsilon_per_site(tmp_path):
    s, m = _summary(tmp_path, "rounds=3", "privacy=dp_sgd", "privacy.target_epsilon=3")
    trained = [r["site"] for r in s["per_site"] if r["role"] == "train"]
    assert sorted(s["privacy"]) == sorted(trained)
    for site, p in s["privacy"].items():
        assert 2.9 < p["epsilon"] <= 3.0 + 1e-6, site
        assert p["delta"] == 1e-5 and p["max_grad_norm"] == 1.0 and p["accountant"] == "rdp"
        assert len(p["noise_multiplier"]) == len(p["sample_rate"]) == len(p["steps"]) == len(p["tasks"])
        assert p["stopped_by_budget"] is False
    eps = m[m["metric"] == "epsilon"].pivot_table(index="round", columns="site", values="value")
    assert list(eps.index) == [1, 2, 3] and (eps.diff().dropna() > 0).all().all()  # grows each round


@pytest.mark.slow  # a whole run; dp_fedavg through a run: test_dp_fedavg_clips_a_huge_update
def test_dp_fedavg_reports_site_level_epsilon_and_its_sampling_assumption(tmp_path):
    s, _ = _summary(tmp_path, "rounds=2", "privacy=dp_fedavg", "strategy=fedavg", "privacy.target_epsilon=5")
    assert len(s["privacy"]) == 8
    p = s["privacy"]["site_00"]
    assert p["mechanism"].startswith("dp_fedavg") and p["steps"] == 2
    assert 4.9 < p["epsilon"] <= 5.0 + 1e-6 and "no amplification" in p["sampling_assumption"]


def test_dp_fedavg_needs_unweighted_fedavg(tmp_path):
    assert main(["run", "--out", str(tmp_path / "x"), "scale=smoke", "privacy=dp_fedavg"]) == 2


def test_dp_fedavg_clips_a_huge_update(smoke_corpus):
    """A site scaling its update 1000x moves the global model by at most the clipping norm."""
    cfg = load_config(
        [
            "scale=smoke",
            "rounds=1",
            "privacy=dp_fedavg",
            "strategy=fedavg",
            "privacy.noise_multiplier=0",
            "privacy.target_epsilon=null",
            "privacy.clipping_norm=0.01",
            "attack.kind=scale",
            "attack.factor=1000",
            "attack.sites=[site_00]",
        ]
    )
    run_config = {"multimed-config": config_to_yaml(cfg), "corpus-path": str(smoke_corpus)}
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(10)], run_config)
    result = run_federation(grid, cfg)
    start = build_model(cfg.model, Corpus.open(smoke_corpus).schema, cfg.seed).state_dict()
    final = record_to_numpy(result.arrays)
    moved = np.sqrt(sum(float(((a - start[k].numpy()) ** 2).sum()) for k, a in final.items()))
    assert 0 < moved <= 0.01 + 1e-6
    assert result.privacy()["site_00"]["epsilon"] == float("inf")  # no noise: no guarantee, said so
