"""Issue 28, findings 1, 2 and two of 7: a run folder never loses a user's file.

1. a user's `.draft.tmp` and `.cache.tmp/` are a user's files: refused by name, never removed; only
   the framework's own temporaries (`.multimed-fl-tmp-<host>-<pid>-...`) of a dead writer are removed,
   and only once the folder is accepted;
2. `--overwrite` deletes exactly what the folder's run_manifest.json lists, never a user's
   `checkpoints_mine/` or `checkpoint_notes.txt`; a folder without a manifest loses nothing; a listed
   folder holding a user's file (tensorboard/notes.txt) is refused naming it, nothing deleted; the
   deployment demo checks its folder before an earlier attempt's deploy/ is deleted;
7. a symbolic link where a run writes is refused by name, never followed; a run killed while writing
   its first checkpoint gets one message from `run --out` and `run --resume`, whose command works.

Each case checks every entry that was there (files byte for byte, folders, links) is still there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from federated.app.cli import main
from federated.core.io import HOST_TAG, atomic_write, stale_temp, temp_name, temp_writer, write_json
from federated.server.run_folder import (
    LOCK_FILE,
    MANIFEST_FILE,
    RUN_OUTPUTS,
    RunFolderError,
    RunLock,
    check_out_dir,
    check_resumable,
    clear_run_outputs,
    fresh_setup_folder,
    read_manifest,
    record_outputs,
    remove_stale_temps,
)

SMOKE = ["--no-progress", "scale=smoke", "rounds=1"]


def _tree(folder: Path) -> dict[str, object]:
    """Every entry under folder: a file's bytes, a folder, a link's target (links are not followed)."""
    out: dict[str, object] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


def _users_temps(folder: Path) -> Path:
    """The probe's folder: a user's hidden drafts that merely look temporary."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".draft.tmp").write_text("draft\n")
    (folder / ".cache.tmp").mkdir()
    (folder / ".cache.tmp" / "cached.bin").write_bytes(b"\x00\x01 a user's cache")
    return folder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _framework_temp(folder: Path, target: str, pid: int, host: str = HOST_TAG) -> Path:
    path = folder / f".multimed-fl-tmp-{host}-{pid}-0123456789ab-{target}"
    path.write_bytes(b"half a " + target.encode())
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("multimed-fl: error: ")]
    assert lines, err
    return lines[-1].removeprefix("multimed-fl: error: ")


# ------------------------------------------------------------- finding 1: a user's .tmp files --


def test_finding1_the_probe_is_refused_by_name_and_the_users_temps_stay(tmp_path, capsys):
    folder = _users_temps(tmp_path / "p")
    (folder / "notes.txt").write_text("notes\n")
    before = _tree(folder)
    assert main(["run", "--out", str(folder), *SMOKE]) == 2
    assert "did not write (.cache.tmp, .draft.tmp, notes.txt)" in _error(capsys)
    assert _tree(folder) == before


def test_finding1_a_draft_tmp_alone_is_refused_not_deleted(tmp_path, capsys):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / ".draft.tmp").write_text("draft\n")
    assert main(["run", "--out", str(folder), *SMOKE]) == 2
    assert "did not write (.draft.tmp)" in _error(capsys)
    assert _tree(folder) == {".draft.tmp": b"draft\n"}


def test_finding1_only_dead_writers_framework_temps_are_stale(tmp_path):
    run = tmp_path / "run"
    site = run / "site_state" / "site_00"
    site.mkdir(parents=True)
    dead = _dead_pid()
    gone = [_framework_temp(run, "checkpoint.npz", dead), _framework_temp(site, "round_00001.npz", dead)]
    (gone_dir := run / f".multimed-fl-tmp-{HOST_TAG}-{dead}-0123456789ab-corpus").mkdir()
    kept = [
        _framework_temp(run, "summary.json", os.getpid()),  # its writer is alive
        _framework_temp(run, "metrics.parquet", dead, host="ffffffff"),  # another host's PID: not judged
    ]
    _users_temps(run)
    (run / ".checkpoint.npz.tmp-1a2b").write_bytes(b"looks like an earlier release's temporary: a user's")
    (site / "round_00001.npz").write_bytes(b"a finished site state")
    before = _tree(run)
    removed = remove_stale_temps(run)
    assert sorted(removed) == sorted(str(p.relative_to(run)) for p in [*gone, gone_dir])
    after = _tree(run)
    assert after == {k: v for k, v in before.items() if k not in removed and not k.startswith(gone_dir.name)}
    assert all(p.exists() for p in kept)


