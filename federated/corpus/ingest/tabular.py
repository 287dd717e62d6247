"""`tabular`: CSV or Parquet rows of features and a label, optionally with a site column.

    - adapter: tabular
      task: breast_cancer_classification
      path: data/wdbc.csv
      label_column: diagnosis
      labels: {B: benign, M: malignant}   # value -> task class (default: class names or indices)
      feature_columns: [radius_mean, texture_mean, ...]   # default: every other numeric column
      site_column: clinic                # becomes origin_site (natural sites); default: origin_site
      patient_column: id                 # default: the row number
      impute: median                     # missing feature values -> the column's median
                                         # (default: none, a missing value is an error)

The `tabular` modality holds 16 features: fewer are zero-padded, more are refused (choose them
with feature_columns). Features are standardised per column over the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.corpus.ingest.core import Problems, SampleSet, adapter, check_classes
from federated.multimed import MODALITIES, REGRESSION, TASKS


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path)


@adapter("tabular", keys={"path", "label_column", "labels", "feature_columns", "site_column",
                           "patient_column", "origin_site", "impute"})
def tabular(params: dict[str, Any], base: Path, problems: Problems) -> SampleSet:
    task = TASKS.get(params["task"])
    path = (base / params["path"]).resolve()
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
    features = params.get("feature_columns") or [
        c for c in frame.columns if c not in (label_col, site_col, patient_col)
        and pd.api.types.is_numeric_dtype(frame[c])]
    width = MODALITIES.get("tabular").shape[0]
    if len(features) > width:
        raise ValueError(f"{path}: {len(features)} feature columns; the tabular modality holds {width}: "
                         "choose them with feature_columns")
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: feature_columns not in the file: {missing}")
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ValueError(f"{path}: feature column(s) {non_numeric} are not numeric")
    values = frame[features].to_numpy(dtype=np.float64)
    impute = params.get("impute", "none")
    if impute not in ("none", "median"):
        raise ValueError(f"impute must be none or median (got {impute!r})")
    if impute == "median":
        medians = np.nanmedian(values, axis=0)
        empty = [features[j] for j in np.flatnonzero(~np.isfinite(medians))]
        if empty:
            raise ValueError(f"{path}: feature column(s) {empty} have no value to impute from")
        values = np.where(np.isnan(values), medians, values)
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
        raw = raw_labels[i]
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
    return samples
