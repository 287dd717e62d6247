"""`images_csv`: a folder of images plus a CSV of labels (bone age, NIH ChestX-ray14, ...).

One label per image: a class, or a regression value such as bone age in months:

    - adapter: images_csv
      task: bone_age
      path: data/boneage/images          # the image root
      labels: data/boneage/train.csv     # one row per image
      image_column: id                   # file name (or path) under the image root
      label_column: boneage              # months; for a classification task, a class
      classes: {B: benign, M: malignant} # classification only: value -> task class
                                         # (default: the class names, or class indices 0..)
      patient_column: patient            # default: the image's name (one patient per image)
      site_column: hospital              # becomes origin_site (natural sites)
      origin_site: rsna                  # without site_column; default: the image root's name
      modality: xray                     # default: the task's first image input

The multi-label radiographic_findings (label: five 0/1 values in the task's class order)
reads either one 0/1 column per finding, every finding of the task included (a source that
does not label a finding cannot say it is absent) ...

      finding_columns: {atelectasis: Atelectasis, cardiomegaly: Cardiomegaly,
                        effusion: Effusion, nodule: Nodule, pneumothorax: Pneumothorax}

... or one column that lists the findings, NIH ChestX-ray14 style ("Cardiomegaly|Effusion";
"No Finding" means none), matched case-insensitively:

      findings_column: Finding Labels
      separator: "|"                     # the default
      findings: {Mass: nodule}           # source name -> task class (default: the same name)
      ignore_findings: [Hernia, Infiltration, Consolidation]   # findings the task lacks

A listed finding that the task lacks is an error unless it is in ignore_findings, so that no
finding is dropped by accident; a finding with no positive image is an error too. Images are
read as in image_folders (the modality's declared shape, standardised per image). A missing
image is reported at its CSV row (row i + 2, as a spreadsheet shows it), a corrupt one by its
path; an image name that leads outside the data root (`../`, a symlink) is refused at its row,
unopened. Problems name the column, never the cell's value. The helpers read_image and cell are
shared with ct_slices and vqa.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, Task
from federated.core.targets import IMAGE, MULTILABEL, REGRESSION
from federated.data.ingest.core import (
    Problems,
    SampleSet,
    adapter,
    check_classes,
    error_reason,
    kept_inside,
    read_csv_checked,
    resolve,
)
from federated.data.ingest.image_folders import image_modality, load_image

LABEL_STYLES = ("label_column", "finding_columns", "findings_column")
STYLE_KEYS = {
    "label_column": ("classes",),
    "finding_columns": (),  # keys that go with each style
    "findings_column": ("separator", "findings", "ignore_findings"),
}
NO_FINDING = "no finding"
BINARY_VALUES = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}
Row = dict[str, Any]
Labeler = Callable[[Row], Any]


class BadItem(Exception):
    """One item (row, record) is unusable; the message says why, the caller says where."""


def read_image(path: Path, shape: tuple[int, ...], problems: Problems, listed_at: str = "") -> np.ndarray | None:
    """The image at the modality's declared shape, or None after reporting why it cannot be used
    (a missing file at `listed_at`, the row or record naming it; a bad one by its path)."""
    suffix = f"; listed at {listed_at}" if listed_at else ""
    if not path.is_file():
        problems.report(listed_at or path, f"image file {path} does not exist")
        return None
    try:
        x = load_image(path, shape)
    except Exception as e:  # PIL raises many types for bad files
        problems.report(path, f"unreadable or corrupt image ({error_reason(e)}){suffix}")
        return None
    if not np.isfinite(x).all():
        problems.report(path, f"image has NaN or infinite values{suffix}")
        return None
    return x


def cell(row: Row, column: str, what: str) -> str:
    """A CSV cell as stripped text; a missing (NaN, empty) cell is a BadItem."""
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise BadItem(f"{what} ({column}) is missing (empty or NaN)")
    return value.strip()


def require_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing} (columns: {', '.join(map(str, frame.columns))})")


@adapter(
    "images_csv",
    keys={
        "path",
        "labels",
        "image_column",
        "label_column",
        "classes",
        "finding_columns",
        "findings_column",
        "separator",
        "findings",
        "ignore_findings",
        "patient_column",
        "site_column",
        "origin_site",
        "modality",
    },
    fills=IMAGE,
    paths=frozenset({"path", "labels"}),
)
def images_csv(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    task = schema.task(params["task"])
    modality = image_modality(task, schema, params)
    root, csv = resolve(base, params, "path"), resolve(base, params, "labels")
    samples = SampleSet(task.name, schema)
    if not root.is_dir():
        problems.report(root, "image folder does not exist")
        return samples
    frame = _read_csv(csv, problems)
    if frame is None:
        return samples
    label_of, declared = labeler(task, params, frame, csv)
    columns = {k: params.get(k) for k in ("image_column", "patient_column", "site_column")}
    if not columns["image_column"]:
        raise ValueError("missing key 'image_column'")
    require_columns(frame, [c for c in columns.values() if c], csv)
    shape = schema.modality(modality).shape
    site = str(params.get("origin_site") or root.name)
    for i, row in enumerate(frame.to_dict("records")):
        where = f"{csv} row {i + 2}"  # 1-based, after the header, as a spreadsheet shows it
        try:
            label = label_of(row)
            name = cell(row, columns["image_column"], "image name")
            patient = cell(row, columns["patient_column"], "patient") if columns["patient_column"] else name
            origin = cell(row, columns["site_column"], "site") if columns["site_column"] else site
        except BadItem as e:
            problems.report(where, str(e))
            continue
        if not kept_inside([root / name], base, problems, where):  # an image name may hold ../
            continue
        x = read_image(root / name, shape, problems, f"{csv.name} row {i + 2}")
        if x is not None:
            samples.add({modality: x}, label, origin, patient, f"images_csv:{csv.name}")
    check_classes(samples, declared, str(csv), problems)
    check_findings(samples, str(csv), problems)
    return samples


def _read_csv(csv: Path, problems: Problems) -> pd.DataFrame | None:
    if not csv.is_file():
        problems.report(csv, "label file does not exist")
        return None
    return read_csv_checked(csv, problems, dtype=str)  # cells stay text; NA spellings become NaN


def check_findings(samples: SampleSet, where: str, problems: Problems) -> None:
    """Multi-label: every finding of the task needs a positive sample (else no AUROC)."""
    task = samples.schema.task(samples.task)
    if task.target != MULTILABEL or not len(samples):
        return
    positives = samples.targets.sum(axis=0)  # [n, findings]
    empty = [c for c, n in zip(task.classes, positives, strict=True) if n == 0]
    if empty:
        problems.report(where, f"finding(s) {empty} of task {task.name} have no positive sample")


def labeler(task: Task, params: dict[str, Any], frame: pd.DataFrame, csv: Path) -> tuple[Labeler, set[str]]:
    """row -> target for the source's label style, and the classes it declares."""
    style = _label_style(task, params)
    if style == "finding_columns":
        return _finding_columns(task, params["finding_columns"], frame, csv), set()
    if style == "findings_column":
        return _findings_column(task, params, frame, csv), set()
    return _label_column(task, params, frame, csv)


