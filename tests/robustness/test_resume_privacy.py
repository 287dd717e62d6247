"""Issue 28, item 2 (resume integrity, without the files' keyed authentication): a resumed run
cannot quietly change the privacy or secure aggregation it trained with, its checkpoint's round must
agree with its history, and the summary says round by round how the run was protected.

The probe: a dp_sgd run of 2 rounds (checkpoint every round), its checkpoint's config switched to
`privacy: none` and 4 rounds, resumed: rounds 3-4 trained without DP, exit 0, and the summary still
reported the DP-SGD epsilon. Checkpoints here are written by save_checkpoint itself, as someone who
can write valid state files would (a user editing config.yaml for deploy --resume, a server
operator, an attacker holding the key): the checks below hold even then.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

import strategies  # noqa: F401  (registers the strategies a config names)
from clients import site_state
from clients.client_app import app as client_app
from federated.app.cli import main
from federated.app.runner import run_experiment
from federated.core.config import ExperimentConfig, config_from_yaml, config_to_yaml, load_config
from federated.core.config.protected import protected_settings
from federated.core.protocol import CONFIG_KEY, CORPUS_KEY, STATE_DIR_KEY
from federated.engines.inprocess import InProcessGrid
from federated.server.checkpoint import Checkpoint, CheckpointError, check_resume, load_checkpoint, save_checkpoint
from federated.server.evaluation import summarize
from federated.server.handshake import handshake
from federated.server.outputs import build_summary
from federated.server.records import FederationResult, FederationTiming, RoundRecord
from federated.server.results import RunSummary
from federated.server.server_app import _resumed_config
from federated.server.site_agreement import FederationError

DP = ["scale=smoke", "privacy=dp_sgd", "rounds=3"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _record(rnd: int, cfg: ExperimentConfig | None, privacy: dict | None = None) -> RoundRecord:
    record = RoundRecord(rnd, [], summarize([]), privacy=privacy or {})
    record.trained_with = protected_settings(cfg) if cfg is not None else {}
    return record


def _checkpoint(cfg: ExperimentConfig, rnd: int = 2, rounds: list[int] | None = None) -> Checkpoint:
    """A checkpoint of round `rnd` whose records trained with cfg's settings."""
    return Checkpoint(
        round=rnd,
        arrays={"w": np.zeros(2, dtype=np.float32)},
        strategy_state={},
        python_rng=random.getstate(),
        initial=_record(0, None),
        history=[_record(r, cfg) for r in (rounds if rounds is not None else range(1, rnd + 1))],
        config_yaml=config_to_yaml(cfg),
    )


def _with(cfg: ExperimentConfig, section: str, **changes) -> ExperimentConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


# ----------------------------------------------------------------- what is compared ----


def test_the_protected_settings_are_every_privacy_and_secure_aggregation_key():
    settings = protected_settings(load_config(DP))
    privacy = {f"privacy.{k}" for k in ("name", "target_epsilon", "delta", "noise_multiplier", "accountant")}
    privacy |= {"privacy.max_grad_norm", "privacy.clipping_norm"}
    assert privacy <= set(settings)
    secure = {f"secure_aggregation.{f.name}" for f in dataclasses.fields(load_config(DP).secure_aggregation)}
    assert secure <= set(settings)
    # how Opacus computes per-sample gradients (every mode exact) does not change what is protected
    assert "privacy.grad_sample_mode" not in settings
    assert set(settings) == privacy | secure


@pytest.mark.parametrize(
    ("section", "change", "named"),
    [
        ("privacy", {"name": "none"}, "privacy.name: 'dp_sgd' -> 'none'"),
        ("privacy", {"noise_multiplier": 0.1, "target_epsilon": None}, "privacy.noise_multiplier: None -> 0.1"),
        ("privacy", {"max_grad_norm": 100.0}, "privacy.max_grad_norm: 1.0 -> 100.0"),
        ("privacy", {"delta": 0.5}, "privacy.delta: 1e-05 -> 0.5"),
        ("privacy", {"target_epsilon": 1000.0}, "privacy.target_epsilon: 8.0 -> 1000.0"),
        ("privacy", {"accountant": "prv"}, "privacy.accountant: 'rdp' -> 'prv'"),
        ("privacy", {"clipping_norm": 50.0}, "privacy.clipping_norm: 1.0 -> 50.0"),
        ("secure_aggregation", {"name": "secaggplus"}, "secure_aggregation.name: 'none' -> 'secaggplus'"),
        ("secure_aggregation", {"min_sites_per_group": 1}, "secure_aggregation.min_sites_per_group: 2 -> 1"),
    ],
)
def test_a_resume_changing_a_protected_setting_is_refused_naming_it(tmp_path, section, change, named):
    cfg = load_config(DP)
    ckpt = _checkpoint(cfg)
    check_resume(ckpt, cfg, tmp_path, "the checkpoint's config")  # the same settings: fine
    with pytest.raises(CheckpointError, match=r"changes what the run trained rounds 1-2 with") as e:
        check_resume(ckpt, _with(cfg, section, **change), tmp_path, "the checkpoint's config")
    assert named in str(e.value)
    if "target_epsilon" in change and "noise_multiplier" in change:  # both keys, each named
        assert "privacy.target_epsilon: 8.0 -> None" in str(e.value)


