"""What every adapter shares: collecting samples, reporting problems, writing the corpus."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, SchemaError, Task
from federated.core.features import Feature, first_feature_difference
from federated.core.registry import Registry
from federated.core.targets import KINDS, REGRESSION
from federated.data.format import index_column, write_corpus


class IngestError(ValueError):
    """Bad input data; the message names the file (and row) and what is wrong with it."""


@dataclass
class Problems:
    """Stop at the first problem (on_error=stop) or record it and skip the item (skip). Warnings
    (what an adapter chose for the source, a constant or mostly missing column) never stop an
    ingest: they are the ingest report, printed and kept in spec.json's provenance."""

    on_error: str = "stop"
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)

    def report(self, where: str | Path, reason: str) -> None:
        if self.on_error == "stop":
            raise IngestError(f"{where}: {reason}")
        self.skipped.append({"item": str(where), "reason": reason})

    def warn(self, where: str | Path, message: str) -> None:
        self.warnings.append({"item": str(where), "warning": message})


@dataclass(frozen=True)
class SampleBlock:
    """Samples side by side, one array per column: how a SampleSet holds them, so a million
    table rows are dealt into sites, split and written as arrays, not as a million objects."""

    inputs: dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (has it: bool [n], values [n_has, *shape])
    targets: np.ndarray  # [n, *label_shape]
    origin_sites: np.ndarray  # [n] of str (object)
    patient_ids: np.ndarray  # [n] of str (object)
    sources: np.ndarray  # [n] of str (object)

    def __len__(self) -> int:
        return len(self.targets)


def _texts(values: Any, n: int) -> np.ndarray:
    """A column of strings as an object array of length n (a ValueError when its length differs)."""
    out = np.empty(n, dtype=object)
    if len(values) != n:
        raise ValueError(f"{len(values)} values for {n} samples")
    out[:] = values
    return out