def _label_style(task: Task, params: dict[str, Any]) -> str:
    """The one label style the source uses; its keys must not mix with another style's, and it
    must fit the task (one label column unless the task is multi-label)."""
    styles = [k for k in LABEL_STYLES if params.get(k) is not None]
    if len(styles) != 1:
        raise ValueError(f"give exactly one of {', '.join(LABEL_STYLES)} (got {styles or 'none'})")
    style = styles[0]
    stray = [k for s, keys in STYLE_KEYS.items() if s != style for k in keys if params.get(k) is not None]
    if stray:
        raise ValueError(f"key(s) {stray} do not go with {style}")
    if (style == "label_column") == (task.target == MULTILABEL):
        need = "finding_columns or findings_column" if task.target == MULTILABEL else "label_column"
        raise ValueError(f"task {task.name} has {task.target} targets: give {need}, not {style}")
    return style


def _label_column(task: Task, params: dict[str, Any], frame: pd.DataFrame, csv: Path) -> tuple[Labeler, set[str]]:
    """One label column: a regression value, or a class (mapped by `classes:`) for a classification task."""
    require_columns(frame, [params["label_column"]], csv)
    if task.target == REGRESSION:
        if params.get("classes"):
            raise ValueError(f"task {task.name} is a regression: it has no classes to map")
        return _regression(str(params["label_column"])), set()
    if not task.is_classification:
        raise ValueError(f"images_csv cannot label task {task.name} ({task.target} targets)")
    return _single_class(task, str(params["label_column"]), dict(params.get("classes") or {}))


