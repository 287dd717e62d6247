"""`ct_slices`: CT scans stored as folders of slice images (the CC-CCII layout).

    - adapter: ct_slices
      task: disease_classification
      path: data/ccccii               # data/ccccii/<class folder>/<patient>/<scan>/<slice image>
      classes: {NCP: novel_coronavirus_pneumonia, CP: common_pneumonia, Normal: normal}
                                      # class folder -> task class (default: the same name)
      per: scan                       # scan (default): one sample per scan; slice: one per slice
      central_slices: 3               # per scan: how many central slices make the sample
      reports: data/reports.csv       # optional clinical reports, one row per scan
      report_columns: {patient: patient_id, scan: scan_id, text: report}   # the defaults;
                                      # add `class: <column>` when patient ids repeat across classes
      origin_site: ccccii             # default: the root folder's name
      modality: ct                    # default: the task's first image input

Slices are ordered by the number in their file name (natural sort: 2.png before 10.png).
`per: scan` makes one image of a scan, at the modality's declared shape: each of its `central_slices` central slices is
standardised (as image_folders does), the slices are averaged, and the average is standardised
again. Averaging a few neighbouring slices keeps the mid-volume anatomy a single slice shows
while damping slice noise, at the size of one slice; only those slices are read, so a corrupt
slice elsewhere in the scan is neither used nor checked. `per: slice` makes every slice a
sample; its patient_id stays the patient's, so the by-patient split keeps all of a patient's
slices (and scans) on one side. Patient ids are `<class folder>/<patient folder>`, since
CC-CCII numbers patients within each class.

A report's text is tokenised into the task's text input (`text`, or a tokens modality the spec
declares; federated/data/ingest/text.py), at its declared length and vocabulary; a
scan without a report (no row, or an empty text) has no text input, which the corpus records as
missing. Problems reported: an unknown class folder, a class folder with no patients, a patient
folder with no scan folders, a scan folder with no slice images, a corrupt slice, a report row
with an empty patient or scan, or one that repeats a scan.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, Modality
from federated.core.targets import IMAGE
from federated.data.ingest.core import (
    Problems,
    SampleSet,
    adapter,
    check_classes,
    class_folders,
    kept_inside,
    read_csv_checked,
    resolve,
)
from federated.data.ingest.image_folders import EXTENSIONS, image_modality
from federated.data.ingest.images_csv import BadItem, cell, read_image, require_columns
from federated.data.ingest.text import text_modality, tokenize

REPORT_COLUMNS = {"patient": "patient_id", "scan": "scan_id", "text": "report"}
ReportKey = tuple[str, ...]


def natural_key(path: Path) -> tuple:
    """Sort key that orders the numbers in a name by value: slice2 < slice10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", path.name))


def _subfolders(folder: Path, data_root: Path, problems: Problems) -> list[Path]:
    """The sub-folders in natural order; one whose real path leaves the data root is reported, not read."""
    return kept_inside(sorted((p for p in folder.iterdir() if p.is_dir()), key=natural_key), data_root, problems)


@adapter(
    "ct_slices",
    keys={"path", "classes", "per", "central_slices", "reports", "report_columns", "origin_site", "modality"},
    fills=IMAGE,
    paths=frozenset({"path", "reports"}),
)
def ct_slices(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    task = schema.task(params["task"])
    modality = image_modality(task, schema, params)
    root = resolve(base, params, "path")
    per, k = _options(params)
    mapping = {str(a): str(b) for a, b in dict(params.get("classes") or {}).items()}
    unknown = sorted(set(mapping.values()) - set(task.classes))
    if unknown:
        raise ValueError(f"classes: {unknown} are not classes of {task.name} ({', '.join(task.classes)})")
    text = text_modality(task, schema) if params.get("reports") is not None else None
    reports = _reports(text, params, base, problems)
    samples = SampleSet(task.name, schema)
    if not root.is_dir():
        problems.report(root, "CT folder does not exist")
        return samples
    ctx = {
        "task": task,
        "modality": modality,
        "shape": schema.modality(modality).shape,
        "text": text.name if text else "",
        "per": per,
        "k": k,
        "reports": reports,
        "site": str(params.get("origin_site") or root.name),
        "source": f"ct_slices:{root.name}",
        "data_root": base,
    }
    layout = "<class>/<patient>/<scan>/<slice>"
    for folder, label in class_folders(root, mapping, task.name, task.classes, problems, layout, base):
        _class_folder(folder, label, ctx, samples, problems)
    check_classes(samples, set(mapping.values()), str(root), problems)
    return samples


def _options(params: dict[str, Any]) -> tuple[str, int]:
    per = params.get("per", "scan")
    if per not in ("scan", "slice"):
        raise ValueError(f"per must be scan or slice (got {per!r})")
    k = params.get("central_slices", 3)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"central_slices must be an integer >= 1 (got {k!r})")
    if per == "slice" and "central_slices" in params:
        raise ValueError("central_slices goes with per: scan")
    return per, k