@dataclass
class SampleSet:
    """Samples of one task, as adapters produce them: inputs at the shapes `schema` declares,
    checked as they are added (one by one with `add`, a table's rows at once with `extend`), so
    an adapter that resizes wrongly fails at its first sample."""

    task: str
    schema: CorpusSchema
    notes: dict[str, Any] = field(default_factory=dict)  # what a reader of the corpus should know
    # vector modality -> (its features, its impute method): what the adapter's columns mean, for
    # the schema (`ingest` checks that every set filling a modality gives the same)
    features: dict[str, tuple[tuple[Feature, ...], str]] = field(default_factory=dict)
    where: str = ""  # the source that produced it (a spec's `sources[i]`), for messages
    # patient -> in the test split, where the source fixes sides (tabular `split_column`), and the
    # column that fixed them, for messages
    fixed_sides: dict[str, bool] = field(default_factory=dict)
    split_column: str = ""
    _blocks: list[SampleBlock] = field(default_factory=list, init=False, repr=False)
    # samples given one by one, not yet a block: (inputs, target, origin site, patient, source)
    _pending: list[tuple[dict[str, np.ndarray], np.ndarray, str, str, str]] = field(
        default_factory=list, init=False, repr=False
    )

    def add(self, inputs: dict[str, np.ndarray], target: Any, origin_site: str, patient_id: str, source: str) -> None:
        spec = self.schema.task(self.task)
        for m, x in inputs.items():
            if m not in spec.inputs:
                raise ValueError(f"task {self.task} has no input {m!r}")
            shape = self.schema.modality(m).shape
            if tuple(x.shape) != tuple(shape):
                raise ValueError(f"{m} sample of shape {tuple(x.shape)}, expected {tuple(shape)}")
        given = {m: x.astype(self.schema.modality(m).dtype) for m, x in inputs.items()}
        self._pending.append((given, np.asarray(target), origin_site, patient_id, source))

    def extend(
        self,
        inputs: dict[str, np.ndarray],
        targets: np.ndarray,
        origin_sites: Any,
        patient_ids: Any,
        source: str,
    ) -> None:
        """Add len(targets) samples at once: `inputs[m]` holds one row per sample ([n, *shape]); a
        task input missing from `inputs` is one every one of these samples lacks."""
        spec, n = self.schema.task(self.task), len(targets)
        for m, x in inputs.items():
            if m not in spec.inputs:
                raise ValueError(f"task {self.task} has no input {m!r}")
            shape = self.schema.modality(m).shape
            if tuple(x.shape) != (n, *shape):
                raise ValueError(f"{m} samples of shape {tuple(x.shape)}, expected {(n, *shape)}")
        columns = {}
        for m in spec.inputs:
            modality = self.schema.modality(m)
            if m in inputs:
                columns[m] = (np.ones(n, dtype=bool), inputs[m].astype(modality.dtype))
            else:
                columns[m] = (np.zeros(n, dtype=bool), np.empty((0, *modality.shape), dtype=modality.dtype))
        block = SampleBlock(
            columns, np.asarray(targets), _texts(origin_sites, n), _texts(patient_ids, n), _texts([source] * n, n)
        )
        self._flush()
        self._blocks.append(block)

    def _flush(self) -> None:
        """The samples added one by one become a block (in their order, after the blocks before them)."""
        if not self._pending:
            return
        pending, n = self._pending, len(self._pending)
        columns = {}
        for m in self.schema.task(self.task).inputs:  # a sample lacks an input it was not given
            modality = self.schema.modality(m)
            has = np.array([m in p[0] for p in pending], dtype=bool)
            values = [p[0][m] for p in pending if m in p[0]]
            columns[m] = (
                has,
                np.stack(values) if values else np.empty((0, *modality.shape), dtype=modality.dtype),
            )
        targets = np.stack([p[1] for p in pending])
        columns_of = [_texts([p[k] for p in pending], n) for k in (2, 3, 4)]
        self._blocks.append(SampleBlock(columns, targets, *columns_of))
        self._pending = []

    def block(self) -> SampleBlock:
        """Every sample, in the order added, as one block."""
        self._flush()
        spec, blocks = self.schema.task(self.task), self._blocks
        if not blocks:
            empty = {m: self.schema.modality(m) for m in spec.inputs}
            inputs = {m: (np.zeros(0, dtype=bool), np.empty((0, *v.shape), dtype=v.dtype)) for m, v in empty.items()}
            texts = np.empty(0, dtype=object)
            return SampleBlock(inputs, np.empty((0, *spec.label_shape)), texts, texts, texts)
        if len(blocks) > 1:
            inputs = {
                m: (
                    np.concatenate([b.inputs[m][0] for b in blocks]),
                    np.concatenate([b.inputs[m][1] for b in blocks]),
                )
                for m in spec.inputs
            }
            joined = (
                np.concatenate([getattr(b, c) for b in blocks]) for c in ("origin_sites", "patient_ids", "sources")
            )
            self._blocks = [SampleBlock(inputs, np.concatenate([b.targets for b in blocks]), *joined)]
        return self._blocks[0]

    @property
    def targets(self) -> np.ndarray:
        """Every sample's target, [n, *label_shape]."""
        return self.block().targets

    @property
    def patient_ids(self) -> np.ndarray:
        return self.block().patient_ids

    @property
    def sources(self) -> np.ndarray:
        return self.block().sources

    @property
    def origin_sites(self) -> np.ndarray:
        return self.block().origin_sites

    @origin_sites.setter
    def origin_sites(self, sites: Any) -> None:
        block = self.block()
        self._blocks = [dataclasses.replace(block, origin_sites=_texts(sites, len(block)))]

    def __len__(self) -> int:
        return sum(len(b) for b in self._blocks) + len(self._pending)


