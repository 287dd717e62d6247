"""Files that hold state a run reads back later (server checkpoints, site states): arrays plus
JSON, never pickle, because a pickle runs code when it is loaded.

One `.npz` file (numpy's zip of uncompressed `.npy` members) holds:
- `meta`: UTF-8 JSON {"format": "multimed-fl/<kind>", "version": N, "auth": "hmac-sha256",
  "key_id": fingerprint of the key, "mac": hex}
- `state`: UTF-8 JSON of the state tree, where an array is {"__array__": i}
- `a0`, `a1`, ...: the arrays, numbered (so parameter names never clash with member names)

The MAC (HMAC-SHA256 under this user's key, federated/core/state_key.py) covers format, version,
the state JSON and every array's dtype, shape and bytes: a file edited after it was written, or
written under another key, is refused as "not authenticated by this user's key" (an unkeyed hash
would not do: whoever edits the file can recompute it). A file of an earlier release (an unkeyed
"sha256" in its header) is refused by name. The members are checked from the zip directory and
their .npy headers before anything is read (federated/core/npz.py): the writer stores them
uncompressed, so together they can never declare more than the file's size. The state tree
holds JSON values, tuples, bytes, arrays, and only the dataclasses and enums the reader names
(`types`): reading never constructs anything else. NaN and infinities are kept exactly (JSON's
NaN/Infinity tokens, which Python's json reads back). A file is written atomically.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from federated.core.io import atomic_write
from federated.core.npz import NpzError, SafeNpz
from federated.core.state_key import StateKeyError, key_id, key_path, load_key

_ZIP_MAGIC = b"PK\x03\x04"
_TAGS = ("__array__", "__tuple__", "__bytes__", "__dataclass__", "__enum__")
AUTH = "hmac-sha256"  # files before it carried an unkeyed "sha256" and are refused by name
_META_LIMIT = 1 << 16  # the header is a few hundred bytes of JSON


class StateFileError(ValueError):
    """A state file that cannot be read back; the message names the file and says why."""


class StateAuthError(StateFileError):
    """A state file this user cannot authenticate: no usable key here, or its MAC does not match
    (edited, or written under another key). A caller without the writer's key may skip a check."""


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


def _mac(key: bytes, fmt: str, version: int, state: bytes, arrays: list[np.ndarray]) -> str:
    """HMAC-SHA256 under the user's key of what the file says: format, version, the state JSON and
    every array's dtype, shape and bytes (so no part can be changed, dropped or reordered)."""
    h = hmac.new(key, f"{AUTH}\n{fmt}\n{version}\n".encode(), hashlib.sha256)
    h.update(len(state).to_bytes(8, "little") + state)
    for i, a in enumerate(arrays):
        h.update(f"\n{i}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)  # the bytes tobytes() gives, uncopied
    return h.hexdigest()


def _as_bytes(text: str | bytes) -> np.ndarray:
    return np.frombuffer(text.encode() if isinstance(text, str) else text, dtype=np.uint8)


def _key(create: bool, path: Path | None = None) -> bytes:
    try:
        return load_key(create=create)
    except StateKeyError as e:
        raise StateAuthError(f"{path}: cannot be authenticated: {e}" if path else str(e)) from None


def write_state_file(path: Path, kind: str, version: int, state: Any) -> Path:
    """Write `state` to `path` (an .npz) atomically, authenticated with this user's key (created on
    first use); TypeError naming the part that cannot be stored, StateFileError for an unusable key."""
    key = _key(create=True)
    arrays: list[np.ndarray] = []
    tree = _encode(state, arrays, kind)
    state_json = json.dumps(tree, separators=(",", ":")).encode()
    fmt = f"multimed-fl/{kind}"
    meta = {
        "format": fmt,
        "version": version,
        "auth": AUTH,
        "key_id": key_id(key),
        "mac": _mac(key, fmt, version, state_json, arrays),
    }
    members = {"meta": _as_bytes(json.dumps(meta)), "state": _as_bytes(state_json)}
    members.update({f"a{i}": a for i, a in enumerate(arrays)})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **members)  # stored, not compressed: what the reader requires

    atomic_write(path, write)
    return path


