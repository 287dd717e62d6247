"""What every adapter shares: collecting samples, reporting problems, writing the corpus."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, Task
from federated.core.registry import Registry
from federated.core.targets import KINDS, REGRESSION
from federated.data.format import index_column, write_corpus


class IngestError(ValueError):
    """Bad input data; the message names the file (and row) and what is wrong with it."""


@dataclass
class Problems:
    """Stop at the first problem (on_error=stop) or record it and skip the item (skip)."""

    on_error: str = "stop"
    skipped: list[dict[str, str]] = field(default_factory=list)

    def report(self, where: str | Path, reason: str) -> None:
        if self.on_error == "stop":
            raise IngestError(f"{where}: {reason}")
        self.skipped.append({"item": str(where), "reason": reason})


@dataclass
class SampleSet:
    """Samples of one task, as adapters produce them: inputs at the shapes `schema` declares,
    checked as they are added, so an adapter that resizes wrongly fails at its first sample."""

    task: str
    schema: CorpusSchema
    # None where a sample lacks that input (its idx_ column is -1)
    inputs: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    targets: list[np.ndarray] = field(default_factory=list)
    origin_sites: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # what a reader of the corpus should know

    def add(self, inputs: dict[str, np.ndarray], target: Any, origin_site: str, patient_id: str, source: str) -> None:
        spec = self.schema.task(self.task)
        for m, x in inputs.items():
            if m not in spec.inputs:
                raise ValueError(f"task {self.task} has no input {m!r}")
            shape = self.schema.modality(m).shape
            if tuple(x.shape) != tuple(shape):
                raise ValueError(f"{m} sample of shape {tuple(x.shape)}, expected {tuple(shape)}")
        n = len(self.targets)
        for m in spec.inputs:  # None: this sample lacks the input (its idx_ column is -1)
            given = inputs.get(m)
            self.inputs.setdefault(m, [None] * n).append(
                None if given is None else given.astype(self.schema.modality(m).dtype)
            )
        self.targets.append(np.asarray(target))
        self.origin_sites.append(origin_site)
        self.patient_ids.append(patient_id)
        self.sources.append(source)

    def __len__(self) -> int:
        return len(self.targets)


Adapter = Callable[[dict[str, Any], Path, Problems, CorpusSchema], SampleSet]
ADAPTERS: Registry[Adapter] = Registry("ingest adapter")
# Keys every source may have, whatever its adapter (read by spec.py, not by adapters).
COMMON_KEYS = frozenset({"adapter", "task", "on_error", "simulated_sites", "shape"})
# adapter name -> the keys its sources may have besides COMMON_KEYS
ADAPTER_KEYS: dict[str, frozenset[str]] = {}
# adapter name -> the kind of the modality a source's `shape:` sets (its main input)
ADAPTER_FILLS: dict[str, str] = {}


def adapter(name: str, keys: set[str] | frozenset[str], fills: str) -> Callable[[Adapter], Adapter]:
    """Register an adapter, the source keys it reads (so a misspelt key is refused by name) and
    the kind of modality it fills (so the spec can settle a source's `shape:` before reading)."""
    if fills not in KINDS:
        raise ValueError(f"adapter {name}: fills {fills!r} is not one of {', '.join(KINDS)}")

    def deco(fn: Adapter) -> Adapter:
        ADAPTER_KEYS[name] = frozenset(keys)
        ADAPTER_FILLS[name] = fills
        return ADAPTERS.add(name, fn)

    return deco


def filled_modality(task: Task, schema: CorpusSchema, kind: str, params: dict[str, Any]) -> str:
    """The modality of `kind` a source fills: its `modality` key, else the task's first input of
    that kind. The spec and the adapter both ask this, so a source's `shape:` sets the very
    modality its adapter writes."""
    of_kind = [m for m in task.inputs if schema.modality(m).kind == kind]
    name = params.get("modality")
    if not name:
        if not of_kind:
            raise ValueError(f"task {task.name} has no {kind} input (its inputs: {', '.join(task.inputs)})")
        return of_kind[0]
    if name not in of_kind:
        raise ValueError(f"task {task.name} has no {kind} input {name!r} (its {kind} inputs: {of_kind})")
    return str(name)


def class_folders(
    root: Path, mapping: dict[str, str], task_name: str, classes: tuple[str, ...], problems: Problems, layout: str = ""
) -> list[tuple[Path, int]]:
    """(folder, class index) for each sub-folder of `root` named after a class (or mapped to
    one by `classes:`); hidden folders are ignored, an unknown class folder is a problem."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        problems.report(root, f"no class folders inside{f' (layout: {layout})' if layout else ''}")
    out = []
    for folder in folders:
        name = mapping.get(folder.name, folder.name)
        if name not in classes:
            problems.report(
                folder, f"class {name!r} is not a class of {task_name} ({', '.join(classes)}); map it with `classes:`"
            )
            continue
        out.append((folder, classes.index(name)))
    return out


MAX_COLUMNS = 10_000  # far above any clinical table; a wider one is refused from its header
MAX_HEADER_BYTES = 64 << 20  # a header line longer than this is refused without reading more


def column_count_problem(path: Path, limit: int = MAX_COLUMNS) -> str | None:
    """Why a table is too wide to read (naming its first columns and their count), from its header
    alone: pandas would otherwise parse and allocate every cell first (a 1M-column CSV took
    minutes and gigabytes before failing). None when the table is narrow enough."""
    names: list[str] | None
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            names = list(pq.read_schema(path).names)
        else:
            names = _csv_header(path)
    except Exception:  # an unreadable file is reported by the reader that follows, with its own reason
        return None
    if names is None:
        return f"header line longer than {MAX_HEADER_BYTES >> 20} MiB; not a table this ingest reads"
    if len(names) <= limit:
        return None
    first = ", ".join(map(str, names[:5]))
    return f"{len(names)} columns (first: {first}, ...), more than the {limit} a table may have"


def _csv_header(path: Path) -> list[str] | None:
    """The column names on a CSV's first line, or None when that line is longer than MAX_HEADER_BYTES."""
    with open(path, "rb") as f:
        line = f.readline(MAX_HEADER_BYTES + 1)
    if len(line) > MAX_HEADER_BYTES:
        return None
    text = line.decode("utf-8", errors="replace").lstrip("\ufeff")
    return next(csv.reader(io.StringIO(text)), [])


def read_csv_checked(path: Path, problems: Problems, **kwargs: Any) -> pd.DataFrame | None:
    """pd.read_csv(path, **kwargs) after the column-count check; None after reporting (naming the
    file) why it cannot be read, so `on_error: skip` skips it."""
    too_wide = column_count_problem(path)
    if too_wide:
        problems.report(path, too_wide)
        return None
    try:
        return pd.read_csv(path, **kwargs)
    except Exception as e:  # pandas raises parser, decoding, OS and value errors alike
        problems.report(path, f"unreadable CSV ({type(e).__name__}: {e})")
        return None


def optional_import(module: str, extra: str):
    """Import a format's library, or fail with the exact command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise IngestError(
            f"this format needs the Python package {module.split('.')[0]!r}: "
            f"pip install 'multimed-fl[{extra}]'  (or: pip install -e '.[{extra}]' "
            "in a checkout)"
        ) from None


def resolve(base: Path, params: dict[str, Any], key: str = "path") -> Path:
    """A source's path, relative to the data root (the spec's data_root, or its folder)."""
    if key not in params:
        raise ValueError(f"missing key {key!r}")
    return (base / str(params[key])).resolve()


def assign_simulated_sites(samples: SampleSet, k: int, seed: int) -> None:
    """For data without hospitals: deal patients into k sites at random (seeded), named
    `simulated_1..k` so every table and report shows they are simulated, not natural."""
    if k < 1:
        raise ValueError(f"simulated_sites must be >= 1 (got {k})")
    patients = sorted(set(samples.patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    site_of = {patients[j]: f"simulated_{1 + rank % k}" for rank, j in enumerate(order)}
    samples.origin_sites = [site_of[p] for p in samples.patient_ids]
    samples.notes["simulated_sites"] = k


def check_classes(samples: SampleSet, declared: set[str], where: str, problems: Problems) -> None:
    """Every class the source declares must have samples (nnU-Net-style empty-class check);
    a source may cover only some of a task's classes (e.g. tumour yes/no)."""
    spec = samples.schema.task(samples.task)
    if not spec.is_classification:
        return
    seen = {spec.classes[int(t)] for t in samples.targets}
    empty = sorted(declared - seen)
    if empty:
        problems.report(where, f"declared class(es) {empty} of task {samples.task} have no sample")


