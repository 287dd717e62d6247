"""Issue 14 item 2, end to end: poisoned updates are refused by what the server knows.

A site that inflates its handshake size, one that moves and claims an encoder of a modality it
never declared, and one that sends finite 3e38 values are each rejected, with the reason, in
every round, under fedavg, modality_fedavg, trimmed_mean, median and krum; the final model
stays finite. A clean run rejects nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from federated.app.runner import run_experiment
from federated.core.config import load_config

pytestmark = pytest.mark.slow

STRATEGIES = ["fedavg", "modality_fedavg", "trimmed_mean", "median", "krum"]
# What each attack's rejection reason starts with (site_00 is an imaging centre: it holds no EEG).
REASONS = {
    "inflate_handshake": "declared 64000000 training examples at the handshake, 100.0% of the",
    "undeclared_group": "claims to have trained undeclared group(s) 'encoder/",
    "huge": "update norm ",
}


def _run(tmp_path, name: str, *overrides: str):
    cfg = load_config(overrides=["scale=smoke", "rounds=2", *overrides])
    out = tmp_path / name
    summary = run_experiment(cfg, out, progress=False).to_dict()
    with np.load(out / "final_model.npz", allow_pickle=False) as model:
        finite = all(np.isfinite(model[k]).all() for k in model.files)
    return summary, finite


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("attack", list(REASONS))
def test_a_poisoned_site_is_rejected_every_round_and_the_model_stays_finite(tmp_path, strategy, attack):
    summary, finite = _run(
        tmp_path, f"{strategy}-{attack}", f"strategy={strategy}", f"attack.kind={attack}", "attack.sites=[site_00]"
    )
    rejections = summary["rejections"]
    assert [(r["round"], r["site"]) for r in rejections] == [(1, "site_00"), (2, "site_00")], rejections
    assert all(r["reason"].startswith(REASONS[attack]) for r in rejections), rejections
    if attack == "huge":
        assert all(r["reason"].endswith("> strategy.max_update_norm=10000") for r in rejections), rejections
    assert finite
    assert summary["rounds_completed"] == 2 and math.isfinite(summary["final"]["id"]["score"])


def test_a_clean_run_rejects_nothing(tmp_path):
    summary, finite = _run(tmp_path, "clean")
    assert summary["rejections"] == [] and finite
