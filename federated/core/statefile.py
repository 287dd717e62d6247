"""Files that hold state a run reads back later (server checkpoints, site states): arrays plus
JSON, never pickle, because a pickle runs code when it is loaded.

One `.npz` file (numpy's zip of `.npy` members, always read with allow_pickle=False) holds:
- `meta`: UTF-8 JSON {"format": "multimed-fl/<kind>", "version": N, "sha256": hex}
- `state`: UTF-8 JSON of the state tree, where an array is {"__array__": i}
- `a0`, `a1`, ...: the arrays, numbered (so parameter names never clash with member names)

The sha256 covers format, version, the state JSON and every array's dtype, shape and bytes:
a file changed or damaged after it was written is refused as a "hash mismatch". The state tree
holds JSON values, tuples, bytes, arrays, and only the dataclasses and enums the reader names
(`types`): reading never constructs anything else. NaN and infinities are kept exactly (JSON's
NaN/Infinity tokens, which Python's json reads back). A file is written atomically.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from federated.core.io import atomic_write

_ZIP_MAGIC = b"PK\x03\x04"
_TAGS = ("__array__", "__tuple__", "__bytes__", "__dataclass__", "__enum__")


class StateFileError(ValueError):
    """A state file that cannot be read back; the message names the file and says why."""


def _encode(value: Any, arrays: list[np.ndarray], where: str) -> Any:
    """`value` as a JSON tree, its arrays appended to `arrays` (TypeError naming the path otherwise)."""
    if isinstance(value, enum.Enum):  # before str and int: str and int enums are both
        return {"__enum__": type(value).__name__, "value": _encode(value.value, arrays, where)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where}: object arrays cannot be stored without pickle")
        arrays.append(np.ascontiguousarray(value))
        return {"__array__": len(arrays) - 1}
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: _encode(getattr(value, f.name), arrays, f"{where}.{f.name}") for f in dataclasses.fields(value)
        }
        return {"__dataclass__": type(value).__name__, "fields": fields}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or k.startswith("__")]
        if bad:
            raise TypeError(f"{where}: dict keys must be strings not starting with '__' (got {bad[0]!r})")
        return {k: _encode(v, arrays, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a state file")


def _decode(node: Any, arrays: list[np.ndarray], types: Mapping[str, type], where: str) -> Any:
    """The inverse of _encode; ValueError naming the path for anything it does not know."""
    if isinstance(node, list):
        return [_decode(v, arrays, types, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    tag = next((t for t in _TAGS if t in node), None)
    if tag is None:
        return {k: _decode(v, arrays, types, f"{where}.{k}") for k, v in node.items()}
    if tag == "__array__":
        index = node["__array__"]
        if not isinstance(index, int) or not 0 <= index < len(arrays):
            raise ValueError(f"{where}: array {index!r} is not in the file")
        return arrays[index]
    if tag == "__tuple__":
        return tuple(_decode(node["__tuple__"], arrays, types, where))
    if tag == "__bytes__":
        return base64.b64decode(str(node["__bytes__"]), validate=True)
    cls = types.get(str(node[tag]))
    if cls is None:
        raise ValueError(f"{where}: type {node[tag]!r} is not one this file may hold")
    if tag == "__enum__":
        if not issubclass(cls, enum.Enum):
            raise ValueError(f"{where}: {node[tag]!r} is not an enum")
        return cls(node["value"])
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"{where}: {node[tag]!r} is not a dataclass")
    fields = node.get("fields")
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: {node[tag]!r} has no fields")
    return cls(**{k: _decode(v, arrays, types, f"{where}.{k}") for k, v in fields.items()})


def _digest(fmt: str, version: int, state: bytes, arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256(f"{fmt}\n{version}\n".encode())
    h.update(len(state).to_bytes(8, "little") + state)
    for i, a in enumerate(arrays):
        h.update(f"\n{i}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _as_bytes(text: str | bytes) -> np.ndarray:
    return np.frombuffer(text.encode() if isinstance(text, str) else text, dtype=np.uint8)


def write_state_file(path: Path, kind: str, version: int, state: Any) -> Path:
    """Write `state` to `path` (an .npz) atomically; TypeError naming the part that cannot be stored."""
    arrays: list[np.ndarray] = []
    tree = _encode(state, arrays, kind)
    state_json = json.dumps(tree, separators=(",", ":")).encode()
    fmt = f"multimed-fl/{kind}"
    meta = {"format": fmt, "version": version, "sha256": _digest(fmt, version, state_json, arrays)}
    members = {"meta": _as_bytes(json.dumps(meta)), "state": _as_bytes(state_json)}
    members.update({f"a{i}": a for i, a in enumerate(arrays)})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **members)

    atomic_write(path, write)
    return path


def _members(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every member of the npz at `path`, read without pickle."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        raise StateFileError(f"{path} is not a {what} (not an npz archive; it is not loaded)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StateFileError(f"{path} is not a {what}: unreadable ({type(e).__name__}: {e})") from None


def _meta(path: Path, members: dict[str, np.ndarray], fmt: str, what: str) -> dict[str, Any]:
    raw = members.get("meta")
    try:
        meta = json.loads(raw.tobytes()) if raw is not None and raw.dtype == np.uint8 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise StateFileError(f"{path} is not a {what} (no '{fmt}' header)")
    return meta


def read_state_file(path: Path, kind: str, version: int, types: Mapping[str, type] | None = None) -> Any:
    """The state written by write_state_file; StateFileError naming `path` and the reason when the
    file is not one of `kind`, is of another version, or its content hash does not match."""
    path = Path(path)
    what = f"MultiMed-FL {kind.replace('-', ' ')}"
    if not path.is_file():
        raise StateFileError(f"{path} does not exist")
    members = _members(path, what)
    fmt = f"multimed-fl/{kind}"
    meta = _meta(path, members, fmt, what)
    if meta.get("version") != version:
        raise StateFileError(
            f"{path}: {what} version {meta.get('version')!r} unsupported (this release reads {version})"
        )
    state = members.get("state")
    count = len(members) - 2
    arrays = [members.get(f"a{i}") for i in range(count)]
    if state is None or state.dtype != np.uint8 or any(a is None for a in arrays):
        raise StateFileError(f"{path} is not a {what} (members missing)")
    present = [a for a in arrays if a is not None]
    state_json = state.tobytes()
    if _digest(fmt, version, state_json, present) != meta.get("sha256"):
        raise StateFileError(f"{path}: hash mismatch (the file was changed or damaged after it was written)")
    try:
        return _decode(json.loads(state_json), present, types or {}, kind)
    except (ValueError, TypeError, KeyError) as e:
        raise StateFileError(f"{path} is not a {what}: {e}") from None
