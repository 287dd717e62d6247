"""The output folder of a run: whose it is, what in it the framework wrote, one run at a time in it.

A run lists every top-level entry it writes in `run_manifest.json` (written atomically, before the
entry itself, so a run killed at any point leaves nothing unlisted). `--overwrite` deletes exactly
the listed entries, never anything by name or prefix: an entry no manifest lists (a user's, or a run
of a release before the manifest) is never deleted or replaced; a new run that would write it is
refused, naming it. A listed folder (tensorboard/, site_state/, deploy/) is deleted only when it
holds nothing but what the framework writes there (INSIDE): a user's file put inside one is named
and nothing at all is deleted. A folder that holds another run (finished: summary.json; interrupted: a
checkpoint, which `--resume` continues; one that stopped before its first checkpoint) or a user's
files is refused unless told to overwrite. A symbolic link where a run writes is refused by name,
never followed.

Temporary files are federated.core.io's (`.multimed-fl-tmp-<host>-<pid>-...`): a run removes only
those whose writer is dead, and only once it holds the lock and the folder has been accepted.

A lock file (run.lock, created with O_EXCL, holding the run's PID) keeps a second run out of a folder
in use: it fails at once, naming the first run's PID. A lock whose process is gone (a killed run)
is taken over; a run.lock holding no PID is not the framework's and is left alone (refused by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeAlias

from federated.core.io import pid_alive, stale_temp, temp_writer, write_json
from federated.core.protocol import SITE_STATE_DIR

LOCK_FILE = "run.lock"
MANIFEST_FILE = "run_manifest.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.npz"  # as federated/server/checkpoint.py names it
LEGACY_CHECKPOINT = "checkpoint.pkl"  # releases before checkpoint version 3 (never loaded, never deleted)
CORPUS_RECORD = "corpus.json"  # the corpus a run started on (path, fingerprint): --resume checks it
# What a run writes into its folder, by name: the only names a manifest may list.
RUN_OUTPUTS = (
    "config.yaml",
    CORPUS_RECORD,
    "metrics.parquet",
    "final_model.npz",
    "tensorboard",
    SITE_STATE_DIR,
    SUMMARY_FILE,
    CHECKPOINT_FILE,
)
# Written before the run itself starts: the deployment demo's keys, logs and run config.
SETUP_ENTRIES = ("deploy",)
WRITTEN = (*RUN_OUTPUTS, *SETUP_ENTRIES)
FOLDERS = frozenset({"tensorboard", SITE_STATE_DIR, "deploy"})

# What the framework writes inside each listed folder, so --overwrite can tell a user's file put there:
# (name pattern, FILE | WHOLE | the rules of a sub-folder). WHOLE: a folder written by a process the
# framework started, whose content is that program's (Flower's FLWR_HOME, a corpus build's temporary).
FILE, WHOLE = "file", "whole"
_Pattern: TypeAlias = "str | Callable[[str], bool]"
_Rules: TypeAlias = "tuple[tuple[_Pattern, str | _Rules], ...]"
_IO_TEMP: tuple[_Pattern, str] = (lambda name: temp_writer(name) is not None, FILE)  # federated.core.io's temporaries
_CORPUS: _Rules = (  # federated/data/format.py: write_corpus
    (r"spec\.json|manifest\.parquet", FILE),
    (r"arrays|targets", ((r"[^/]+\.npy", FILE),)),
)
INSIDE: dict[str, _Rules] = {
    # tracking.TensorBoardLogger: torch's SummaryWriter, scalars only (one events file per process)
    "tensorboard": ((r"events\.out\.tfevents\..+", FILE),),
    # clients/site_state.py: <site>/round_NNNNN.npz, written atomically
    SITE_STATE_DIR: ((r"[^/]+", ((r"round_[0-9]+\.npz", FILE), _IO_TEMP)),),
    # federated/engines/deployment (demo.py, federation.py) and federated/engines/pki.py
    "deploy": (
        (r"run_config\.toml", FILE),
        (r"superlink\.db(-journal|-wal|-shm)?", FILE),
        (r"logs", ((r"(superlink|flwr-cli|run|supernode-.+|clientapp-.+)\.log", FILE),)),
        (r"pki", ((r"ca\.(crt|key)|server\.(pem|key)|node_[0-9]+(\.pub)?", FILE), (r"\..+\.tmp-[0-9a-f]{16}", FILE))),
        (r"flwr_home", WHOLE),
        (r"sites", ((r"\..+\.tmp-[0-9a-f]{8}-[0-9]+-[0-9a-f]{8}", WHOLE), (r"[^.][^/]*", _CORPUS))),
    ),
}
_MANIFEST_FORMAT = "multimed-fl run folder"
_MANIFEST_VERSION = 1
# A lock younger than this without a PID in it is being written now.
_UNWRITTEN_LOCK_GRACE_S = 10.0


class RunFolderError(RuntimeError):
    """The output folder cannot take this run; the message names the folder and the entry."""


def is_framework_entry(name: str) -> bool:
    """Whether a top-level entry's name is one multimed-fl writes (it may still be a user's: only the
    manifest says whether this folder's run wrote it)."""
    return name in WRITTEN or name in (LOCK_FILE, MANIFEST_FILE, LEGACY_CHECKPOINT) or temp_writer(name) is not None


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ------------------------------------------------------------------------------- the manifest --
_MANIFEST_HELP = (
    "it lists what multimed-fl wrote in this folder, and --overwrite deletes only that; remove it and "
    "the folder's entries are treated as an earlier release's (never deleted)"
)


