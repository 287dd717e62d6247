"""Whole runs under secure_aggregation=secaggplus: the same model as without it (up to quantisation),
with site-level DP, a crashing site, checkpoints and resume, and the Ray engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from federated.app.runner import run_experiment
from federated.core.config import load_config
from federated.core.config.schema import ConfigError

BASE = ["scale=smoke", "rounds=2"]


def _run(tmp_path, name, overrides, smoke_corpus):
    out = tmp_path / name
    run_experiment(load_config([*BASE, f"corpus.path={smoke_corpus}", *overrides]), out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    with np.load(out / "final_model.npz") as z:
        model = {k: z[k] for k in z.files}
    return summary, model


SGD = ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0"]


def _initial(smoke_corpus, overrides):
    from federated.core.models import build_model
    from federated.data.format import Corpus

    cfg = load_config([*BASE, f"corpus.path={smoke_corpus}", *overrides])
    model = build_model(cfg.model, Corpus.open(smoke_corpus).schema, cfg.seed)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# The smoke plan's only neuro_clinic training site holds eeg and motor imagery: under secure
# aggregation no one else's update hides its own, so those groups are left out and keep their value.
WITHHELD = ("encoders.eeg.", "heads.motor_imagery.")


@pytest.mark.slow  # the unit test: test_secure_round.py, the secure aggregate equals the plain one
@pytest.mark.parametrize("strategy", ["modality_fedavg", "fedavg"])
def test_a_secure_run_ends_with_the_plain_runs_model_up_to_quantisation(tmp_path, smoke_corpus, strategy):
    """Plain SGD: fedavg's second round trains from a model 1e-7 away and stays that close. (Adam does
    not: it normalises each step, so a parameter whose gradient is ~0 moves by +-lr on a 1e-7 change.)
    modality_fedavg is compared after one round: the groups it leaves out send round 2 elsewhere."""
    rounds = ["rounds=2" if strategy == "fedavg" else "rounds=1"]
    plain, plain_model = _run(tmp_path, "plain", [f"strategy={strategy}", *SGD, *rounds], smoke_corpus)
    secure, secure_model = _run(
        tmp_path, "secure", [f"strategy={strategy}", *SGD, *rounds, "secure_aggregation=secaggplus"], smoke_corpus
    )
    initial = _initial(smoke_corpus, [f"strategy={strategy}"])
    withheld = [k for k in plain_model if strategy == "modality_fedavg" and k.startswith(WITHHELD)]
    assert (strategy == "fedavg") != bool(withheld)  # fedavg's one group is every site's
    for k in withheld:
        np.testing.assert_array_equal(secure_model[k], initial[k])
        assert not np.array_equal(plain_model[k], initial[k])  # the plain run did move it
    # each round's aggregate is off by at most 8 sites x 2c/T (T = 2**28 for 8 sites), over the group's weight
    error = max(float(np.max(np.abs(secure_model[k] - plain_model[k]))) for k in plain_model if k not in withheld)
    assert error < 1e-5
    assert not secure.get("failures")
    if strategy == "fedavg":
        assert secure["final"]["id"]["score"] == pytest.approx(plain["final"]["id"]["score"], abs=1e-4)
        assert secure["final"]["ood"]["score"] == pytest.approx(plain["final"]["ood"]["score"], abs=1e-4)


@pytest.mark.slow
def test_one_adam_round_matches_and_a_secure_run_repeats_exactly(tmp_path, smoke_corpus):
    _, plain = _run(tmp_path, "plain", ["rounds=1", "strategy=fedavg"], smoke_corpus)
    _, secure = _run(tmp_path, "secure", ["rounds=1", "strategy=fedavg", "secure_aggregation=secaggplus"], smoke_corpus)
    _, again = _run(tmp_path, "again", ["rounds=1", "strategy=fedavg", "secure_aggregation=secaggplus"], smoke_corpus)
    assert max(float(np.max(np.abs(secure[k] - plain[k]))) for k in plain) < 1e-5
    # the masks are random (os.urandom), the stochastic rounding is seeded per site and round
    assert all(np.array_equal(secure[k], again[k]) for k in secure)


def _distance(a, b):
    return float(np.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)))


def test_site_level_dp_clips_at_the_sites_and_noises_after_unmasking(tmp_path, smoke_corpus):
    secure = ["rounds=1", "strategy=fedavg", "secure_aggregation=secaggplus"]
    dp = [*secure, "privacy=dp_fedavg", "privacy.clipping_norm=0.1"]
    summary, noised = _run(tmp_path, "dp", [*dp, "privacy.target_epsilon=8"], smoke_corpus)
    _, clipped = _run(
        tmp_path, "clipped", [*dp, "privacy.noise_multiplier=0", "privacy.target_epsilon=null"], smoke_corpus
    )
    _, unclipped = _run(tmp_path, "unclipped", [*secure, "strategy.weighting=uniform"], smoke_corpus)
    initial = _initial(smoke_corpus, ["strategy=fedavg"])
    # the sites clipped: the mean of updates of norm <= C has norm <= C; without it the step is larger
    assert _distance(clipped, initial) <= 0.1 * (1 + 1e-4)
    assert _distance(unclipped, initial) > 0.3
    # the server added Gaussian noise sigma*C/n per entry after unmasking (n = 8 sampled sites)
    report = next(iter(summary["privacy"].values()))
    sigma = report["noise_multiplier"]
    noise = np.concatenate([(noised[k].astype(np.float64) - clipped[k]).ravel() for k in noised])
    assert np.std(noise) == pytest.approx(sigma * 0.1 / 8, rel=0.05)
    assert abs(np.mean(noise)) < 0.05 * sigma * 0.1 / 8
    assert report["steps"] == 1 and report["epsilon"] > 0


@pytest.mark.slow  # the unit test: test_secure_round.py, sites that gave a stage no reply
def test_a_site_crashing_in_training_leaves_the_round_and_the_run_goes_on(tmp_path, smoke_corpus):
    overrides = ["secure_aggregation=secaggplus", "faults.kind=crash", "faults.sites=[site_02]", "faults.rounds=[1]"]
    summary, _ = _run(tmp_path, "crash", overrides, smoke_corpus)
    assert summary["rounds_completed"] == 2
    failures = json.dumps(summary.get("failures", summary))
    assert "site_02" in failures and "crashed in round 1" in failures


def test_strategies_that_need_individual_updates_are_refused_before_the_run(tmp_path, smoke_corpus):
    cfg = load_config([*BASE, f"corpus.path={smoke_corpus}", "strategy=median", "secure_aggregation=secaggplus"])
    with pytest.raises(ConfigError, match="coordinate-wise median"):
        run_experiment(cfg, tmp_path / "median", progress=False)
    assert not (tmp_path / "median" / "summary.json").exists()


def test_secure_aggregation_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="secure_aggregation.modulus_range must be a power of 2"):
        load_config(["secure_aggregation=secaggplus", "secure_aggregation.modulus_range=3000000000"])
    with pytest.raises(ConfigError, match="secure_aggregation.num_shares"):
        load_config(["secure_aggregation=secaggplus", "secure_aggregation.num_shares=2"])
    with pytest.raises(ConfigError, match="unknown secure_aggregation 'secagg'; choices: none, secaggplus"):
        load_config(["secure_aggregation=secagg"])
    with pytest.raises(ConfigError, match="strategy.max_update_norm_ratio cannot be set with secure_aggregation"):
        load_config(["secure_aggregation=secaggplus", "strategy.max_update_norm_ratio=5"])
    with pytest.raises(ConfigError, match="attack.kind cannot be simulated with secure_aggregation"):
        load_config(["secure_aggregation=secaggplus", "attack.kind=sign_flip", "attack.sites=[site_00]"])


# ------------------------------------------------- engines, resume, a killed site (slow) ----

FOUR_ROUNDS = ["scale=smoke", "rounds=4", "engine.checkpoint_every=2", "secure_aggregation=secaggplus"]


def _model(out):
    with np.load(out / "final_model.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_ray_runs_the_same_secure_run_as_in_process(tmp_path):
    from federated.app.cli import main
    from federated.engines.ray_engine import ray_processes

    for engine in ("inprocess", "ray"):
        assert (
            main(
                [
                    "run",
                    "--out",
                    str(tmp_path / engine),
                    "--no-progress",
                    f"engine={engine}",
                    *BASE,
                    "secure_aggregation=secaggplus",
                ]
            )
            == 0
        )
    a, b = _model(tmp_path / "inprocess"), _model(tmp_path / "ray")
    # the masks differ (os.urandom), the sum does not: rounding is seeded by site and round
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6
    assert not ray_processes()


@pytest.mark.slow
def test_a_site_process_killed_while_training_is_recovered_from_the_others_shares(tmp_path):
    from federated.app.cli import main

    """fedavg: every site's vector holds the one group, so the others still cover it. (Under
    modality_fedavg site_01's imaging groups would be left with site_00 alone, and the round would
    not be unmasked: the unit tests check that veto.)"""
    out = tmp_path / "kill"
    overrides = ["strategy=fedavg", "engine=ray", "faults.kind=exit", "faults.sites=[site_01]", "faults.rounds=[1]"]
    assert main(["run", "--out", str(out), "--no-progress", *BASE, "secure_aggregation=secaggplus", *overrides]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds_completed"] == 2
    assert "collect_masked_vectors stage" in s["failures"]["1"]["train:site_01"]
    assert "train:site_01" not in s["failures"].get("2", {})  # back in round 2


@pytest.mark.slow
def test_a_secure_run_resumes_from_its_checkpoint_to_the_same_model(tmp_path, monkeypatch):
    import federated.app.runner as runner
    from federated.app.cli import main
    from federated.server.callbacks import Callback
    from federated.server.checkpoint import load_checkpoint

    class Killed(Exception):
        pass

    class KillAfter3(Callback):
        def on_round_end(self, record) -> None:
            if record.round == 3:
                raise Killed

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--out", str(full), "--no-progress", *FOUR_ROUNDS]) == 0
    monkeypatch.setattr(runner, "ProgressBar", lambda console: KillAfter3())
    with pytest.raises(Killed):
        run_experiment(load_config(FOUR_ROUNDS), cut, progress=True)
    monkeypatch.undo()
    assert load_checkpoint(cut).round == 2
    assert main(["run", "--resume", str(cut), "--no-progress"]) == 0
    a, b = _model(full), _model(cut)
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6


@pytest.mark.slow
def test_a_deployed_secure_run_over_tls_scores_as_in_process(tmp_path):
    import dataclasses

    from federated.core.config import config_from_yaml
    from federated.engines.deployment import deploy_demo

    out = tmp_path / "demo"
    result = deploy_demo(
        3, out, [*BASE, "secure_aggregation=secaggplus"], say=lambda line: None, timeout_s=900, grace_s=5
    )
    assert result.status == "finished:completed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and not summary.get("failures")
    cfg = config_from_yaml((out / "config.yaml").read_text())
    cfg = dataclasses.replace(
        cfg,
        corpus=dataclasses.replace(cfg.corpus, site_corpora=str(out / "deploy" / "sites")),
        engine=dataclasses.replace(cfg.engine, name="inprocess", expected_sites=0),
    )
    local = run_experiment(cfg, tmp_path / "inprocess", progress=False).to_dict()
    a, b = _model(out), _model(tmp_path / "inprocess")
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6
    for group in ("id", "ood"):
        assert summary["final"][group]["score"] == pytest.approx(local["final"][group]["score"], abs=1e-6)