def test_a_change_that_protects_nothing_more_or_less_is_not_refused(tmp_path):
    cfg = load_config(DP)
    check_resume(_checkpoint(cfg), _with(cfg, "privacy", grad_sample_mode="hooks"), tmp_path, "x")
    check_resume(_checkpoint(cfg), dataclasses.replace(cfg, rounds=6), tmp_path, "x")  # more rounds, same DP


# ------------------------------------------------------- the probe, with the real runner ----


@pytest.mark.slow
def test_a_resume_that_switches_dp_off_is_refused_and_an_honest_one_reports_every_round(tmp_path, capsys):
    out = tmp_path / "run"
    dp = ["scale=smoke", "privacy=dp_sgd", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null"]
    assert main(["run", "--out", str(out), "--no-progress", *dp, "rounds=2", "engine.checkpoint_every=1"]) == 0
    first = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()  # as if it had stopped after its last checkpoint
    original = load_checkpoint(out)
    cfg = config_from_yaml(original.config_yaml)
    off = dataclasses.replace(_with(cfg, "privacy", name="none"), rounds=4)

    # the probe: the checkpoint's config says privacy none and 4 rounds
    save_checkpoint(out, dataclasses.replace(original, config_yaml=config_to_yaml(off)))
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "privacy.name: 'dp_sgd' -> 'none'" in err and "trained rounds 1-2" in err
    assert _snapshot(out) == before  # the folder, checkpoint included, as it was
    assert not (out / "summary.json").exists()

    # the server's records rewritten too (a tampered server): every site refuses, naming the key
    lying = [dataclasses.replace(r, trained_with=protected_settings(off)) for r in original.history]
    save_checkpoint(out, dataclasses.replace(original, config_yaml=config_to_yaml(off), history=lying))
    with pytest.raises(FederationError, match=r"site site_\d+ refuses to resume at round 2: .*privacy.name: 'dp_sgd'"):
        run_experiment(None, out, progress=False, resume=True)
    assert not (out / "summary.json").exists()

    # an honest resume (the same privacy, two more rounds) trains with DP and reports all four rounds
    longer = dataclasses.replace(cfg, rounds=4)
    save_checkpoint(out, dataclasses.replace(original, config_yaml=config_to_yaml(longer)))
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == 2 and summary["rounds_completed"] == 4
    rounds = summary["privacy_by_round"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["mode"] == "dp_sgd" and r["noise_multiplier"] == 1.0 and r["delta"] == 1e-5 for r in rounds)
    assert rounds[:2] == first["privacy_by_round"]  # the rounds before the resume, as the first run wrote them
    eps = [r["epsilon"] for r in rounds]
    assert all(a < b for a, b in itertools.pairwise(eps)), eps
    # the contract's per-site section is the last round's spend
    assert {s: p["epsilon"] for s, p in summary["privacy"].items()} == rounds[-1]["epsilon_per_site"]
    assert {"epsilon", "delta", "steps"} <= set(next(iter(summary["privacy"].values())))


# ------------------------------------------------------------------- round vs history ----


@pytest.mark.parametrize(
    ("rnd", "rounds", "named"),
    [
        (1, [1, 2, 3], r"round 1 does not agree with its history, which holds rounds \[1, 2, 3\]"),
        (3, [1, 2], r"round 3 does not agree with its history, which holds rounds \[1, 2\]"),
        (2, [2, 1], r"round 2 does not agree with its history, which holds rounds \[2, 1\]"),
        (2, [1, 1], r"round 2 does not agree with its history, which holds rounds \[1, 1\]"),
    ],
)
def test_a_checkpoint_whose_round_disagrees_with_its_history_is_refused(tmp_path, capsys, rnd, rounds, named):
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out, _checkpoint(load_config(DP), rnd, rounds))
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match=named):
        run_experiment(None, out, progress=False, resume=True)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 2
    assert "does not agree with its history" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_checkpoint_with_rounds_that_recorded_other_settings_or_none_is_refused(tmp_path):
    cfg = load_config(DP)
    mixed = _checkpoint(cfg)
    mixed.history[0].trained_with = protected_settings(_with(cfg, "privacy", name="none"))
    with pytest.raises(CheckpointError, match=r"round 1 recorded other privacy settings than round 2 \(privacy.name"):
        check_resume(mixed, cfg, tmp_path, "x")
    unrecorded = _checkpoint(cfg)
    for r in unrecorded.history:
        r.trained_with = {}
    with pytest.raises(CheckpointError, match=r"round 2 of the checkpoint does not record the privacy settings"):
        check_resume(unrecorded, cfg, tmp_path, "x")
    with pytest.raises(CheckpointError, match=r"rounds=1, below the checkpoint's round 2"):
        check_resume(_checkpoint(cfg), dataclasses.replace(cfg, rounds=1), tmp_path, "x")


