"""`tabular`: CSV or Parquet rows of features and a label, optionally with a site column.

    - adapter: tabular
      task: breast_cancer_classification
      path: data/wdbc.csv
      label_column: diagnosis
      labels: {B: benign, M: malignant}   # value -> task class (default: class names or indices)
      dictionary: dictionary.yaml        # the coordinator's data dictionary (relative to the spec;
                                         # default: the spec's `dictionary:`): types, units, ranges,
                                         # missing codes, categorical levels and reference levels
      feature_columns: [radius_mean, texture_mean, ...]   # default: the dictionary's columns, or
                                         # without one every other numeric column (the report lists them)
      categorical_columns: [smoker, group]   # one indicator per level but the reference level
      site_column: clinic                # becomes origin_site (natural sites); default: origin_site
      patient_column: id                 # default: the file and the row (`icu.csv:row0`, the path
                                         # inside the data root), so two files' rows are two patients
      split_column: split                # cells `train` or `test`: each patient's side is the table's,
                                         # not drawn (a patient on both sides is refused), so hospitals
                                         # ingesting their own rows and a pooled ingest split alike
      impute: median                     # mean | median: a missing value is kept (NaN) and filled at
                                         # load time; default: none, a missing value is a row problem
      allow_leaks: [prior_sepsis]        # columns the leak check lets through (see leaks.py)
      max_missing_share: 0.5             # a column missing in more of the rows is named in the report
      modality: tabular                  # default: the task's first vector input

Ingest stores raw values: a numeric feature as read (after the dictionary's missing codes and
range), a categorical one as 0/1 indicators, a missing cell as NaN (only with `impute`; on every
indicator of its column). Imputation and standardisation are a load-time transform whose
statistics come from the run's `preprocess.statistics` (federated, per_site or pooled), so the
old `statistics:` key is refused. The features -- name (`age`, `sex=female`), source column,
kind, level, unit, range -- and the impute method go into the corpus's schema, where the
handshake compares them between hospitals.

With a dictionary (federated/data/ingest/dictionary.py) the columns are encoded by it, never by
local frequency: its levels, its reference levels, its order (feature_columns and
categorical_columns then only choose columns, and each must be in it); a value outside its range
or levels is a row problem (or missing, where it says so). Without one, a categorical's levels
are the ones this table holds and its reference level the most frequent here: the report lists
what was chosen, and a hospital that chose otherwise is refused at the handshake.

The vector modality holds the number of features its declared shape says (the catalogue's
`tabular`: 16; `modalities: {tabular: {features: 40}}` or a new `{kind: vector, features: 24}`
changes it), counted after encoding: fewer are zero-padded, more are refused (choose them with
feature_columns / categorical_columns, or declare a wider modality). Before writing, every
feature is checked for a leak of the task's label (federated/data/ingest/leaks.py). Text cells
are compared stripped of spaces ("No " is "No").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, Task
from federated.core.features import IMPUTE_METHODS, Feature
from federated.core.targets import REGRESSION, VECTOR
from federated.data.ingest.core import (
    IngestError,
    Problems,
    SampleSet,
    adapter,
    check_classes,
    column_count_problem,
    compressed_problem,
    distinct_cells,
    error_reason,
    filled_modality,
    real_path,
    resolve,
)
from federated.data.ingest.dictionary import (
    ColumnSpec,
    DataDictionary,
    Encoded,
    dictionary_at,
    dictionary_digest,
    encode_categorical,
    encode_numeric,
)
from federated.data.ingest.leaks import check_leaks, quality_warnings

STATISTICS_RETIRED = (
    "ingest no longer imputes or standardises: it stores raw values, and the statistics that "
    "impute and standardise them at load time are the run's setting `preprocess.statistics` "
    "(federated, per_site or pooled); remove `statistics:` from the source"
)


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, compression=None)  # never inferred from the suffix (compressed_problem)


def _text(value: Any) -> Any:
    """Spreadsheet exports pad text ("No "): compare stripped strings; blank is missing."""
    if isinstance(value, str):
        value = value.strip()
        return None if value == "" else value
    return value


# A feature column: its name, its dictionary entry (None without a dictionary), whether categorical.
Column = tuple[str, ColumnSpec | None, bool]


def feature_columns(
    frame: pd.DataFrame,
    params: dict[str, Any],
    exclude: set[str],
    dictionary: DataDictionary | None,
    path: Path,
) -> tuple[list[Column], bool]:
    """(column, its dictionary entry, whether categorical) for each feature column, in feature
    order; and whether the columns were taken by default (no list and no dictionary)."""
    for key in ("feature_columns", "categorical_columns"):
        value = params.get(key) or []
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ValueError(f"{key} must be a list of column names")
    listed = [*(params.get("feature_columns") or []), *(params.get("categorical_columns") or [])]
    categorical = list(params.get("categorical_columns") or [])
    if dictionary is not None:
        return _dictionary_columns(frame, listed, categorical, exclude, dictionary, path), False
    numeric = list(
        params.get("feature_columns")
        or [
            c
            for c in frame.columns
            if c not in exclude and c not in categorical and pd.api.types.is_numeric_dtype(frame[c])
        ]
    )
    missing = [c for c in [*numeric, *categorical] if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: feature or categorical column(s) not in the file: {missing}")
    non_numeric = [c for c in numeric if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ValueError(
            f"{path}: feature column(s) {non_numeric} are not numeric; list them under "
            "categorical_columns to encode them as indicators"
        )
    columns: list[Column] = [(c, None, False) for c in numeric] + [(c, None, True) for c in categorical]
    return columns, not params.get("feature_columns")


def _dictionary_columns(
    frame: pd.DataFrame,
    listed: list[str],
    categorical: list[str],
    exclude: set[str],
    dictionary: DataDictionary,
    path: Path,
) -> list[Column]:
    """The dictionary's columns in its order: those listed, or every one but the label, site and
    patient columns. A listed column the dictionary lacks, or one listed as categorical that it
    calls numeric, is refused; so is a chosen column the table lacks."""
    absent = [c for c in listed if dictionary.column(c) is None]
    if absent:
        raise ValueError(f"column(s) {absent} are not in the data dictionary {dictionary.where}")
    numeric_listed = [c for c in categorical if (spec := dictionary.column(c)) and spec.type != "categorical"]
    if numeric_listed:
        raise ValueError(f"categorical_columns {numeric_listed} are numeric in the data dictionary {dictionary.where}")
    chosen = [c for c in dictionary.names if (c in listed if listed else c not in exclude)]
    not_in_table = [c for c in chosen if c not in frame.columns]
    if not_in_table:
        raise ValueError(
            f"{path}: no column(s) {not_in_table}, which the data dictionary {dictionary.where} describes; "
            "every hospital's table must hold the dictionary's columns (or list the ones to take "
            "under feature_columns)"
        )
    out: list[Column] = []
    for c in chosen:
        spec = dictionary.column(c)
        out.append((c, spec, spec is not None and spec.type == "categorical"))
    return out


def encode(frame: pd.DataFrame, columns: list[Column], path: Path) -> tuple[list[Encoded], np.ndarray, list[Feature]]:
    """Each column encoded (dictionary.py), its values side by side, and the features in order."""
    encoded = []
    for col, spec, is_categorical in columns:
        try:
            enc = encode_categorical(frame[col], col, spec) if is_categorical else encode_numeric(frame[col], col, spec)
        except IngestError as e:
            raise IngestError(f"{path}: {e}") from None
        encoded.append(enc)
    values = np.concatenate([e.values for e in encoded], axis=1) if encoded else np.zeros((len(frame), 0))
    return encoded, values, [f for e in encoded for f in e.features]


def _too_wide(
    encoded: list[Encoded], columns: list[Column], n_features: int, width: int, path: Path, modality: str
) -> None:
    """More features than the modality holds: refused, naming columns and counts, never a level
    (a level is a cell's value)."""
    if n_features <= width:
        return
    listed = []
    for enc, (col, _, is_categorical) in zip(encoded, columns, strict=True):
        if not is_categorical:
            listed.append(col)
            continue
        levels = len(enc.features) + 1 if enc.observed or enc.features else 0  # the reference has no column
        listed.append(f"{col}: {levels} level{'s' * (levels != 1)} ({len(enc.features)} columns)")
    raise ValueError(
        f"{path}: {n_features} features after encoding ({', '.join(listed)}); the {modality} "
        f"modality holds {width}: choose columns with feature_columns / categorical_columns, "
        f"or declare more under `modalities: {{{modality}: {{features: {n_features}}}}}`"
    )


def _impute(params: dict[str, Any]) -> str:
    """The source's impute method as the schema writes it ("" for none)."""
    value = params.get("impute", "none")
    method = "" if value in ("none", None) else value
    if method not in IMPUTE_METHODS:
        raise ValueError(f"impute must be none, mean or median (got {value!r})")
    return str(method)


def _share(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{key} must be a number between 0 and 1 (got {value!r})")
    return float(value)


@adapter(
    "tabular",
    keys={
        "path",
        "label_column",
        "labels",
        "feature_columns",
        "categorical_columns",
        "site_column",
        "patient_column",
        "origin_site",
        "impute",
        "modality",
        "dictionary",
        "allow_leaks",
        "max_missing_share",
        "split_column",
    },
    fills=VECTOR,
    retired={"statistics": STATISTICS_RETIRED},
    dictionary="columns",
)
def tabular(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    """One sample per labelled row with usable features, stored raw; its features in the schema."""
    if "statistics" in params:
        raise ValueError(f"`statistics`: {STATISTICS_RETIRED}")
    task = schema.task(params["task"])
    path = resolve(base, params)
    samples = SampleSet(task.name, schema)
    modality = filled_modality(task, schema, VECTOR, params)
    width = schema.modality(modality).shape[0]
    impute = _impute(params)
    max_missing = _share(params.get("max_missing_share", 0.5), "max_missing_share")
    allow = params.get("allow_leaks") or []
    if not isinstance(allow, list) or not all(isinstance(c, str) for c in allow):
        raise ValueError("allow_leaks must be a list of column names")
    dictionary = (
        dictionary_at(params["dictionary"], base, folder_is="data root")
        if params.get("dictionary") is not None
        else None
    )
    if dictionary is not None and not dictionary.columns:
        raise ValueError(f"the data dictionary {dictionary.where} describes no columns (only genes)")
    frame = open_table(path, problems)
    if frame is None:
        return samples
    frame = frame.rename(columns=str)  # a Parquet file may name a column 0: features are named by text
    label_col = params["label_column"]
    site_col, patient_col = params.get("site_column"), params.get("patient_column")
    split_col = params.get("split_column")
    for col in [label_col, *(c for c in (site_col, patient_col, split_col) if c)]:
        _require_column(frame, col, path)
    exclude = {c for c in (label_col, site_col, patient_col, split_col) if c}
    columns, by_default = feature_columns(frame, params, exclude, dictionary, path)
    encoded, values, features = encode(frame, columns, path)
    _too_wide(encoded, columns, len(features), width, path, modality)
    unknown_allowed = sorted(set(allow) - {c for c, _, _ in columns})
    if unknown_allowed:
        raise ValueError(f"allow_leaks names column(s) {unknown_allowed} that are not features of this source")
    _report_choices(encoded, columns, by_default, dictionary, path, problems)
    mapping = dict(params.get("labels") or {})
    labelled, labels = _read_labels(task, frame[label_col], mapping, label_col, path, problems)
    check_leaks(values[labelled], features, labels, task, set(allow), str(path), problems, impute)
    blocks, missing = [e.values[labelled] for e in encoded], [e.missing[labelled] for e in encoded]
    for warning in quality_warnings([c for c, _, _ in columns], blocks, missing, max_missing):
        problems.warn(path, warning)
    ok = _report_rows(encoded, columns, values, labelled, impute, path, problems)
    if split_col:
        ok &= _read_split(frame[split_col].iloc[labelled], labelled, split_col, path, problems)
    kept = labelled[ok]
    default_site = str(params.get("origin_site", "site_0"))
    sites = cell_texts(frame[site_col].iloc[kept]) if site_col else [default_site] * len(kept)
    if patient_col:
        patients = cell_texts(frame[patient_col].iloc[kept])
    else:  # per file: "row0" of two files would be one patient, put on one side of the split
        file = _inside_name(path, base)
        patients = [f"{file}:row{i}" for i in kept]
    feats = np.zeros((len(kept), width), dtype=np.float32)  # zero-padded to the modality's width
    feats[:, : values.shape[1]] = values[kept]
    samples.extend({modality: feats}, labels[ok], sites, patients, f"tabular:{path.name}")
    if split_col:
        samples.split_column = split_col
        _fix_sides(samples, patients, frame[split_col].iloc[kept], split_col, path)
    check_classes(samples, {v for v in mapping.values() if v in task.classes}, str(path), problems)
    samples.notes["features"] = [f.name for f in features]
    if dictionary is not None:
        samples.notes["dictionary"] = dictionary_digest(dictionary)
    samples.features[modality] = (tuple(features), impute)
    return samples


def _report_choices(
    encoded: list[Encoded],
    columns: list[Column],
    by_default: bool,
    dictionary: DataDictionary | None,
    path: Path,
    problems: Problems,
) -> None:
    """The ingest report: the columns taken when none were listed, and the levels this table's
    frequencies chose when no dictionary fixed them."""
    if by_default:
        taken = [c for c, _, is_categorical in columns if not is_categorical]
        problems.warn(
            path,
            f"no feature_columns: took every other numeric column ({len(taken)}: {', '.join(taken)}); "
            "list them under feature_columns to choose (a column derived from the label leaks it)",
        )
    chosen = [e.chosen for e in encoded if e.chosen]
    if dictionary is None and chosen:
        problems.warn(
            path,
            "no data dictionary: categorical levels chosen from this table's own frequencies ("
            + "; ".join(chosen)
            + "); another hospital's frequencies can choose others, and the handshake refuses "
            "features that differ: ingest with the coordinator's dictionary (`multimed-fl corpus "
            "dictionary TABLE --out FILE` drafts one)",
        )


def _report_rows(
    encoded: list[Encoded],
    columns: list[Column],
    values: np.ndarray,
    labelled: np.ndarray,
    impute: str,
    path: Path,
    problems: Problems,
) -> np.ndarray:
    """Whether each labelled row can become a sample; each row that cannot is reported once, in
    row order, naming its columns and why (never a value): the dictionary's problems, then a
    missing value (without impute) or an infinite one."""
    n = len(labelled)
    reasons: list[tuple[np.ndarray, str]] = []
    for enc in encoded:
        reasons += [(rows[labelled], why) for rows, why in enc.problems]
    missing = np.stack([e.missing[labelled] for e in encoded], axis=1) if encoded else np.zeros((n, 0), dtype=bool)
    start = np.cumsum([0, *(len(e.features) for e in encoded)])
    infinite = (
        np.stack([np.isinf(values[labelled, start[k] : start[k + 1]]).any(axis=1) for k in range(len(encoded))], axis=1)
        if encoded
        else np.zeros((n, 0), dtype=bool)
    )
    bad_value = infinite | (missing if not impute else np.zeros_like(missing))
    bad = bad_value.any(axis=1)
    for rows, _ in reasons:
        bad |= rows
    names = [c for c, _, _ in columns]
    for j in np.flatnonzero(bad):
        why = [reason for rows, reason in reasons if rows[j]]
        if bad_value[j].any():
            cols = [names[k] for k in np.flatnonzero(bad_value[j])]
            note = (
                " (impute: mean or median keeps a row with a missing value)" if not impute and missing[j].any() else ""
            )
            why.append(f"NaN or infinite value in {cols}{note}")
        problems.report(f"{path} row {labelled[j] + 2}", "; ".join(why))
    return ~bad


def _read_split(column: pd.Series, rows: np.ndarray, split_col: str, path: Path, problems: Problems) -> np.ndarray:
    """Which rows name their side (train or test) in the split column; the others are reported."""
    sides = np.array([_text(v) in ("train", "test") for v in column.to_numpy()], dtype=bool)
    for i in np.flatnonzero(~sides):
        problems.report(f"{path} row {rows[i] + 2}", f"split ({split_col}) is not train or test")
    return sides


def _fix_sides(samples: SampleSet, patients: list[str], column: pd.Series, split_col: str, path: Path) -> None:
    """`split_column`: each patient's side is the table's, not drawn, so hospitals that each ingest
    their own rows and a pooled ingest of the same table split alike. A patient on both sides is refused."""
    for patient, side in zip(patients, (_text(v) for v in column.to_numpy()), strict=True):
        if samples.fixed_sides.setdefault(patient, side == "test") != (side == "test"):
            raise ValueError(f"{path}: a patient has rows on both sides of {split_col}; a patient is on one side")


def _inside_name(path: Path, base: Path) -> str:
    """The table's path inside the data root (posix), else its file name: default patient ids."""
    try:
        return path.relative_to(real_path(base)).as_posix()
    except ValueError:
        return path.name


def _require_column(frame: pd.DataFrame, col: str, path: Path) -> None:
    """A column the source names must exist; the message lists the file's columns to pick from."""
    if col not in frame.columns:
        raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, frame.columns))})")


