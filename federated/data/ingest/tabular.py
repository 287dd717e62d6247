"""`tabular`: CSV or Parquet rows of features and a label, optionally with a site column.

    - adapter: tabular
      task: breast_cancer_classification
      path: data/wdbc.csv
      label_column: diagnosis
      labels: {B: benign, M: malignant}   # value -> task class (default: class names or indices)
      feature_columns: [radius_mean, texture_mean, ...]   # default: every other numeric column
      categorical_columns: [smoker, group]   # one-hot, the most frequent level as reference
      site_column: clinic                # becomes origin_site (natural sites); default: origin_site
      patient_column: id                 # default: the row number
      impute: median                     # missing feature values -> the column's median
                                         # (default: none, a missing value is an error)
      statistics: per_site               # where medians, means and SDs come from: per_site
                                         # (default) or file
      modality: tabular                  # default: the task's first vector input

The vector modality holds the number of features its declared shape says (the catalogue's
`tabular`: 16; `modalities: {tabular: {features: 40}}` or a new `{kind: vector, features: 24}`
changes it), counted after one-hot encoding: fewer are zero-padded, more are refused (choose
them with feature_columns / categorical_columns, or declare a wider modality). Features are standardised
per column. By default each site's rows are imputed and standardised with that site's own
statistics (the file is one site when there is no site column): a hospital prepares its own
data, so no statistic crosses hospitals and a held-out hospital's values never shape the
features the training sites see. `statistics: file` pools the whole file, as a centralised
pipeline would. Text cells are compared stripped of spaces ("No " is "No").
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, Task
from federated.core.targets import REGRESSION, VECTOR
from federated.data.ingest.core import (
    Problems,
    SampleSet,
    adapter,
    check_classes,
    column_count_problem,
    compressed_problem,
    error_reason,
    filled_modality,
    resolve,
    standardise_by_group,
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


def one_hot(column: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Indicator columns for every level but the most frequent (the reference level, as in a
    regression model's dummy coding); a blank cell is a level of its own ("missing")."""
    codes, cells = distinct_cells(column)
    level_of_cell = [
        "missing" if _text(v) is None or (isinstance(v, float) and np.isnan(v)) else str(_text(v)) for v in cells
    ]
    cell_level, names = pd.factorize(np.asarray(level_of_cell, dtype=object))  # "M" and "M " are one level
    row_level = cell_level[codes]
    if not len(names):  # no rows
        return np.zeros((len(column), 0)), []
    counts = np.bincount(row_level, minlength=len(names))
    reference = sorted(names[counts == counts.max()])[0]
    levels = sorted(lv for lv in names if lv != reference)
    index = {name: k for k, name in enumerate(names)}
    return (
        np.stack([(row_level == index[lv]).astype(np.float64) for lv in levels], axis=1)
        if levels
        else np.zeros((len(column), 0)),
        [f"{column.name}={lv}" for lv in levels],
    )


def feature_matrix(
    frame: pd.DataFrame, params: dict[str, Any], exclude: set[str], path: Path, width: int, modality: str = "tabular"
) -> tuple[np.ndarray, list[str], int]:
    """Numeric feature columns (NaN where missing), then one-hot categorical ones; and how many
    of the columns are numeric. More than `width` (the modality's features) is refused."""
    categorical = list(params.get("categorical_columns") or [])
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
            "categorical_columns to one-hot encode them"
        )
    values = frame[numeric].to_numpy(dtype=np.float64)
    names = list(numeric)
    widths = []  # the error names columns and counts, never a level: a level is a cell's value
    for col in categorical:
        block, block_names = one_hot(frame[col])
        values = np.concatenate([values, block], axis=1)
        names += block_names
        levels = len(block_names) + 1 if len(frame) else 0  # the reference level has no column
        widths.append(f"{col}: {levels} level{'s' * (levels != 1)} ({len(block_names)} columns)")
    if len(names) > width:
        listed = ", ".join([*map(str, numeric), *widths])
        raise ValueError(
            f"{path}: {len(names)} features after encoding ({listed}); the {modality} "
            f"modality holds {width}: choose columns with feature_columns / categorical_columns, "
            f"or declare more under `modalities: {{{modality}: {{features: {len(names)}}}}}`"
        )
    return values, names, len(numeric)


def impute_by_group(
    values: np.ndarray, groups: np.ndarray, n_numeric: int, names: list[str], impute: str
) -> tuple[np.ndarray, dict[Any, list[str]]]:
    """Missing numeric cells -> their group's median (impute: median). A column with no finite
    value in a group stays missing there, for the row check to report (and `on_error: skip` to
    skip); returned with it: group -> those columns, so the report can say why."""
    if impute not in ("none", "median"):
        raise ValueError(f"impute must be none or median (got {impute!r})")
    values = values.copy()
    unfillable: dict[Any, list[str]] = {}
    if impute == "none" or not n_numeric:
        return values, unfillable
    with warnings.catch_warnings():  # an all-NaN column is reported by row, not warned about
        warnings.simplefilter("ignore", RuntimeWarning)
        codes, distinct = pd.factorize(np.asarray(groups), use_na_sentinel=False)  # hashed, not sorted
        for k, group in enumerate(distinct):
            rows = np.flatnonzero(codes == k)
            cols = np.arange(n_numeric)
            block = values[np.ix_(rows, cols)]
            medians = np.nanmedian(_finite_or_nan(block), axis=0)
            unfillable[group] = [names[j] for j in np.flatnonzero(~np.isfinite(medians))]
            values[np.ix_(rows, cols)] = np.where(np.isnan(block), medians, block)
    return values, unfillable