# ------------------------------------------------------------------ deploy --resume ----


def test_deploy_submit_resume_refuses_a_config_yaml_that_changes_privacy(tmp_path, capsys, monkeypatch):
    import federated.engines.deployment as deployment

    submitted = []
    monkeypatch.setattr(deployment, "submit_and_wait", lambda *a, **k: submitted.append(a))
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(DP)
    save_checkpoint(out, _checkpoint(cfg))
    (out / "config.yaml").write_text(config_to_yaml(_with(cfg, "privacy", name="none", max_grad_norm=10.0)))
    before = _snapshot(out)
    assert main(["deploy", "submit", "--connection", "x", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "privacy.name: 'dp_sgd' -> 'none'" in err and "privacy.max_grad_norm: 1.0 -> 10.0" in err
    assert str(out / "config.yaml") in err
    assert submitted == [] and _snapshot(out) == before


def test_deploy_submit_resume_leaves_the_check_to_the_server_app_without_its_key(tmp_path, capsys, monkeypatch):
    """The README's SuperLink runs as a service user: its checkpoint is authenticated by the service
    user's key, which the submitting operator does not hold (or has no key at all). The early check
    is then skipped and the run submitted; the ServerApp, holding the key, checks and names the keys."""
    import types

    import federated.engines.deployment as deployment
    from federated.core.state_key import KEY_ENV, load_key

    submitted = []
    monkeypatch.setattr(
        deployment,
        "submit_and_wait",
        lambda *a, **k: submitted.append((a, k)) or types.SimpleNamespace(completed=True, run_id="7"),
    )
    out = tmp_path / "srv" / "runs" / "exp1"
    out.mkdir(parents=True)
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "service-user.key"))
    cfg = load_config(DP)
    save_checkpoint(out, _checkpoint(cfg))
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    before = _snapshot(out)
    for operator, has_a_key in (("operator.key", True), ("no-key-yet/state.key", False)):
        monkeypatch.setenv(KEY_ENV, str(tmp_path / operator))
        if has_a_key:
            load_key()  # the operator's own key: not the service user's
        submitted.clear()
        assert main(["deploy", "submit", "--connection", "x", "--resume", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "the checkpoint cannot be checked here" in printed and "the ServerApp checks" in printed
        assert len(submitted) == 1 and submitted[0][1]["resume"] is True
        assert config_from_yaml(submitted[0][0][2]) == cfg
    assert not (tmp_path / "no-key-yet").exists()  # no key is made for a check that is skipped
    assert _snapshot(out) == before
    # the submitter that does hold the key still refuses a changed privacy setting before submitting
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "service-user.key"))
    (out / "config.yaml").write_text(config_to_yaml(_with(cfg, "privacy", name="none")))
    submitted.clear()
    assert main(["deploy", "submit", "--connection", "x", "--resume", str(out)]) == 2
    assert "privacy.name: 'dp_sgd' -> 'none'" in capsys.readouterr().err and submitted == []


def test_the_server_app_names_the_privacy_key_a_submitted_config_changes(tmp_path):
    cfg = load_config(DP)
    ckpt = _checkpoint(cfg)
    assert _resumed_config(config_to_yaml(cfg), ckpt, tmp_path) == cfg
    with pytest.raises(CheckpointError, match=r"the run config's multimed-config changes .*privacy.name: 'dp_sgd'"):
        _resumed_config(config_to_yaml(_with(cfg, "privacy", name="none")), ckpt, tmp_path)
    # the checkpoint's own config changed (by someone who can write checkpoints), the run config with it
    edited = dataclasses.replace(ckpt, config_yaml=config_to_yaml(_with(cfg, "secure_aggregation", name="secaggplus")))
    with pytest.raises(CheckpointError, match=r"checkpoint's config changes .*secure_aggregation.name: 'none'"):
        _resumed_config(edited.config_yaml, edited, tmp_path)


# -------------------------------------------------------------------- at the site ----


