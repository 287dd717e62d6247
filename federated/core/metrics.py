"""Task metrics (numpy), the registry a task's metric names are looked up in, and the mapping of
each task's primary metric onto a [0, 1] score.

Written by hand because the only well-kept library with all of them (scikit-learn) is not
otherwise a dependency, and these are a few lines each; every one is tested against
hand-computed values.

Tasks may be declared in data (a corpus's schema, an ingest spec) rather than in code, so their
metrics are names looked up in `METRICS`: `validate_metrics` refuses, by name, a metric that is
unknown or does not apply to the task's target type, before any training is spent on it.

A site's score for a task is its primary metric mapped to "higher is better" in [0, 1]
(each metric's `to_score`):
  accuracy, balanced_accuracy, macro_f1,
  micro_f1, auroc, mean_auroc, q3           -> as is ("as_is")
  kappa, pearson, r2                        -> max(0, value) ("clip_at_zero")
  mae                                       -> max(0, 1 - MAE / MAD) ("mae_vs_mad"), MAD = mean
                                               absolute deviation of the task's training targets,
                                               i.e. the MAE of always predicting the mean (score 0)
  mse, rmse                                 -> no score ("unscored"): their scale is the target's,
                                               so they can only be secondary metrics
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from federated.core.registry import Registry

# The target-type words come from targets.py: a corpus schema validates its tasks' metrics here.
from federated.core.targets import (
    BINARY,
    CLOSED_SET,
    IGNORE_LABEL,
    MULTICLASS,
    MULTILABEL,
    PER_RESIDUE,
    REGRESSION,
    TARGET_TYPES,
)


class Task(Protocol):
    """What metrics read of a task (federated/core/corpus_schema.py's Task, which imports this
    module to check its metric names: a protocol keeps the import one way)."""

    @property
    def name(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def metrics(self) -> tuple[str, ...]: ...
    @property
    def classes(self) -> tuple[str, ...]: ...
    @property
    def primary_metric(self) -> str: ...


AS_IS = "as_is"
CLIP_AT_ZERO = "clip_at_zero"
MAE_VS_MAD = "mae_vs_mad"
UNSCORED = "unscored"
SCORE_MAPPINGS: tuple[str, ...] = (AS_IS, CLIP_AT_ZERO, MAE_VS_MAD, UNSCORED)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else math.nan


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in y_true, so a majority-class guess on an
    imbalanced site scores 1 / n_classes instead of the majority share."""
    classes = np.unique(y_true)
    if len(classes) == 0:
        return math.nan
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean F1 over the classes that occur in y_true or y_pred (as scikit-learn does)."""
    f1s = []
    for c in range(n_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else math.nan


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 of all (sample, label) decisions pooled; NaN when no label is present or predicted."""
    truth, pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = int(np.sum(truth & pred))
    wrong = int(np.sum(truth != pred))  # false positives + false negatives
    return 2 * tp / (2 * tp + wrong) if tp + wrong else math.nan


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks for ties; NaN when only one class is present."""
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    sorted_scores = np.asarray(score)[order]
    ranks = np.empty(len(score), dtype=float)
    # average ranks of tied groups
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean over labels of per-label AUROC, skipping labels with a single class here."""
    values = [auroc(y_true[:, j], scores[:, j]) for j in range(y_true.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def cohen_kappa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    n = len(y_true)
    if n == 0:
        return math.nan
    confusion = np.zeros((n_classes, n_classes))
    np.add.at(confusion, (y_true.astype(int), y_pred.astype(int)), 1)
    p_observed = np.trace(confusion) / n
    p_expected = float((confusion.sum(0) * confusion.sum(1)).sum()) / n**2
    if p_expected == 1.0:
        return math.nan
    return float((p_observed - p_expected) / (1 - p_expected))


def pearson(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if len(y_true) < 2 or np.std(y_true) == 0 or np.std(y_pred) == 0:
        return math.nan
    with np.errstate(invalid="ignore", divide="ignore"):  # near-constant predictions
        return float(np.corrcoef(y_true, y_pred)[0, 1])


def r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination; NaN when the targets do not vary (no baseline to beat)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    total = float(np.sum((y_true - y_true.mean()) ** 2)) if len(y_true) else 0.0
    if total == 0.0:
        return math.nan
    return 1.0 - float(np.sum((y_true - y_pred) ** 2)) / total


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.abs(y_true - y_pred))) if len(y_true) else math.nan


def mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean((y_true - y_pred) ** 2)) if len(y_true) else math.nan


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return math.sqrt(mse(y_true, y_pred)) if len(y_true) else math.nan


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # no overflow for large |x|


