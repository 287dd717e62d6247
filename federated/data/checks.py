"""What a corpus folder promises, checked on disk: each problem names the file (and row or column).

Two tiers. `open_problems` is what `Corpus.open` runs before any site reads the corpus: files
present, .npy headers (shape, dtype, size: a truncated or reshaped file is named), row counts,
manifest columns, split and task values, index columns, label ranges per task. It reads the
spec, the manifest (which planning reads anyway) and the targets (one label per sample), but
only the headers of the input arrays, so opening stays fast however large they are.
`scan_problems` adds what needs every input value (finite values, token ids within the
vocabulary) and is run by `multimed-fl corpus check DIR` (`check_corpus`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, SchemaError, Task
from federated.core.multimed import CATALOGUE
from federated.core.targets import BINARY, IGNORE_LABEL, MULTILABEL, PER_RESIDUE, REGRESSION
from federated.data.layout import (
    BASE_COLUMNS,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SPEC_FILE,
    SPLITS,
    CorpusFormatError,
    NpyHeader,
    array_file,
    index_column,
    read_npy_header,
    target_file,
)

SCAN_BLOCK_BYTES = 64 << 20  # full scans read memory-mapped arrays in blocks of about this size
SPEC_KEYS = {"name": str, "n_samples": int, "modalities": dict, "tasks": dict, "origin_sites": list}


def read_spec(path: Path) -> dict[str, Any]:
    """spec.json as a mapping with the keys readers use, or CorpusFormatError naming the file and key."""
    spec_file = path / SPEC_FILE
    if not spec_file.is_file():
        raise CorpusFormatError(f"{path} is not a corpus: {SPEC_FILE} is missing")
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusFormatError(f"{spec_file} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise CorpusFormatError(f"{spec_file} is not a JSON object")
    version = spec.get("schema_version")
    if version not in (1, SCHEMA_VERSION):
        raise CorpusFormatError(f"{spec_file} has schema_version {version!r}; this version reads {SCHEMA_VERSION}")
    for key, kind in SPEC_KEYS.items():
        if not isinstance(spec.get(key), kind):
            raise CorpusFormatError(f"{spec_file}: key {key!r} must be a JSON {kind.__name__} (got {spec.get(key)!r})")
    for section in ("modalities", "tasks"):
        for name, entry in spec[section].items():
            if not isinstance(entry, dict):
                raise CorpusFormatError(f"{spec_file}: {section}.{name} must be a JSON object")
    if version == 1:
        spec["schema"] = _catalogue_schema(spec, spec_file).to_dict()
        spec["schema_version"] = SCHEMA_VERSION
    spec_schema(spec, spec_file)
    return spec


def spec_schema(spec: dict[str, Any], where: Path | str = SPEC_FILE) -> CorpusSchema:
    """The schema a spec declares, checked (a schema naming a path or a made-up kind is refused here)."""
    try:
        return CorpusSchema.from_dict(spec.get("schema"), f"{where}: schema")
    except SchemaError as e:
        raise CorpusFormatError(str(e)) from None


def _catalogue_schema(spec: dict[str, Any], spec_file: Path) -> CorpusSchema:
    """Migrate a version-1 corpus (written before corpora declared their schema, when every task
    and shape came from the MultiMed catalogue): its schema is the catalogue's for its tasks, if
    its arrays have the catalogue's shapes; otherwise it is refused with the command to rebuild."""
    rebuild = (
        "rebuild it with this version (`multimed-fl corpus build --out DIR` for a synthetic corpus, "
        "`multimed-fl ingest SPEC --out DIR --overwrite` for an ingested one)"
    )
    unknown = [t for t in spec["tasks"] if t not in CATALOGUE.tasks]
    if unknown:
        raise CorpusFormatError(
            f"{spec_file}: a version-1 corpus with task(s) {unknown} outside the catalogue; {rebuild}"
        )
    schema = CATALOGUE.restrict(spec["tasks"])
    for m, entry in spec["modalities"].items():
        if m not in schema.modalities or list(entry.get("shape", [])) != list(schema.modality(m).shape):
            raise CorpusFormatError(
                f"{spec_file}: a version-1 corpus whose modality {m!r} does not match the catalogue's; {rebuild}"
            )
    return schema


