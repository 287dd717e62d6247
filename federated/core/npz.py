"""Reading `.npz` files (numpy's zip of `.npy` members) and other zips without trusting them.

np.load decompresses a member before anything about it is checked, so a small file can claim
gigabytes (a compression bomb) and the reader finds out only after allocating them. Here every
check comes first and reads nothing but the zip directory and each member's .npy header:
- the directory: only stored or deflated members (numpy writes nothing else; bzip2 and lzma
  members would decompress without a bound), none encrypted; a stored member's declared size
  equals the bytes it occupies; a deflated one's compressed bytes are no more than its declared
  size can need (else the size is a lie);
- each header (streamed, a few hundred bytes): format 1.0 or 2.0, no object dtype (only pickle
  reads those), and shape x itemsize + header = the declared size;
- the members a caller reads declare no more, together, than the bound it gives (it knows what it
  expects: a state file, the file's own size; weights, the model's tensors);
and a member's data is then streamed into an array of exactly that size, so a size that still
lies can never make it read more.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import numpy as np
from numpy.lib import format as npy_format

_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_CHUNK = 1 << 20  # bytes decompressed per read while streaming a member
_T = TypeVar("_T")


class NpzError(ValueError):
    """An archive refused before (or while) reading it; the message says which member and why."""


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _deflate_bound(size: int) -> int:
    """The most compressed bytes `size` bytes can need: deflate falls back to stored blocks (5 bytes
    per 64 KiB), so anything well past that holds more than the declared size."""
    return size + (size >> 8) + 1024


def check_zip_directory(zf: zipfile.ZipFile, file_size: int, max_bytes: int | None, stored_only: bool = False) -> None:
    """Refuse, from the directory alone, a zip whose declared sizes cannot be true or (when
    `max_bytes` is given) whose members could expand past it in total (NpzError naming the member)."""
    total = 0
    for info in zf.infolist():
        name = info.filename
        method = _METHODS.get(info.compress_type)
        if method is None or (stored_only and info.compress_type != zipfile.ZIP_STORED):
            kind = method or f"compression method {info.compress_type}"
            allowed = "stored (uncompressed)" if stored_only else "stored or deflate"
            raise NpzError(f"member {name!r} is {kind}; only {allowed} members are read: it is not decompressed")
        if info.flag_bits & 0x1:
            raise NpzError(f"member {name!r} is encrypted: it is not read")
        if info.header_offset + info.compress_size > file_size:
            raise NpzError(f"member {name!r} claims {_size(info.compress_size)} beyond the end of the file")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise NpzError(
                f"member {name!r} is stored uncompressed in {info.compress_size} bytes but declares "
                f"{info.file_size}: its declared size is false"
            )
        if info.compress_size > _deflate_bound(info.file_size):
            raise NpzError(
                f"member {name!r} has {_size(info.compress_size)} of compressed data for a declared "
                f"{_size(info.file_size)}: its declared size is false; it is not decompressed"
            )
        total += info.file_size
        if max_bytes is not None and total > max_bytes:
            raise _too_much(total, name, info.file_size, max_bytes, file_size)


def _too_much(total: int, name: str, size: int, max_bytes: int, file_size: int) -> NpzError:
    return NpzError(
        f"its members declare {_size(total)} or more uncompressed (member {name!r}: {_size(size)}), "
        f"more than the {_size(max_bytes)} this reader allows for a {_size(file_size)} file: refused "
        f"before decompressing anything (a compression bomb?)"
    )


@dataclass(frozen=True)
class Member:
    """One .npy member as its header declares it (nothing of its data has been read)."""

    name: str  # as np.load names it: the member's file name without '.npy'
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int  # bytes of .npy header before the data

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


class SafeNpz:
    """An .npz opened for checked reading: `with SafeNpz(path, max_bytes) as z: z.member(n); z.read(n)`.

    Opening checks the zip directory (check_zip_directory); `stored_only` refuses any compressed
    member (for files this project writes itself, with np.savez). `max_bytes` is the most the
    caller expects the members it reads to hold uncompressed: `reserve(names)` checks a set of
    members against it up front, and `read` never goes past it. Members only looked at
    (`member`: the header) do not count.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int, stored_only: bool = False) -> None:
        self.path = Path(path)
        self.file_size = self.path.stat().st_size
        self.max_bytes, self._spent = max_bytes, 0
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise NpzError(f"not a zip archive ({type(e).__name__}: {e})") from None
        try:
            check_zip_directory(self._zip, self.file_size, None, stored_only)
            self._infos: dict[str, zipfile.ZipInfo] = {}
            for info in self._zip.infolist():
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise NpzError(f"member {info.filename!r} is not an .npy array")
                name = info.filename.removesuffix(".npy")
                if name in self._infos:
                    raise NpzError(f"member {info.filename!r} appears twice")
                self._infos[name] = info
        except BaseException:
            self._zip.close()
            raise
        self._members: dict[str, Member] = {}

    def __enter__(self) -> SafeNpz:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    @property
    def names(self) -> list[str]:
        """The members' array names, in the archive's order."""
        return list(self._infos)

    def declared_size(self, name: str) -> int:
        """The member's uncompressed size as the zip directory declares it."""
        return self._infos[name].file_size

    def reserve(self, names: list[str]) -> None:
        """Refuse (NpzError) before reading any of them when `names` declare more than `max_bytes` together."""
        total = 0
        for name in names:
            total += self.declared_size(name)
            if total > self.max_bytes:
                raise _too_much(total, name + ".npy", self.declared_size(name), self.max_bytes, self.file_size)

    def member(self, name: str) -> Member:
        """The member's header, checked against its declared size; only the header is read."""
        if name not in self._members:
            with self._open(name) as fp:
                self._members[name] = self._header(name, fp)
        return self._members[name]

    def read(self, name: str) -> np.ndarray:
        """The member's array, streamed: never more than its header's shape x itemsize bytes."""
        m = self.member(name)
        self._spent += self.declared_size(name)
        if self._spent > self.max_bytes:
            raise _too_much(self._spent, name + ".npy", self.declared_size(name), self.max_bytes, self.file_size)
        flat = np.empty(m.count, dtype=m.dtype)
        buf = flat.view(np.uint8).data  # the array's own bytes: chunks land in place, no second copy
        with self._open(name) as fp:
            self._call(name, fp.read, m.data_offset)
            pos = 0
            while pos < m.nbytes:
                chunk = self._call(name, fp.read, min(_CHUNK, m.nbytes - pos))
                if not chunk:
                    raise NpzError(f"member {name!r} ends after {pos} of its {m.nbytes} data bytes")
                buf[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            if self._call(name, fp.read, 1):  # also makes zipfile check the member's CRC-32
                raise NpzError(f"member {name!r} holds more data than its header declares")
        if m.fortran_order:
            return flat.reshape(m.shape[::-1]).transpose()
        return flat.reshape(m.shape)

    def _open(self, name: str) -> IO[bytes]:
        if name not in self._infos:
            raise NpzError(f"no member {name!r}")
        return self._call(name, self._zip.open, self._infos[name])

    @staticmethod
    def _call(name: str, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args), with zipfile's and zlib's errors as an NpzError naming the member."""
        try:
            return fn(*args)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
            raise NpzError(f"member {name!r} is unreadable ({type(e).__name__}: {e})") from None

    def _header(self, name: str, fp: IO[bytes]) -> Member:
        try:
            version = npy_format.read_magic(fp)
            readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f".npy format {version[0]}.{version[1]} (1.0 and 2.0 are read)")
            shape, fortran_order, dtype = readers[version](fp)
            offset = fp.tell()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
            raise NpzError(f"member {name!r} has no readable .npy header ({type(e).__name__}: {e})") from None
        if dtype.hasobject:
            raise NpzError(f"member {name!r} holds Python objects (dtype {dtype}), which only pickle can read")
        if any(n < 0 for n in shape):
            raise NpzError(f"member {name!r} has a negative dimension in shape {shape}")
        m = Member(name, dtype, tuple(shape), bool(fortran_order), offset)
        declared = self._infos[name].file_size
        if declared != offset + m.nbytes:
            raise NpzError(
                f"member {name!r}: its header describes {dtype} {tuple(shape)} ({_size(m.nbytes)} of data) but "
                f"the zip declares {_size(declared)} for it"
            )
        return m
