"""Metric functions against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ctcurate.models.metrics import (
    BinaryCounts,
    accuracy,
    balanced_accuracy,
    binary_counts,
    dice,
    mean_defined,
    roc_auc,
    roc_curve,
    sensitivity,
    specificity,
)


def test_dice_by_hand() -> None:
    pred = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    truth = np.array([0, 1, 1, 1, 0, 0], dtype=bool)
    # |P∩T| = 2, |P| = 3, |T| = 3 → 4 / 6
    assert dice(pred, truth) == pytest.approx(2 / 3)
    assert dice(truth, truth) == 1.0


def test_dice_empty_conventions() -> None:
    empty = np.zeros((2, 3), dtype=bool)
    full = np.ones((2, 3), dtype=bool)
    assert dice(empty, empty) is None
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0
    with pytest.raises(ValueError, match=r"shapes differ"):
        dice(empty, np.zeros((3, 2), dtype=bool))


def test_mean_defined() -> None:
    assert mean_defined([None, 0.5, None, 1.0]) == pytest.approx(0.75)
    assert mean_defined([None, None]) is None
    assert mean_defined([]) is None


def test_counts_and_rates() -> None:
    actual = [1, 1, 1, 0, 0, 0, 0, 1]
    predicted = [1, 0, 1, 0, 1, 0, 0, 1]
    counts = binary_counts(actual, predicted)
    assert counts == BinaryCounts(tp=3, fp=1, tn=3, fn=1)
    assert counts.n == 8
    assert sensitivity(counts) == pytest.approx(3 / 4)
    assert specificity(counts) == pytest.approx(3 / 4)
    assert accuracy(counts) == pytest.approx(6 / 8)
    assert balanced_accuracy(counts) == pytest.approx(3 / 4)


def test_balanced_accuracy_imbalanced() -> None:
    # 4 positives, 1 negative; all called positive: sens 1, spec 0 → 0.5 (accuracy 0.8)
    counts = binary_counts([1, 1, 1, 1, 0], [1, 1, 1, 1, 1])
    assert accuracy(counts) == pytest.approx(0.8)
    assert balanced_accuracy(counts) == pytest.approx(0.5)


def test_undefined_rates() -> None:
    only_pos = binary_counts([1, 1], [1, 0])
    assert specificity(only_pos) is None
    assert sensitivity(only_pos) == pytest.approx(0.5)
    assert balanced_accuracy(only_pos) == pytest.approx(0.5)
    none = binary_counts([], [])
    assert accuracy(none) is None
    assert balanced_accuracy(none) is None
    assert sensitivity(none) is None
    with pytest.raises(ValueError, match=r"actual values must be 0 or 1"):
        binary_counts([2], [1])
    with pytest.raises(ValueError, match=r"2 actual vs 1 predicted"):
        binary_counts([1, 0], [1])


def test_auc_with_ties() -> None:
    actual = [1, 1, 0, 0]
    scores = [0.9, 0.5, 0.5, 0.1]
    # pairs (pos, neg): (0.9,0.5)=1 (0.9,0.1)=1 (0.5,0.5)=0.5 (0.5,0.1)=1 → 3.5 / 4
    assert roc_auc(actual, scores) == pytest.approx(0.875)
    assert roc_auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert roc_auc([1, 1], [0.1, 0.9]) is None
    assert roc_auc([], []) is None
    with pytest.raises(ValueError, match=r"scores must be finite"):
        roc_auc([1, 0], [float("nan"), 0.1])


def test_roc_curve_by_hand() -> None:
    points = roc_curve([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1])
    assert points == [
        {"fpr": 0.0, "tpr": 0.0, "threshold": None},
        {"fpr": 0.0, "tpr": 0.5, "threshold": 0.9},
        {"fpr": 0.5, "tpr": 1.0, "threshold": 0.5},
        {"fpr": 1.0, "tpr": 1.0, "threshold": 0.1},
    ]
    # trapezoid area under these points equals the tie-aware AUC
    fpr = np.array([float(p["fpr"] or 0.0) for p in points])
    tpr = np.array([float(p["tpr"] or 0.0) for p in points])
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(0.875)
    assert roc_curve([0, 0], [0.1, 0.2]) == []
    with pytest.raises(ValueError, match=r"2 actual values vs 1 scores"):
        roc_curve([1, 0], [0.5])