def read_manifest(path: Path) -> pd.DataFrame:
    """The manifest table, or CorpusFormatError naming the file (a garbage file is not a traceback)."""
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise CorpusFormatError(f"{file} is missing")
    try:
        return pd.read_parquet(file)
    except Exception as e:  # pyarrow's errors share no base class narrower than Exception
        raise CorpusFormatError(f"{file}: not a readable Parquet table ({type(e).__name__}: {e})") from None


def open_problems(path: Path, spec: dict[str, Any], manifest: pd.DataFrame) -> list[str]:
    """The cheap checks (no input array data read); an empty list for a sound corpus."""
    schema = spec_schema(spec, path / SPEC_FILE)
    problems = spec_problems(path, spec, schema)
    problems += manifest_problems(path, spec, schema, manifest)
    if problems:  # array and target checks index the manifest by the columns checked above
        return problems
    problems += array_problems(path, spec, schema, manifest)
    problems += target_problems(path, spec, schema, manifest)
    return problems


def spec_problems(path: Path, spec: dict[str, Any], schema: CorpusSchema) -> list[str]:
    """Arrays and tasks the spec lists but its schema does not declare (or the reverse)."""
    where = path / SPEC_FILE
    problems = [
        f"{where}: modality {m!r} has an array but is not in the schema (schema modalities: "
        f"{', '.join(schema.modalities)})"
        for m in spec["modalities"]
        if m not in schema.modalities
    ]
    if set(spec["tasks"]) != set(schema.tasks):
        problems.append(f"{where}: tasks {sorted(spec['tasks'])} differ from the schema's tasks {sorted(schema.tasks)}")
    for t in spec["tasks"]:
        if t in schema.tasks and schema.tasks[t].target == REGRESSION:
            stats = spec["tasks"][t]
            bad = [k for k in ("mean", "std", "mad") if not _finite_number(stats.get(k))]
            if bad or stats["mad"] < 0 or stats["std"] < 0:
                problems.append(f"{where}: tasks.{t} needs finite mean, std and mad >= 0 (the score's scale): {stats}")
    return problems


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def manifest_problems(path: Path, spec: dict[str, Any], schema: CorpusSchema, manifest: pd.DataFrame) -> list[str]:
    """Columns, their types, row count, split and task values of the manifest, each named with a row."""
    where = path / MANIFEST_FILE
    columns = [*BASE_COLUMNS, *(index_column(m) for m in spec["modalities"] if m in schema.modalities)]
    missing = [c for c in columns if c not in manifest.columns]
    if missing:
        return [f"{where}: lacks columns {missing}"]
    integer = ["target_row", *(c for c in manifest.columns if c.startswith("idx_"))]
    problems = [
        f"{where}: column {c} has dtype {manifest[c].dtype}, expected integers"
        for c in integer
        if not pd.api.types.is_integer_dtype(manifest[c])
    ]
    if not pd.api.types.is_numeric_dtype(manifest["label"]):
        problems.append(f"{where}: column label has dtype {manifest['label'].dtype}, expected numbers")
    if problems:
        return problems
    if len(manifest) != spec["n_samples"]:
        problems.append(f"{where}: {len(manifest)} rows, but {SPEC_FILE} says n_samples={spec['n_samples']}")
    duplicated = manifest["sample_id"].duplicated()
    if duplicated.any():
        problems.append(_rows(where, "sample_id", duplicated, manifest["sample_id"], "is a duplicate"))
    problems += _value_problems(where, manifest, "split", SPLITS, f"is not one of {', '.join(SPLITS)}")
    codes, names = pd.factorize(manifest["task"], use_na_sentinel=False)
    problems += _value_problems(
        where, manifest, "task", tuple(spec["tasks"]), f"is not a task {SPEC_FILE} lists", (codes, names)
    )
    counts = dict(zip(names, np.bincount(codes, minlength=len(names)), strict=True))
    for t, stats in spec["tasks"].items():
        if stats.get("n") is not None and int(counts.get(t, 0)) != stats["n"]:
            problems.append(f"{where}: {int(counts.get(t, 0))} rows of task {t}, but {SPEC_FILE} says n={stats['n']}")
    return problems


