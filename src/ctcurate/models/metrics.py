"""Pure metric functions of the evaluate stage: arrays in, numbers out.

Conventions for undefined values (documented in ``metrics/eval.json`` as ``null``):

- Dice of two empty masks is undefined (``None``): there is nothing to overlap. Such cases
  are left out of a mean (as MONAI's ``ignore_empty``); a mean over no defined value is
  ``None``. Dice of an empty and a non-empty mask is 0.
- Sensitivity is undefined without actual positives, specificity without actual negatives,
  accuracy without cases.
- Balanced accuracy is the mean of the recalls of the classes present in the truth
  (``None`` when there is no case).
- ROC AUC needs both classes; with one class it is ``None`` and the ROC curve is empty.
  Tied scores count one half (the Mann-Whitney U statistic).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


def dice(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float | None:
    """Dice coefficient 2|P∩T| / (|P| + |T|) of two boolean masks; ``None`` if both empty."""
    if pred.shape != truth.shape:
        msg = f"dice: shapes differ, {pred.shape} vs {truth.shape}"
        raise ValueError(msg)
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not ``None``; ``None`` when there is none."""
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return None
    return float(np.mean(np.asarray(defined, dtype=np.float64)))


@dataclass(frozen=True)
class BinaryCounts:
    """Confusion counts of a binary decision (positive class = 1)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        """Number of cases."""
        return self.tp + self.fp + self.tn + self.fn


def binary_counts(actual: Sequence[int], predicted: Sequence[int]) -> BinaryCounts:
    """Count true / false positives and negatives of 0/1 decisions."""
    a = np.asarray(actual, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    if a.shape != p.shape:
        msg = f"binary_counts: {a.size} actual vs {p.size} predicted values"
        raise ValueError(msg)
    for name, arr in (("actual", a), ("predicted", p)):
        if arr.size and not np.isin(arr, (0, 1)).all():
            msg = f"binary_counts: {name} values must be 0 or 1"
            raise ValueError(msg)
    return BinaryCounts(
        tp=int(((a == 1) & (p == 1)).sum()),
        fp=int(((a == 0) & (p == 1)).sum()),
        tn=int(((a == 0) & (p == 0)).sum()),
        fn=int(((a == 1) & (p == 0)).sum()),
    )


def sensitivity(counts: BinaryCounts) -> float | None:
    """TP / (TP + FN); ``None`` without actual positives."""
    pos = counts.tp + counts.fn
    return counts.tp / pos if pos else None


def specificity(counts: BinaryCounts) -> float | None:
    """TN / (TN + FP); ``None`` without actual negatives."""
    neg = counts.tn + counts.fp
    return counts.tn / neg if neg else None


def accuracy(counts: BinaryCounts) -> float | None:
    """(TP + TN) / N; ``None`` without cases."""
    return (counts.tp + counts.tn) / counts.n if counts.n else None


def balanced_accuracy(counts: BinaryCounts) -> float | None:
    """Mean recall over the classes present in the truth; ``None`` without cases."""
    return mean_defined(v for v in (sensitivity(counts), specificity(counts)) if v is not None)


def _check_scores(
    actual: Sequence[int], scores: Sequence[float]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    a = np.asarray(actual, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if a.shape != s.shape:
        msg = f"{a.size} actual values vs {s.size} scores"
        raise ValueError(msg)
    if a.size and not np.isin(a, (0, 1)).all():
        msg = "actual values must be 0 or 1"
        raise ValueError(msg)
    if not np.isfinite(s).all():
        msg = "scores must be finite"
        raise ValueError(msg)
    return a, s


def roc_auc(actual: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve, ties counted one half; ``None`` unless both classes occur.

    Computed as the Mann-Whitney U statistic: the fraction of (positive, negative) pairs
    where the positive scores higher, plus half the tied pairs.
    """
    a, s = _check_scores(actual, scores)
    pos = s[a == 1]
    neg = s[a == 0]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def roc_curve(actual: Sequence[int], scores: Sequence[float]) -> list[dict[str, float | None]]:
    """ROC points ``{"fpr", "tpr", "threshold"}``, from (0, 0) to (1, 1).

    A case is called positive when its score is ``>= threshold``; one point per distinct
    score, highest first, after a first point (0, 0) whose threshold is ``None`` (nothing
    called positive). Empty when the truth lacks a class.
    """
    a, s = _check_scores(actual, scores)
    n_pos = int((a == 1).sum())
    n_neg = int((a == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return []
    points: list[dict[str, float | None]] = [{"fpr": 0.0, "tpr": 0.0, "threshold": None}]
    for threshold in np.unique(s)[::-1]:
        called = s >= threshold
        points.append(
            {
                "fpr": int((called & (a == 0)).sum()) / n_neg,
                "tpr": int((called & (a == 1)).sum()) / n_pos,
                "threshold": float(threshold),
            }
        )
    return points
