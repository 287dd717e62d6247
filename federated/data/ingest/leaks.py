"""Leak and quality checks at ingest: a feature that gives the label away, and columns not worth
their place.

A column derived from the label (a diagnosis code of the outcome, a score computed from it)
makes a model look perfect in training and worthless anywhere else, and nothing downstream can
tell. So before a table becomes a corpus, each feature alone is scored against the task's label:
for a classification task, its AUROC for each class against the rest, in either direction (a
feature that is low exactly for one class leaks as much as one that is high); for a regression
task, its correlation with the label, or its being the label. A feature at AUROC >= 0.99, or
|correlation| >= 0.9999, or equal to the label, is refused naming its column, the task and the
score, unless the source lists the column under `allow_leaks`. The check needs MIN_ROWS rows
with a value and, for a class, MIN_CLASS rows on each side: in fewer, a perfect separation is
too likely by chance to refuse a column on.

AUROC is the Mann-Whitney U statistic over average ranks (scipy.stats.rankdata), the value
sklearn's roc_auc_score gives, without depending on scikit-learn.

Quality (warnings in the ingest report, never errors): a column that is constant over the
labelled rows, and one missing in more than `max_missing_share` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from federated.core.corpus_schema import Task
from federated.core.features import INDICATOR, Feature
from federated.core.targets import REGRESSION
from federated.data.ingest.core import IngestError

LEAK_AUROC = 0.99
LEAK_CORRELATION = 0.9999
MIN_ROWS = 20
MIN_CLASS = 5


def auroc(x: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of scores `x` for the rows where `positive` holds (ties count one half)."""
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    ranks = rankdata(x)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def classification_leak(x: np.ndarray, labels: np.ndarray) -> tuple[float, int] | None:
    """(the highest one-vs-rest AUROC in either direction, its class) over the rows where x is
    finite, or None when too few rows (MIN_ROWS) or no class with MIN_CLASS rows on each side."""
    finite = np.isfinite(x)
    x, labels = x[finite], labels[finite]
    if len(x) < MIN_ROWS:
        return None
    classes, counts = np.unique(labels, return_counts=True)
    scored = [c for c, n in zip(classes, counts, strict=True) if MIN_CLASS <= n <= len(x) - MIN_CLASS]
    if len(classes) == 2:
        scored = scored[1:]  # one class against the other: the second class's AUROC is the same
    best: tuple[float, int] | None = None
    for c in scored:
        a = auroc(x, labels == c)
        a = max(a, 1.0 - a)
        if best is None or a > best[0]:
            best = (a, int(c))
    return best


def regression_leak(x: np.ndarray, labels: np.ndarray) -> tuple[str, float] | None:
    """("equal values", 1.0) when the feature is the label, ("|correlation|", r) when it is nearly
    a linear function of it (LEAK_CORRELATION), else None; over rows where x is finite."""
    finite = np.isfinite(x)
    x, y = x[finite], np.asarray(labels, dtype=np.float64)[finite]
    if len(x) < MIN_ROWS:
        return None
    if np.array_equal(x, y):
        return "equal values", 1.0
    if x.std() == 0 or y.std() == 0:
        return None
    r = abs(float(np.corrcoef(x, y)[0, 1]))
    return ("|correlation|", r) if r >= LEAK_CORRELATION else None


def check_leaks(
    values: np.ndarray, features: Sequence[Feature], labels: np.ndarray, task: Task, allowed: set[str], where: str
) -> None:
    """Refuse (IngestError) the first feature that alone gives the task's label away, naming its
    column, the task and the score (never a level: a level is a cell's value)."""
    for j, f in enumerate(features):
        if f.column in allowed:
            continue
        what = f"column {f.column!r}" + (" (the indicator of one of its levels)" if f.kind == INDICATOR else "")
        remedy = (
            "a column derived from the label leaks it into training; leave it out of the features, or, "
            f"if it is a legitimate predictor, list it under `allow_leaks: [{f.column}]`"
        )
        if task.target == REGRESSION:
            found = regression_leak(values[:, j], labels)
            if found is not None:
                measure, score = found
                raise IngestError(
                    f"{where}: {what} reproduces task {task.name}'s label ({measure} {score:.6f}); {remedy}"
                )
            continue
        leak = classification_leak(values[:, j], labels)
        if leak is not None and leak[0] >= LEAK_AUROC:
            score, c = leak
            of_class = f" for class {task.classes[c]}" if len(task.classes) > 2 else ""
            raise IngestError(
                f"{where}: {what} alone predicts task {task.name}'s label with AUROC {score:.4f}{of_class} "
                f"(>= {LEAK_AUROC}); {remedy}"
            )


def quality_warnings(
    columns: Sequence[str], blocks: Sequence[np.ndarray], missing: Sequence[np.ndarray], max_missing_share: float
) -> list[str]:
    """The report's words on each column (its encoded block and where it is missing, over the
    labelled rows): constant, or missing in more than max_missing_share of the rows."""
    out = []
    for name, block, miss in zip(columns, blocks, missing, strict=True):
        n = len(miss)
        if not n:
            continue
        share = float(miss.mean())
        if share > max_missing_share:
            out.append(
                f"column {name!r} is missing in {share:.0%} of the labelled rows "
                f"(more than max_missing_share {max_missing_share:g})"
            )
        observed = block[~miss]
        # rows are all alike exactly when every column is constant: min == max, no sort needed
        if len(observed) and (not block.shape[1] or bool((observed.min(axis=0) == observed.max(axis=0)).all())):
            out.append(f"column {name!r} holds one value in every labelled row: it carries no information")
    return out
