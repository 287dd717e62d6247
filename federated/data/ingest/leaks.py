"""Leak and quality checks at ingest: a feature that gives the label away, and columns not worth
their place.

A column derived from the label (a diagnosis code of the outcome, a score computed from it)
makes a model look perfect in training and worthless anywhere else, and nothing downstream can
tell. So before a table becomes a corpus, each feature alone is scored against the task's label,
and so, where the source imputes (its missing cells are kept), is whether the column is
recorded at all: a value recorded only for one class gives the label away by its absence.

Classification: a feature's AUROC for each class against the rest, in either direction (a
feature that is low exactly for one class leaks as much as one that is high). A feature is
refused when

  - it reproduces the label exactly (one value per class: a copy or a recoding of the label, or
    of one class against the rest), or
  - the lower one-sided 95% confidence bound of its AUROC, A - 1.645 SE, is >= LEAK_AUROC (0.99),
    with SE Hanley & McNeil's (1982) standard error for n1 rows of the class against n0 others.
    At a perfect separation (A = 1) that SE is 0 whatever the counts, so the bound is taken at
    A = 1 - 1 / (2 n1 n0), half a pair ordered wrong, the nearest AUROC such a sample cannot
    tell from 1.

A point AUROC >= 0.99 whose bound is lower is a warning in the ingest report, naming the column,
not a refusal: at a small hospital a genuine predictor reaches it by chance (AUROC 0.95 with
6 positives in 40 rows: 0.99 or more in a fifth of samples, a perfect separation in one in ten),
while a derived column in a table of a hundred such patients is refused.

Regression: the feature is refused when it is the label (equal values), a linear function of it
(|Pearson correlation| >= LEAK_CORRELATION, 0.9999) or a monotone one (|Spearman correlation|
>= LEAK_SPEARMAN, 0.999: log(label), the label in other units and rounded). Whether a value is
recorded is one bit, which cannot reproduce a continuous label: it is scored for classification
tasks only.

A source lets a column through by listing it under `allow_leaks`. The check needs MIN_ROWS rows
with a value and, for a class, MIN_CLASS rows on each side: in fewer, a perfect separation is
too likely by chance to refuse a column on.

AUROC is the Mann-Whitney U statistic over average ranks (scipy.stats.rankdata), the value
sklearn's roc_auc_score gives, without depending on scikit-learn: a feature is ranked once and
every class's rank sum is one np.bincount, so many classes cost what two do. The Hanley-McNeil
SE is three lines of arithmetic, written here (scipy has no AUROC interval).

Quality (warnings in the ingest report, never errors): a column that is constant over the
labelled rows, and one missing in more than `max_missing_share` of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from federated.core.corpus_schema import Task
from federated.core.features import INDICATOR, Feature
from federated.core.targets import REGRESSION
from federated.data.ingest.core import IngestError, Problems

LEAK_AUROC = 0.99
LEAK_CORRELATION = 0.9999
LEAK_SPEARMAN = 0.999
Z_95 = 1.6448536269514722  # the one-sided 95% normal quantile, scipy.stats.norm.ppf(0.95)
MIN_ROWS = 20
MIN_CLASS = 5


class Leak(NamedTuple):
    """How well one feature alone predicts one class against the rest."""

    auroc: float  # in either direction: max(A, 1 - A)
    label: int  # the class
    lower: float  # the lower one-sided 95% bound of the AUROC (module docstring)
    exact: bool  # the feature reproduces the label (or the class against the rest) exactly
    n1: int  # rows of the class
    n0: int  # rows of the others

    @property
    def refused(self) -> bool:
        return self.exact or self.lower >= LEAK_AUROC


def auroc(x: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of scores `x` for the rows where `positive` holds (ties count one half)."""
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    ranks = rankdata(x)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def hanley_mcneil_se(a: np.ndarray, n1: np.ndarray, n0: np.ndarray) -> np.ndarray:
    """Hanley & McNeil's (1982) standard error of an AUROC `a` from n1 positives and n0 negatives."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)
    return np.sqrt(np.maximum(var, 0.0))


def lower_bound(a: np.ndarray, n1: np.ndarray, n0: np.ndarray) -> np.ndarray:
    """The lower one-sided 95% bound of AUROCs `a` (>= 0.5), with a perfect separation's bound
    taken at half a pair ordered wrong (module docstring)."""
    n1, n0 = np.asarray(n1, dtype=np.float64), np.asarray(n0, dtype=np.float64)
    a = np.minimum(a, 1 - 0.5 / (n1 * n0))
    return a - Z_95 * hanley_mcneil_se(a, n1, n0)


def _reproduces(x: np.ndarray, target: np.ndarray, k: int) -> bool:
    """Whether x takes exactly k values, one for each of target's k codes."""
    x_codes, x_values = pd.factorize(x)
    return len(x_values) == k and len(np.unique(x_codes.astype(np.int64) * k + target)) == k