def test_finding1_temps_of_a_refused_folder_are_not_touched(tmp_path, capsys):
    """Removing stale temporaries comes after the folder is accepted: a refused folder keeps them."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "notes.txt").write_text("notes\n")
    _framework_temp(folder, "summary.json", _dead_pid())
    before = _tree(folder)
    assert main(["run", "--out", str(folder), *SMOKE]) == 2
    assert _tree(folder) == before


def test_finding1_atomic_writes_name_their_temporaries_with_prefix_host_and_pid(tmp_path):
    seen: list[str] = []
    atomic_write(tmp_path / "summary.json", lambda tmp: (seen.append(tmp.name), tmp.write_text("{}")))
    assert temp_writer(seen[0]) == (HOST_TAG, os.getpid()) and seen[0].endswith("-summary.json")
    assert not stale_temp(seen[0])  # this process is alive
    for user_name in (".draft.tmp", ".cache.tmp", ".summary.json.tmp-0a1b2c3d4e5f", "multimed-fl-tmp-x"):
        assert temp_writer(user_name) is None and not stale_temp(user_name)
    assert temp_name(tmp_path / "x").name.startswith(f".multimed-fl-tmp-{HOST_TAG}-{os.getpid()}-")


@pytest.mark.slow
def test_finding1_overwrite_runs_beside_a_users_temps_and_keeps_them(tmp_path, capsys):
    folder = _users_temps(tmp_path / "p")
    dead_temp = _framework_temp(folder, "checkpoint.npz", _dead_pid())
    mine = _tree(folder)
    del mine[dead_temp.name]
    assert main(["run", "--out", str(folder), "--overwrite", *SMOKE]) == 0
    after = _tree(folder)
    assert {k: after.get(k) for k in mine} == mine
    assert not dead_temp.exists()  # the framework's own, of a dead writer: removed once accepted
    assert json.loads((folder / "summary.json").read_text())["rounds_completed"] == 1


# ------------------------------------------------- finding 2: --overwrite deletes by manifest --


def _mine(folder: Path) -> None:
    (folder / "checkpoints_mine").mkdir(parents=True)
    (folder / "checkpoints_mine" / "epoch_3.pt").write_bytes(b"my own checkpoint")
    (folder / "checkpoint_notes.txt").write_text("which checkpoint is which\n")
    (folder / "summary.json.bak").write_text("{}")


def _finished_run(folder: Path) -> None:
    """What a finished, checkpointed run of this release leaves, with its manifest (listed first)."""
    folder.mkdir(parents=True, exist_ok=True)
    record_outputs(folder, *RUN_OUTPUTS)
    (folder / "site_state" / "site_00").mkdir(parents=True)
    (folder / "site_state" / "site_00" / "round_00001.npz").write_bytes(b"ledger")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out.tfevents.1").write_bytes(b"events")
    for name in ("config.yaml", "corpus.json", "metrics.parquet", "final_model.npz", "summary.json", "checkpoint.npz"):
        (folder / name).write_bytes(f"an earlier run's {name}".encode())


def test_finding2_overwrite_deletes_exactly_the_manifests_entries(tmp_path):
    folder = tmp_path / "q"
    _mine(folder)
    _finished_run(folder)
    mine = {
        k: v
        for k, v in _tree(folder).items()
        if k.startswith(("checkpoints_mine", "checkpoint_notes", "summary.json.bak"))
    }
    check_out_dir(folder, overwrite=True)
    assert sorted(clear_run_outputs(folder)) == sorted(RUN_OUTPUTS)
    assert _tree(folder) == {**mine, MANIFEST_FILE: (folder / MANIFEST_FILE).read_bytes()}
    assert read_manifest(folder) == frozenset()


@pytest.mark.slow
def test_finding2_the_probe_overwrite_keeps_checkpoints_mine_and_checkpoint_notes(tmp_path, capsys):
    folder = tmp_path / "q"
    assert main(["run", "--out", str(folder), *SMOKE, "engine.checkpoint_every=1"]) == 0
    assert (folder / "checkpoint.npz").is_file() and "checkpoint.npz" in read_manifest(folder)
    _mine(folder)
    mine = {
        k: v
        for k, v in _tree(folder).items()
        if k.startswith(("checkpoints_mine", "checkpoint_notes", "summary.json.bak"))
    }
    assert main(["run", "--out", str(folder), "--overwrite", *SMOKE]) == 0  # no checkpointing this time
    after = _tree(folder)
    assert {k: after.get(k) for k in mine} == mine
    assert "checkpoint.npz" not in after and "site_state" not in after  # the earlier run's: listed, deleted


def test_finding2_a_folder_without_a_manifest_loses_nothing(tmp_path, capsys):
    """An earlier release's run (no manifest): nothing proves which entries it wrote, so --overwrite
    refuses, naming them, and deletes nothing."""
    folder = tmp_path / "old"
    _mine(folder)
    _finished_run(folder)
    (folder / MANIFEST_FILE).unlink()
    before = _tree(folder)
    assert main(["run", "--out", str(folder), "--overwrite", *SMOKE]) == 2
    err = _error(capsys)
    assert "nothing lists checkpoint.npz, config.yaml, corpus.json, final_model.npz, metrics.parquet" in err
    assert "remove them yourself" in err
    assert _tree(folder) == before
    assert clear_run_outputs(folder) == [] and _tree(folder) == before


def test_finding2_an_edited_manifest_cannot_name_a_users_file(tmp_path, capsys):
    folder = tmp_path / "q"
    _mine(folder)
    write_json(
        folder / MANIFEST_FILE, {"format": "multimed-fl run folder", "version": 1, "entries": ["checkpoint_notes.txt"]}
    )
    before = _tree(folder)
    assert main(["run", "--out", str(folder), "--overwrite", *SMOKE]) == 2
    assert "lists 'checkpoint_notes.txt', which multimed-fl never writes" in _error(capsys)
    with pytest.raises(RunFolderError, match="never writes"):
        clear_run_outputs(folder)
    assert _tree(folder) == before


def test_finding2_a_setup_folder_no_manifest_lists_is_not_replaced(tmp_path):
    """The deployment demo's deploy/: an earlier attempt's (listed) is replaced, anything else kept."""
    folder = tmp_path / "demo"
    (folder / "deploy").mkdir(parents=True)
    (folder / "deploy" / "my_keys.txt").write_text("mine")
    before = _tree(folder)
    with pytest.raises(RunFolderError, match=r"deploy is already there and no run_manifest.json"):
        fresh_setup_folder(folder, "deploy")
    assert _tree(folder) == before
    (folder / "deploy" / "my_keys.txt").unlink()
    (folder / "deploy").rmdir()
    made = fresh_setup_folder(folder, "deploy")
    (made / "logs").mkdir()
    (made / "logs" / "superlink.log").write_text("an attempt")
    assert fresh_setup_folder(folder, "deploy") == made and not any(made.iterdir())


def _demo_attempt(deploy: Path) -> None:
    """What `deploy demo` (demo.py, federation.py, pki.py) leaves in deploy/, as measured in a real one."""
    for name in (
        "ca.crt",
        "ca.key",
        "server.pem",
        "server.key",
        "node_00",
        "node_00.pub",
        ".ca.key.tmp-0123456789abcdef",
    ):
        (deploy / "pki").mkdir(parents=True, exist_ok=True)
        (deploy / "pki" / name).write_bytes(b"pem")
    (deploy / "logs").mkdir()
    for name in ("superlink", "flwr-cli", "run", "supernode-site_00", "clientapp-site_00"):
        (deploy / "logs" / f"{name}.log").write_text("log")
    corpus = deploy / "sites" / "site_00"
    for sub in ("arrays", "targets"):
        (corpus / sub).mkdir(parents=True)
        (corpus / sub / "oct.npy").write_bytes(b"npy")
    (corpus / "spec.json").write_text("{}")
    (corpus / "manifest.parquet").write_bytes(b"PAR1")
    (deploy / "sites" / f".site_01.tmp-{HOST_TAG}-12345-0a1b2c3d").mkdir()  # a split killed half-way
    (deploy / "flwr_home" / "apps" / "multimed-fl.0.1.0" / "partitions").mkdir(parents=True)  # Flower's own
    (deploy / "flwr_home" / "config.toml").write_text("[superlink]\n")
    for name in ("run_config.toml", "superlink.db", "superlink.db-wal"):
        (deploy / name).write_bytes(b"x")


def _finished_with(folder: Path, users_file: str) -> Path:
    _finished_run(folder)
    record_outputs(folder, "deploy")
    _demo_attempt(folder / "deploy")
    (folder / users_file).parent.mkdir(parents=True, exist_ok=True)
    (folder / users_file).write_text("mine: my own notes on this run\n")
    return folder


def test_overwrite_is_refused_naming_a_users_file_inside_a_listed_folder_and_deletes_nothing(tmp_path, capsys):
    """--overwrite deleted tensorboard/, site_state/ and deploy/ whole, with a user's file put inside."""
    folder = _finished_with(tmp_path / "q", "tensorboard/notes.txt")
    before = _tree(folder)
    assert main(["run", "--out", str(folder), "--overwrite", *SMOKE]) == 2
    err = _error(capsys)
    assert "multimed-fl did not write tensorboard/notes.txt there" in err and "nothing was deleted" in err
    assert _tree(folder) == before