Adapter = Callable[[dict[str, Any], Path, Problems, CorpusSchema], SampleSet]
ADAPTERS: Registry[Adapter] = Registry("ingest adapter")
# Keys every source may have, whatever its adapter (read by spec.py, not by adapters).
COMMON_KEYS = frozenset({"adapter", "task", "on_error", "simulated_sites", "shape"})
# adapter name -> the keys its sources may have besides COMMON_KEYS
ADAPTER_KEYS: dict[str, frozenset[str]] = {}
# adapter name -> the kind of the modality a source's `shape:` sets (its main input)
ADAPTER_FILLS: dict[str, str] = {}
# adapter name -> the source keys that name files or folders (checked to lie inside the data root)
ADAPTER_PATHS: dict[str, frozenset[str]] = {}
# adapter name -> keys it no longer reads -> what to do instead (refused with that message)
ADAPTER_RETIRED: dict[str, dict[str, str]] = {}
# adapter name -> the part of a data dictionary it reads ("columns" or "genes"), for those that read one
ADAPTER_DICTIONARY: dict[str, str] = {}


def adapter(
    name: str,
    keys: set[str] | frozenset[str],
    fills: str,
    paths: frozenset[str] = frozenset({"path"}),
    retired: dict[str, str] | None = None,
    dictionary: str = "",
) -> Callable[[Adapter], Adapter]:
    """Register an adapter, the source keys it reads (so a misspelt key is refused by name), the
    kind of modality it fills (so the spec can settle a source's `shape:` before reading), the
    keys among them that name files or folders (so each is checked against the data root first),
    the keys it once read, each with what replaces it (refused with that message), and the part of
    a data dictionary it encodes by (its `dictionary` key; a spec's `dictionary:` reaches it when
    that part is there)."""
    if fills not in KINDS:
        raise ValueError(f"adapter {name}: fills {fills!r} is not one of {', '.join(KINDS)}")
    if dictionary and "dictionary" not in keys:
        raise ValueError(f"adapter {name}: reads a dictionary's {dictionary} but has no `dictionary` key")
    if not paths <= set(keys):
        raise ValueError(f"adapter {name}: path keys {sorted(paths - set(keys))} are not among its keys")

    def deco(fn: Adapter) -> Adapter:
        ADAPTER_KEYS[name] = frozenset(keys)
        ADAPTER_FILLS[name] = fills
        ADAPTER_PATHS[name] = frozenset(paths)
        ADAPTER_RETIRED[name] = dict(retired or {})
        if dictionary:
            ADAPTER_DICTIONARY[name] = dictionary
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
    root: Path,
    mapping: dict[str, str],
    task_name: str,
    classes: tuple[str, ...],
    problems: Problems,
    layout: str = "",
    data_root: Path | None = None,
) -> list[tuple[Path, int]]:
    """(folder, class index) for each sub-folder of `root` named after a class (or mapped to
    one by `classes:`); hidden folders are ignored, an unknown class folder is a problem, and so
    is one whose real path leaves `data_root` (default: `root`)."""
    listed = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    folders = kept_inside(listed, data_root or root, problems)
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


# Suffixes from which pandas infers a compression (and tar): such a file would be decompressed
# without a bound while it is parsed, so a small file could expand to gigabytes. Refused by name.
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar", ".tgz", ".tbz2", ".txz")


def compressed_problem(path: Path) -> str | None:
    """Why a table is not read when its name says it is compressed (nothing is opened); None otherwise.
    Every table reader passes compression=None, so no other name is decompressed either."""
    suffix = path.suffix.lower()
    if suffix not in COMPRESSED_SUFFIXES:
        return None
    return (
        f"a compressed table ({suffix}) is not read: ingest decompresses nothing (a small archive can expand "
        f"without bound); decompress it first and name the plain file ({path.stem})"
    )


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
    too_wide = compressed_problem(path) or column_count_problem(path)
    if too_wide:
        problems.report(path, too_wide)
        return None
    try:
        return pd.read_csv(path, **{**kwargs, "compression": None})
    except Exception as e:  # pandas raises parser, decoding, OS and value errors alike
        problems.report(path, f"unreadable CSV ({error_reason(e)})")
        return None


def error_reason(e: BaseException) -> str:
    """A reader's exception as a report may show it: the type, and the message only where it says
    where and why without quoting the file (an OS error's path and reason, a parser's line and
    field counts). Other messages may quote the bytes or the cell that failed: only the type."""
    if isinstance(e, UnicodeDecodeError):
        return f"{type(e).__name__}: not {e.encoding} text (byte offset {e.start})"
    if isinstance(e, OSError | pd.errors.ParserError | pd.errors.EmptyDataError):
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return type(e).__name__


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