@dataclass(frozen=True)
class Metric:
    """One named metric: which target types it applies to, how to compute it from raw model
    outputs, and how its value maps onto a higher-is-better [0, 1] score."""

    name: str
    targets: frozenset[str]
    # (raw outputs, targets, n_classes) -> value; outputs as the model gives them: logits for
    # classification / multilabel, de-standardised values for regression, [N, L, C] logits for
    # per-residue targets padded with IGNORE_LABEL
    compute: Callable[[np.ndarray, np.ndarray, int], float]
    to_score: str  # one of SCORE_MAPPINGS
    description: str

    def __post_init__(self) -> None:
        if self.to_score not in SCORE_MAPPINGS:
            raise ValueError(
                f"metric {self.name!r}: to_score {self.to_score!r} is not one of {', '.join(SCORE_MAPPINGS)}"
            )
        unknown = sorted(set(self.targets) - set(TARGET_TYPES))
        if not self.targets or unknown:
            raise ValueError(
                f"metric {self.name!r}: targets must be a non-empty subset of {', '.join(TARGET_TYPES)}; "
                f"got {sorted(self.targets)}"
            )

    def score(self, value: float, target_mad: float | None = None) -> float:
        """The value mapped to higher-is-better in [0, 1] (module docstring); NaN stays NaN."""
        if self.to_score == UNSCORED:
            raise ValueError(f"metric {self.name!r} has no [0, 1] score: it cannot be a task's primary metric")
        if math.isnan(value):
            return math.nan
        if self.to_score == CLIP_AT_ZERO:
            return max(0.0, value)
        if self.to_score == MAE_VS_MAD:
            if not target_mad:
                raise ValueError(f"an {self.name.upper()} score needs the target's MAD")
            return max(0.0, 1.0 - value / target_mad)
        return float(value)


def _binary_logits(outputs: np.ndarray) -> np.ndarray:
    """One logit per sample, whether the head gave [N] or [N, 1]."""
    out = np.asarray(outputs)
    return out.reshape(len(out))


def _predicted_classes(outputs: np.ndarray) -> np.ndarray:
    """Class predictions from logits: a single logit per sample is a binary head (sigmoid >= 0.5,
    i.e. logit >= 0), several are one logit per class (argmax)."""
    out = np.asarray(outputs)
    if out.ndim == 1 or out.shape[-1] == 1:
        return (sigmoid(_binary_logits(out)) >= 0.5).astype(int)
    return out.argmax(-1)


def _q3(outputs: np.ndarray, targets: np.ndarray, _n_classes: int) -> float:
    keep = targets != IGNORE_LABEL
    return accuracy(targets[keep], np.asarray(outputs).argmax(-1)[keep])


def _regression(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray, np.ndarray, int], float]:
    def compute(outputs: np.ndarray, targets: np.ndarray, _n_classes: int) -> float:
        return fn(targets, outputs)

    return compute


_CLASSES = frozenset({BINARY, MULTICLASS, CLOSED_SET})
_REGRESSION = frozenset({REGRESSION})

METRICS: Registry[Metric] = Registry("metric")

