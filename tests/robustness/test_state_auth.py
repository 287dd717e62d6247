"""Issue 28, finding 3 (first half): a checkpoint edited and re-hashed was believed. Switching
`privacy: dp_sgd` to `none` in checkpoint.npz and recomputing its unkeyed sha256 let a resumed
run train without DP. Now checkpoints and site states carry an HMAC-SHA256 under a per-user key
kept outside the run folder (federated/core/state_key.py): an edit cannot be re-signed without
the key, and the key file itself is refused when others could read or replace it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import random
import stat
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, RecordDict

from clients import site_state
from federated.app.cli import main
from federated.core.config import config_to_yaml, load_config
from federated.core.protocol import STATE_DIR_KEY
from federated.core.state_key import KEY_BYTES, KEY_ENV, StateKeyError, key_path, load_key
from federated.core.statefile import StateFileError, read_state_file, write_state_file
from federated.server.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from federated.server.evaluation import summarize
from federated.server.records import RoundRecord


@pytest.fixture
def own_key(tmp_path, monkeypatch) -> Path:
    """This test's user: a key file of their own, outside the run folder (created on first use)."""
    path = tmp_path / "home" / "state.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


def _dp_checkpoint(run: Path) -> Path:
    text = config_to_yaml(load_config(["scale=smoke", "privacy=dp_sgd"]))
    assert "\n  name: dp_sgd\n" in text
    record = RoundRecord(0, [], summarize([]))
    ckpt = Checkpoint(0, {"w": np.arange(4, dtype=np.float32)}, {}, random.getstate(), record, [], text)
    return save_checkpoint(run, ckpt)


def _members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {n: z[n] for n in z.files}


def _mac(key: bytes, meta: dict, state: bytes, arrays: list[np.ndarray]) -> str:
    """The documented MAC (federated/core/statefile.py), computed independently of it."""
    h = hmac.new(key, f"hmac-sha256\n{meta['format']}\n{meta['version']}\n".encode(), hashlib.sha256)
    h.update(len(state).to_bytes(8, "little") + state)
    for i, a in enumerate(arrays):
        h.update(f"\n{i}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _edit(path: Path, old: bytes, new: bytes, sign) -> None:
    """Replace `old` by `new` in the state JSON and rewrite the header with sign(meta, state, arrays)."""
    members = _members(path)
    meta = json.loads(members["meta"].tobytes())
    state = members["state"].tobytes()
    assert old in state
    state = state.replace(old, new)
    arrays = [members[f"a{i}"] for i in range(len(members) - 2)]
    meta = sign(meta, state, arrays)
    members["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    members["state"] = np.frombuffer(state, np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **members)


def _privacy(path: Path) -> str:
    return "dp_sgd" if b"name: dp_sgd" in _members(path)["state"].tobytes() else "none"


def test_a_checkpoint_edited_and_re_hashed_is_refused_and_resume_exits_2(tmp_path, own_key, capsys):
    run = tmp_path / "run"
    path = _dp_checkpoint(run)
    genuine = path.read_bytes()
    victim = own_key.read_bytes()
    edit = (b"name: dp_sgd", b"name: none")

    def keep(meta, state, arrays):  # the edit alone
        return meta

    def rehash(meta, state, arrays):  # the probe: recompute an unkeyed sha256 as the earlier format had it
        h = hashlib.sha256(f"{meta['format']}\n{meta['version']}\n".encode())
        h.update(len(state).to_bytes(8, "little") + state)
        for i, a in enumerate(arrays):
            h.update(f"\n{i}:{a.dtype.str}:{a.shape}\n".encode() + a.tobytes())
        return {"format": meta["format"], "version": meta["version"], "sha256": h.hexdigest()}

    def own_key_mac(meta, state, arrays):  # re-signed under the editor's own key (another user)
        return {**meta, "mac": _mac(os.urandom(KEY_BYTES), meta, state, arrays)}

    for sign, why in (
        (keep, "it was edited or damaged after it was written"),
        (rehash, "written by an earlier MultiMed-FL release, before state files were authenticated"),
        (own_key_mac, "edited or damaged after it was written"),  # the header still names the victim's key id
    ):
        path.write_bytes(genuine)
        _edit(path, *edit, sign)
        assert _privacy(path) == "none"
        with pytest.raises(CheckpointError, match=why):
            load_checkpoint(run)
        assert main(["run", "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(run / CHECKPOINT_FILE) in err and why in err

    # the control: the same edit signed with the victim's key is accepted, so it is the MAC alone that refuses
    path.write_bytes(genuine)
    _edit(path, *edit, lambda meta, state, arrays: {**meta, "mac": _mac(victim, meta, state, arrays)})
    assert "name: none" in load_checkpoint(run).config_yaml


def test_a_file_written_under_another_key_is_refused_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "alice.key"))
    path = write_state_file(tmp_path / "s.npz", "site-state", 1, {"w": np.ones(3)})
    assert read_state_file(path, "site-state", 1)["w"].tolist() == [1.0, 1.0, 1.0]
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "bob.key"))
    write_state_file(tmp_path / "other.npz", "site-state", 1, {})  # bob's key now exists
    bob = tmp_path / "bob.key"
    message = rf"{path} is not authenticated by this user's key \({bob}\): it was written by another user or machine"
    with pytest.raises(StateFileError, match=message):
        read_state_file(path, "site-state", 1)


