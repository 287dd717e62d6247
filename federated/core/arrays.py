"""Model arrays on the wire: one packed buffer per record, and fast readers for Flower Arrays.

Packing. Flower 1.42 stores a Message as a tree of objects and moves each object with its own
request: every Array of an ArrayRecord is one object plus one ArrayChunk per 5 MiB
(flwr/app/message/array.py: slice_array), so a ~120-tensor model is ~250 objects and a
SuperNode pulls them one by one, two at a time, sleeping 1-10 s on each that the SuperLink
does not hold yet (flwr/supercore/inflatable/inflatable_utils.py: pull_objects). `pack_arrays`
puts the whole state dict into ONE Array (a uint8 buffer) so a model is a handful of objects.

Buffer layout (all integers little-endian):
  MAGIC (8 bytes) | version (u32) | header length H (u32) | header: H bytes of UTF-8 JSON |
  zero padding to a multiple of ALIGN | data: each array's C-order bytes at its offset.
The JSON is {"arrays": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]} in the record's
order; offsets are relative to the data start, each a multiple of ALIGN (so zero-copy views are
aligned for every dtype), with only alignment padding between arrays and none after the last.

The unpacker reads bytes from the network, so it trusts nothing: the magic, version, JSON
shape, dtypes (plain numeric only: nothing an object dtype or pickle could run), dims, offsets
and sizes are all checked, and a refused buffer raises ValueError naming the problem.

Fast reading of ordinary Arrays. flwr's Array.numpy() runs np.load, whose header parser
(ast.literal_eval per array) took ~1 s of a 9 s 8-site run here (profiled). The Array already
carries dtype and shape, so the data is the bytes after the .npy header. Anything that is not a
plain little-endian C-order .npy v1-v3 falls back to Flower's own reader.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY"

PACKED_KEY = "__multimed_packed__"  # the one key of a packed ArrayRecord
PACKED_STYPE = "multimed.packed"  # the stype of its one Array (Flower never writes this one)
PACK_MAGIC = b"MMFLPAK\x00"
PACK_VERSION = 1
ALIGN = 64
_PREAMBLE = len(PACK_MAGIC) + 8  # magic, version, header length
MAX_NDIM = 32
MAX_DIM = 2**40  # no real tensor has a dimension this long; larger is a corrupt layout
_ENTRY_KEYS = frozenset({"name", "dtype", "shape", "offset", "nbytes"})
# Plain numeric dtypes, little-endian or byte-order free: nothing that can hold Python objects.
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str
    for t in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "<f2",
        "<f4",
        "<f8",
        "<c8",
        "<c16",
    )
)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _as_plain_numpy(name: str, value: np.ndarray | torch.Tensor) -> np.ndarray:
    """The value as a C-order little-endian numpy array of an allowed dtype, or TypeError."""
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise TypeError(f"pack_arrays: {name!r} has dtype {arr.dtype}, not a plain numeric dtype")
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # ascontiguousarray would make 0-d 1-d


def pack_arrays(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding every array in ONE Flower Array: one object to move instead of
    two per tensor. `record_to_numpy` reads it back exactly (names, order, dtypes, values)."""
    plain = [(str(k), _as_plain_numpy(str(k), v)) for k, v in arrays.items()]
    entries: list[dict[str, Any]] = []
    end = 0
    for name, arr in plain:
        offset = _align(end)
        entries.append(
            {"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes}
        )
        end = offset + arr.nbytes
    header = json.dumps({"arrays": entries}, separators=(",", ":")).encode("utf-8")
    data_start = _align(_PREAMBLE + len(header))
    buf = bytearray(data_start + end)
    buf[: len(PACK_MAGIC)] = PACK_MAGIC
    buf[len(PACK_MAGIC) : _PREAMBLE] = PACK_VERSION.to_bytes(4, "little") + len(header).to_bytes(4, "little")
    buf[_PREAMBLE : _PREAMBLE + len(header)] = header
    view = memoryview(buf)
    for (_, arr), entry in zip(plain, entries, strict=True):
        start = data_start + entry["offset"]
        view[start : start + arr.nbytes] = arr.reshape(-1).view(np.uint8).data if arr.nbytes else b""
    packed = Array(dtype="uint8", shape=(len(buf),), stype=PACKED_STYPE, data=bytes(buf))
    return ArrayRecord({PACKED_KEY: packed})


def is_packed(record: ArrayRecord) -> bool:
    """Whether the record is pack_arrays' form (one Array under PACKED_KEY with PACKED_STYPE)."""
    if len(record) != 1 or PACKED_KEY not in record:
        return False
    return record[PACKED_KEY].stype == PACKED_STYPE


def _read_header(data: bytes) -> tuple[list[Any], int]:
    """The layout's entries and the data start, after checking magic, version and JSON."""
    if len(data) < _PREAMBLE or data[: len(PACK_MAGIC)] != PACK_MAGIC:
        raise ValueError("packed arrays: wrong magic (not a pack_arrays buffer)")
    version = int.from_bytes(data[len(PACK_MAGIC) : len(PACK_MAGIC) + 4], "little")
    if version != PACK_VERSION:
        raise ValueError(f"packed arrays: unsupported version {version} (this reader knows {PACK_VERSION})")
    header_len = int.from_bytes(data[len(PACK_MAGIC) + 4 : _PREAMBLE], "little")
    if _PREAMBLE + header_len > len(data):
        raise ValueError(f"packed arrays: header length {header_len} runs past the {len(data)}-byte buffer")
    try:
        layout = json.loads(data[_PREAMBLE : _PREAMBLE + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"packed arrays: the layout is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(layout, dict) or set(layout) != {"arrays"} or not isinstance(layout["arrays"], list):
        raise ValueError('packed arrays: the layout is not {"arrays": [...]}')
    data_start = _align(_PREAMBLE + header_len)
    if data_start > len(data):
        raise ValueError("packed arrays: the buffer ends inside the header's padding")
    return layout["arrays"], data_start


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(i: int, entry: object, seen: set[str]) -> tuple[str, np.dtype, tuple[int, ...], int, int]:
    """(name, dtype, shape, offset, nbytes) of one layout entry, every field checked."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise ValueError(f"packed arrays: entry {i} is not an object with keys {sorted(_ENTRY_KEYS)}")
    name, dtype, shape, offset, nbytes = (entry[k] for k in ("name", "dtype", "shape", "offset", "nbytes"))
    if not isinstance(name, str):
        raise ValueError(f"packed arrays: entry {i} has a non-string name")
    if name in seen:
        raise ValueError(f"packed arrays: name {name!r} appears twice")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ValueError(f"packed arrays: {name!r} has dtype {dtype!r}, not a plain numeric dtype")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) for d in shape):
        raise ValueError(f"packed arrays: {name!r} has shape {shape!r}, not a list of at most {MAX_NDIM} ints")
    if any(d < 0 or d > MAX_DIM for d in shape):
        raise ValueError(f"packed arrays: {name!r} has shape {shape}, with a negative or huge dimension")
    if not _is_int(offset) or not _is_int(nbytes) or offset < 0 or nbytes < 0:
        raise ValueError(f"packed arrays: {name!r} has offset/nbytes that are not non-negative ints")
    np_dtype = np.dtype(dtype)
    if nbytes != math.prod(shape) * np_dtype.itemsize:
        raise ValueError(f"packed arrays: {name!r} declares {nbytes} bytes, not what shape {shape} of {dtype} needs")
    if offset % ALIGN:
        raise ValueError(f"packed arrays: {name!r} starts at offset {offset}, not a multiple of {ALIGN}")
    return name, np_dtype, tuple(shape), offset, nbytes


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of a pack_arrays buffer (read-only views of `data`), or ValueError."""
    entries, data_start = _read_header(data)
    data_len = len(data) - data_start
    out: dict[str, np.ndarray] = {}
    end = 0
    for i, entry in enumerate(entries):
        name, dtype, shape, offset, nbytes = _check_entry(i, entry, set(out))
        if offset < end:
            raise ValueError(f"packed arrays: {name!r} at offset {offset} overlaps the previous array (ends at {end})")
        if offset - end >= ALIGN:
            raise ValueError(f"packed arrays: {offset - end} unexplained bytes before {name!r}")
        if offset + nbytes > data_len:
            raise ValueError(f"packed arrays: {name!r} (bytes {offset}-{offset + nbytes}) runs past the data")
        arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=data_start + offset).reshape(shape)
        if dtype.kind == "b" and nbytes and arr.view(np.uint8).max() > 1:
            raise ValueError(f"packed arrays: bool array {name!r} holds bytes other than 0 and 1")
        out[name] = arr
        end = offset + nbytes
    if data_len != end:
        raise ValueError(f"packed arrays: the buffer is {data_len - end} bytes longer than its layout says")
    return out


def to_numpy(array: Array) -> np.ndarray:
    """The array's values (read-only: a view of the message's bytes)."""
    data = array.data
    if array.stype == "numpy.ndarray" and data[:6] == _MAGIC:
        major = data[6]
        if major == 1:
            start = 10 + int.from_bytes(data[8:10], "little")
        elif major in (2, 3):
            start = 12 + int.from_bytes(data[8:12], "little")
        else:
            start = -1
        header = data[10:start] if major == 1 else data[12:start]
        if start > 0 and b"'fortran_order': False" in header:
            dtype = np.dtype(array.dtype)
            if dtype.byteorder in ("=", "<", "|"):
                return np.frombuffer(data, dtype=dtype, offset=start).reshape(array.shape)
    return array.numpy()


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """name -> array of a packed or an ordinary ArrayRecord (read-only views of its bytes)."""
    if is_packed(record):
        return unpack_arrays(record[PACKED_KEY].data)
    return {k: to_numpy(a) for k, a in record.items()}


def plain_record(record: ArrayRecord) -> ArrayRecord:
    """An ordinary ArrayRecord (one Flower Array per tensor) of a packed one; an ordinary record as
    is. For Flower code that walks a record's Arrays itself (its DP wrapper clips and noises each)."""
    if not is_packed(record):
        return record
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in record_to_numpy(record).items()})


def record_to_torch(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Like ArrayRecord.to_torch_state_dict, with the fast reader (tensors share the bytes)."""
    out = OrderedDict()
    with warnings.catch_warnings():  # from_numpy on read-only memory: we never write to these
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, a in record_to_numpy(record).items():
            out[k] = torch.from_numpy(a)
    return out
