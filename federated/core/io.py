"""File helpers: atomic writes (a reader, or a crash, never sees a half-written output file)
and reading the project's own YAML files (ingest specs, study definitions) with clear errors."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


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