def _value_problems(
    where: Path,
    manifest: pd.DataFrame,
    column: str,
    allowed: tuple[str, ...],
    what: str,
    factorized: tuple[np.ndarray, Any] | None = None,
) -> list[str]:
    """The first row whose `column` holds a value outside `allowed` (factorised: one pass over the
    column, then a test per distinct value, not per row)."""
    codes, values = factorized or pd.factorize(manifest[column], use_na_sentinel=False)
    bad_codes = [k for k, v in enumerate(values) if v not in allowed]
    if not bad_codes:
        return []
    return [_rows(where, column, np.isin(codes, bad_codes), manifest[column], what)]


def _rows(where: Path, column: str, bad: pd.Series | np.ndarray, values: pd.Series, what: str) -> str:
    """'<file>: column C row R: value V <what> (N rows in all)', naming the first offending row."""
    mask = np.asarray(bad, dtype=bool)
    first = int(np.flatnonzero(mask)[0])
    value = values.iloc[first]
    value = value.item() if isinstance(value, np.generic) else value
    return f"{where}: column {column} row {first}: {value!r} {what} ({_n_rows(int(mask.sum()))} in all)"


def _n_rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _header(path: Path, rel: str, problems: list[str]) -> NpyHeader | None:
    file = path / rel
    if not file.is_file():
        problems.append(f"{file} is missing")
        return None
    try:
        return read_npy_header(file)
    except CorpusFormatError as e:
        problems.append(str(e))
        return None


def array_problems(path: Path, spec: dict[str, Any], schema: CorpusSchema, manifest: pd.DataFrame) -> list[str]:
    """Each input array's header against the schema and the spec; each index column inside its array."""
    problems: list[str] = []
    undeclared = [c.removeprefix("idx_") for c in manifest.columns if c.startswith("idx_")]
    for m in [*schema.modalities, *(m for m in undeclared if m not in schema.modalities)]:
        col = index_column(m)
        idx = manifest[col].to_numpy() if col in manifest.columns else np.full(len(manifest), -1)
        if m not in spec["modalities"]:
            if (idx >= 0).any():
                problems.append(_rows(path / MANIFEST_FILE, col, idx >= 0, manifest[col], f"points into no {m} array"))
            continue
        header = _header(path, array_file(m), problems)
        if header is None:
            continue
        registered, file = schema.modality(m), path / array_file(m)
        if header.shape[1:] != registered.shape:
            problems.append(f"{file}: per-sample shape {header.shape[1:]}, expected {registered.shape}")
        if header.dtype != np.dtype(registered.dtype):
            problems.append(f"{file}: dtype {header.dtype}, expected {registered.dtype}")
        n = header.shape[0] if header.shape else 0
        if n != spec["modalities"][m].get("n", n):
            problems.append(f"{file}: {n} rows, but {SPEC_FILE} says n={spec['modalities'][m]['n']}")
        outside = (idx < -1) | (idx >= n)
        if outside.any():
            problems.append(_rows(path / MANIFEST_FILE, col, outside, manifest[col], f"is outside {file} ({n} rows)"))
    return problems


def target_problems(path: Path, spec: dict[str, Any], schema: CorpusSchema, manifest: pd.DataFrame) -> list[str]:
    """Each task's targets: header (dtype, label shape), target rows inside it, labels in the task's range."""
    problems: list[str] = []
    codes, names = pd.factorize(manifest["task"])
    code_of = {name: k for k, name in enumerate(names)}
    target_rows = manifest["target_row"].to_numpy()
    for t in spec["tasks"]:
        if t not in schema.tasks:
            continue
        header = _header(path, target_file(t), problems)
        if header is None:
            continue
        task, file = schema.task(t), path / target_file(t)
        kind = "f" if task.target == REGRESSION else "iu"
        if header.shape[1:] != task.label_shape or header.dtype.kind not in kind:
            what = "floats" if kind == "f" else "integers"
            problems.append(
                f"{file}: per-sample shape {header.shape[1:]} and dtype {header.dtype}; task {t} stores "
                f"{what} of per-sample shape {task.label_shape}"
            )
            continue
        n = header.shape[0]
        outside = (codes == code_of.get(t, -2)) & ((target_rows < 0) | (target_rows >= n))
        if outside.any():
            where = f"is outside {file} ({n} rows)"
            problems.append(_rows(path / MANIFEST_FILE, "target_row", outside, manifest["target_row"], where))
        data = np.fromfile(file, dtype=header.dtype, count=math.prod(header.shape), offset=header.data_offset)
        label = label_problem(task, data.reshape(header.shape), file)
        if label:
            problems.append(label)
    return problems