def standardise_by_group(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each group's rows (a site's) minus that group's column means, over its SDs: the per-site
    statistics the tabular and h5ad adapters use, so no statistic crosses hospitals."""
    out = np.empty_like(values)
    for group in np.unique(groups):
        rows = groups == group
        out[rows] = (values[rows] - values[rows].mean(axis=0)) / (values[rows].std(axis=0) + 1e-9)
    return out


def draw_test_patients(sets: list[SampleSet], test_fraction: float, seed: int) -> set[str]:
    """The patients whose samples form the test split, drawn over every source at once, so a
    patient in two tasks (two targets of one trial) is on the same side in both. Every task
    with more than one patient keeps at least one patient on each side."""
    rng = np.random.default_rng(seed)
    patients = sorted({p for s in sets for p in s.patient_ids})
    n_test = round(test_fraction * len(patients))
    test = set(rng.choice(patients, size=n_test, replace=False)) if n_test else set()
    for s in sets:
        own = sorted(set(s.patient_ids))
        if len(own) < 2:
            continue
        mine = [p for p in own if p in test]
        if not mine:
            test.add(own[int(rng.integers(len(own)))])
        elif len(mine) == len(own):
            test.discard(mine[int(rng.integers(len(mine)))])
    return test


def ingest(
    sets: list[SampleSet],
    out_dir: Path,
    name: str,
    provenance: dict[str, Any],
    schema: CorpusSchema,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the samples as one corpus declaring `schema` (restricted to the tasks present).
    The split is by patient (a patient's samples stay on one side, across tasks too), drawn
    with `seed`; `dataset` is the source of each sample."""
    rows: list[dict[str, Any]] = []
    arrays: dict[str, list[np.ndarray]] = {m: [] for m in schema.modalities}
    targets: dict[str, list[np.ndarray]] = {}
    for s in sets:
        if s.task not in schema.tasks:
            raise IngestError(f"task {s.task}: not a task of the corpus schema ({', '.join(schema.tasks)})")
        if s.schema.task(s.task) != schema.task(s.task):
            raise IngestError(f"task {s.task}: its samples were read for another definition of the task")
        if not len(s):
            raise IngestError(f"task {s.task}: no sample was ingested (every item was skipped?)")
    test = draw_test_patients(sets, test_fraction, seed)
    for s in sets:
        target_offset = len(targets.get(s.task, []))
        targets.setdefault(s.task, []).extend(s.targets)
        for i in range(len(s)):
            row = _manifest_row(s, i, target_offset + i, test)
            row.update(_index_inputs(s, i, arrays, schema))
            rows.append(row)
    manifest = pd.DataFrame(rows)
    for col in [c for c in manifest if c.startswith("idx_")]:  # tasks differ in their inputs
        manifest[col] = manifest[col].fillna(-1).astype("int64")
    out_arrays = {m: np.stack(v) for m, v in arrays.items() if v}
    return write_corpus(
        out_dir,
        manifest,
        out_arrays,
        _stack_targets(targets, schema),
        name,
        provenance,
        schema=schema,
        overwrite=overwrite,
    )