@pytest.mark.parametrize(
    ("users_file", "named"),
    [
        ("site_state/notes.txt", "site_state/notes.txt"),
        ("site_state/site_00/round_00001.npz.bak", "site_state/site_00/round_00001.npz.bak"),
        ("site_state/site_00/analysis/epsilon.csv", "site_state/site_00/analysis"),  # not looked into
        ("deploy/notes.txt", "deploy/notes.txt"),
        ("deploy/pki/my_ca.key", "deploy/pki/my_ca.key"),
        ("deploy/logs/notes.md", "deploy/logs/notes.md"),
        ("deploy/sites/site_00/arrays/mine.csv", "deploy/sites/site_00/arrays/mine.csv"),
        ("tensorboard/events.out.tfevents.1.d/mine", "tensorboard/events.out.tfevents.1.d"),  # a folder, not a file
    ],
)
def test_clearing_checks_every_listed_folder_before_deleting_anything(tmp_path, users_file, named):
    folder = _finished_with(tmp_path / "q", users_file)
    before = _tree(folder)
    with pytest.raises(RunFolderError, match=rf"but multimed-fl did not write {re.escape(named)} there"):
        check_out_dir(folder, overwrite=True)
    with pytest.raises(RunFolderError, match="nothing was deleted"):
        clear_run_outputs(folder)
    assert _tree(folder) == before