def _bytes_member(z: SafeNpz, name: str, limit: int) -> bytes:
    m = z.member(name)
    if m.dtype != np.uint8 or len(m.shape) != 1 or m.nbytes > limit:
        raise NpzError(f"member {name!r} is {m.dtype} {m.shape}, not UTF-8 bytes of at most {limit}")
    return z.read(name).tobytes()


def _meta(path: Path, z: SafeNpz, fmt: str, what: str) -> dict[str, Any]:
    if "meta" not in z.names:
        raise StateFileError(f"{path} is not a {what} (no '{fmt}' header)")
    try:
        meta = json.loads(_bytes_member(z, "meta", _META_LIMIT))
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise StateFileError(f"{path} is not a {what} (no '{fmt}' header)")
    return meta


def _scheme(path: Path, meta: dict[str, Any]) -> None:
    if meta.get("auth") != AUTH:
        if "sha256" in meta:
            raise StateFileError(
                f"{path} was written by an earlier MultiMed-FL release, before state files were authenticated "
                f"(it carries only an unkeyed sha256, which anyone can recompute): it is not loaded; start the "
                f"run again"
            )
        raise StateFileError(f"{path}: unknown authentication {meta.get('auth')!r} (this release writes {AUTH})")


def _authentic(path: Path, meta: dict[str, Any], key: bytes, mac: str) -> None:
    if not hmac.compare_digest(str(meta.get("mac", "")), mac):
        why = (
            "edited or damaged after it was written"
            if meta.get("key_id") == key_id(key)
            else "written by another user or machine (another key), or edited"
        )
        raise StateAuthError(
            f"{path} is not authenticated by this user's key ({key_path()}): it was {why}; it is not loaded"
        )


def read_state_file(path: Path, kind: str, version: int, types: Mapping[str, type] | None = None) -> Any:
    """The state written by write_state_file; StateFileError naming `path` and the reason when the
    file is not one of `kind`, is of another version, is not authenticated by this user's key, or
    its members declare more than the file holds (nothing is decompressed: see federated/core/npz.py)."""
    path = Path(path)
    what = f"MultiMed-FL {kind.replace('-', ' ')}"
    if not path.is_file():
        raise StateFileError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        raise StateFileError(f"{path} is not a {what} (not an npz archive; it is not loaded)")
    fmt = f"multimed-fl/{kind}"
    try:
        # Written with np.savez (stored): the members can never declare more than the file's size.
        with SafeNpz(path, max_bytes=path.stat().st_size, stored_only=True) as z:
            z.reserve(z.names)  # every member is read; stored, together they fit in the file itself
            meta = _meta(path, z, fmt, what)
            if meta.get("version") != version:
                raise StateFileError(
                    f"{path}: {what} version {meta.get('version')!r} unsupported (this release reads {version})"
                )
            _scheme(path, meta)
            key = _key(create=False, path=path)
            count = len(z.names) - 2
            expected = {"meta", "state", *(f"a{i}" for i in range(count))}
            if set(z.names) != expected:
                raise StateFileError(f"{path} is not a {what} (members missing or unexpected)")
            state_json = _bytes_member(z, "state", z.declared_size("state"))
            arrays = []
            for i in range(count):
                m = z.member(f"a{i}")
                if m.dtype.kind == "V":
                    raise NpzError(f"member 'a{i}' has structured dtype {m.dtype}, which a state file never holds")
                arrays.append(z.read(f"a{i}"))
    except NpzError as e:
        raise StateFileError(f"{path} is not a {what}: unreadable ({e})") from None
    _authentic(path, meta, key, _mac(key, fmt, version, state_json, arrays))
    try:
        return _decode(json.loads(state_json), arrays, types or {}, kind)
    except (ValueError, TypeError, KeyError) as e:
        raise StateFileError(f"{path} is not a {what}: {e}") from None