def _regression(column: str) -> Labeler:
    def label_of(row: Row) -> np.float32:
        raw = cell(row, column, "label")
        try:
            value = float(raw)
        except ValueError:
            raise BadItem(f"label ({column}) is not a number") from None
        if not np.isfinite(value):
            raise BadItem(f"label ({column}) is not finite")
        return np.float32(value)

    return label_of


def _single_class(task: Task, column: str, classes: dict[Any, Any]) -> tuple[Labeler, set[str]]:
    mapping = {str(k): str(v) for k, v in classes.items()}
    unknown = sorted(set(mapping.values()) - set(task.classes))
    if unknown:
        raise ValueError(f"classes: {unknown} are not classes of {task.name} ({', '.join(task.classes)})")

    def label_of(row: Row) -> int:
        raw = cell(row, column, "label")
        name = mapping.get(raw, raw)
        if name in task.classes:
            return task.classes.index(name)
        if not mapping and re.fullmatch(r"[0-9]+", str(name), flags=re.ASCII) and int(name) < len(task.classes):
            return int(name)
        raise BadItem(
            f"label ({column}) is not a class of {task.name} ({', '.join(task.classes)}); map it with `classes:`"
        )

    return label_of, set(mapping.values())


def _finding_columns(task: Task, columns: Any, frame: pd.DataFrame, csv: Path) -> Labeler:
    if not isinstance(columns, dict):
        raise ValueError("finding_columns must map each task finding to its CSV column")
    unknown = sorted(set(map(str, columns)) - set(task.classes))
    if unknown:
        raise ValueError(f"finding_columns: {unknown} are not findings of {task.name} ({', '.join(task.classes)})")
    lacking = [c for c in task.classes if c not in columns]
    if lacking:
        raise ValueError(f"finding_columns: every finding of {task.name} needs a column; {lacking} have none")
    require_columns(frame, [str(columns[c]) for c in task.classes], csv)

    def label_of(row: Row) -> np.ndarray:
        y = np.zeros(len(task.classes), dtype=np.float32)
        for j, c in enumerate(task.classes):
            raw = cell(row, str(columns[c]), f"finding {c}")
            if raw.lower() not in BINARY_VALUES:
                raise BadItem(f"finding column {columns[c]!r} holds a value other than 0 or 1 (or true, false)")
            y[j] = BINARY_VALUES[raw.lower()]
        return y

    return label_of


def _findings_column(task: Task, params: dict[str, Any], frame: pd.DataFrame, csv: Path) -> Labeler:
    column, separator = str(params["findings_column"]), str(params.get("separator", "|"))
    require_columns(frame, [column], csv)
    lookup = {c.lower(): c for c in task.classes}
    for source, target in dict(params.get("findings") or {}).items():
        if target not in task.classes:
            raise ValueError(f"findings: {target!r} is not a finding of {task.name} ({', '.join(task.classes)})")
        lookup[str(source).lower()] = target
    ignored = {str(f).lower() for f in params.get("ignore_findings") or []}

    def label_of(row: Row) -> np.ndarray:
        names = [n.strip() for n in cell(row, column, "findings").split(separator) if n.strip()]
        y = np.zeros(len(task.classes), dtype=np.float32)
        for name in names:
            key = name.lower()
            if key in lookup:
                y[task.classes.index(lookup[key])] = 1.0
            elif key == NO_FINDING and len(names) > 1:
                raise BadItem(f"{column}: 'No Finding' listed together with findings")
            elif key not in ignored and key != NO_FINDING:
                raise BadItem(
                    f"{column}: finding number {names.index(name) + 1} of the cell is not a finding of "
                    f"{task.name} ({', '.join(task.classes)}); map it with `findings:` or list it in "
                    "`ignore_findings:`"
                )
        return y

    return label_of