def test_what_the_framework_writes_inside_its_folders_is_cleared(tmp_path):
    folder = tmp_path / "q"
    _finished_run(folder)
    record_outputs(folder, "deploy")
    _demo_attempt(folder / "deploy")
    _framework_temp(folder / "site_state" / "site_00", "round_00002.npz", os.getpid())
    (folder / "tensorboard" / "events.out.tfevents.1796662499.vm.21619.0").write_bytes(b"events")
    check_out_dir(folder, overwrite=True)
    assert sorted(clear_run_outputs(folder)) == sorted([*RUN_OUTPUTS, "deploy"])
    assert sorted(os.listdir(folder)) == [MANIFEST_FILE]


def test_a_setup_folder_holding_a_users_file_is_not_replaced(tmp_path):
    folder = tmp_path / "demo"
    fresh_setup_folder(folder, "deploy")
    _demo_attempt(folder / "deploy")
    (folder / "deploy" / "pki" / "hospital_b.pub").write_text("a key a user saved here")
    before = _tree(folder)
    with pytest.raises(RunFolderError, match=r"did not write deploy/pki/hospital_b.pub there"):
        fresh_setup_folder(folder, "deploy")
    assert _tree(folder) == before


@pytest.mark.parametrize("left", ["interrupted", "users_file", "inside_deploy"])
def test_the_demo_refuses_a_folder_before_deleting_deploy_or_starting_anything(tmp_path, left, monkeypatch):
    """deploy_demo checked only summary.json, then deleted a listed deploy/ and started processes."""
    from federated.engines.deployment import demo

    started = []
    monkeypatch.setattr(demo, "LoopbackFederation", lambda *a, **k: started.append(a))
    folder = tmp_path / "demo"
    fresh_setup_folder(folder, "deploy")
    _demo_attempt(folder / "deploy")
    if left == "interrupted":
        record_outputs(folder, "checkpoint.npz", "config.yaml")
        (folder / "checkpoint.npz").write_bytes(b"round 2")
        (folder / "config.yaml").write_text("seed: 0\n")
        refused = r"holds an interrupted run"
    elif left == "users_file":
        (folder / "notes.txt").write_text("mine")
        refused = r"files multimed-fl did not write \(notes.txt\)"
    else:
        (folder / "deploy" / "notes.txt").write_text("mine")
        refused = r"did not write deploy/notes.txt there"
    before = _tree(folder)
    with pytest.raises(RunFolderError, match=refused):
        demo.deploy_demo(2, folder, ["scale=smoke", "rounds=1"], say=lambda line: None)
    assert _tree(folder) == before and started == []


