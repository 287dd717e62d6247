"""Issue 14, item 1: no code runs from a state file; a site's paths and DP ledger stay its own;
configs from the wire or a run folder are taken literally.

A crafted pickle (its __reduce__ runs a shell command that creates a marker file) is planted where
the earlier pickle formats lived and where the new files live: nothing may run it (the marker file
stays absent) and the error names the file.
"""

from __future__ import annotations

import os
import pickle  # only to craft the files that must never be loaded
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from clients import site_state
from clients.client_app import app as client_app
from clients.dp_sgd import STATE_KEY, PrivacyLedger, keep_highest_ledger
from clients.site_runtime import SiteConfigError, site_local_path, site_runtime
from federated.app.cli import main
from federated.app.runner import run_experiment
from federated.core.config import ConfigError, config_from_yaml, config_to_yaml, load_config
from federated.core.protocol import CONFIG_KEY, CORPUS_KEY, STATE_DIR_KEY
from federated.engines.inprocess import InProcessGrid
from federated.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from federated.server.evaluation import summarize
from federated.server.handshake import handshake
from federated.server.records import RoundRecord
from federated.server.site_agreement import FederationError


class Crafted:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def crafted_pickle(marker: Path) -> bytes:
    return pickle.dumps(Crafted(marker))


def test_the_crafted_pickle_does_run_code_when_unpickled(tmp_path):
    """The control: the planted payload is live, so the marker's absence below means something."""
    marker = tmp_path / "ran"
    pickle.loads(crafted_pickle(marker))
    assert marker.exists()


# ------------------------------------------------------------------ server checkpoint ----


@pytest.mark.parametrize("name", ["checkpoint.pkl", "checkpoint.npz"])
def test_resume_never_runs_a_crafted_checkpoint_and_names_it(tmp_path, capsys, name):
    run, marker = tmp_path / "run", tmp_path / "ran"
    run.mkdir()
    (run / name).write_bytes(crafted_pickle(marker))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(run / name) in err and ("earlier release" in err or "not a MultiMed-FL checkpoint" in err)
    assert not marker.exists()
    assert (run / name).read_bytes() == crafted_pickle(marker)  # left as it was


# ------------------------------------------------------------------------ site state ----


def _context(state_dir: Path, node: dict | None = None, state: RecordDict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config=node if node is not None else {"partition-id": 0},
        state=state if state is not None else RecordDict(),
        run_config={STATE_DIR_KEY: str(state_dir)},
    )