def _context(state_dir: Path) -> Context:
    state = RecordDict({"personal": ArrayRecord({}), "c": ConfigRecord({"k": 1})})
    return Context(run_id=1, node_id=1, node_config={}, state=state, run_config={STATE_DIR_KEY: str(state_dir)})


def test_a_site_refuses_to_restore_into_other_privacy_settings(tmp_path):
    dp = protected_settings(load_config(DP))
    site_state.save(_context(tmp_path), "site_a", 2, dp)
    site_state.restore(_context(tmp_path), "site_a", 2, settings=dp)  # the same: restored
    off = protected_settings(_with(load_config(DP), "privacy", name="none"))
    with pytest.raises(site_state.SiteStateError, match=r"site site_a refuses to resume at round 2: .*privacy.name"):
        site_state.restore(_context(tmp_path), "site_a", 2, settings=off)
    secagg_off = {**dp, "secure_aggregation.min_sites_per_group": 1}
    with pytest.raises(site_state.SiteStateError, match=r"secure_aggregation.min_sites_per_group: 2 -> 1"):
        site_state.restore(_context(tmp_path), "site_a", 2, settings=secagg_off)
    site_state.save(_context(tmp_path), "site_a", 3)  # a state that recorded nothing
    with pytest.raises(site_state.SiteStateError, match=r"does not record the privacy settings"):
        site_state.restore(_context(tmp_path), "site_a", 3, settings=dp)


def test_a_server_that_switched_dp_off_is_refused_by_the_site_in_the_handshake(tmp_path, smoke_corpus):
    """The server's side is bypassed entirely (a tampered server): the site's own state refuses."""
    states = tmp_path / "states"
    ctx = _context(states)
    site_state.save(ctx, "site_00", 2, protected_settings(load_config(DP)))
    off = config_to_yaml(_with(load_config(DP), "privacy", name="none"))
    run = {CONFIG_KEY: off, CORPUS_KEY: str(smoke_corpus), STATE_DIR_KEY: str(states)}
    grid = InProcessGrid(client_app, [{"partition-id": 0}], run)
    with pytest.raises(FederationError, match=r"handshake: node .*site site_00 refuses to resume at round 2") as e:
        handshake(grid, restore_round=2, timeout_s=30)
    assert "privacy.name: 'dp_sgd' -> 'none'" in str(e.value)


# ------------------------------------------------------------------ the summary ----


def test_the_summary_reports_round_by_round_the_privacy_the_run_trained_with():
    cfg = load_config(["scale=smoke", "privacy=dp_sgd", "privacy.noise_multiplier=1.1", "privacy.target_epsilon=null"])
    report = {"epsilon": 1.5, "delta": 1e-5, "steps": 4}
    history = [
        _record(1, cfg, {"site_a": report, "site_b": {**report, "epsilon": 1.0}}),
        _record(2, cfg, {"site_a": {**report, "epsilon": 2.5}}),  # site_b not sampled: keeps 1.0
        _record(3, cfg, {"site_b": {**report, "epsilon": math.inf}}),  # no bound
    ]
    result = FederationResult([], _record(0, None), history, ArrayRecord(), FederationTiming())
    summary = build_summary(cfg, result, 1.0)
    raw = json.loads(json.dumps(summary.to_dict()))
    rounds = raw["privacy_by_round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0] == {
        "round": 1,
        "mode": "dp_sgd",
        "target_epsilon": None,
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "secure_aggregation": "none",
        "epsilon": 1.5,
        "epsilon_per_site": {"site_a": 1.5, "site_b": 1.0},
    }
    assert rounds[1]["epsilon_per_site"] == {"site_a": 2.5, "site_b": 1.0} and rounds[1]["epsilon"] == 2.5
    assert rounds[2]["epsilon"] == "inf" and rounds[2]["epsilon_infinite"] is True
    assert rounds[2]["epsilon_per_site"]["site_b"] == "inf"
    # the contract's per-site section is unchanged: each site's latest report
    assert raw["privacy"]["site_a"] == {"epsilon": 2.5, "delta": 1e-5, "steps": 4}
    back = RunSummary.from_dict(raw)
    assert back.privacy_by_round == summary.privacy_by_round
    assert math.isinf(back.privacy_by_round[2].epsilon_per_site["site_b"])


def test_a_round_without_dp_lists_no_dp_settings_and_no_epsilon():
    cfg = load_config(["scale=smoke"])
    result = FederationResult([], _record(0, None), [_record(1, cfg)], ArrayRecord(), FederationTiming())
    rounds = build_summary(cfg, result, 1.0).to_dict()["privacy_by_round"]
    assert rounds == [
        {"round": 1, "mode": "none", "secure_aggregation": "none", "epsilon": None, "epsilon_per_site": {}}
    ]
