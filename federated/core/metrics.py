"""Task metrics (numpy) and the mapping of each task's primary metric onto a [0, 1] score.

Written by hand because the only well-kept library with all of them (scikit-learn) is not
otherwise a dependency, and these are a few lines each; every one is tested against
hand-computed values.

A site's score for a task is its primary metric mapped to "higher is better" in [0, 1]:
  macro_f1, accuracy, auroc, mean_auroc, q3 -> as is
  kappa, pearson                            -> max(0, value)
  mae                                       -> max(0, 1 - MAE / MAD), MAD = mean absolute
                                               deviation of the task's training targets, i.e.
                                               the MAE of always predicting the mean (score 0)
"""

from __future__ import annotations

import math

import numpy as np

from federated.core.multimed import (
    BINARY,
    CLOSED_SET,
    IGNORE_LABEL,
    MULTICLASS,
    MULTILABEL,
    PER_RESIDUE,
    REGRESSION,
    Task,
)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else math.nan


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


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.abs(y_true - y_pred))) if len(y_true) else math.nan


def mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean((y_true - y_pred) ** 2)) if len(y_true) else math.nan


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # no overflow for large |x|


def task_metrics(task: Task, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """All of a task's metrics from raw model outputs (logits, or de-standardised regression)."""
    n_cls = len(task.classes)
    if task.target in (MULTICLASS, CLOSED_SET):
        pred = outputs.argmax(-1)
        values = {
            "accuracy": accuracy(targets, pred),
            "macro_f1": macro_f1(targets, pred, n_cls),
            "kappa": cohen_kappa(targets, pred, n_cls),
        }
    elif task.target == BINARY:
        prob = sigmoid(outputs)
        values = {"auroc": auroc(targets, prob), "accuracy": accuracy(targets, (prob >= 0.5).astype(int))}
    elif task.target == MULTILABEL:
        values = {"mean_auroc": mean_auroc(targets, sigmoid(outputs))}
    elif task.target == REGRESSION:
        values = {"mae": mae(targets, outputs), "mse": mse(targets, outputs), "pearson": pearson(targets, outputs)}
    elif task.target == PER_RESIDUE:
        keep = targets != IGNORE_LABEL
        values = {"q3": accuracy(targets[keep], outputs.argmax(-1)[keep])}
    else:  # pragma: no cover - the registry only holds known targets
        raise ValueError(f"unknown target type {task.target!r}")
    return {m: values[m] for m in task.metrics}


def unit_score(task: Task, metrics: dict[str, float], target_mad: float | None = None) -> float:
    """The task's primary metric mapped to higher-is-better in [0, 1] (module docstring)."""
    name = task.primary_metric
    value = metrics[name]
    if math.isnan(value):
        return math.nan
    if name in ("kappa", "pearson"):
        return max(0.0, value)
    if name == "mae":
        if not target_mad:
            raise ValueError(f"task {task.name}: an MAE score needs the target's MAD")
        return max(0.0, 1.0 - value / target_mad)
    return float(value)
