"""Run folders are never lost: another run's files, a user's files, and a folder in use by a live run.

Each refused case checks the message names the folder (and the PID for a lock) and that every file
that was there before is still there, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federated.app.cli import main
from federated.core.io import temp_name
from federated.server.run_folder import (
    LOCK_FILE,
    MANIFEST_FILE,
    RunFolderError,
    RunLock,
    check_out_dir,
    clear_run_outputs,
    is_framework_entry,
    record_outputs,
)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _interrupted_run(folder: Path) -> Path:
    """What a killed checkpointed run leaves: config, metrics, a checkpoint and a site's DP ledger, each
    listed in its manifest before it was written."""
    folder.mkdir(parents=True, exist_ok=True)
    record_outputs(folder, "site_state", "checkpoint.npz", "config.yaml", "metrics.parquet")
    (folder / "site_state" / "site_00").mkdir(parents=True)
    (folder / "site_state" / "site_00" / "round_0002.npz").write_bytes(b"ledger: epsilon 1.7")
    (folder / "checkpoint.npz").write_bytes(b"round 2 of 5")
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "metrics.parquet").write_bytes(b"PAR1")
    return folder


def _user_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "data").mkdir()
    (folder / "data" / "cohort.csv").write_text("id,age\n1,40\n")
    return folder


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


# ----------------------------------------------------------------------------- folder checks --


def test_an_interrupted_run_is_refused_and_pointed_to_resume(tmp_path):
    folder = _interrupted_run(tmp_path / "run")
    before = _snapshot(folder)
    with pytest.raises(RunFolderError, match=r"holds an interrupted run \(checkpoint.npz.*--resume .*run"):
        check_out_dir(folder, overwrite=False)
    assert _snapshot(folder) == before


def test_site_states_without_a_checkpoint_are_a_run_with_nothing_to_resume(tmp_path):
    folder = tmp_path / "run"
    (folder / "site_state" / "site_00").mkdir(parents=True)
    with pytest.raises(RunFolderError, match=r"stopped before its first checkpoint \(site_state; .*nothing to resume"):
        check_out_dir(folder, overwrite=False)


def test_a_finished_run_is_refused(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"already holds a finished run \(summary.json\)"):
        check_out_dir(tmp_path, overwrite=False)


def test_a_users_files_are_refused_by_name(tmp_path):
    folder = _user_folder(tmp_path / "mine")
    with pytest.raises(RunFolderError, match=r"files multimed-fl did not write \(data, notes.txt\)"):
        check_out_dir(folder, overwrite=False)
    check_out_dir(folder, overwrite=True)  # allowed, but (below) never deleted


def test_overwrite_clears_only_what_the_manifest_lists(tmp_path):
    folder = _interrupted_run(tmp_path / "run")
    record_outputs(folder, "summary.json")
    (folder / "summary.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / "checkpoint.pkl").write_bytes(b"an older release's checkpoint")  # no manifest lists it: kept
    assert clear_run_outputs(folder) == [
        "checkpoint.npz",
        "config.yaml",
        "metrics.parquet",
        "site_state",
        "summary.json",
    ]
    assert sorted(os.listdir(folder)) == ["checkpoint.pkl", "notes.txt", MANIFEST_FILE]
    assert (folder / "notes.txt").read_text() == "mine"


def test_framework_entries_are_recognised():
    for name in ("config.yaml", "summary.json", "checkpoint.npz", "checkpoint.pkl", "site_state", "tensorboard"):
        assert is_framework_entry(name)
    assert is_framework_entry(temp_name(Path("summary.json")).name) and is_framework_entry(LOCK_FILE)
    assert is_framework_entry(MANIFEST_FILE)
    for name in ("notes.txt", "summary.json.bak", "data", ".summary.json.tmp-0a1b2c3d4e5f", ".draft.tmp"):
        assert not is_framework_entry(name)


def test_an_empty_or_missing_folder_is_fine(tmp_path):
    check_out_dir(tmp_path / "new", overwrite=False)
    check_out_dir(tmp_path, overwrite=False)


def test_a_file_as_out_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "f", overwrite=True)


# ------------------------------------------------------------------------------------ the lock --


def test_a_lock_held_by_a_live_process_is_refused_naming_its_pid(tmp_path):
    other = _sleeper()
    try:
        (tmp_path / LOCK_FILE).write_text(f"{other.pid}\n")
        with pytest.raises(RunFolderError, match=rf"in use by another run \(PID {other.pid}, lock file"):
            RunLock(tmp_path).acquire()
        assert (tmp_path / LOCK_FILE).read_text() == f"{other.pid}\n"  # not taken over
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    dead = _sleeper()
    dead.kill()
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f"{dead.pid}\n")
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderError, match=rf"PID {os.getpid()}"):  # the same folder twice: refused
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_folder_the_lock_created_goes_away_if_nothing_was_written(tmp_path):
    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new" / LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists()


def test_a_lock_without_a_pid_is_never_taken_over(tmp_path):
    """Fresh, it is a run taking the folder; old, nothing says it is the framework's: kept, named."""
    lock = tmp_path / LOCK_FILE
    lock.write_text("")
    with pytest.raises(RunFolderError, match="being taken by another run"):
        RunLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(lock, (old, old))
    with pytest.raises(RunFolderError, match=rf"{LOCK_FILE} holds no PID.*remove it"):
        RunLock(tmp_path).acquire()
    assert lock.exists() and lock.read_text() == ""