def _class_folder(folder: Path, label: int, ctx: dict[str, Any], samples: SampleSet, problems: Problems) -> None:
    patients = _subfolders(folder, ctx["data_root"], problems)
    if not patients:
        problems.report(folder, "no patient folders in this class folder")
    for patient in patients:
        scans = _subfolders(patient, ctx["data_root"], problems)
        if not scans:
            problems.report(
                patient, "no scan folders in this patient folder (layout: <class>/<patient>/<scan>/<slice>)"
            )
        for scan in scans:
            _scan(scan, label, ctx, samples, problems)


def _scan(scan: Path, label: int, ctx: dict[str, Any], samples: SampleSet, problems: Problems) -> None:
    listed = sorted((p for p in scan.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS), key=natural_key)
    slices = kept_inside(listed, ctx["data_root"], problems)
    if not slices:
        problems.report(scan, "scan folder has no slice images (.png/.jpg/.jpeg)")
        return
    patient, cls = scan.parent.name, scan.parent.parent.name
    inputs: dict[str, np.ndarray] = {}
    for key in ((patient, scan.name), (cls, patient, scan.name)):  # without / with a class column
        if key in ctx["reports"]:
            inputs[ctx["text"]] = ctx["reports"][key]
    shape = ctx["shape"]
    if ctx["per"] == "slice":
        for s in slices:
            x = read_image(s, shape, problems)
            if x is not None:
                samples.add({ctx["modality"]: x, **inputs}, label, ctx["site"], f"{cls}/{patient}", ctx["source"])
        return
    start = max(0, (len(slices) - ctx["k"]) // 2)
    central = [read_image(s, shape, problems) for s in slices[start : start + ctx["k"]]]
    read = [x for x in central if x is not None]
    if len(read) < len(central):
        return  # the bad slice was reported; the scan is skipped
    mean = np.mean(read, axis=0)
    x = (mean - mean.mean()) / (mean.std() + 1e-6)
    samples.add({ctx["modality"]: x, **inputs}, label, ctx["site"], f"{cls}/{patient}", ctx["source"])


def _reports(
    text: Modality | None, params: dict[str, Any], base: Path, problems: Problems
) -> dict[ReportKey, np.ndarray]:
    """(patient, scan) -- or (class folder, patient, scan) -- -> the report's tokens in `text`."""
    if text is None:
        return {}
    columns = {**REPORT_COLUMNS, **dict(params.get("report_columns") or {})}
    unknown = sorted(set(columns) - {*REPORT_COLUMNS, "class"})
    if unknown:
        raise ValueError(f"report_columns: unknown key(s) {unknown}; valid: class, patient, scan, text")
    path = resolve(base, params, "reports")
    if not path.is_file():
        problems.report(path, "reports file does not exist")
        return {}
    frame = read_csv_checked(path, problems, dtype=str)
    if frame is None:
        return {}
    require_columns(frame, list(map(str, columns.values())), path)
    return _report_rows(frame, columns, path, problems, text)


def _report_rows(
    frame: pd.DataFrame, columns: dict[str, str], path: Path, problems: Problems, modality: Modality
) -> dict[ReportKey, np.ndarray]:
    key_parts = [p for p in ("class", "patient", "scan") if p in columns]
    out: dict[ReportKey, np.ndarray] = {}
    for i, row in enumerate(frame.to_dict("records")):
        where = f"{path} row {i + 2}"
        try:
            key = tuple(cell(row, str(columns[p]), p) for p in key_parts)
        except BadItem as e:
            problems.report(where, str(e))
            continue
        if key in out:
            problems.report(where, f"a second report for scan {'/'.join(key)}")
            continue
        text = row.get(str(columns["text"]))
        if isinstance(text, str) and text.strip():
            out[key] = tokenize(text, modality)
    return out