def label_range(task: Task) -> str:
    """The labels a task's targets may hold, in words."""
    k = len(task.classes)
    if task.target == REGRESSION:
        return "finite numbers"
    if task.target in (BINARY, MULTILABEL):
        return "0 or 1"
    classes = f"class indices 0..{k - 1} ({k} classes)"
    return f"{classes} or {IGNORE_LABEL} (padding)" if task.target == PER_RESIDUE else classes


def label_problem(task: Task, targets: np.ndarray, file: Path) -> str | None:
    """The first row of `targets` outside the task's label range, named with the file and task."""
    flat = np.asarray(targets).reshape(len(targets), -1)
    if task.target == REGRESSION:
        ok = np.isfinite(flat)
    else:
        top = 2 if task.target in (BINARY, MULTILABEL) else len(task.classes)
        ok = (flat >= 0) & (flat < top)
        if task.target == PER_RESIDUE:
            ok |= flat == IGNORE_LABEL
    bad_rows = ~ok.all(axis=1)
    if not bad_rows.any():
        return None
    row = int(np.flatnonzero(bad_rows)[0])
    value = flat[row][~ok[row]][0]
    return (
        f"{file}: row {row} holds label {value.item()!r}, outside task {task.name}'s labels: "
        f"{label_range(task)} ({_n_rows(int(bad_rows.sum()))} in all)"
    )


def _blocks(arr: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of a memory-mapped array in blocks of about SCAN_BLOCK_BYTES."""
    per_row = max(1, arr[:1].nbytes)
    step = max(1, SCAN_BLOCK_BYTES // per_row)
    for start in range(0, len(arr), step):
        yield start, np.asarray(arr[start : start + step])


def scan_problems(path: Path, spec: dict[str, Any]) -> list[str]:
    """Every input value read once: floats finite, token ids inside the modality's vocabulary."""
    problems: list[str] = []
    schema = spec_schema(spec, path / SPEC_FILE)
    for m in spec["modalities"]:
        if m not in schema.modalities:
            continue
        registered, file = schema.modality(m), path / array_file(m)
        try:
            header = read_npy_header(file)
        except CorpusFormatError:
            continue  # open_problems names it; a scan needs a readable array
        if header.shape[1:] != registered.shape or header.dtype != np.dtype(registered.dtype):
            continue
        arr = np.load(file, mmap_mode="r")
        if registered.is_tokens:
            what = f"token ids outside 0..{registered.vocab_size - 1} (the {m} vocabulary)"
        elif registered.raw_features and registered.impute:
            what = "infinite values"
        else:
            what = "NaN or infinite values"
        first, count = -1, 0
        for start, block in _blocks(arr):
            flat = block.reshape(len(block), -1)
            if registered.is_tokens:
                bad = ((flat < 0) | (flat >= registered.vocab_size)).any(axis=1)
            elif registered.raw_features and registered.impute:  # a missing value is NaN, filled at load
                bad = np.isinf(flat).any(axis=1)
            else:
                bad = ~np.isfinite(flat).all(axis=1)
            if bad.any() and first < 0:
                first = start + int(np.flatnonzero(bad)[0])
            count += int(bad.sum())
        if count:
            problems.append(f"{file}: row {first} holds {what} ({_n_rows(count)} in all)")
    return problems


def check_corpus(path: str | Path) -> list[str]:
    """Every problem of the corpus in `path` (cheap checks, then full-data scans); [] when sound."""
    path = Path(path)
    try:
        spec = read_spec(path)
        manifest = read_manifest(path)
    except CorpusFormatError as e:
        return [str(e)]
    return open_problems(path, spec, manifest) + scan_problems(path, spec)


def summarise(path: Path, problems: list[str], limit: int = 10) -> str:
    """One error message for Corpus.open: the problems (at most `limit`) and where to see them all."""
    if len(problems) == 1:
        return f"corpus {path}: {problems[0]}"
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return (
        f"corpus {path} has {len(problems)} problems:\n  {shown}{more}\n"
        f"(multimed-fl corpus check {path} lists them all)"
    )