def real_path(path: Path) -> Path:
    """`path` with every symlink followed; only names are resolved: nothing is opened or read."""
    return Path(os.path.realpath(path))


def inside(path: Path, root: Path) -> Path | None:
    """The real path of `path` when it lies inside the real path of `root`, else None."""
    real = real_path(path)
    return real if real.is_relative_to(real_path(root)) else None


def outside(key: str, value: object, root: Path) -> str:
    """The refusal of a source's `key` whose path leaves the data root (naming both, not opened)."""
    return (
        f"`{key}`: {value} (real path {real_path(root / str(value))}) lies outside the data root "
        f"{real_path(root)}; not opened. "
        "A source reads only inside its data root: the spec's folder (or its `data_root` inside it), "
        "or the folder given with --data-root DIR"
    )


def resolve(base: Path, params: dict[str, Any], key: str = "path") -> Path:
    """A source's path, relative to the data root `base` (--data-root, else the spec's data_root,
    else its folder), with its symlinks resolved; ValueError, before anything is opened, when it
    lies outside the data root (`../`, an absolute path, a symlink pointing out)."""
    if key not in params:
        raise ValueError(f"missing key {key!r}")
    path = inside(base / str(params[key]), base)
    if path is None:
        raise ValueError(outside(key, params[key], base))
    return path


def kept_inside(paths: Iterable[Path], root: Path, problems: Problems, listed_at: str = "") -> list[Path]:
    """The paths that lie inside the data root `root` (symlinks followed), in order; each other is
    reported (`listed_at`: the row or record that named it), never opened."""
    real_root, kept = real_path(root), []
    for path in paths:
        if inside(path, real_root) is not None:
            kept.append(path)
        else:
            problems.report(listed_at or path, f"a path that lies outside the data root {real_root}; not opened")
    return kept


def assign_simulated_sites(samples: SampleSet, k: int, seed: int) -> None:
    """For data without hospitals: deal patients into k sites at random (seeded), named
    `simulated_1..k` so every table and report shows they are simulated, not natural."""
    if k < 1:
        raise ValueError(f"simulated_sites must be >= 1 (got {k})")
    codes, patients = _sorted_codes(samples.patient_ids)  # patients in sorted order, each sample's
    order = np.random.default_rng(seed).permutation(len(patients))
    rank = np.empty(len(patients), dtype=np.int64)
    rank[order] = np.arange(len(patients))  # the patient order[r] is dealt r-th: into site r % k
    names = _texts([f"simulated_{1 + j}" for j in range(k)], k)
    samples.origin_sites = names[rank[codes] % k]
    samples.notes["simulated_sites"] = k


def _sorted_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code of each value, the distinct values sorted as `sorted` sorts them): hashed, not
    compared row by row, so a million patient ids take a fraction of a second."""
    codes, uniques = pd.factorize(np.asarray(values, dtype=object))
    distinct = uniques.tolist()
    order = sorted(range(len(distinct)), key=distinct.__getitem__)  # Python's own string order
    position = np.empty(len(distinct), dtype=np.int64)
    position[order] = np.arange(len(distinct))
    return position[codes], np.asarray(uniques, dtype=object)[order]


_ONE_TYPE = frozenset({"string", "integer", "floating", "boolean", "empty"})


def distinct_cells(column: pd.Series) -> tuple[np.ndarray, list[Any]]:
    """(the code of each cell, the distinct cells as `tolist` gives them): what depends only on a
    cell's value is then computed once per value, not once per row. Where equal hashes could join
    cells a row-by-row reading keeps apart (1, 1.0 and True in one object column; 0.0 and -0.0),
    every cell is its own value."""
    kind = pd.api.types.infer_dtype(column, skipna=True)
    if kind == "floating":
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        joins = bool(np.signbit(values[values == 0]).any())
    else:
        joins = kind not in _ONE_TYPE
    if joins:
        return np.arange(len(column)), column.tolist()
    codes, uniques = pd.factorize(column, use_na_sentinel=False)
    return codes, uniques.tolist()


def check_classes(samples: SampleSet, declared: set[str], where: str, problems: Problems) -> None:
    """Every class the source declares must have samples (nnU-Net-style empty-class check);
    a source may cover only some of a task's classes (e.g. tumour yes/no)."""
    spec = samples.schema.task(samples.task)
    if not spec.is_classification:
        return
    seen = {spec.classes[int(t)] for t in np.unique(samples.targets)}
    empty = sorted(declared - seen)
    if empty:
        problems.report(where, f"declared class(es) {empty} of task {samples.task} have no sample")