def _manifest_row(s: SampleSet, i: int, target_row: int, test: set[str]) -> dict[str, Any]:
    """The base columns of sample i; its split follows its patient, its label only if scalar."""
    return {
        "sample_id": f"{s.task}/{target_row:07d}",
        "dataset": s.sources[i],
        "task": s.task,
        "patient_id": s.patient_ids[i],
        "origin_site": s.origin_sites[i],
        "split": "test" if s.patient_ids[i] in test else "train",
        "label": float(s.targets[i]) if np.ndim(s.targets[i]) == 0 else np.nan,
        "target_row": target_row,
    }


def _index_inputs(s: SampleSet, i: int, arrays: dict[str, list[np.ndarray]], schema: CorpusSchema) -> dict[str, int]:
    """Append sample i's inputs to the per-modality arrays; its idx_ columns (-1 where it lacks one)."""
    columns: dict[str, int] = {}
    for m in schema.task(s.task).inputs:
        x = s.inputs[m][i] if m in s.inputs else None
        if x is not None:
            columns[index_column(m)] = len(arrays[m])
            arrays[m].append(x)
        else:
            columns[index_column(m)] = -1
    return columns


def _stack_targets(targets: dict[str, list[np.ndarray]], schema: CorpusSchema) -> dict[str, np.ndarray]:
    """One array per task, float32 for regression and int64 for class targets (the format's dtypes)."""
    out: dict[str, np.ndarray] = {}
    for t, v in targets.items():
        dtype = np.float32 if schema.task(t).target == REGRESSION else np.int64
        out[t] = np.stack(v).astype(dtype)
    return out
