import math

import numpy as np
import pytest

from federated.core import metrics as M
from federated.core.multimed import BINARY, CATALOGUE, MULTILABEL, PER_RESIDUE, REGRESSION, Task
from federated.core.registry import UnknownNameError


def test_accuracy_and_macro_f1_by_hand():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    assert M.accuracy(y, p) == pytest.approx(3 / 5)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 fp0 fn1 -> 0
    assert M.macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_auroc_by_hand_with_ties():
    y = np.array([0, 0, 1, 1])
    assert M.auroc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert M.auroc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert math.isnan(M.auroc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_mean_auroc_skips_single_class_labels():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])
    s = np.array([[0.1, 0.2], [0.9, 0.3], [0.2, 0.1], [0.8, 0.5]])
    assert M.mean_auroc(y, s) == pytest.approx(1.0)


def test_kappa_pearson_mae_by_hand():
    y = np.array([0, 1, 0, 1])
    assert M.cohen_kappa(y, y, 2) == pytest.approx(1.0)
    # observed 0.5, expected 0.5 -> kappa 0
    assert M.cohen_kappa(y, np.array([0, 0, 1, 1]), 2) == pytest.approx(0.0)
    assert M.pearson(np.array([1.0, 2, 3]), np.array([2.0, 4, 6])) == pytest.approx(1.0)
    assert M.mae(np.array([1.0, 3.0]), np.array([2.0, 1.0])) == pytest.approx(1.5)
    assert M.mse(np.array([1.0, 3.0]), np.array([2.0, 1.0])) == pytest.approx(2.5)


def test_task_metrics_per_target_type():
    q3 = M.task_metrics(CATALOGUE.task("protein_structure"), np.eye(3)[[[0, 1, 2, 2]]] * 5.0, np.array([[0, 1, 1, -1]]))
    assert q3 == {"q3": pytest.approx(2 / 3)}  # the padded position is ignored
    binary = M.task_metrics(
        CATALOGUE.task("breast_cancer_classification"), np.array([-2.0, 3.0, 1.0]), np.array([0, 1, 0])
    )
    assert binary == {"auroc": 1.0, "accuracy": pytest.approx(2 / 3)}


def test_unit_score_maps_to_higher_is_better():
    bone = CATALOGUE.task("bone_age")
    assert M.unit_score(bone, {"mae": 10.0}, target_mad=40.0) == pytest.approx(0.75)
    assert M.unit_score(bone, {"mae": 80.0}, target_mad=40.0) == 0.0
    expr = CATALOGUE.task("expression_prediction")
    assert M.unit_score(expr, {"pearson": -0.3, "mse": 1.0}) == 0.0
    with pytest.raises(ValueError, match="MAD"):
        M.unit_score(bone, {"mae": 1.0})


# --- the metric registry -------------------------------------------------------------------


def test_balanced_accuracy_is_mean_recall_over_classes_in_y_true():
    # recalls: class 0 2/3, class 1 1/1, class 2 1/2
    y = np.array([0, 0, 0, 1, 2, 2])
    p = np.array([0, 0, 1, 1, 2, 0])
    assert M.balanced_accuracy(y, p) == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    # class 3 is only predicted, so it adds no recall term: (1/2 + 1) / 2
    assert M.balanced_accuracy(np.array([0, 0, 1]), np.array([0, 3, 1])) == pytest.approx(0.75)
    # a majority-class guess: accuracy 3/4 but balanced accuracy 1/2
    y, p = np.array([0, 0, 0, 1]), np.zeros(4, dtype=int)
    assert (M.accuracy(y, p), M.balanced_accuracy(y, p)) == (0.75, 0.5)
    assert math.isnan(M.balanced_accuracy(np.array([]), np.array([])))


def test_micro_f1_pools_every_label_decision():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    pred = np.array([[1, 0, 0], [1, 1, 0]])  # tp 2, fp 1, fn 1 -> 2*2 / (2*2 + 2)
    assert M.micro_f1(y, pred) == pytest.approx(2 / 3)
    assert M.micro_f1(y, y) == 1.0
    assert math.isnan(M.micro_f1(np.zeros((2, 3)), np.zeros((2, 3))))


def test_r2_and_rmse_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, SST 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert M.r2(y, np.array([1.0, 2.0, 3.0, 5.0])) == pytest.approx(1 - 1 / 5)
    assert M.r2(y, np.array([4.0, 3.0, 2.0, 1.0])) == pytest.approx(1 - 20 / 5)  # worse than the mean
    assert math.isnan(M.r2(np.array([2.0, 2.0]), np.array([1.0, 3.0])))  # no variance to explain
    assert M.rmse(np.array([0.0, 0.0]), np.array([2.0, -4.0])) == pytest.approx(math.sqrt((4 + 16) / 2))
    assert math.isnan(M.rmse(np.array([]), np.array([])))


