"""The corpus folder's names and the .npy header reader, shared by the writer (format.py) and the
checks (checks.py), so neither has to import the other."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2  # 2: spec.json declares the schema; 1 is migrated on open (checks.read_spec)
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.parquet"
BASE_COLUMNS = ("sample_id", "dataset", "task", "patient_id", "origin_site", "split", "label", "target_row")
SPLITS = ("train", "test")


class CorpusFormatError(ValueError):
    """A corpus folder or the data about to be written does not follow the format."""


def index_column(modality: str) -> str:
    return f"idx_{modality}"


def array_file(modality: str) -> str:
    return f"arrays/{modality}.npy"


def target_file(task: str) -> str:
    return f"targets/{task}.npy"


@dataclass(frozen=True)
class NpyHeader:
    """What a .npy file's header promises: enough to check it without reading its data."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # bytes before the data: the header's length
    file_size: int

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(path: Path) -> NpyHeader:
    """The header of a .npy file, or CorpusFormatError naming the file when it is not one, holds
    Python objects (which only pickle could read) or is shorter or longer than its header says
    (a truncated or reshaped file, which np.load would report as "mmap length is greater than
    file size" without a name)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise CorpusFormatError(f"{path}: .npy format version {version} is not supported (1.0 or 2.0)")
            offset = f.tell()
        size = path.stat().st_size
    except CorpusFormatError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise CorpusFormatError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    header = NpyHeader(tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran), offset, size)
    if header.dtype.hasobject:
        raise CorpusFormatError(f"{path}: holds Python objects (dtype {header.dtype}); corpus arrays are numeric")
    expected = offset + header.data_bytes
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CorpusFormatError(
            f"{path}: {what}: {size} bytes, but its header (shape {header.shape}, dtype {header.dtype}) "
            f"promises {expected}; the file was cut short or reshaped, rebuild the corpus"
        )
    return header