for _metric in (
    Metric(
        "accuracy",
        _CLASSES,
        lambda o, t, _k: accuracy(t, _predicted_classes(o)),
        AS_IS,
        "share of samples whose predicted class is right",
    ),
    Metric(
        "balanced_accuracy",
        _CLASSES,
        lambda o, t, _k: balanced_accuracy(t, _predicted_classes(o)),
        AS_IS,
        "mean per-class recall over the classes present",
    ),
    Metric(
        "macro_f1",
        _CLASSES,
        lambda o, t, k: macro_f1(t, _predicted_classes(o), k),
        AS_IS,
        "mean per-class F1 over the classes present or predicted",
    ),
    Metric(
        "kappa",
        _CLASSES,
        lambda o, t, k: cohen_kappa(t, _predicted_classes(o), k),
        CLIP_AT_ZERO,
        "Cohen's kappa: agreement beyond chance",
    ),
    Metric(
        "auroc",
        frozenset({BINARY}),
        lambda o, t, _k: auroc(t, sigmoid(_binary_logits(o))),
        AS_IS,
        "area under the ROC curve of the positive-class probability",
    ),
    Metric(
        "mean_auroc",
        frozenset({MULTILABEL}),
        lambda o, t, _k: mean_auroc(t, sigmoid(o)),
        AS_IS,
        "mean per-label AUROC over labels with both classes present",
    ),
    Metric(
        "micro_f1",
        frozenset({MULTILABEL}),
        lambda o, t, _k: micro_f1(t, sigmoid(o) >= 0.5),
        AS_IS,
        "F1 of all (sample, label) decisions pooled, at probability 0.5",
    ),
    Metric("mae", _REGRESSION, _regression(mae), MAE_VS_MAD, "mean absolute error, in the target's unit"),
    Metric("mse", _REGRESSION, _regression(mse), UNSCORED, "mean squared error, in the target's unit squared"),
    Metric("rmse", _REGRESSION, _regression(rmse), UNSCORED, "root mean squared error, in the target's unit"),
    Metric("pearson", _REGRESSION, _regression(pearson), CLIP_AT_ZERO, "Pearson correlation of prediction and target"),
    Metric("r2", _REGRESSION, _regression(r2), CLIP_AT_ZERO, "coefficient of determination (1 - SSE / SST)"),
    Metric(
        "q3",
        frozenset({PER_RESIDUE}),
        _q3,
        AS_IS,
        "per-position accuracy over unpadded positions",
    ),
):
    METRICS.add(_metric.name, _metric)


def metrics_for(target: str) -> list[str]:
    """The names of the metrics that apply to a target type, in registry order."""
    if target not in TARGET_TYPES:
        raise ValueError(f"unknown target type {target!r}; valid target types: {', '.join(TARGET_TYPES)}")
    return [name for name, metric in METRICS.items() if target in metric.targets]


def validate_metrics(task_name: str, target: str, metrics: Iterable[str]) -> None:
    """Refuse, naming the task and metric, a metric list a task's declaration got wrong: empty,
    repeated, unknown, not for this target type, or an unscored primary (first) metric."""
    valid = metrics_for(target)
    listing = f"metrics for {target} targets: {', '.join(valid)}"
    if isinstance(metrics, str):
        raise ValueError(f"task {task_name!r}: metrics must be a list of names, not the string {metrics!r}")
    names = list(metrics)
    if not names:
        raise ValueError(f"task {task_name!r} declares no metrics; {listing}")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"task {task_name!r}: metric {name!r} is listed twice")
        if name not in METRICS:
            raise ValueError(f"task {task_name!r}: metric {name!r} is not a known metric; {listing}")
        if name not in valid:
            raise ValueError(f"task {task_name!r}: metric {name!r} does not apply to {target} targets; {listing}")
    if METRICS.get(names[0]).to_score == UNSCORED:
        scored = [n for n in valid if METRICS.get(n).to_score != UNSCORED]
        raise ValueError(
            f"task {task_name!r}: metric {names[0]!r} has no [0, 1] score, so it cannot be the primary (first) "
            f"metric; put one of these first: {', '.join(scored)}"
        )


def task_metrics(task: Task, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Exactly the task's metrics, in its order, from raw model outputs (logits, or
    de-standardised regression values)."""
    validate_metrics(task.name, task.target, task.metrics)
    n_classes = 2 if task.target == BINARY else len(task.classes)
    return {name: METRICS.get(name).compute(outputs, targets, n_classes) for name in task.metrics}


def unit_score(task: Task, metrics: dict[str, float], target_mad: float | None = None) -> float:
    """The task's primary metric mapped to higher-is-better in [0, 1] (module docstring)."""
    name = task.primary_metric
    try:
        return METRICS.get(name).score(metrics[name], target_mad)
    except ValueError as err:
        raise ValueError(f"task {task.name}: {err}") from None
