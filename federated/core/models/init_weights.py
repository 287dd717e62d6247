"""`model.init_weights=PATH`: start a run's global model from a local weights file.

A run may begin from an earlier run's final_model.npz or from a torch/safetensors checkpoint
instead of a fresh initialisation. Tensors whose name and shape match are copied in; everything
else keeps its fresh initialisation, and an InitReport says which is which so the run's log shows
exactly what was reused. Files are read without executing code (.npz members as plain .npy arrays,
never object arrays; torch with weights_only=True): a weights file is data, and a crafted one must not run anything.
Nor may it claim more memory than the model it initialises: a zip's members (an .npz, a torch
file) are checked from the zip directory and their headers before anything is decompressed, and
only the tensors whose name and shape match the model are read. Nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federated.core.npz import NpzError, SafeNpz, check_zip_directory

NPZ_SUFFIXES = (".npz",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
VALID_SUFFIXES = NPZ_SUFFIXES + TORCH_SUFFIXES + SAFETENSORS_SUFFIXES

# Checkpoint layouts that wrap the state dict under one key (training scripts commonly save
# {"state_dict": ..., "epoch": ...} or {"model": ..., "optimizer": ...}); tried in this order.
_WRAPPER_KEYS = ("state_dict", "model")
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: what a model's tensors can take
# What the members of a weights zip may declare uncompressed (_max_bytes): a model's tensor takes
# at most 8 bytes an element (float64, int64); without the model, 16 x the file's size + 64 MiB.
_ELEMENT_BYTES = 8
_RATIO_WITHOUT_MODEL = 16
_SLACK_WITHOUT_MODEL = 64 << 20
_FEW = 3  # names quoted in a message or summary: enough to recognise the file, short enough to read


class WeightsFileError(ValueError):
    """A weights file that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class InitReport:
    """What load_init_weights took from the file and what kept its fresh initialisation."""

    path: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    @property
    def kept_fresh(self) -> tuple[str, ...]:
        """Model tensors not loaded: absent from the file, or present with another shape."""
        return self.missing + tuple(name for name, _, _ in self.mismatched)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (shapes as lists) for the run's outputs."""
        return {
            "path": self.path,
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [
                {"name": name, "file_shape": list(file_shape), "model_shape": list(model_shape)}
                for name, file_shape, model_shape in self.mismatched
            ],
        }

    def summary_line(self) -> str:
        """One log line; quotes a few names so a partial load is visible without the full lists."""
        total = len(self.loaded) + len(self.kept_fresh)
        line = f"init_weights {self.path}: loaded {len(self.loaded)} of {total} tensors"
        fresh = self.kept_fresh
        if fresh:
            line += f"; {len(fresh)} kept fresh ({_few(fresh)})"
        if self.mismatched:
            shown = [f"{n} {list(f)} vs {list(m)}" for n, f, m in self.mismatched[:_FEW]]
            more = " ..." if len(self.mismatched) > _FEW else ""
            line += f"; {len(self.mismatched)} shape mismatches ({', '.join(shown)}{more})"
        if self.unexpected:
            line += f"; {len(self.unexpected)} file tensors unused ({_few(self.unexpected)})"
        return line


def _few(names: Sequence[str]) -> str:
    """The first few names, with '...' when there are more."""
    shown = ", ".join(names[:_FEW])
    return shown + " ..." if len(names) > _FEW else shown


def _fail(path: str | os.PathLike[str], why: str) -> WeightsFileError:
    return WeightsFileError(f"model.init_weights: {path}: {why}")


