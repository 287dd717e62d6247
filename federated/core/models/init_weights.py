"""`model.init_weights=PATH`: start a run's global model from a local weights file.

A run may begin from an earlier run's final_model.npz or from a torch/safetensors checkpoint
instead of a fresh initialisation. Tensors whose name and shape match are copied in; everything
else keeps its fresh initialisation, and an InitReport says which is which so the run's log shows
exactly what was reused. Files are read without executing code (numpy with allow_pickle=False,
torch with weights_only=True): a weights file is data, and a crafted one must not run anything.
Nothing is downloaded.
"""

from __future__ import annotations

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

NPZ_SUFFIXES = (".npz",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
VALID_SUFFIXES = NPZ_SUFFIXES + TORCH_SUFFIXES + SAFETENSORS_SUFFIXES

# Checkpoint layouts that wrap the state dict under one key (training scripts commonly save
# {"state_dict": ..., "epoch": ...} or {"model": ..., "optimizer": ...}); tried in this order.
_WRAPPER_KEYS = ("state_dict", "model")
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: what a model's tensors can take
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


def read_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a weights file into name -> array, without running any code the file might carry.

    Every refusal is a WeightsFileError naming the file; the arrays returned are numeric and finite.
    """
    p = Path(path)
    if not p.exists():
        raise WeightsFileError(f"model.init_weights: no such file {p}")
    if p.is_dir():
        raise _fail(p, "is a directory, not a weights file")
    suffix = p.suffix.lower()
    if suffix in NPZ_SUFFIXES:
        arrays = _read_npz(p)
    elif suffix in TORCH_SUFFIXES:
        arrays = _read_torch(p)
    elif suffix in SAFETENSORS_SUFFIXES:
        arrays = _read_safetensors(p)
    else:
        raise _fail(p, f"unknown extension {p.suffix or '(none)'!r}; valid: {', '.join(VALID_SUFFIXES)}")
    if not arrays:
        raise _fail(p, "holds no tensors")
    for name, array in arrays.items():
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise _fail(p, f"tensor {name!r} has non-numeric dtype {array.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise _fail(p, f"tensor {name!r} has non-finite values (NaN or inf)")
    return arrays


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    """final_model.npz as write_final_model saves it (np.savez of name -> array)."""
    # Checked first: np.load would read any other file as a lone .npy or a pickle, and its
    # refusal of the latter suggests loading it unsafely, which is the wrong advice here.
    if not zipfile.is_zipfile(p):
        raise _fail(p, "unreadable or corrupt .npz: not a zip archive of named arrays (as np.savez writes)")
    try:
        loaded = np.load(p, allow_pickle=False)
    except Exception as e:  # corrupt archives fail in zipfile, zlib, numpy's format parser...
        raise _fail(p, f"unreadable or corrupt .npz ({type(e).__name__}: {e})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise _fail(p, "unreadable or corrupt .npz: not an archive of named arrays")
    try:
        with loaded:
            return {name: np.asarray(loaded[name]) for name in loaded.files}
    except Exception as e:
        raise _fail(p, f"unreadable or corrupt .npz ({type(e).__name__}: {e})") from e


def _read_torch(p: Path) -> dict[str, np.ndarray]:
    """A torch state dict, bare or under a 'state_dict'/'model' key; loaded with weights_only=True."""
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
    arrays = read_weights(path)
    state = model.state_dict()
    loaded: list[str] = []
    missing: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for name, target in state.items():
        if name not in arrays:
            missing.append(name)
        elif tuple(arrays[name].shape) != tuple(target.shape):
            mismatched.append((name, tuple(arrays[name].shape), tuple(target.shape)))
        else:
            loaded.append(name)
    unexpected = [name for name in arrays if name not in state]
    if not loaded:
        detail = f"; shape mismatches: {_few([n for n, _, _ in mismatched])}" if mismatched else ""
        raise _fail(
            path,
            f"no tensor matches the model by name and shape (file has {_few(list(arrays))}; "
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
