"""The key that authenticates the state a run reads back (checkpoints, site states).

A state file carries an HMAC-SHA256 of its content under this key, so a file edited after it was
written cannot be made to pass by recomputing a hash: that needs the key. The key is one per user,
kept outside every run folder and never sent anywhere: `$MULTIMED_FL_STATE_KEY` names its file
(tests, services, CI), else `$XDG_CONFIG_HOME/multimed-fl/state.key` (default
`~/.config/multimed-fl/state.key`). It is created on first use (32 random bytes, mode 0600); a key
file that others could read or write, that is not a regular file, that another user owns or that
is not 32 bytes is refused, naming it and the fix. Whoever can write the key can forge state.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

KEY_ENV = "MULTIMED_FL_STATE_KEY"
KEY_BYTES = 32  # HMAC-SHA256's block-size-independent strength: a 256-bit key
KEY_NAME = Path("multimed-fl") / "state.key"


class StateKeyError(ValueError):
    """The state key cannot be used; the message names its file and what to do."""


def key_path() -> Path:
    """Where this user's state key lives: $MULTIMED_FL_STATE_KEY, else the XDG config folder."""
    named = os.environ.get(KEY_ENV, "")
    if named:
        return Path(named).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config) if config and Path(config).is_absolute() else Path.home() / ".config"
    return base / KEY_NAME


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key (tells 'another key' from 'edited'); reveals nothing of it."""
    return hashlib.sha256(b"multimed-fl state key id\0" + key).hexdigest()[:16]


def load_key(create: bool = True) -> bytes:
    """This user's state key; created (when `create`) if there is none yet. StateKeyError otherwise."""
    path = key_path()
    try:
        return _read(path)
    except FileNotFoundError:
        if not create:
            raise StateKeyError(
                f"no state key at {path}: state files are authenticated with this user's key, created "
                f"when a run first writes one (set {KEY_ENV} to use another key file)"
            ) from None
    _create(path)
    return _read(path)


def check_key() -> Path:
    """Load (or create) this user's key now, so that a key that cannot be used is refused by name
    before a run trains, not at its first checkpoint k rounds later. Returns its path."""
    load_key(create=True)
    return key_path()


def _read(path: Path) -> bytes:
    # O_NONBLOCK: a FIFO at the key's path must be refused, not waited on
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        _check(path, st)
        key = os.read(fd, KEY_BYTES + 1) if st.st_size == KEY_BYTES else b""
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise StateKeyError(
            f"state key {path} holds {st.st_size} bytes, not {KEY_BYTES}: it is not a MultiMed-FL state key. "
            f"Point {KEY_ENV} at the right file, or move this one away so that a new key is created (state "
            f"written with the old key can then no longer be resumed)"
        )
    return key


def _check(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise StateKeyError(f"state key {path} is not a regular file: point {KEY_ENV} at the key file itself")
    getuid = getattr(os, "getuid", None)
    if getuid is not None and st.st_uid != getuid():
        raise StateKeyError(
            f"state key {path} is owned by uid {st.st_uid}, not by you (uid {getuid()}): a key another user "
            f"controls lets them forge your state; use your own (unset {KEY_ENV}, or chown it)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise StateKeyError(
            f"state key {path} is readable or writable by others (mode {mode:04o}): anyone who can read it "
            f"can forge a checkpoint or site state. Run: chmod 600 {path}"
        )


def _create(path: Path) -> None:
    """Write a new random key at `path`, mode 0600. Race-free: the key is complete before it
    appears (a hard link, which fails if another process made one first; theirs is then used)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.multimed-fl-new-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # another process created it first: use theirs
        except OSError:  # a file system without hard links: a rename, which a racing creator may overwrite
            if path.exists():
                return
            os.replace(tmp, path)
        logging.getLogger(__name__).info("created the state key %s (mode 0600)", path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