def test_the_key_is_made_on_first_use_outside_the_run_0600_and_never_written_into_state(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "multimed-fl" / "state.key"
    assert key_path() == expected and not expected.exists()
    run = tmp_path / "run"
    path = write_state_file(run / "checkpoint.npz", "checkpoint", 3, {"w": np.ones(2)})
    assert stat.S_IMODE(expected.stat().st_mode) == 0o600
    key = expected.read_bytes()
    assert len(key) == KEY_BYTES
    assert key not in path.read_bytes() and key.hex().encode() not in path.read_bytes()
    assert [p.name for p in run.iterdir()] == ["checkpoint.npz"]
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert key_path() == tmp_path / "home" / ".config" / "multimed-fl" / "state.key"


def test_processes_that_make_the_key_at_once_all_get_the_same_one(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "k" / "state.key"))
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_key())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["state.key"]  # no temporary left behind


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o666])
def test_a_key_others_can_read_or_write_is_refused_with_the_fix(own_key, tmp_path, mode):
    load_key()
    own_key.chmod(mode)
    message = rf"state key {own_key} is readable or writable by others \(mode {mode:04o}\).*Run: chmod 600 {own_key}"
    with pytest.raises(StateKeyError, match=message):
        load_key()
    with pytest.raises(StateFileError, match=message):
        write_state_file(tmp_path / "s.npz", "site-state", 1, {})
    own_key.chmod(0o600)
    path = write_state_file(tmp_path / "s.npz", "site-state", 1, {})
    own_key.chmod(mode)
    with pytest.raises(StateFileError, match=rf"{path}: cannot be authenticated: state key {own_key} is readable"):
        read_state_file(path, "site-state", 1)


def test_a_key_that_is_not_a_regular_file_or_not_32_bytes_is_refused(own_key):
    own_key.parent.mkdir(parents=True)
    own_key.mkdir()
    with pytest.raises(StateKeyError, match=rf"state key {own_key} is not a regular file"):
        load_key()
    own_key.rmdir()
    os.mkfifo(own_key, 0o600)  # must be refused, not waited on
    with pytest.raises(StateKeyError, match="is not a regular file"):
        load_key()
    own_key.unlink()
    for size in (0, 31, 33, 64):
        own_key.write_bytes(b"k" * size)
        own_key.chmod(0o600)
        with pytest.raises(StateKeyError, match=rf"state key {own_key} holds {size} bytes, not 32"):
            load_key()
        own_key.unlink()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="only root can give a file away")
def test_a_key_another_user_owns_is_refused(own_key):
    load_key()
    os.chown(own_key, 4242, -1)
    with pytest.raises(StateKeyError, match=r"is owned by uid 4242, not by you \(uid 0\)"):
        load_key()


def test_reading_without_a_key_says_so_and_creates_none(tmp_path, own_key, monkeypatch):
    path = write_state_file(tmp_path / "s.npz", "site-state", 1, {})
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "nobody" / "state.key"))
    nobody = tmp_path / "nobody"
    with pytest.raises(StateFileError, match=rf"{path}: cannot be authenticated: no state key at {nobody}"):
        read_state_file(path, "site-state", 1)
    assert not (tmp_path / "nobody").exists()


def test_a_hospitals_site_state_is_authenticated_by_its_own_key(tmp_path, monkeypatch):
    """Each SuperNode's ClientApp writes and reads its site state in its own process, under its
    user's key; another hospital's (or the coordinator's) key does not authenticate it."""
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "hospital_a.key"))
    state = RecordDict({"personal": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})})
    run_config = {STATE_DIR_KEY: str(tmp_path / "states")}
    site_state.save(Context(run_id=1, node_id=1, node_config={}, state=state, run_config=run_config), "site_a", 2)
    path = site_state.state_file(tmp_path / "states", "site_a", 2)
    site_state.load(path, "site_a", 2)
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "hospital_b.key"))
    load_key()
    with pytest.raises(site_state.SiteStateError, match=r"site site_a: .* is not authenticated by this user's key"):
        site_state.load(path, "site_a", 2)