def test_finding2_a_users_run_lock_without_a_pid_is_never_deleted(tmp_path):
    lock = tmp_path / LOCK_FILE
    lock.write_text("my lock notes\n")
    old = os.stat(lock).st_mtime - 60
    os.utime(lock, (old, old))
    with pytest.raises(RunFolderError, match="holds no PID"):
        RunLock(tmp_path).acquire()
    assert lock.read_text() == "my lock notes\n"


# ------------------------------------------------------------ finding 7: symbolic links --


@pytest.mark.parametrize("overwrite", [False, True])
def test_finding7_a_tensorboard_link_is_refused_never_followed(tmp_path, capsys, overwrite):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("not the run's")
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    before, outside = _tree(folder), _tree(elsewhere)
    assert main(["run", "--out", str(folder), *(["--overwrite"] if overwrite else []), *SMOKE]) == 2
    err = _error(capsys)
    assert f"{folder / 'tensorboard'} is a symbolic link (to {elsewhere})" in err and "never follows" in err
    assert _tree(folder) == before and _tree(elsewhere) == outside


@pytest.mark.parametrize("name", [*RUN_OUTPUTS, MANIFEST_FILE, "deploy"])
def test_finding7_every_place_a_run_writes_refuses_a_link(tmp_path, name):
    target = tmp_path / "target"
    target.mkdir()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / name).symlink_to(target)
    for check in (lambda: check_out_dir(folder, overwrite=True), lambda: check_resumable(folder)):
        with pytest.raises(RunFolderError, match=rf"{re.escape(str(folder / name))} is a symbolic link"):
            check()
    with pytest.raises(RunFolderError, match="symbolic link"):
        record_outputs(folder, name if name != MANIFEST_FILE else "summary.json")
    assert not any(target.iterdir())