# -------------------------------------------------------------------------- through the CLI ----


def test_the_cli_refuses_an_interrupted_run_and_keeps_it(tmp_path, capsys):
    folder = _interrupted_run(tmp_path / "run")
    before = _snapshot(folder)
    assert main(["run", "--out", str(folder), "--no-progress", "scale=smoke", "rounds=1"]) == 2
    err = capsys.readouterr().err
    assert "interrupted run" in err and f"--resume {folder}" in err
    assert _snapshot(folder) == before and not (folder / LOCK_FILE).exists()


def test_the_cli_refuses_a_users_folder_and_keeps_it(tmp_path, capsys):
    folder = _user_folder(tmp_path / "mine")
    before = _snapshot(folder)
    assert main(["run", "--out", str(folder), "--no-progress", "scale=smoke", "rounds=1"]) == 2
    assert "did not write (data, notes.txt)" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_the_cli_refuses_a_folder_in_use(tmp_path, capsys):
    other = _sleeper()
    try:
        (tmp_path / LOCK_FILE).write_text(f"{other.pid}\n")
        assert main(["run", "--out", str(tmp_path), "--no-progress", "scale=smoke", "rounds=1"]) == 2
        assert f"PID {other.pid}" in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_overwrite_runs_beside_a_users_files_without_touching_them(tmp_path, capsys):
    folder = _user_folder(tmp_path / "mine")
    _interrupted_run(folder)
    mine = {k: v for k, v in _snapshot(folder).items() if k in ("notes.txt", "data/cohort.csv")}
    assert main(["run", "--out", str(folder), "--overwrite", "--no-progress", "scale=smoke", "rounds=1"]) == 0
    after = _snapshot(folder)
    assert {k: after[k] for k in mine} == mine
    assert "checkpoint.npz" not in after and not any(k.startswith("site_state") for k in after)
    assert json.loads(after["summary.json"])["rounds_completed"] == 1


@pytest.mark.slow
def test_two_concurrent_runs_the_second_fails_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "federated.app.cli", "run", "--out", str(out), "--no-progress", "scale=smoke"]
    first = subprocess.Popen([*cmd, "rounds=3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists():
            assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        assert main(["run", "--out", str(out), "--no-progress", "scale=smoke", "rounds=1"]) == 2
        assert first.poll() is None  # the second failed while the first was still running
        assert f"in use by another run (PID {first.pid}" in capsys.readouterr().err
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3  # the first run's outputs, whole
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------- the ServerApp --


def _server_app_run(smoke_corpus, out: Path) -> None:
    from flwr.app import Context, RecordDict

    from clients.client_app import app as client_app
    from federated.core.config import config_to_yaml, load_config
    from federated.engines.inprocess import InProcessGrid
    from federated.server.server_app import app as server_app

    cfg = load_config(["scale=smoke", "rounds=1"])
    run_config = {"multimed-config": config_to_yaml(cfg), "corpus-path": str(smoke_corpus), "out-dir": str(out)}
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(10)], run_config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def test_the_server_app_refuses_a_users_folder_and_an_interrupted_run(tmp_path, smoke_corpus):
    for folder, why in (
        (_user_folder(tmp_path / "mine"), "did not write"),
        (_interrupted_run(tmp_path / "killed"), "interrupted run"),
    ):
        before = _snapshot(folder)
        with pytest.raises(RunFolderError, match=why):
            _server_app_run(smoke_corpus, folder)
        assert _snapshot(folder) == before and not (folder / LOCK_FILE).exists()


def test_the_server_app_refuses_a_folder_in_use(tmp_path, smoke_corpus):
    other = _sleeper()
    try:
        (tmp_path / LOCK_FILE).write_text(f"{other.pid}\n")
        with pytest.raises(RunFolderError, match=rf"PID {other.pid}"):
            _server_app_run(smoke_corpus, tmp_path)
        assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]
    finally:
        other.kill()
        other.wait()


def test_a_killed_writes_temporary_files_are_removed_at_the_next_start_and_nothing_else(tmp_path):
    from federated.core.io import HOST_TAG
    from federated.server.run_folder import remove_stale_temps

    dead = _sleeper()
    dead.kill()
    dead.wait()
    out = tmp_path / "run"
    site = out / "site_state" / "site_00"
    site.mkdir(parents=True)
    tag = f".multimed-fl-tmp-{HOST_TAG}-{dead.pid}-0123456789ab-"
    (out / f"{tag}checkpoint.npz").write_bytes(b"half a checkpoint")
    (site / f"{tag}round_00001.npz").write_bytes(b"half a site state")
    (out / f"{tag}corpus").mkdir()
    (site / "round_00001.npz").write_bytes(b"a finished site state")
    (out / "notes.txt").write_text("a user's file")
    (out / ".notes.txt.tmp-1a2b").write_text("a user's file that looks like an earlier release's temporary")
    removed = remove_stale_temps(out)
    assert sorted(removed) == [f"{tag}checkpoint.npz", f"{tag}corpus", f"site_state/site_00/{tag}round_00001.npz"]
    assert sorted(p.name for p in out.iterdir()) == [".notes.txt.tmp-1a2b", "notes.txt", "site_state"]
    assert [p.name for p in site.iterdir()] == ["round_00001.npz"]
    assert remove_stale_temps(tmp_path / "absent") == []