def classification_leak(x: np.ndarray, labels: np.ndarray) -> Leak | None:
    """The class whose one-vs-rest AUROC (either direction) most gives the label away -- a
    refused one first, else the highest AUROC -- over the rows where x is finite; None when too
    few rows (MIN_ROWS) or no class with MIN_CLASS rows on each side. x is ranked once; each
    class's rank sum is one bincount."""
    finite = np.isfinite(x)
    if not finite.all():
        x, labels = x[finite], labels[finite]
    n = len(x)
    if n < MIN_ROWS:
        return None
    classes, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    scored = (counts >= MIN_CLASS) & (counts <= n - MIN_CLASS)
    if len(classes) == 2:
        scored[0] = False  # one class against the other: the first class's AUROC is the same
    if not scored.any():
        return None
    ranks = rankdata(x)
    n1 = counts.astype(np.float64)
    n0 = n - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (np.bincount(codes, weights=ranks, minlength=len(classes)) - n1 * (n1 + 1) / 2) / (n1 * n0)
    a = np.maximum(a, 1.0 - a)
    lower = lower_bound(a, n1, n0)
    best: Leak | None = None
    for c in np.flatnonzero(scored):
        exact = bool(a[c] == 1.0) and (
            _reproduces(x, (codes == c).astype(np.int64), 2) or _reproduces(x, codes, len(classes))
        )
        leak = Leak(float(a[c]), int(classes[c]), float(lower[c]), exact, int(n1[c]), int(n0[c]))
        if best is None or (leak.refused, leak.auroc) > (best.refused, best.auroc):
            best = leak
    return best


def regression_leak(
    x: np.ndarray, labels: np.ndarray, label_ranks: np.ndarray | None = None
) -> tuple[str, float] | None:
    """("equal values", 1.0) when the feature is the label, ("|correlation|", r) when it is nearly
    a linear function of it (LEAK_CORRELATION), ("|Spearman correlation|", rho) when nearly a
    monotone one (LEAK_SPEARMAN), else None; over rows where x is finite. `label_ranks`: the
    labels' average ranks over all rows (used when x is finite everywhere)."""
    finite = np.isfinite(x)
    y = np.asarray(labels, dtype=np.float64)
    if not finite.all():
        x, y, label_ranks = x[finite], y[finite], None
    if len(x) < MIN_ROWS:
        return None
    if np.array_equal(x, y):
        return "equal values", 1.0
    if x.std() == 0 or y.std() == 0:
        return None
    r = abs(float(np.corrcoef(x, y)[0, 1]))
    if r >= LEAK_CORRELATION:
        return "|correlation|", r
    rho = abs(float(np.corrcoef(rankdata(x), rankdata(y) if label_ranks is None else label_ranks)[0, 1]))
    return ("|Spearman correlation|", rho) if rho >= LEAK_SPEARMAN else None


def check_leaks(
    values: np.ndarray,
    features: Sequence[Feature],
    labels: np.ndarray,
    task: Task,
    allowed: set[str],
    where: str,
    problems: Problems,
    impute: str = "",
) -> None:
    """Refuse (IngestError) the first feature that alone gives the task's label away, naming its
    column, the task and the score (never a level: a level is a cell's value); warn (in the
    ingest report) of one whose AUROC reaches LEAK_AUROC only by its point value. With `impute`,
    whether each column is recorded is scored too (classification)."""
    regression = task.target == REGRESSION
    label_ranks = rankdata(np.asarray(labels, dtype=np.float64)) if regression and len(labels) else None
    missingness_done: set[str] = set()
    for j, f in enumerate(features):
        if f.column in allowed:
            continue
        what = f"column {f.column!r}" + (" (the indicator of one of its levels)" if f.kind == INDICATOR else "")
        x = values[:, j]
        if regression:
            found = regression_leak(x, labels, label_ranks)
            if found is not None:
                measure, score = found
                raise IngestError(
                    f"{where}: {what} reproduces task {task.name}'s label ({measure} {score:.6f}); {_remedy(f.column)}"
                )
            continue
        _judge(classification_leak(x, labels), what, f.column, task, where, problems)
        missing = np.isnan(x)
        if impute and f.column not in missingness_done and missing.any() and not missing.all():
            missingness_done.add(f.column)  # an indicator column's missing rows are its column's
            _judge(
                classification_leak(missing.astype(np.float64), labels),
                f"whether column {f.column!r} is recorded (its missing cells)",
                f.column,
                task,
                where,
                problems,
            )


def _remedy(column: str) -> str:
    return (
        "a column derived from the label leaks it into training; leave it out of the features, or, if it is "
        f"a legitimate predictor, list it under `allow_leaks: [{column}]`"
    )


def _judge(leak: Leak | None, what: str, column: str, task: Task, where: str, problems: Problems) -> None:
    """Refuse a refused leak; warn of a point AUROC >= LEAK_AUROC whose bound is below it."""
    if leak is None or (not leak.refused and leak.auroc < LEAK_AUROC):
        return
    of_class = f" for class {task.classes[leak.label]}" if len(task.classes) > 2 else ""
    score = f"AUROC {leak.auroc:.4f}{of_class}"
    if leak.exact:
        raise IngestError(f"{where}: {what} reproduces task {task.name}'s label exactly ({score}); {_remedy(column)}")
    if leak.refused:
        raise IngestError(
            f"{where}: {what} alone predicts task {task.name}'s label with {score} (>= {LEAK_AUROC}), "
            f"its lower 95% bound {leak.lower:.4f}; {_remedy(column)}"
        )
    problems.warn(
        where,
        f"{what} alone predicts task {task.name}'s label with {score} (>= {LEAK_AUROC}), but with {leak.n1} rows "
        f"of class {task.classes[leak.label]} against {leak.n0} others its lower 95% bound is {leak.lower:.4f}, "
        f"under {LEAK_AUROC}: not refused, as a genuine predictor reaches that by chance in so few rows. If it is "
        f"derived from the label, leave it out of the features; `allow_leaks: [{column}]` silences this",
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