def test_finding7_a_sites_state_folder_as_a_link_is_refused_on_resume(tmp_path):
    folder = tmp_path / "run"
    (folder / "site_state").mkdir(parents=True)
    (folder / "checkpoint.npz").write_bytes(b"round 1")
    (folder / "site_state" / "site_00").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(RunFolderError, match=r"site_state/site_00 is a symbolic link"):
        check_resumable(folder)


# -------------------------------------------- finding 7: killed before its first checkpoint --


def _stopped_before_checkpoint(folder: Path) -> Path:
    """What a run killed while writing its first checkpoint leaves (listed in its manifest)."""
    folder.mkdir(parents=True)
    record_outputs(folder, "corpus.json", "checkpoint.npz", "site_state", "config.yaml", "tensorboard")
    (folder / "site_state" / "site_00").mkdir(parents=True)
    (folder / "tensorboard").mkdir()
    (folder / "site_state" / "site_00" / "round_00001.npz").write_bytes(b"a site's round 1")
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "corpus.json").write_text("{}")
    _framework_temp(folder, "checkpoint.npz", _dead_pid())
    return folder


def test_finding7_run_and_resume_say_the_same_about_a_run_without_a_checkpoint(tmp_path, capsys):
    folder = _stopped_before_checkpoint(tmp_path / "k")
    before = _tree(folder)
    assert main(["run", "--out", str(folder), *SMOKE]) == 2
    fresh = _error(capsys)
    assert main(["run", "--resume", str(folder)]) == 2
    resumed = _error(capsys)
    assert fresh == resumed
    assert "stopped before its first checkpoint" in fresh and "nothing to resume" in fresh
    assert f"`multimed-fl run --out {folder} --overwrite" in fresh
    assert _tree(folder) == before


def test_finding7_without_a_manifest_both_say_what_to_remove(tmp_path, capsys):
    folder = _stopped_before_checkpoint(tmp_path / "k")
    (folder / MANIFEST_FILE).unlink()
    assert main(["run", "--out", str(folder), *SMOKE]) == 2
    fresh = _error(capsys)
    assert main(["run", "--resume", str(folder)]) == 2
    assert fresh == _error(capsys)
    assert "remove them yourself" in fresh and "--overwrite [" not in fresh


_KILLED_WRITING_CHECKPOINT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import federated.server.checkpoint as checkpoint
    from federated.core.io import atomic_write
    from federated.app.cli import main

    def killed(out_dir, ckpt):  # SIGKILL half-way through writing the first checkpoint
        def half(tmp):
            tmp.write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write(Path(out_dir) / checkpoint.CHECKPOINT_FILE, half)

    checkpoint.save_checkpoint = killed
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_finding7_a_run_killed_writing_its_first_checkpoint_starts_again_as_told(tmp_path, capsys):
    folder = tmp_path / "k"
    args = ["run", "--out", str(folder), "--no-progress", "scale=smoke", "rounds=2", "engine.checkpoint_every=1"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITING_CHECKPOINT, *args], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    temps = [p.name for p in folder.iterdir() if temp_writer(p.name)]
    assert len(temps) == 1 and temps[0].endswith("-checkpoint.npz") and stale_temp(temps[0])
    assert main(["run", "--out", str(folder), *SMOKE]) == 2
    fresh = _error(capsys)
    assert main(["run", "--resume", str(folder)]) == 2
    assert _error(capsys) == fresh and "stopped before its first checkpoint" in fresh
    told = re.search(r"`multimed-fl run --out (\S+) --overwrite \[key=value \.\.\.\]`", fresh)
    assert told and told[1] == str(folder)
    assert main(["run", "--out", told[1], "--overwrite", *SMOKE]) == 0
    assert json.loads((folder / "summary.json").read_text())["rounds_completed"] == 1
    assert not [p for p in folder.iterdir() if temp_writer(p.name)]  # the dead writer's, removed