def read_manifest(out_dir: Path) -> frozenset[str] | None:
    """The entries this folder's runs listed as written; None when the folder has no manifest (new, or
    a run of an earlier release). RunFolderError naming the file when it is not one."""
    path = Path(out_dir) / MANIFEST_FILE
    _refuse_links(Path(out_dir), [MANIFEST_FILE])
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} cannot be read ({type(e).__name__}: {e}); {_MANIFEST_HELP}") from None
    entries = raw.get("entries") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or raw.get("format") != _MANIFEST_FORMAT
        or raw.get("version") != _MANIFEST_VERSION
        or not isinstance(entries, list)
    ):
        raise RunFolderError(
            f"{path} is not a {_MANIFEST_FORMAT} manifest (version {_MANIFEST_VERSION}); {_MANIFEST_HELP}"
        )
    unknown = [e for e in entries if e not in WRITTEN]
    if unknown:  # an edited manifest must not make --overwrite delete a user's file
        raise RunFolderError(
            f"{path} lists {_listing(map(repr, unknown))}, which multimed-fl never writes; {_MANIFEST_HELP}"
        )
    return frozenset(entries)


def record_outputs(out_dir: Path, *names: str) -> None:
    """List `names` in the folder's manifest before they are written. A folder that is already there
    unlisted (a resumed run of an earlier release) stays unlisted: the run writes into it but did not
    make it. A file is listed: the write replaces it whole. A symbolic link is refused by name."""
    out_dir = Path(out_dir)
    bad = [n for n in names if n not in WRITTEN]
    if bad:
        raise ValueError(f"{bad} are not run folder entries ({', '.join(WRITTEN)})")
    _refuse_links(out_dir, names)
    listed = read_manifest(out_dir) or frozenset()
    new = {n for n in names if n not in listed and not (n in FOLDERS and (out_dir / n).exists())}
    if new:
        _write_manifest(out_dir, listed | new)


def _write_manifest(out_dir: Path, entries: Iterable[str]) -> None:
    write_json(
        out_dir / MANIFEST_FILE,
        {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "entries": sorted(entries)},
    )


# ---------------------------------------------------------------------------- folder checks --


def _refuse_links(out_dir: Path, names: Iterable[str]) -> None:
    for name in names:
        path = out_dir / name
        if path.is_symlink():
            raise RunFolderError(
                f"{path} is a symbolic link (to {os.readlink(path)}); multimed-fl writes its {name} there and "
                "never follows a link out of the run folder: replace it with a real file or folder, or choose "
                "another --out"
            )


def _check_links(out_dir: Path) -> None:
    """Every place a run writes, and each site's state folder, must not be a symbolic link."""
    _refuse_links(out_dir, (*WRITTEN, MANIFEST_FILE))
    state = out_dir / SITE_STATE_DIR
    if state.is_dir():
        _refuse_links(state, sorted(os.listdir(state)))


def _matches(pattern: _Pattern, name: str) -> bool:
    return pattern(name) if callable(pattern) else re.fullmatch(pattern, name) is not None