def cell_texts(column: pd.Series) -> list[str]:
    """str() of each cell as `column.iloc[i]` gives it (a numpy scalar, a Timestamp, pd.NA), for
    origin sites and patient ids: the column read at once, not looked up row by row."""
    numpy_cells = isinstance(column.dtype, np.dtype) and column.dtype.kind not in "mM"
    return [str(v) for v in (column.to_numpy() if numpy_cells else column.array)]


def open_table(path: Path, problems: Problems) -> pd.DataFrame | None:
    """The source's table, or None after reporting why it cannot be read (so on_error: skip skips it)."""
    if not path.is_file():
        problems.report(path, "file does not exist")
        return None
    too_wide = compressed_problem(path) or column_count_problem(path)
    if too_wide:
        problems.report(path, too_wide)
        return None
    try:
        return read_table(path)
    except Exception as e:
        problems.report(path, f"unreadable table ({error_reason(e)})")
        return None


def _read_labels(
    task: Task, column: pd.Series, mapping: dict, label_col: str, path: Path, problems: Problems
) -> tuple[np.ndarray, np.ndarray]:
    """(the rows with a usable label, their labels: class indices, or values for a regression
    task); the other rows are reported, in row order. Each distinct cell is read once."""
    codes, cells = distinct_cells(column)
    read = [_label(task, mapping, _text(raw), label_col) for raw in cells]
    usable = np.array([label is not None for label, _ in read], dtype=bool)
    for i in np.flatnonzero(~usable[codes]):
        problems.report(f"{path} row {i + 2}", read[codes[i]][1])
    dtype = np.float64 if task.target == REGRESSION else np.int64
    labels = np.array([0 if label is None else label for label, _ in read], dtype=dtype)
    rows = np.flatnonzero(usable[codes])
    return rows, labels[codes[rows]]


def _label(task: Task, mapping: dict, raw: Any, label_col: str) -> tuple[float | int | None, str]:
    """A cell's label as the task stores it, or (None, why it has none)."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return None, f"label ({label_col}) is missing"
    if task.target == REGRESSION:
        try:
            label = float(raw)
        except (TypeError, ValueError):
            return None, f"label ({label_col}) is not a number"
        if not np.isfinite(label):
            return None, "label is NaN"
        return label, ""
    name = mapping.get(raw, raw)
    if name in task.classes:
        return task.classes.index(name), ""
    if isinstance(name, (int, np.integer)) and 0 <= int(name) < len(task.classes):
        return int(name), ""
    return None, f"label ({label_col}) is not a class of {task.name} ({', '.join(task.classes)})"