def test_the_mac_reads_each_arrays_bytes_in_place_with_the_documented_digest(tmp_path, own_key):
    """The MAC hashes a uint8 view of each array, not a tobytes() copy: the digest is still the
    documented one (an independent HMAC over tobytes()), for every layout and dtype a state holds."""
    arrays = [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2],  # not contiguous
        np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
        np.array(3.5),  # 0-d
        np.zeros((0, 5), dtype=np.float32),  # empty
        np.array([True, False, True]),
        np.arange(5, dtype=">i4"),  # big-endian
        np.array([1 + 2j], dtype=np.complex64),
        np.array(["ab", "c"]),
    ]
    path = write_state_file(tmp_path / "s.npz", "site-state", 1, {"a": arrays})
    members = _members(path)
    meta = json.loads(members["meta"].tobytes())
    stored = [members[f"a{i}"] for i in range(len(members) - 2)]
    assert meta["mac"] == _mac(load_key(), meta, members["state"].tobytes(), stored)
    read = read_state_file(path, "site-state", 1)["a"]  # verified under the same MAC
    assert all(np.array_equal(x.ravel(), y.ravel()) and x.dtype == y.dtype for x, y in zip(read, arrays, strict=True))


def test_a_member_added_or_dropped_is_refused(tmp_path, own_key):
    path = write_state_file(tmp_path / "s.npz", "site-state", 1, {"a": np.ones(2), "b": np.zeros(2)})
    members = _members(path)
    for change in ("drop", "add"):
        changed = dict(members)
        if change == "drop":
            del changed["a1"]
        else:
            changed["x"] = np.ones(1)
        buf = io.BytesIO()
        np.savez(buf, **changed)
        path.write_bytes(buf.getvalue())
        with pytest.raises(StateFileError, match=r"members missing|not authenticated"):
            read_state_file(path, "site-state", 1)
    with zipfile.ZipFile(path) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


# ------------------------------------------- a bad key is refused before the run trains ----


def test_a_key_others_can_read_stops_a_checkpointing_run_before_it_writes_anything(tmp_path, own_key, capsys):
    """Found only at the first checkpoint before (k rounds in, after the folder was filled)."""
    load_key()
    own_key.chmod(0o644)
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--no-progress", "scale=smoke", "rounds=2", "engine.checkpoint_every=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"multimed-fl: error: state key {own_key} is readable or writable by others (mode 0644)" in err
    assert f"Run: chmod 600 {own_key}" in err and "Traceback" not in err
    assert not out.exists()  # nothing was written into --out (the folder the lock made is gone too)
    out.mkdir()
    assert main(args) == 2 and list(out.iterdir()) == []
    assert stat.S_IMODE(own_key.stat().st_mode) == 0o644  # the key is the user's to fix, never changed


def test_every_engine_checks_the_key_before_round_1_when_the_run_checkpoints(tmp_path, own_key):
    from federated.server.checkpoint import checkpointers

    load_key()
    own_key.chmod(0o644)
    every = load_config(["scale=smoke", "engine.checkpoint_every=2"])
    with pytest.raises(StateKeyError, match=rf"chmod 600 {own_key}"):
        checkpointers(every, tmp_path)
    never = load_config(["scale=smoke", "engine.checkpoint_every=0"])
    assert checkpointers(never, tmp_path) == [] and checkpointers(every, None) == []  # nothing saved: not needed


def test_a_hospital_whose_key_others_can_read_is_refused_by_name_in_the_handshake(tmp_path, own_key, smoke_corpus):
    """Its first site_state.save failed silently before (a failed evaluate reply), found only on resume."""
    from clients.client_app import app as client_app
    from federated.core.protocol import CONFIG_KEY, CORPUS_KEY
    from federated.engines.inprocess import InProcessGrid
    from federated.server.handshake import handshake
    from federated.server.site_agreement import FederationError

    load_key()
    own_key.chmod(0o604)
    run = {
        CONFIG_KEY: config_to_yaml(load_config(["scale=smoke", "engine.checkpoint_every=1"])),
        CORPUS_KEY: str(smoke_corpus),
        STATE_DIR_KEY: str(tmp_path / "states"),
    }
    with pytest.raises(FederationError, match=r"handshake: node .*site site_00 cannot save its state") as e:
        handshake(InProcessGrid(client_app, [{"partition-id": 0}], run), timeout_s=30)
    assert f"state key {own_key} is readable or writable by others (mode 0604)" in str(e.value)
    assert f"chmod 600 {own_key}" in str(e.value)
    own_key.chmod(0o600)
    assert [
        p.site for p in handshake(InProcessGrid(client_app, [{"partition-id": 0}], run), timeout_s=30).values()
    ] == ["site_00"]
    no_checkpoints = {**run, CONFIG_KEY: config_to_yaml(load_config(["scale=smoke"]))}
    own_key.chmod(0o604)  # a run that saves nothing does not need the key
    handshake(InProcessGrid(client_app, [{"partition-id": 0}], no_checkpoints), timeout_s=30)
