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

The `tabular` modality holds 16 features (after one-hot encoding): fewer are zero-padded, more
are refused (choose them with feature_columns / categorical_columns). Features are standardised
per column over the file. Text cells are compared stripped of spaces ("No " is "No").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.corpus.ingest.core import Problems, SampleSet, adapter, check_classes, resolve
from federated.multimed import MODALITIES, REGRESSION, TASKS


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path)


def _text(value: Any) -> Any:
    """Spreadsheet exports pad text ("No "): compare stripped strings; blank is missing."""
    if isinstance(value, str):
        value = value.strip()
        return None if value == "" else value
    return value


def one_hot(column: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Indicator columns for every level but the most frequent (the reference level, as in a
    regression model's dummy coding); a blank cell is a level of its own ("missing")."""
    values = column.map(lambda v: "missing" if _text(v) is None or (isinstance(v, float) and np.isnan(v))
                        else str(_text(v)))
    counts = values.value_counts()
    reference = sorted(counts.index[counts == counts.max()])[0]
    levels = sorted(lv for lv in counts.index if lv != reference)
    return (np.stack([(values == lv).to_numpy(dtype=np.float64) for lv in levels], axis=1)
            if levels else np.zeros((len(column), 0)), [f"{column.name}={lv}" for lv in levels])


def feature_matrix(frame: pd.DataFrame, params: dict[str, Any], exclude: set[str], path: Path
                   ) -> tuple[np.ndarray, list[str]]:
    """Numeric feature columns (optionally imputed) and one-hot categorical ones."""
    categorical = list(params.get("categorical_columns") or [])
    numeric = list(params.get("feature_columns") or [
        c for c in frame.columns if c not in exclude and c not in categorical
        and pd.api.types.is_numeric_dtype(frame[c])])
    missing = [c for c in [*numeric, *categorical] if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: feature or categorical column(s) not in the file: {missing}")
    non_numeric = [c for c in numeric if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ValueError(f"{path}: feature column(s) {non_numeric} are not numeric; list them under "
                         "categorical_columns to one-hot encode them")
    values = frame[numeric].to_numpy(dtype=np.float64)
    impute = params.get("impute", "none")
    if impute not in ("none", "median"):
        raise ValueError(f"impute must be none or median (got {impute!r})")
    if impute == "median" and numeric:
        medians = np.nanmedian(values, axis=0)
        empty = [numeric[j] for j in np.flatnonzero(~np.isfinite(medians))]
        if empty:
            raise ValueError(f"{path}: feature column(s) {empty} have no value to impute from")
        values = np.where(np.isnan(values), medians, values)
    names = list(numeric)
    for col in categorical:
        block, block_names = one_hot(frame[col])
        values = np.concatenate([values, block], axis=1)
        names += block_names
    width = MODALITIES.get("tabular").shape[0]
    if len(names) > width:
        raise ValueError(f"{path}: {len(names)} features after encoding ({', '.join(names)}); the tabular "
                         f"modality holds {width}: choose columns with feature_columns / categorical_columns")
    return values, names


@adapter("tabular", keys={"path", "label_column", "labels", "feature_columns", "categorical_columns",
                           "site_column", "patient_column", "origin_site", "impute"})
def tabular(params: dict[str, Any], base: Path, problems: Problems) -> SampleSet:
    task = TASKS.get(params["task"])
    path = resolve(base, params)
    samples = SampleSet(task.name)
    if "tabular" not in task.inputs:
        raise ValueError(f"task {task.name} has no tabular input (its inputs: {', '.join(task.inputs)})")
    if not path.is_file():
        problems.report(path, "file does not exist")
        return samples
    try:
        frame = read_table(path)
    except Exception as e:
        problems.report(path, f"unreadable table ({type(e).__name__}: {e})")
        return samples
    label_col = params["label_column"]
    site_col, patient_col = params.get("site_column"), params.get("patient_column")
    for col in [label_col, *(c for c in (site_col, patient_col) if c)]:
        if col not in frame.columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, frame.columns))})")
    values, features = feature_matrix(frame, params, {label_col, site_col, patient_col}, path)
    width = MODALITIES.get("tabular").shape[0]
    mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0) + 1e-9
    mapping = dict(params.get("labels") or {})
    raw_labels = frame[label_col].tolist()
    for i in range(len(frame)):
        where = f"{path} row {i + 2}"  # 1-based, after the header, as a spreadsheet shows it
        x = values[i]
        if not np.isfinite(x).all():
            bad = [features[j] for j in np.flatnonzero(~np.isfinite(x))]
            problems.report(where, f"NaN or infinite value in {bad}")
            continue
        raw = _text(raw_labels[i])
        if raw is None or (isinstance(raw, float) and np.isnan(raw)):
            problems.report(where, f"label ({label_col}) is missing")
            continue
        if task.target == REGRESSION:
            try:
                label = float(raw)
            except (TypeError, ValueError):
                problems.report(where, f"label {raw!r} is not a number")
                continue
            if not np.isfinite(label):
                problems.report(where, "label is NaN")
                continue
        else:
            name = mapping.get(raw, raw)
            if name in task.classes:
                label = task.classes.index(name)
            elif isinstance(name, (int, np.integer)) and 0 <= int(name) < len(task.classes):
                label = int(name)
            else:
                problems.report(where, f"label {raw!r} is not a class of {task.name} ({', '.join(task.classes)})")
                continue
        feats = np.zeros(width, dtype=np.float32)
        feats[: len(features)] = (x - mean) / std
        site = str(frame[site_col].iloc[i]) if site_col else str(params.get("origin_site", "site_0"))
        patient = str(frame[patient_col].iloc[i]) if patient_col else f"row{i}"
        samples.add({"tabular": feats}, label, site, patient, f"tabular:{path.name}")
    check_classes(samples, {v for v in mapping.values() if v in task.classes}, str(path), problems)
    samples.notes["features"] = features
    return samples
