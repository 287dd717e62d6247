import math

import numpy as np
import pytest

from federated.core import metrics as M
from federated.core.multimed import TASKS


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
    q3 = M.task_metrics(TASKS.get("protein_structure"), np.eye(3)[[[0, 1, 2, 2]]] * 5.0, np.array([[0, 1, 1, -1]]))
    assert q3 == {"q3": pytest.approx(2 / 3)}  # the padded position is ignored
    binary = M.task_metrics(TASKS.get("breast_cancer_classification"), np.array([-2.0, 3.0, 1.0]), np.array([0, 1, 0]))
    assert binary == {"auroc": 1.0, "accuracy": pytest.approx(2 / 3)}


def test_unit_score_maps_to_higher_is_better():
    bone = TASKS.get("bone_age")
    assert M.unit_score(bone, {"mae": 10.0}, target_mad=40.0) == pytest.approx(0.75)
    assert M.unit_score(bone, {"mae": 80.0}, target_mad=40.0) == 0.0
    expr = TASKS.get("expression_prediction")
    assert M.unit_score(expr, {"pearson": -0.3, "mse": 1.0}) == 0.0
    with pytest.raises(ValueError, match="MAD"):
        M.unit_score(bone, {"mae": 1.0})