def draw_test_patients(sets: list[SampleSet], test_fraction: float, seed: int) -> list[np.ndarray]:
    """Whether each sample of each set is in the test split: its patient's side, drawn over
    every source at once, so a patient in two tasks (two targets of one trial) is on the same
    side in both. Every task with more than one patient keeps at least one patient on each side.
    Patients are numbered in sorted order, so the draw is the seed's, whatever the row order."""
    rng = np.random.default_rng(seed)
    lengths = [len(s) for s in sets]
    codes, patients = _sorted_codes(np.concatenate([s.patient_ids for s in sets]))
    n_test = round(test_fraction * len(patients))
    test = np.zeros(len(patients), dtype=bool)
    if n_test:
        test[rng.choice(len(patients), size=n_test, replace=False)] = True
    per_set = np.split(codes, np.cumsum(lengths)[:-1])
    for own_rows in per_set:
        own = np.flatnonzero(np.bincount(own_rows, minlength=len(patients)))  # this set's patients, sorted
        if len(own) < 2:
            continue
        mine = own[test[own]]
        if not len(mine):
            test[own[int(rng.integers(len(own)))]] = True
        elif len(mine) == len(own):
            test[mine[int(rng.integers(len(mine)))]] = False
    fixed: dict[str, bool] = {}
    fixed_by: dict[str, SampleSet] = {}  # the set that fixed each patient's side first
    for s in sets:
        for patient, side in s.fixed_sides.items():
            if fixed.setdefault(patient, side) != side:
                first = fixed_by[patient]
                raise IngestError(  # names the sources and columns, never the patient (a cell's value)
                    f"{_name(first)} (split column {first.split_column!r}) and {_name(s)} (split column "
                    f"{s.split_column!r}) put a patient on different sides (train and test); a patient is on one "
                    "side: give the sources one split, or distinct patient ids (patient_column)"
                )
            fixed_by.setdefault(patient, s)
    if fixed:  # the sources' own split wins over the draw
        position = {p: i for i, p in enumerate(patients.tolist())}
        test[[position[p] for p in fixed]] = list(fixed.values())
    return [test[c] for c in per_set]


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
    with `seed`; `dataset` is the source of each sample. A vector modality whose sets give features
    declares them (and its impute method) in the schema written."""
    schema = schema_with_features(sets, schema)
    parts: list[pd.DataFrame] = []
    arrays: dict[str, list[np.ndarray]] = {m: [] for m in schema.modalities}
    targets: dict[str, list[np.ndarray]] = {}
    for s in sets:
        if s.task not in schema.tasks:
            raise IngestError(f"task {s.task}: not a task of the corpus schema ({', '.join(schema.tasks)})")
        if s.schema.task(s.task) != schema.task(s.task):
            raise IngestError(f"task {s.task}: its samples were read for another definition of the task")
        if not len(s):
            raise IngestError(f"task {s.task}: no sample was ingested (every item was skipped?)")
    for s, in_test in zip(sets, draw_test_patients(sets, test_fraction, seed), strict=True):
        block = s.block()
        target_offset = sum(len(t) for t in targets.get(s.task, []))
        targets.setdefault(s.task, []).append(block.targets)
        part = _manifest_part(s.task, block, target_offset, in_test)
        for m in schema.task(s.task).inputs:
            part[index_column(m)] = _index_input(block, m, arrays)
        parts.append(part)
    manifest = pd.concat(parts, ignore_index=True, sort=False)  # columns in order of first appearance
    for col in [c for c in manifest if c.startswith("idx_")]:  # tasks differ in their inputs
        manifest[col] = manifest[col].fillna(-1).astype("int64")
    out_arrays = {m: np.concatenate(v) for m, v in arrays.items() if v}
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


def schema_with_features(sets: list[SampleSet], schema: CorpusSchema) -> CorpusSchema:
    """`schema` with each vector modality's features and impute method, as the sets that fill it
    give them. Every set filling a modality must give the same list (two tables encoded apart
    would put different things in one column): else IngestError naming both sources and the
    first feature that differs."""
    given: dict[str, tuple[SampleSet, tuple[Feature, ...], str]] = {}
    for s in sets:
        for m, (features, impute) in s.features.items():
            if m not in given:
                given[m] = (s, features, impute)
                continue
            first, features0, impute0 = given[m]
            where = first_feature_difference(features, features0).replace("there", f"in {_name(first)}")
            if where or impute != impute0:
                why = where or f"impute {impute or 'none'!r} here, {impute0 or 'none'!r} in {_name(first)}"
                raise IngestError(
                    f"{_name(s)}: modality {m} is filled by two sources that encode it differently: {why}; "
                    "sources filling one modality must list the same features (use one data dictionary)"
                )
    for s in sets:  # a set filling a modality that others describe, without describing it itself
        for m, (first, _, _) in given.items():
            if m not in s.features and m in s.schema.task(s.task).inputs and s.block().inputs[m][0].any():
                raise IngestError(
                    f"{_name(s)}: fills modality {m} without naming its features, which {_name(first)} "
                    "names; a modality's columns mean one thing in a corpus"
                )
    if not given:
        return schema
    modalities = dict(schema.modalities)
    for m, (first, features, impute) in given.items():
        try:
            modalities[m] = dataclasses.replace(schema.modality(m), features=features, impute=impute)
        except SchemaError as e:
            raise IngestError(f"{_name(first)}: {e}") from None
    return CorpusSchema(modalities, dict(schema.tasks))


def _name(s: SampleSet) -> str:
    return s.where or f"the source of task {s.task}"


def _manifest_part(task: str, block: SampleBlock, target_offset: int, in_test: np.ndarray) -> pd.DataFrame:
    """The base manifest columns of a set's samples; a sample's split follows its patient, its
    label is its target when that is a scalar (NaN otherwise)."""
    n = len(block)
    target_rows = np.arange(target_offset, target_offset + n, dtype=np.int64)
    scalar = block.targets.ndim == 1
    return pd.DataFrame(
        {
            "sample_id": _texts([f"{task}/{r:07d}" for r in range(target_offset, target_offset + n)], n),
            "dataset": block.sources,
            "task": _texts([task] * n, n),
            "patient_id": block.patient_ids,
            "origin_site": block.origin_sites,
            "split": _texts(["train", "test"], 2)[in_test.astype(np.int64)],
            "label": block.targets.astype(np.float64) if scalar else np.full(n, np.nan),
            "target_row": target_rows,
        }
    )


def _index_input(block: SampleBlock, modality: str, arrays: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Append the block's values of `modality` to its array's parts; each sample's row in that
    array (-1 where the sample lacks it)."""
    has, values = block.inputs[modality]
    start = sum(len(v) for v in arrays[modality])
    rows = np.full(len(has), -1, dtype=np.int64)
    rows[has] = np.arange(start, start + len(values))
    if len(values):
        arrays[modality].append(values)
    return rows


def _stack_targets(targets: dict[str, list[np.ndarray]], schema: CorpusSchema) -> dict[str, np.ndarray]:
    """One array per task, float32 for regression and int64 for class targets (the format's dtypes)."""
    out: dict[str, np.ndarray] = {}
    for t, v in targets.items():
        dtype = np.float32 if schema.task(t).target == REGRESSION else np.int64
        out[t] = np.concatenate(v).astype(dtype)
    return out