def test_binary_task_metrics_threshold_logits_in_declared_order():
    task = Task(
        "sepsis", ("tabular",), BINARY, ("kappa", "macro_f1", "balanced_accuracy", "accuracy", "auroc"), ("no", "yes")
    )
    logits = np.array([-2.0, -1.0, 1.0, 2.0])  # predictions 0 0 1 1
    y = np.array([0, 0, 0, 1])
    got = M.task_metrics(task, logits, y)
    assert list(got) == ["kappa", "macro_f1", "balanced_accuracy", "accuracy", "auroc"]
    # observed agreement 3/4; marginals true (3, 1), predicted (2, 2): expected (3*2 + 1*2) / 16 = 1/2
    assert got["kappa"] == pytest.approx((0.75 - 0.5) / 0.5)
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 0 -> 2/3
    assert got["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["auroc"] == pytest.approx(1.0)
    assert M.task_metrics(task, logits[:, None], y) == got  # a [N, 1] head reads the same
    # a subset, in another order, computes exactly that
    subset = Task("sepsis", ("tabular",), BINARY, ("auroc", "accuracy"), ("no", "yes"))
    assert list(M.task_metrics(subset, logits, y)) == ["auroc", "accuracy"]


def test_multilabel_and_regression_task_metrics():
    findings = Task("findings", ("xray",), MULTILABEL, ("micro_f1", "mean_auroc"), ("a", "b", "c"), (3,))
    y = np.array([[1, 0, 1], [0, 1, 0]])
    logits = np.array([[2.0, -1.0, -3.0], [1.0, 3.0, -2.0]])  # predictions [[1,0,0],[1,1,0]]
    # per-label AUROC: 1, 1, 0 (label c ranks its positive below its negative)
    assert M.task_metrics(findings, logits, y) == {"micro_f1": pytest.approx(2 / 3), "mean_auroc": pytest.approx(2 / 3)}
    growth = Task("growth", ("tabular",), REGRESSION, ("r2", "rmse", "mae"))
    got = M.task_metrics(growth, np.array([1.0, 2.0, 3.0, 5.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert got == {"r2": pytest.approx(0.8), "rmse": pytest.approx(0.5), "mae": pytest.approx(0.25)}
    assert M.unit_score(growth, got) == pytest.approx(0.8)
    assert M.unit_score(growth, {"r2": -3.0}) == 0.0  # clipped at zero


def test_metrics_for_each_target_type():
    assert M.metrics_for(BINARY) == ["accuracy", "balanced_accuracy", "macro_f1", "kappa", "auroc"]
    assert M.metrics_for(MULTILABEL) == ["mean_auroc", "micro_f1"]
    assert M.metrics_for(REGRESSION) == ["mae", "mse", "rmse", "pearson", "r2"]
    assert M.metrics_for(PER_RESIDUE) == ["q3"]
    with pytest.raises(ValueError, match="unknown target type 'ordinal'"):
        M.metrics_for("ordinal")


def test_registry_lookup_error_lists_the_metric_names():
    with pytest.raises(UnknownNameError) as err:
        M.METRICS.get("f2")
    assert "unknown metric 'f2'" in str(err.value)
    assert "accuracy" in str(err.value) and "micro_f1" in str(err.value) and "r2" in str(err.value)
    assert "rmse" in M.METRICS and "f2" not in M.METRICS


def test_validate_metrics_refuses_by_name():
    binary = "accuracy, balanced_accuracy, macro_f1, kappa, auroc"
    M.validate_metrics("sepsis", BINARY, ["auroc", "accuracy"])  # fine: no error
    with pytest.raises(ValueError) as err:
        M.validate_metrics("sepsis", BINARY, ["auroc", "f2"])
    assert str(err.value) == f"task 'sepsis': metric 'f2' is not a known metric; metrics for binary targets: {binary}"
    with pytest.raises(ValueError) as err:
        M.validate_metrics("x", BINARY, ("mae",))
    assert (
        str(err.value)
        == f"task 'x': metric 'mae' does not apply to binary targets; metrics for binary targets: {binary}"
    )
    with pytest.raises(ValueError, match="task 'x' declares no metrics"):
        M.validate_metrics("x", BINARY, [])
    with pytest.raises(ValueError, match="metric 'auroc' is listed twice"):
        M.validate_metrics("x", BINARY, ["auroc", "accuracy", "auroc"])
    with pytest.raises(ValueError, match="not the string 'auroc'"):
        M.validate_metrics("x", BINARY, "auroc")
    with pytest.raises(ValueError, match="unknown target type"):
        M.validate_metrics("x", "ordinal", ["accuracy"])


def test_unscored_metric_cannot_be_primary():
    M.validate_metrics("expr", REGRESSION, ["pearson", "mse", "rmse"])  # secondary is fine
    with pytest.raises(ValueError, match="'rmse' has no \\[0, 1\\] score.*first: mae, pearson, r2"):
        M.validate_metrics("expr", REGRESSION, ["rmse", "pearson"])
    with pytest.raises(ValueError, match="cannot be a task's primary metric"):
        M.METRICS.get("mse").score(1.0)


def test_metric_refuses_unknown_score_mapping_or_target():
    with pytest.raises(ValueError, match="to_score 'higher'"):
        M.Metric("f2", frozenset({BINARY}), lambda o, t, k: 0.0, "higher", "F-beta")
    with pytest.raises(ValueError, match="targets must be a non-empty subset"):
        M.Metric("f2", frozenset({"ordinal"}), lambda o, t, k: 0.0, "as_is", "F-beta")
