"""The corpus format on disk: a spec, a Parquet manifest and memory-mappable arrays.

    DIR/spec.json              schema_version, name, counts, modality shapes, task target stats,
                               origin sites, provenance (generator config or ingest spec)
    DIR/manifest.parquet       one row per sample (columns below)
    DIR/arrays/<modality>.npy  [n_with_modality, *shape]; only samples that have the modality
    DIR/targets/<task>.npy     [n_task_samples, *label_shape]; the full target of each sample

Manifest columns: sample_id, dataset, task, patient_id, origin_site, split ("train"/"test",
the source's suggested split), label (float64: the scalar label -- class index, binary label
or regression value -- NaN for multi-label and per-residue targets), target_row (row in
targets/<task>.npy) and, per modality, idx_<modality> (row in arrays/<modality>.npy, -1 when
the sample lacks it). Storing each modality once, indexed, keeps a corpus of mixed tasks as
small as its data, and lets a site read its rows with np.load(mmap_mode="r") without copies.

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place
only when complete, so a crash never leaves a half-written corpus.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.io import temp_dir_beside
from federated.core.multimed import MODALITIES, TASKS

SCHEMA_VERSION = 1
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.parquet"
BASE_COLUMNS = ("sample_id", "dataset", "task", "patient_id", "origin_site", "split", "label", "target_row")
SPLITS = ("train", "test")


class CorpusFormatError(ValueError):
    """A corpus folder or the data about to be written does not follow the format."""


def index_column(modality: str) -> str:
    return f"idx_{modality}"


def _check_before_write(manifest: pd.DataFrame, arrays: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> None:
    """Refuse bad data before anything touches the disk, naming the first problem found."""
    _check_manifest_rows(manifest)
    for t in manifest["task"].unique():
        _check_task_targets(manifest, t, targets)
    for m, arr in arrays.items():
        _check_modality_array(manifest, m, arr)
    for m in MODALITIES:
        col = index_column(m)
        if col in manifest.columns and (manifest[col] >= 0).any() and m not in arrays:
            raise CorpusFormatError(f"{col} has rows but there is no arrays/{m}.npy")


def _check_manifest_rows(manifest: pd.DataFrame) -> None:
    """The base columns exist, sample ids are unique and splits are known: readers key on these."""
    missing = [c for c in BASE_COLUMNS if c not in manifest.columns]
    if missing:
        raise CorpusFormatError(f"manifest lacks columns {missing}")
    if manifest["sample_id"].duplicated().any():
        dup = manifest.loc[manifest["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise CorpusFormatError(f"manifest has duplicate sample_id {dup!r}")
    bad_split = set(manifest["split"].unique()) - set(SPLITS)
    if bad_split:
        raise CorpusFormatError(f"manifest split values {sorted(bad_split)} not in {SPLITS}")


def _check_task_targets(manifest: pd.DataFrame, task: str, targets: dict[str, np.ndarray]) -> None:
    """A task's rows point inside its targets array, whose per-sample shape is the task's label shape."""
    if task not in TASKS:
        raise CorpusFormatError(f"manifest task {task!r} is not a MultiMed task")
    if task not in targets:
        raise CorpusFormatError(f"no targets array for task {task!r}")
    rows = manifest.loc[manifest["task"] == task, "target_row"].to_numpy()
    if rows.min() < 0 or rows.max() >= len(targets[task]):
        raise CorpusFormatError(f"target_row of task {task!r} outside targets/{task}.npy")
    shape = TASKS.get(task).label_shape
    if targets[task].shape[1:] != shape:
        raise CorpusFormatError(f"targets/{task}.npy has per-sample shape {targets[task].shape[1:]}, expected {shape}")


def _check_modality_array(manifest: pd.DataFrame, modality: str, arr: np.ndarray) -> None:
    """A modality's array has the registered shape and dtype, finite values, and an index column inside it."""
    spec = MODALITIES.get(modality)
    if arr.shape[1:] != spec.shape:
        raise CorpusFormatError(f"arrays/{modality}.npy has per-sample shape {arr.shape[1:]}, expected {spec.shape}")
    if arr.dtype != np.dtype(spec.dtype):
        raise CorpusFormatError(f"arrays/{modality}.npy has dtype {arr.dtype}, expected {spec.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise CorpusFormatError(f"arrays/{modality}.npy contains NaN or infinite values")
    col = index_column(modality)
    if col not in manifest.columns:
        raise CorpusFormatError(f"manifest lacks column {col} for array {modality}")
    idx = manifest[col].to_numpy()
    if idx.max() >= len(arr):
        raise CorpusFormatError(f"{col} points past the end of arrays/{modality}.npy")


def write_corpus(
    out_dir: str | Path,
    manifest: pd.DataFrame,
    arrays: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    name: str,
    provenance: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write a corpus atomically: to a temporary sibling folder, then rename into place."""
    out_dir = Path(out_dir)
    manifest = manifest.reset_index(drop=True).copy()
    for m in MODALITIES:  # every corpus has every idx column, so readers need no special case
        col = index_column(m)
        if col not in manifest.columns:
            manifest[col] = -1
        manifest[col] = manifest[col].astype("int64")
    _check_before_write(manifest, arrays, targets)
    if out_dir.exists() and not overwrite:
        raise CorpusFormatError(f"{out_dir} already exists; choose another --out or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out_dir)  # ordinary permissions (mkdtemp would leave the corpus 0700)
    try:
        (tmp / "arrays").mkdir()
        (tmp / "targets").mkdir()
        for m, arr in arrays.items():
            np.save(tmp / "arrays" / f"{m}.npy", np.ascontiguousarray(arr))
        for t, arr in targets.items():
            np.save(tmp / "targets" / f"{t}.npy", np.ascontiguousarray(arr))
        manifest.to_parquet(tmp / MANIFEST_FILE, index=False)
        spec = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "n_samples": len(manifest),
            "modalities": {
                m: {"shape": list(a.shape[1:]), "dtype": str(a.dtype), "n": len(a)} for m, a in arrays.items()
            },
            "tasks": {t: _target_stats(t, targets[t], manifest) for t in targets},
            "origin_sites": sorted(manifest["origin_site"].unique().tolist()),
            "provenance": provenance,
        }
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _target_stats(task: str, target: np.ndarray, manifest: pd.DataFrame) -> dict[str, Any]:
    """Per-task facts a reader needs: sample count and, for regression, the target's scale.

    `mad` (mean absolute deviation from the mean, over the train split) is the MAE of always
    predicting the mean: the regression score maps MAE onto [0, 1] against it.
    """
    rows = manifest[manifest["task"] == task]
    stats: dict[str, Any] = {"n": len(rows)}
    if TASKS.get(task).target == "regression":
        train = target[rows.loc[rows["split"] == "train", "target_row"].to_numpy()].astype(float)
        mean = float(train.mean())
        stats.update(mean=mean, std=float(train.std()), mad=float(np.abs(train - mean).mean()))
    return stats


@dataclass
class Corpus:
    """A corpus folder opened for reading; arrays are memory-mapped, never copied whole."""

    path: Path
    spec: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Corpus:
        path = Path(path)
        spec_file = path / SPEC_FILE
        if not spec_file.is_file():
            raise CorpusFormatError(f"{path} is not a corpus: {SPEC_FILE} is missing")
        try:
            spec = json.loads(spec_file.read_text())
        except json.JSONDecodeError as e:
            raise CorpusFormatError(f"{spec_file} is not valid JSON: {e}") from None
        version = spec.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CorpusFormatError(f"{spec_file} has schema_version {version!r}; this version reads {SCHEMA_VERSION}")
        if not (path / MANIFEST_FILE).is_file():
            raise CorpusFormatError(f"{path / MANIFEST_FILE} is missing")
        for m in spec["modalities"]:
            if not (path / "arrays" / f"{m}.npy").is_file():
                raise CorpusFormatError(f"{path}/arrays/{m}.npy is missing")
        for t in spec["tasks"]:
            if not (path / "targets" / f"{t}.npy").is_file():
                raise CorpusFormatError(f"{path}/targets/{t}.npy is missing")
        return cls(path, spec)

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame, tasks: list[str]) -> Corpus:
        """A corpus of a manifest only, without arrays: enough to plan sites (benchmarks, tests)."""
        spec = {
            "schema_version": SCHEMA_VERSION,
            "tasks": {t: {} for t in tasks},
            "modalities": [],
            "origin_sites": sorted(manifest["origin_site"].unique().tolist()),
        }
        corpus = cls(Path("<manifest only>"), spec)
        corpus.__dict__["manifest"] = manifest
        return corpus

    @cached_property
    def manifest(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / MANIFEST_FILE)

    @property
    def tasks(self) -> list[str]:
        return list(self.spec["tasks"])

    @property
    def modalities(self) -> list[str]:
        return list(self.spec["modalities"])

    def array(self, modality: str) -> np.ndarray:
        return self._mmaps(f"arrays/{modality}.npy")

    def targets(self, task: str) -> np.ndarray:
        return self._mmaps(f"targets/{task}.npy")

    def _mmaps(self, rel: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_mmap_cache", {})
        if rel not in cache:
            cache[rel] = np.load(self.path / rel, mmap_mode="r")
        return cache[rel]

    def target_stats(self, task: str) -> dict[str, Any]:
        return self.spec["tasks"][task]