def read_weights(
    path: str | os.PathLike[str], expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Read a weights file into name -> array, without running any code the file might carry.

    `expected` (name -> shape, the model's) limits what an .npz gives to those tensors: the rest
    are judged by their headers alone. Every refusal is a WeightsFileError naming the file; the
    arrays returned are numeric and finite.
    """
    return _read(Path(path), expected).arrays


@dataclass(frozen=True)
class _Found:
    """What a weights file holds: the arrays read, and every tensor's shape (read or not)."""

    arrays: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]


def _max_bytes(p: Path, expected: Mapping[str, tuple[int, ...]] | None) -> int:
    """The most a weights zip's members may declare uncompressed: the file's own size (what stored
    members occupy) plus, for the model being initialised, its tensors at 8 bytes an element (so
    float64 weights fit); without a model, a generous multiple of the file's size."""
    size = p.stat().st_size
    if expected is None:
        return size * _RATIO_WITHOUT_MODEL + _SLACK_WITHOUT_MODEL
    return size + _ELEMENT_BYTES * sum(math.prod(shape) for shape in expected.values())


def _read(p: Path, expected: Mapping[str, tuple[int, ...]] | None) -> _Found:
    if not p.exists():
        raise WeightsFileError(f"model.init_weights: no such file {p}")
    if p.is_dir():
        raise _fail(p, "is a directory, not a weights file")
    suffix = p.suffix.lower()
    if suffix in NPZ_SUFFIXES:
        found = _read_npz(p, expected)
    elif suffix in TORCH_SUFFIXES:
        arrays = _read_torch(p, _max_bytes(p, expected))
        found = _Found(arrays, {name: a.shape for name, a in arrays.items()})
    elif suffix in SAFETENSORS_SUFFIXES:
        arrays = _read_safetensors(p)
        found = _Found(arrays, {name: a.shape for name, a in arrays.items()})
    else:
        raise _fail(p, f"unknown extension {p.suffix or '(none)'!r}; valid: {', '.join(VALID_SUFFIXES)}")
    if not found.shapes:
        raise _fail(p, "holds no tensors")
    for name, array in found.arrays.items():
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise _fail(p, f"tensor {name!r} has non-numeric dtype {array.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise _fail(p, f"tensor {name!r} has non-finite values (NaN or inf)")
    return found


def _read_npz(p: Path, expected: Mapping[str, tuple[int, ...]] | None) -> _Found:
    """final_model.npz as write_final_model saves it (np.savez of name -> array), or np.savez_compressed's.

    Every member's declared size and .npy header are checked before any data is decompressed
    (federated/core/npz.py); with `expected`, only the tensors whose name and shape match are read.
    """
    # Checked first: np.load would read any other file as a lone .npy or a pickle, and its
    # refusal of the latter suggests loading it unsafely, which is the wrong advice here.
    if not zipfile.is_zipfile(p):
        raise _fail(p, "unreadable or corrupt .npz: not a zip archive of named arrays (as np.savez writes)")
    try:
        with SafeNpz(p, _max_bytes(p, expected)) as z:
            members = [z.member(name) for name in z.names]
            for m in members:
                if m.dtype.kind not in _NUMERIC_KINDS:
                    raise _fail(p, f"tensor {m.name!r} has non-numeric dtype {m.dtype}")
            wanted = [m.name for m in members if expected is None or expected.get(m.name) == m.shape]
            z.reserve(wanted)
            return _Found({name: z.read(name) for name in wanted}, {m.name: m.shape for m in members})
    except NpzError as e:
        raise _fail(p, f"unreadable or corrupt .npz ({e})") from None


def _read_torch(p: Path, max_bytes: int) -> dict[str, np.ndarray]:
    """A torch state dict, bare or under a 'state_dict'/'model' key; loaded with weights_only=True.
    torch.save writes a zip (stored records) that torch.load decompresses whole: its directory is
    checked first, as an .npz's is."""
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as zf:
                check_zip_directory(zf, p.stat().st_size, max_bytes)
        except (NpzError, zipfile.BadZipFile, OSError) as e:
            raise _fail(p, f"unreadable or corrupt torch file ({e})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "Weights only load failed" in message:
            found = re.search(r"GLOBAL (\S+) was not an allowed global", message)
            what = f" (it references {found.group(1)})" if found else ""
            raise _fail(
                p,
                f"refused: the file holds pickled objects other than tensors{what}, and loading them could run "
                "code; re-save it as a plain state dict of tensors",
            ) from e
        raise _fail(p, f"unreadable or corrupt torch file ({type(e).__name__}: {_first_line(message)})") from e
    except Exception as e:  # truncated zips, foreign formats: torch raises many kinds
        raise _fail(p, f"unreadable or corrupt torch file ({type(e).__name__}: {_first_line(str(e))})") from e
    return _state_dict_arrays(p, obj)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "no message"


def _state_dict_arrays(p: Path, obj: object) -> dict[str, np.ndarray]:
    """The name -> array form of a loaded checkpoint object, whichever common layout it uses."""
    if not isinstance(obj, Mapping):
        raise _fail(p, f"holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    state: Mapping[Any, Any] = obj
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            state = obj[key]
            break
    arrays: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise _fail(p, f"state dict key {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise _fail(p, f"entry {name!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            tensor = tensor.float()
        try:
            arrays[name] = tensor.numpy()
        except (TypeError, RuntimeError) as e:
            raise _fail(p, f"tensor {name!r} of dtype {value.dtype} cannot be read as numbers ({e})") from e
    return arrays


def _read_safetensors(p: Path) -> dict[str, np.ndarray]:
    """A .safetensors file, when the optional safetensors package is installed."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise _fail(
            p,
            "reading .safetensors needs the safetensors package: "
            "pip install 'multimed-fl[safetensors]' (or pip install safetensors)",
        ) from e
    try:
        return {str(name): np.asarray(array) for name, array in load_file(str(p)).items()}
    except Exception as e:
        raise _fail(p, f"unreadable or corrupt .safetensors ({type(e).__name__}: {e})") from e


def load_init_weights(model: torch.nn.Module, path: str | os.PathLike[str]) -> InitReport:
    """Copy the file's tensors into the model where name and shape match; report the rest.

    Tensors are cast to the model's dtypes. A file that matches nothing is an error rather than a
    silent fresh start: it is almost certainly the wrong file or a different architecture.
    """
    state = model.state_dict()
    found = _read(Path(path), {name: tuple(t.shape) for name, t in state.items()})
    arrays, shapes = found.arrays, found.shapes
    loaded: list[str] = []
    missing: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for name, target in state.items():
        if name not in shapes:
            missing.append(name)
        elif tuple(shapes[name]) != tuple(target.shape):
            mismatched.append((name, tuple(shapes[name]), tuple(target.shape)))
        else:
            loaded.append(name)
    unexpected = [name for name in shapes if name not in state]
    if not loaded:
        detail = f"; shape mismatches: {_few([n for n, _, _ in mismatched])}" if mismatched else ""
        raise _fail(
            path,
            f"no tensor matches the model by name and shape (file has {_few(list(shapes))}; "
            f"model has {_few(list(state))}{detail})",
        )
    with torch.no_grad():
        for name in loaded:
            target = state[name]
            # np.array copies to a C-ordered, writable array (ascontiguousarray would turn a 0-d
            # scalar such as BatchNorm's counter into shape (1,))
            target.copy_(torch.from_numpy(np.array(arrays[name], order="C")).to(dtype=target.dtype))
    return InitReport(
        path=str(path),
        loaded=tuple(loaded),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
    )
