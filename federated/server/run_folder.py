"""The output folder of a run: whose it is, and one run at a time in it.

A fresh run refuses a folder that holds another run (finished: summary.json; interrupted: a
checkpoint or site states, which `--resume` continues) or files multimed-fl did not write, unless
it is told to overwrite. Overwriting replaces only what the framework wrote: a file it did not write
is never deleted or replaced, with or without --overwrite (the folder check names them instead).

A lock file (run.lock, created with O_EXCL, holding the run's PID) keeps a second run out of a folder
in use: it fails at once, naming the first run's PID. A lock whose process is gone (a killed run)
is taken over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from federated.core.protocol import SITE_STATE_DIR

LOCK_FILE = "run.lock"
SUMMARY_FILE = "summary.json"
# What a run writes into its folder (checkpoint files are recognised by their prefix, so the
# checkpoint format may change without making old run folders look foreign).
CORPUS_RECORD = "corpus.json"  # the corpus a run started on (path, fingerprint): --resume checks it
RUN_OUTPUTS = (
    "config.yaml",
    CORPUS_RECORD,
    "metrics.parquet",
    "final_model.npz",
    "tensorboard",
    SITE_STATE_DIR,
    SUMMARY_FILE,
)
CHECKPOINT_PREFIX = "checkpoint"
# Written before the run itself starts: the deployment demo's keys, logs and run config.
SETUP_ENTRIES = ("deploy",)
# A lock younger than this without a PID in it is being written now, not stale.
_UNWRITTEN_LOCK_GRACE_S = 10.0


class RunFolderError(RuntimeError):
    """The output folder cannot take this run; the message names the folder and what is in it."""


def _is_temp(name: str) -> bool:
    """federated.core.io's temporary files (.<name>.tmp-<hex>) and temp folders of an interrupted write."""
    return name.startswith(".") and ".tmp" in name


def is_framework_entry(name: str) -> bool:
    """Whether a top-level entry of a run folder is one multimed-fl writes."""
    return (
        name in RUN_OUTPUTS
        or name in SETUP_ENTRIES
        or name == LOCK_FILE
        or name.startswith(CHECKPOINT_PREFIX)
        or _is_temp(name)
    )


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding another run, or files multimed-fl did not write, unless overwrite;
    a run folder's own files are then replaced, anything else is left untouched."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RunFolderError(f"--out {out_dir} is a file, not a folder")
    names = sorted(os.listdir(out_dir))
    checkpoints = [n for n in names if n.startswith(CHECKPOINT_PREFIX)]
    run_files = [n for n in names if n in RUN_OUTPUTS or n in checkpoints]
    foreign = [n for n in names if not is_framework_entry(n)]
    if overwrite:
        return
    if SUMMARY_FILE in names:
        raise RunFolderError(
            f"{out_dir} already holds a finished run (summary.json); choose another --out or pass --overwrite"
        )
    if checkpoints or SITE_STATE_DIR in names:
        raise RunFolderError(
            f"{out_dir} holds an interrupted run ({_listing(run_files)}); continue it with "
            f"`multimed-fl run --resume {out_dir}`, choose another --out, or pass --overwrite "
            "(which deletes its checkpoint and site states)"
        )
    if run_files:
        raise RunFolderError(
            f"{out_dir} holds another run's outputs ({_listing(run_files)}); choose another --out or pass --overwrite"
        )
    if foreign:
        raise RunFolderError(
            f"{out_dir} holds files multimed-fl did not write ({_listing(foreign)}); choose an empty or new "
            "folder, or pass --overwrite (files it did not write are left untouched)"
        )


def remove_stale_temps(out_dir: Path) -> list[str]:
    """Remove the temporary files and folders of a write that was killed half-way (a checkpoint, a
    site state, the summary: federated.core.io writes beside the target, then renames). Called with
    the folder's lock held, so no live write of this run folder can own one. Returns what it removed,
    relative to out_dir."""
    state = out_dir / SITE_STATE_DIR
    folders = [out_dir, state, *(sorted(p for p in state.iterdir() if p.is_dir()) if state.is_dir() else [])]
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if not _is_temp(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(str(entry.relative_to(out_dir)))
    return removed


def clear_run_outputs(out_dir: Path) -> None:
    """Remove an earlier run's logs, checkpoint and site states (a fresh run must not mix with them);
    only entries the framework writes, never anything else in the folder."""
    for name in os.listdir(out_dir):
        path = out_dir / name
        if name in ("tensorboard", SITE_STATE_DIR) or (name.startswith(CHECKPOINT_PREFIX) and path.is_dir()):
            shutil.rmtree(path, ignore_errors=True)
        elif name in (SUMMARY_FILE, "final_model.npz", "metrics.parquet") or name.startswith(CHECKPOINT_PREFIX):
            path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


class RunLock:
    """An exclusive lock on a run folder: `with RunLock(dir):` (or acquire()/release())."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._created_dir = False
        self._held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return True

    def _stale(self) -> bool:
        """Whether the existing lock belongs to no live process (else RunFolderError naming it)."""
        pid = _read_pid(self.path)
        if pid is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True
            if age < _UNWRITTEN_LOCK_GRACE_S:
                raise RunFolderError(f"{self.out_dir} is being taken by another run right now ({self.path})")
            return True
        if _pid_alive(pid):
            raise RunFolderError(
                f"{self.out_dir} is in use by another run (PID {pid}, lock file {self.path}); "
                "wait for it or choose another --out (if no such run is in it, remove the lock file)"
            )
        return True

    def acquire(self) -> RunLock:
        self._created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self._create():
            if self._stale():  # its process is gone: take it over
                self.path.unlink(missing_ok=True)
            if not self._create():
                raise RunFolderError(
                    f"{self.out_dir} was just taken by another run (PID {_read_pid(self.path)}, lock file {self.path})"
                )
        self._held = True
        return self

    def release(self) -> None:
        """Remove the lock if it is still this process's; a folder this lock created and nothing
        else filled is removed too (a run refused before writing leaves no trace)."""
        if not self._held:
            return
        self._held = False
        if _read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)
        if self._created_dir:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                self.out_dir.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