def _state() -> RecordDict:
    return RecordDict(
        {
            "personal": ArrayRecord(
                {"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)), "n": Array(np.array([7]))}
            ),
            "cfg": ConfigRecord(
                {"s": "x", "i": 3, "f": 0.5, "t": True, "raw": b"\x00\x01", "li": [1, 2], "lf": [0.5], "ls": ["a"]}
            ),
            "m": MetricRecord({"loss": 1.5, "k": [1, 2]}),
        }
    )


def _plain(state: RecordDict) -> dict:
    out: dict = {}
    for name, record in state.items():
        if isinstance(record, ArrayRecord):
            out[name] = {k: (a.numpy().dtype.str, a.numpy().tolist()) for k, a in record.items()}
        else:
            out[name] = {k: (type(v).__name__, v) for k, v in record.items()}
    return out


def test_a_site_state_reads_back_exactly_and_keeps_the_last_two(tmp_path):
    ctx = _context(tmp_path, state=_state())
    for rnd in (1, 2, 3):
        site_state.save(ctx, "site_a", rnd)
    assert sorted(p.name for p in (tmp_path / "site_a").iterdir()) == ["round_00002.npz", "round_00003.npz"]
    fresh = _context(tmp_path)
    site_state.restore(fresh, "site_a", 3)
    assert _plain(fresh.state) == _plain(_state())
    assert fresh.state.array_records["personal"].to_torch_state_dict()["w"].shape == (2, 3)


def test_a_planted_site_state_is_never_run_and_is_named(tmp_path):
    marker = tmp_path / "ran"
    site_state.save(_context(tmp_path, state=_state()), "site_a", 2)
    path = tmp_path / "site_a" / "round_00002.npz"
    path.write_bytes(crafted_pickle(marker))  # a pickle where the new format lives
    with pytest.raises(site_state.SiteStateError, match=rf"site site_a: {path} is not a MultiMed-FL site state"):
        site_state.restore(_context(tmp_path), "site_a", 2)
    path.unlink()
    legacy = path.with_suffix(".pkl")  # the earlier release's file
    legacy.write_bytes(crafted_pickle(marker))
    with pytest.raises(site_state.SiteStateError, match=rf"{legacy} is a pickle of an earlier release: it is not"):
        site_state.restore(_context(tmp_path), "site_a", 2)
    assert not marker.exists()


def test_a_site_state_of_another_site_or_changed_is_refused_by_name(tmp_path):
    site_state.save(_context(tmp_path, state=_state()), "site_b", 2)
    (tmp_path / "site_a").mkdir()
    copied = tmp_path / "site_a" / "round_00002.npz"
    copied.write_bytes((tmp_path / "site_b" / "round_00002.npz").read_bytes())
    with pytest.raises(site_state.SiteStateError, match=r"holds \('site_b', 2\).*not site site_a's state of round 2"):
        site_state.restore(_context(tmp_path), "site_a", 2)
    with np.load(copied) as z:
        members = {n: z[n] for n in z.files}
    members["a0"] = members["a0"] + 1  # one weight changed
    with open(copied, "wb") as f:
        np.savez(f, **members)
    with pytest.raises(site_state.SiteStateError, match=rf"{copied} is not authenticated by this user's key"):
        site_state.restore(_context(tmp_path), "site_a", 2)


@pytest.mark.slow
def test_resume_never_runs_a_planted_site_state_and_keeps_the_run(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "ran"
    run_experiment(load_config(["scale=smoke", "rounds=2", "engine.checkpoint_every=1"]), run, progress=False)
    (run / "summary.json").unlink()  # as if killed after the last checkpoint
    site = sorted((run / "site_state").iterdir())[0]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.parent != site}
    planted = site / "round_00002.npz"
    planted.write_bytes(crafted_pickle(marker))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{planted} is not a MultiMed-FL site state" in err and "handshake" in err
    planted.unlink()
    legacy = planted.with_suffix(".pkl")
    legacy.write_bytes(crafted_pickle(marker))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    assert f"{legacy} is a pickle of an earlier release" in capsys.readouterr().err
    assert not marker.exists()
    assert all(p.exists() for p in before)  # nothing already written was lost
    assert all(p.read_bytes() == body for p, body in before.items() if p.name != "config.yaml")
    assert load_checkpoint(run).round == 2


# --------------------------------------------------------------------- site-local paths ----


def test_simulation_takes_paths_from_the_run_config_and_a_node_config_wins():
    run = {STATE_DIR_KEY: "/server/states", CORPUS_KEY: "/server/corpus"}
    assert site_local_path(STATE_DIR_KEY, {"partition-id": 0}, run) == "/server/states"
    assert site_local_path(STATE_DIR_KEY, {"partition-id": 0, STATE_DIR_KEY: "/own"}, run) == "/own"
    assert site_local_path(CORPUS_KEY, {"partition-id": 0}, {}) == ""


def test_in_deployment_a_server_sent_path_is_refused_with_the_reason(tmp_path, smoke_corpus):
    run = {STATE_DIR_KEY: str(tmp_path / "server-chosen"), CORPUS_KEY: str(smoke_corpus)}
    node = {"site": "site_00"}
    for key in (STATE_DIR_KEY, CORPUS_KEY):
        with pytest.raises(SiteConfigError, match=rf"site site_00: the server's run config sets {key}=.*comes only "):
            site_local_path(key, node, run)
    assert site_local_path(STATE_DIR_KEY, {**node, STATE_DIR_KEY: "/own"}, run) == "/own"  # the server's is ignored
    with pytest.raises(SiteConfigError, match="state-dir"):
        site_state.state_dir(_context(tmp_path / "server-chosen", node=node))
    cfg_yaml = config_to_yaml(load_config(["scale=smoke"]))
    with pytest.raises(SiteConfigError, match=r"site site_00: node config needs corpus-path"):
        site_runtime({CONFIG_KEY: cfg_yaml}, node)
    # through the ClientApp: the handshake fails, naming the key; nothing was written there
    grid = InProcessGrid(client_app, [node], {CONFIG_KEY: cfg_yaml, **run})
    with pytest.raises(FederationError, match=r"handshake: .*corpus-path comes only from its own node config"):
        handshake(grid, timeout_s=5)
    own = {**node, CORPUS_KEY: str(smoke_corpus)}
    grid = InProcessGrid(client_app, [own], {CONFIG_KEY: cfg_yaml, **run})
    with pytest.raises(FederationError, match=r"state-dir comes only from its own node config"):
        handshake(grid, restore_round=2, timeout_s=5)
    assert not (tmp_path / "server-chosen").exists()


# ----------------------------------------------------------------- a monotone DP ledger ----


def _ledger_state(steps: int, personal: float) -> RecordDict:
    state = RecordDict({"personal": ArrayRecord({"w": Array(np.full(2, personal, dtype=np.float32))})})
    ctx = Context(run_id=1, node_id=1, node_config={}, state=state, run_config={})
    PrivacyLedger({"mortality": [[1.1, 0.02, steps]]}, {"mortality": 1.1}).save(ctx)
    return state


def _epsilon(steps: int, delta: float) -> float:
    """Independently of the ledger: Opacus' RDP accountant over the same steps."""
    acc = RDPAccountant()
    acc.history = [(1.1, 0.02, steps)]
    return float(acc.get_epsilon(delta))


def test_restoring_an_earlier_round_never_lowers_the_spent_epsilon(tmp_path):
    privacy = load_config(["scale=smoke", "privacy=dp_sgd"]).privacy
    assert privacy.accountant == "rdp"
    site_state.save(_context(tmp_path, state=_ledger_state(100, 2.0)), "site_a", 2)
    site_state.save(_context(tmp_path, state=_ledger_state(300, 4.0)), "site_a", 4)
    low, high = _epsilon(100, privacy.delta), _epsilon(300, privacy.delta)
    assert high > low * 1.2

    # the server names round 2: the model state is round 2's, the ledger round 4's (more spent)
    ctx = _context(tmp_path)
    site_state.restore(ctx, "site_a", 2, privacy)
    assert ctx.state.array_records["personal"]["w"].numpy().tolist() == [2.0, 2.0]
    assert PrivacyLedger.load(ctx).spent(privacy) == pytest.approx(high, rel=1e-12)

    # what the site spent in memory (rounds not saved yet) counts too
    ctx = _context(tmp_path, state=_ledger_state(500, 9.0))
    site_state.restore(ctx, "site_a", 4, privacy)
    assert ctx.state.array_records["personal"]["w"].numpy().tolist() == [4.0, 4.0]
    assert PrivacyLedger.load(ctx).spent(privacy) == pytest.approx(_epsilon(500, privacy.delta), rel=1e-12)

    # the latest round restores as saved; without the check (no privacy config) round 2's ledger
    ctx = _context(tmp_path)
    site_state.restore(ctx, "site_a", 4, privacy)
    assert PrivacyLedger.load(ctx).spent(privacy) == pytest.approx(high, rel=1e-12)
    ctx = _context(tmp_path)
    site_state.restore(ctx, "site_a", 2)
    assert PrivacyLedger.load(ctx).spent(privacy) == pytest.approx(low, rel=1e-12)


def test_keep_highest_ledger_replaces_only_the_ledger():
    privacy = load_config(["scale=smoke", "privacy=dp_sgd"]).privacy
    restored, later = _ledger_state(10, 1.0), _ledger_state(20, 5.0)
    assert keep_highest_ledger(restored, [RecordDict(), _ledger_state(5, 0.0)], privacy) is None
    kept = keep_highest_ledger(restored, [later], privacy)
    assert kept == pytest.approx(_epsilon(20, privacy.delta), rel=1e-12)
    assert restored.config_records[STATE_KEY] is later.config_records[STATE_KEY]
    assert restored.array_records["personal"]["w"].numpy().tolist() == [1.0, 1.0]


# -------------------------------------------------------- configs are taken literally ----


SECRET = "the-site-secret-value"


def _interpolated(monkeypatch) -> str:
    monkeypatch.setenv("MMFL_TEST_SECRET", SECRET)
    text = config_to_yaml(load_config(["scale=smoke"]))
    assert "\n  planner: " in text
    return text.replace("\n  planner: ", "\n  planner: ${oc.env:MMFL_TEST_SECRET}", 1)


def test_a_serialised_config_resolves_nothing(monkeypatch):
    text = _interpolated(monkeypatch)
    with pytest.raises(
        ConfigError, match=r"sites.planner: interpolation '\$\{oc.env:MMFL_TEST_SECRET\}.*not allowed"
    ) as e:
        config_from_yaml(text)
    assert SECRET not in str(e.value)
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        config_from_yaml("sites: [1")


def test_a_site_does_not_resolve_the_wire_config(monkeypatch, smoke_corpus):
    text = _interpolated(monkeypatch)
    grid = InProcessGrid(client_app, [{"partition-id": 0}], {CONFIG_KEY: text, CORPUS_KEY: str(smoke_corpus)})
    with pytest.raises(FederationError, match=r"handshake: .*sites.planner: interpolation") as e:
        handshake(grid, timeout_s=5)
    assert SECRET not in str(e.value)


def test_resume_does_not_resolve_the_run_folders_config(monkeypatch, tmp_path, capsys):
    text = _interpolated(monkeypatch)
    record = RoundRecord(0, [], summarize([]))
    save_checkpoint(tmp_path, Checkpoint(0, {"w": np.zeros(2)}, {}, random.getstate(), record, [], text))
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sites.planner: interpolation" in err and SECRET not in err