def _foreign(folder: Path, rules: _Rules, rel: str) -> list[str]:
    """Entries under `folder` (named relative to the run folder) that `rules` do not say the framework
    writes; a link never is one, and what is not the framework's is not looked into."""
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        kind = next((k for pattern, k in rules if _matches(pattern, entry.name)), None)
        name = f"{rel}/{entry.name}"
        if kind is None or entry.is_symlink():
            found.append(name)
        elif kind == FILE:
            found += [] if entry.is_file() else [name]
        elif not entry.is_dir():
            found.append(name)
        elif kind != WHOLE:
            assert isinstance(kind, tuple)
            found += _foreign(Path(entry.path), kind, name)
    return found


def not_written_here(out_dir: Path, names: Iterable[str]) -> list[str]:
    """What deleting the entries `names` would take that the framework does not write: a user's file
    inside a listed folder, or a folder where the framework writes a file (and the reverse)."""
    found = []
    for name in sorted(names):
        path = out_dir / name
        if path.is_symlink() or not path.exists():
            continue  # a link is refused by name before anything is deleted; a missing entry takes nothing
        if name in INSIDE:
            found += _foreign(path, INSIDE[name], name) if path.is_dir() else [name]
        elif path.is_dir():
            found.append(name)
    return found


def _refuse_foreign(out_dir: Path, names: Iterable[str], what: str) -> None:
    foreign = not_written_here(out_dir, names)
    if foreign:
        raise RunFolderError(
            f"{out_dir}: {what}, but multimed-fl did not write {_listing(foreign)} there (a user's files?): "
            "nothing was deleted; move them out of the run folder (or remove them yourself) and run again"
        )


def _unproven(names: Iterable[str], listed: frozenset[str]) -> list[str]:
    """Entries a new run would write or replace that no manifest says multimed-fl wrote."""
    return [n for n in names if n in RUN_OUTPUTS and n not in listed]


def _start_again(out_dir: Path, names: list[str], listed: frozenset[str]) -> str:
    """How to start a new run in the folder, in words that work for it."""
    unproven = _unproven(names, listed)
    if unproven:
        return (
            f"no {MANIFEST_FILE} here lists {_listing(unproven)} (an earlier release's run, or not "
            "multimed-fl's), so --overwrite would refuse to replace them: remove them yourself, or choose "
            "another --out"
        )
    return (
        f"`multimed-fl run --out {out_dir} --overwrite [key=value ...]` deletes exactly what the run listed "
        f"in {MANIFEST_FILE} and nothing else (its settings are in {out_dir / 'config.yaml'}), or choose "
        "another --out"
    )


def _stopped_before_checkpoint(out_dir: Path, names: list[str], listed: frozenset[str]) -> str:
    """The one message, for `run --out` and `run --resume` alike, about a run with no checkpoint."""
    run_files = [n for n in names if n in RUN_OUTPUTS]
    return (
        f"{out_dir} holds a run that stopped before its first checkpoint ({_listing(run_files)}; "
        f"no {CHECKPOINT_FILE}, so there is nothing to resume). Start it again: "
        f"{_start_again(out_dir, names, listed)}"
    )


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding another run, or files multimed-fl did not write, unless overwrite; with
    overwrite, refuse one holding entries the run would replace that no manifest lists. Symbolic links
    where a run writes are refused either way."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RunFolderError(f"--out {out_dir} is a file, not a folder")
    _check_links(out_dir)
    names = sorted(os.listdir(out_dir))
    listed = read_manifest(out_dir) or frozenset()
    if overwrite:
        unproven = _unproven(names, listed)
        if unproven:
            raise RunFolderError(
                f"{out_dir}: --overwrite deletes only what a run listed in {MANIFEST_FILE}, and nothing lists "
                f"{_listing(unproven)} (an earlier release's run, or not multimed-fl's), which a new run would "
                "replace; remove them yourself or choose another --out"
            )
        _refuse_foreign(out_dir, listed, f"--overwrite deletes what a run listed in {MANIFEST_FILE}")
        return
    run_files = [n for n in names if n in RUN_OUTPUTS or n == LEGACY_CHECKPOINT]
    foreign = [n for n in names if not is_framework_entry(n)]
    if SUMMARY_FILE in names:
        raise RunFolderError(
            f"{out_dir} already holds a finished run (summary.json); to start a new run in it: "
            f"{_start_again(out_dir, names, listed)}"
        )
    if CHECKPOINT_FILE in names or LEGACY_CHECKPOINT in names:
        raise RunFolderError(
            f"{out_dir} holds an interrupted run ({_listing(run_files)}); continue it with "
            f"`multimed-fl run --resume {out_dir}`, or start it again: {_start_again(out_dir, names, listed)}"
        )
    if run_files:
        raise RunFolderError(_stopped_before_checkpoint(out_dir, names, listed))
    if foreign:
        raise RunFolderError(
            f"{out_dir} holds files multimed-fl did not write ({_listing(foreign)}); choose an empty or new "
            "folder, or pass --overwrite (files it did not write are left untouched)"
        )


