"""File helpers: atomic writes (a reader, or a crash, never sees a half-written output file)
and reading the project's own YAML files (ingest specs, study definitions) with clear errors.

A temporary file or folder is named `.multimed-fl-tmp-<host>-<pid>-<hex>-<target name>`: a name no
user would choose, carrying its writer, so a later run removes only its own temporaries and only
those whose writer is gone (`stale_temp`), never a user's `.draft.tmp`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".multimed-fl-tmp-"
# a shared disk: a PID means something only on the host that wrote it
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(
    rf"^{re.escape(TEMP_PREFIX)}(?P<host>[0-9a-f]{{8}})-(?P<pid>[0-9]{{1,10}})-[0-9a-f]{{12}}-(?P<target>.+)$"
)


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside `path`, carrying this host and process."""
    return path.with_name(f"{TEMP_PREFIX}{HOST_TAG}-{os.getpid()}-{secrets.token_hex(6)}-{path.name}")


def temp_writer(name: str) -> tuple[str, int] | None:
    """(host tag, PID) of a temporary named by temp_name; None for any other name."""
    m = _TEMP_NAME.match(name)
    return (m["host"], int(m["pid"])) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except (OverflowError, ValueError):  # no such PID can exist: cannot tell, so keep what it wrote
        return True
    return True


def stale_temp(name: str) -> bool:
    """Whether `name` is a temporary of this framework whose writer, on this host, is gone (a write
    killed half-way). Another host's temporaries are never judged: its PIDs mean nothing here."""
    writer = temp_writer(name)
    return writer is not None and writer[0] == HOST_TAG and not pid_alive(writer[1])


def _beside(path: Path, create: Callable[[Path], None]) -> Path:
    """A new, uniquely named hidden entry beside `path`, made by create(name) (which must fail with
    FileExistsError if the name is taken, as O_EXCL and mkdir do)."""
    while True:
        candidate = temp_name(path)
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate


def _new_file(name: Path) -> None:
    # mode 0o666 minus the umask: the permissions an ordinary open(name, "w") gives, so a
    # results file is readable by the group where the user's umask says so. (tempfile.mkstemp
    # would make it 0600.) Secrets are written by federated/engines/pki.py, not through here.
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place.

    The final file gets the permissions an ordinary open() would give (0666 minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, _new_file)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (see atomic_write)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def temp_dir_beside(path: Path) -> Path:
    """A new empty hidden folder beside `path`, to fill and then rename onto `path`.

    Its permissions are those of an ordinary mkdir (0777 minus the umask), so the renamed
    folder is as readable as any other output; tempfile.mkdtemp would make it 0700.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _beside(path, lambda name: name.mkdir(0o777))


def json_safe(value: Any) -> Any:
    """NaN/inf become null: JSON has no NaN, and a reader's json.load must not choke."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def read_yaml_mapping(path: Path, valid_keys: set[str], error: type[Exception], what: str) -> dict[str, Any]:
    """A YAML file that must be a mapping with only `valid_keys`; else `error` naming the file."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: {what} is a mapping of keys ({', '.join(sorted(valid_keys))})")
    unknown = sorted(set(raw) - valid_keys)
    if unknown:
        raise error(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(valid_keys))}")
    return raw
