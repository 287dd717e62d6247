"""The corpus format on disk: a spec, a Parquet manifest and memory-mappable arrays.

    DIR/spec.json              schema_version, name, the schema (every modality's kind, shape and
                               dtype; every task's inputs, target type, classes and metrics),
                               counts, task target stats, origin sites, provenance (generator
                               config or ingest spec)
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
only when complete, so a crash never leaves a half-written corpus. The temporary folder's name
carries this host and the writer's PID (`.<name>.tmp-<host>-<pid>-<random>`): the next write
beside it removes folders whose writer has died, never those of a build still running.

`Corpus.open` checks what the spec promises before anyone reads the data (federated/data/checks.py:
files, headers, row counts, manifest columns and values, label ranges); `Corpus.check` adds the
full-data scans; `Corpus.fingerprint` identifies the corpus's contents for a run to record.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema
from federated.core.io import HOST_TAG, pid_alive
from federated.core.multimed import CATALOGUE
from federated.core.targets import REGRESSION
from federated.data.checks import check_corpus, open_problems, read_manifest, read_spec, spec_schema, summarise
from federated.data.layout import (
    BASE_COLUMNS,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SPEC_FILE,
    SPLITS,
    CorpusFormatError,
    array_file,
    index_column,
    read_npy_header,
    target_file,
)

__all__ = [
    "BASE_COLUMNS",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "SPEC_FILE",
    "SPLITS",
    "Corpus",
    "CorpusFormatError",
    "index_column",
    "remove_stale_builds",
    "write_corpus",
]


def _check_before_write(
    schema: CorpusSchema, manifest: pd.DataFrame, arrays: dict[str, np.ndarray], targets: dict[str, np.ndarray]
) -> None:
    """Refuse bad data before anything touches the disk, naming the first problem found."""
    _check_manifest_rows(manifest)
    for t in manifest["task"].unique():
        _check_task_targets(schema, manifest, t, targets)
    for m, arr in arrays.items():
        _check_modality_array(schema, manifest, m, arr)
    for m in schema.modalities:
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


def _check_task_targets(
    schema: CorpusSchema, manifest: pd.DataFrame, task: str, targets: dict[str, np.ndarray]
) -> None:
    """A task's rows point inside its targets array, whose per-sample shape is the task's label shape."""
    if task not in schema.tasks:
        raise CorpusFormatError(f"manifest task {task!r} is not a task of the schema ({', '.join(schema.tasks)})")
    if task not in targets:
        raise CorpusFormatError(f"no targets array for task {task!r}")
    rows = manifest.loc[manifest["task"] == task, "target_row"].to_numpy()
    if rows.min() < 0 or rows.max() >= len(targets[task]):
        raise CorpusFormatError(f"target_row of task {task!r} outside targets/{task}.npy")
    shape = schema.task(task).label_shape
    if targets[task].shape[1:] != shape:
        raise CorpusFormatError(f"targets/{task}.npy has per-sample shape {targets[task].shape[1:]}, expected {shape}")


def _check_modality_array(schema: CorpusSchema, manifest: pd.DataFrame, modality: str, arr: np.ndarray) -> None:
    """A modality's array has the schema's shape and dtype, finite values, and an index column inside it."""
    if modality not in schema.modalities:
        raise CorpusFormatError(f"array {modality!r} is not a modality of the schema ({', '.join(schema.modalities)})")
    spec = schema.modality(modality)
    if arr.shape[1:] != spec.shape:
        raise CorpusFormatError(f"arrays/{modality}.npy has per-sample shape {arr.shape[1:]}, expected {spec.shape}")
    if arr.dtype != np.dtype(spec.dtype):
        raise CorpusFormatError(f"arrays/{modality}.npy has dtype {arr.dtype}, expected {spec.dtype}")
    # Raw features that declare an impute keep a missing value as NaN (filled at load time).
    nan_allowed = spec.raw_features and bool(spec.impute)
    if (
        np.issubdtype(arr.dtype, np.floating)
        and not np.isfinite(arr).all()
        and (not nan_allowed or np.isinf(arr).any())
    ):
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
    schema: CorpusSchema,
    overwrite: bool = False,
) -> Path:
    """Write a corpus atomically: to a temporary sibling folder, then rename into place.
    `schema` declares the tasks (it may declare more than the corpus holds: what is written is
    the schema of the tasks present, with their input modalities)."""
    out_dir = Path(out_dir)
    manifest = manifest.reset_index(drop=True).copy()
    present = set(manifest["task"].unique()) if "task" in manifest.columns else set()  # one pass over the rows
    unknown = sorted(present - set(schema.tasks))
    if unknown:
        raise CorpusFormatError(f"manifest task(s) {unknown} are not tasks of the schema ({', '.join(schema.tasks)})")
    if "task" in manifest.columns:
        schema = schema.restrict(t for t in schema.tasks if t in present)
    for col in [
        c for c in manifest.columns if c.startswith("idx_") and c.removeprefix("idx_") not in schema.modalities
    ]:
        if (manifest[col] >= 0).any():
            raise CorpusFormatError(f"{col} has rows, but {col.removeprefix('idx_')!r} is not a modality of the schema")
        manifest = manifest.drop(columns=col)
    for m in schema.modalities:  # every corpus has an idx column per modality, so readers need no special case
        col = index_column(m)
        if col not in manifest.columns:
            manifest[col] = -1
        manifest[col] = manifest[col].astype("int64")
    _check_before_write(schema, manifest, arrays, targets)
    if out_dir.exists() and not overwrite:
        raise CorpusFormatError(f"{out_dir} already exists; choose another --out or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out_dir)
    tmp = _build_dir_beside(out_dir)
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
            "tasks": {t: _target_stats(schema.task(t).target, t, targets[t], manifest) for t in targets},
            "schema": schema.to_dict(),
            "origin_sites": sorted(manifest["origin_site"].unique().tolist()),
            "provenance": provenance,
        }
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        if out_dir.exists():
            if not overwrite:  # another build of it finished meanwhile: keep that one, never delete it
                raise CorpusFormatError(f"{out_dir} already exists; choose another --out or remove it")
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError as e:  # it appeared between the check and the rename
            raise CorpusFormatError(f"{out_dir} already exists ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _build_dir_beside(out_dir: Path) -> Path:
    """A new empty folder beside `out_dir` named with this host (io's HOST_TAG: a shared disk's PIDs
    are per host) and PID, so that a later build can tell a dead writer's leftovers from a running
    one's. Permissions are an ordinary mkdir's (tempfile.mkdtemp would leave the corpus 0700).

    Not io.temp_dir_beside's `.multimed-fl-tmp-...` name: a cache folder holds the leftovers of
    killed builds of earlier releases under this name, which remove_stale_builds must still
    recognise, and whose users (and tests/robustness/test_corpus.py) know it as `.<name>.tmp-...`."""
    while True:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir(0o777)
        except FileExistsError:
            continue
        return tmp


def remove_stale_builds(out_dir: str | Path, any_name: bool = False) -> list[Path]:
    """Remove the temporary folders of killed builds beside `out_dir` (of `out_dir` only, or of any
    corpus with any_name=True, for a cache folder): only those made on this host by a process that
    no longer exists. Returns what was removed."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    prefix = "." if any_name else f".{out_dir.name}.tmp-"
    removed = []
    for entry in out_dir.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        _, sep, tag = entry.name.rpartition(".tmp-")
        host, _, rest = tag.partition("-")
        pid = rest.partition("-")[0]
        if not sep or host != HOST_TAG or not pid.isdigit() or entry.is_symlink() or not entry.is_dir():
            continue
        if not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _target_stats(target_type: str, task: str, target: np.ndarray, manifest: pd.DataFrame) -> dict[str, Any]:
    """Per-task facts a reader needs: sample count and, for regression, the target's scale.

    `mad` (mean absolute deviation from the mean, over the train split) is the MAE of always
    predicting the mean: the regression score maps MAE onto [0, 1] against it.
    """
    rows = manifest[manifest["task"] == task]
    stats: dict[str, Any] = {"n": len(rows)}
    if target_type == REGRESSION:
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
        """Open a corpus folder after the cheap checks (checks.open_problems): every problem found
        is named in one CorpusFormatError, before any site reads a wrong label or a short file."""
        path = Path(path)
        spec = read_spec(path)
        manifest = read_manifest(path)
        problems = open_problems(path, spec, manifest)
        if problems:
            raise CorpusFormatError(summarise(path, problems))
        corpus = cls(path, spec)
        corpus.__dict__["manifest"] = manifest  # read once, for the checks and for planning
        return corpus

    def check(self) -> list[str]:
        """Every problem, the full-data scans included (finite inputs, token ids in the vocabulary)."""
        return check_corpus(self.path)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of what the corpus is: spec.json, the manifest and every targets file byte for
        byte, and of each input array its header, size and 16 sampled 64 KiB blocks. Any rebuild,
        relabelling, added or removed sample or reshaped array changes it; so does an edit of the
        sampled blocks (an in-place edit elsewhere in an input array is what `corpus check`'s scans
        are for). Cost: reading the small files and 1 MiB per input array."""
        digest = hashlib.sha256(b"multimed-fl corpus fingerprint v1\0")
        for rel in [SPEC_FILE, MANIFEST_FILE, *(target_file(t) for t in sorted(self.tasks))]:
            digest.update(f"{rel}\0".encode())
            _hash_file(digest, self.path / rel)
        for m in sorted(self.modalities):
            file = self.path / array_file(m)
            header = read_npy_header(file)
            digest.update(f"{array_file(m)}\0{header.file_size}\0".encode())
            _hash_samples(digest, file, header.data_offset, header.file_size)
        return digest.hexdigest()

    @classmethod
    def from_manifest(
        cls, manifest: pd.DataFrame, tasks: list[str] | tuple[str, ...], schema: CorpusSchema = CATALOGUE
    ) -> Corpus:
        """A corpus of a manifest only, without arrays: enough to plan sites (benchmarks, tests)."""
        spec = {
            "schema_version": SCHEMA_VERSION,
            "tasks": {t: {} for t in tasks},
            "modalities": [],
            "origin_sites": sorted(manifest["origin_site"].unique().tolist()),
            "schema": schema.restrict(tasks).to_dict(),
        }
        corpus = cls(Path("<manifest only>"), spec)
        corpus.__dict__["manifest"] = manifest
        return corpus

    @cached_property
    def manifest(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / MANIFEST_FILE)

    @cached_property
    def schema(self) -> CorpusSchema:
        """The modalities and tasks this corpus declares (what the model, metrics and plans read)."""
        return spec_schema(self.spec, self.path)

    @property
    def tasks(self) -> list[str]:
        """The tasks, in schema order."""
        return [t for t in self.schema.tasks if t in self.spec["tasks"]]

    @property
    def modalities(self) -> list[str]:
        """The modalities with an array, in schema order."""
        return [m for m in self.schema.modalities if m in self.spec["modalities"]]

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


_SAMPLE_BLOCKS, _SAMPLE_BYTES = 16, 64 << 10


def _hash_file(digest: Any, file: Path) -> None:
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def _hash_samples(digest: Any, file: Path, data_offset: int, size: int) -> None:
    """The header and _SAMPLE_BLOCKS evenly spaced blocks of the data (the whole file when small)."""
    with open(file, "rb") as f:
        digest.update(f.read(data_offset))
        span = size - data_offset
        if span <= _SAMPLE_BLOCKS * _SAMPLE_BYTES:
            digest.update(f.read())
            return
        for k in range(_SAMPLE_BLOCKS):
            f.seek(data_offset + k * (span - _SAMPLE_BYTES) // (_SAMPLE_BLOCKS - 1))
            digest.update(f.read(_SAMPLE_BYTES))