def _finite_or_nan(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, np.nan)


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
        "statistics",
        "modality",
    },
    fills=VECTOR,
)
def tabular(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    """One sample per labelled row with complete features, imputed and standardised per site."""
    task = schema.task(params["task"])
    path = resolve(base, params)
    samples = SampleSet(task.name, schema)
    modality = filled_modality(task, schema, VECTOR, params)
    width = schema.modality(modality).shape[0]
    frame = _open_table(path, problems)
    if frame is None:
        return samples
    label_col = params["label_column"]
    site_col, patient_col = params.get("site_column"), params.get("patient_column")
    for col in [label_col, *(c for c in (site_col, patient_col) if c)]:
        _require_column(frame, col, path)
    exclude = {c for c in (label_col, site_col, patient_col) if c}
    values, features, n_numeric = feature_matrix(frame, params, exclude, path, width, modality)
    groups, per_site = _statistics_groups(frame, site_col, params.get("statistics", "per_site"))
    # labels first, so that only rows that become samples shape the medians, means and SDs
    mapping = dict(params.get("labels") or {})
    labelled, labels = _read_labels(task, frame[label_col], mapping, label_col, path, problems)
    values, unfillable = impute_by_group(
        values[labelled], groups[labelled], n_numeric, features, params.get("impute", "none")
    )
    finite = np.isfinite(values).all(axis=1)
    for j in np.flatnonzero(~finite):
        reason = _nonfinite_reason(
            values[j], features, unfillable.get(groups[labelled[j]], []), groups[labelled[j]], per_site
        )
        problems.report(f"{path} row {labelled[j] + 2}", reason)
    kept = labelled[finite]
    values = standardise_by_group(values[finite], groups[kept])
    default_site = str(params.get("origin_site", "site_0"))
    sites = cell_texts(frame[site_col].iloc[kept]) if site_col else [default_site] * len(kept)
    patients = cell_texts(frame[patient_col].iloc[kept]) if patient_col else [f"row{i}" for i in kept]
    feats = np.zeros((len(kept), width), dtype=np.float32)  # zero-padded to the modality's width
    feats[:, : values.shape[1]] = values
    samples.extend({modality: feats}, labels[finite], sites, patients, f"tabular:{path.name}")
    check_classes(samples, {v for v in mapping.values() if v in task.classes}, str(path), problems)
    samples.notes["features"] = features
    return samples


def _require_column(frame: pd.DataFrame, col: str, path: Path) -> None:
    """A column the source names must exist; the message lists the file's columns to pick from."""
    if col not in frame.columns:
        raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, frame.columns))})")


def cell_texts(column: pd.Series) -> list[str]:
    """str() of each cell as `column.iloc[i]` gives it (a numpy scalar, a Timestamp, pd.NA), for
    origin sites and patient ids: the column read at once, not looked up row by row."""
    numpy_cells = isinstance(column.dtype, np.dtype) and column.dtype.kind not in "mM"
    return [str(v) for v in (column.to_numpy() if numpy_cells else column.array)]


def _open_table(path: Path, problems: Problems) -> pd.DataFrame | None:
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


def _statistics_groups(frame: pd.DataFrame, site_col: str | None, statistics: str) -> tuple[np.ndarray, bool]:
    """The group of each row whose statistics impute and standardise it (its site, or one group for
    the file), and whether those groups are sites."""
    if statistics not in ("per_site", "file"):
        raise ValueError(f"statistics must be per_site or file (got {statistics!r})")
    per_site = bool(site_col) and statistics == "per_site"
    groups = frame[site_col].astype(str).to_numpy() if per_site else np.zeros(len(frame), dtype=int)
    return groups, per_site


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


def _nonfinite_reason(row: np.ndarray, features: list[str], unfillable: list[str], group: Any, per_site: bool) -> str:
    """Why a row still holds a missing value; names the columns imputation had nothing to fill from."""
    bad = [features[k] for k in np.flatnonzero(~np.isfinite(row))]
    why = [f for f in unfillable if f in bad]
    reason = f"NaN or infinite value in {bad}"
    if why:
        reason += (
            f" (no row of site {group} has a value of {why} to impute from; statistics: file "
            "imputes from the whole file)"
            if per_site
            else f" (no row of the file has a value of {why} to impute from)"
        )
    return reason


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