def check_resumable(out_dir: Path) -> None:
    """Refuse to resume a folder with nothing to resume (the same words `run --out` says about it) or
    with a symbolic link where the run writes; the checkpoint itself is checked by its loader."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise RunFolderError(f"--resume {out_dir}: no such folder")
    _check_links(out_dir)
    names = sorted(os.listdir(out_dir))
    if SUMMARY_FILE in names:
        raise RunFolderError(f"{out_dir} holds a finished run ({SUMMARY_FILE}): nothing to resume")
    if CHECKPOINT_FILE in names or LEGACY_CHECKPOINT in names:
        return
    if any(n in RUN_OUTPUTS for n in names):
        raise RunFolderError(_stopped_before_checkpoint(out_dir, names, read_manifest(out_dir) or frozenset()))
    raise RunFolderError(f"{out_dir} holds no run to resume (no {CHECKPOINT_FILE})")


def fresh_setup_folder(out_dir: Path, name: str) -> Path:
    """An empty `name` folder (deploy/) for what is written before the run starts: an earlier attempt's,
    listed in the manifest, is deleted; one that no manifest lists is refused by name, never deleted."""
    out_dir = Path(out_dir)
    if name not in SETUP_ENTRIES:
        raise ValueError(f"{name!r} is not a setup folder ({', '.join(SETUP_ENTRIES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    _refuse_links(out_dir, [name])
    path = out_dir / name
    if path.exists():
        if name not in (read_manifest(out_dir) or frozenset()):
            raise RunFolderError(
                f"{path} is already there and no {MANIFEST_FILE} in {out_dir} lists it as multimed-fl's (an earlier "
                "release's, or not multimed-fl's), so it is not replaced: remove it yourself, or choose another --out"
            )
        _refuse_foreign(out_dir, [name], f"an earlier attempt's {name}/ is replaced")
        shutil.rmtree(path)  # an earlier attempt's keys and logs: stale
    record_outputs(out_dir, name)
    path.mkdir()
    return path


# ------------------------------------------------------------------- clearing and temporaries --


def remove_stale_temps(out_dir: Path) -> list[str]:
    """Remove the temporaries of writes killed half-way (federated.core.io's names, whose writer on this
    host is dead) in the folder, site_state/ and each site's folder in it; nothing else. Call it with
    the folder's lock held and the folder accepted. Returns what it removed, relative to out_dir."""
    out_dir = Path(out_dir)
    state = out_dir / SITE_STATE_DIR
    folders = [out_dir]
    if state.is_dir() and not state.is_symlink():
        folders += [state, *sorted(p for p in state.iterdir() if p.is_dir() and not p.is_symlink())]
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink() or not stale_temp(entry.name):  # io never writes a link
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(str(entry.relative_to(out_dir)))
    return removed


def clear_run_outputs(out_dir: Path) -> list[str]:
    """--overwrite: delete exactly the entries the folder's manifest lists (an earlier run's outputs,
    which a fresh run must not mix with), then start an empty manifest. Returns what it deleted."""
    out_dir = Path(out_dir)
    listed = read_manifest(out_dir)
    if listed is None:
        return []
    _refuse_links(out_dir, sorted(listed))
    _refuse_foreign(out_dir, listed, f"--overwrite deletes what a run listed in {MANIFEST_FILE}")
    removed = []
    for name in sorted(listed):
        path = out_dir / name
        try:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
        except OSError as e:
            raise RunFolderError(f"--overwrite: cannot delete {path} ({e.strerror})") from None
        removed.append(name)
    _write_manifest(out_dir, ())
    return removed


# ----------------------------------------------------------------------------------- the lock --


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
        _refuse_links(self.out_dir, [LOCK_FILE])
        pid = _read_pid(self.path)
        if pid is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True
            if age < _UNWRITTEN_LOCK_GRACE_S:
                raise RunFolderError(f"{self.out_dir} is being taken by another run right now ({self.path})")
            raise RunFolderError(  # never deleted: it may be a user's file
                f"{self.path} holds no PID, so it is not a lock multimed-fl can judge; if no run is using "
                f"{self.out_dir}, remove it, or choose another --out"
            )
        if pid_alive(pid):
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
