"""How well a selector fitted on an audit list is expected to do on series it has not seen.

``select-train`` fits the pneumonia selector on every audited series; this module measures,
on the same audit list, what that fit is worth elsewhere (docs/select.md, "Validation"):

* **cross-validation**: the audit list is split into ``folds`` stratified folds (each
  class dealt out in turn, in the audit list's order: no randomness), each fold scored by
  a selector fitted on the others, and precision, recall and the AUC of the score taken
  over the pooled out-of-fold decisions;
* **leave one site out**: each site's series scored by a selector fitted on the other
  sites only — what the selector does at a hospital whose scanners, protocols and
  patients it never saw. The pooled figures and each site's are reported. A selector that
  ranks well within the list but loses precision or recall here is not calibrated across
  sites, and a new site needs audited series of its own.

Every fit is :func:`ctcurate.selection.pneumonia.fit_selector` with the stage's ``l2`` and
``threshold``; a training part with one class only gives the class prior, as the stage
does. Undefined figures (no positive decision, no actual positive, one class only) are
``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ctcurate.models.metrics import binary_counts, roc_auc, sensitivity
from ctcurate.selection.pneumonia import FEATURES, fit_selector


def stratified_folds(labels: npt.ArrayLike, folds: int) -> npt.NDArray[np.int64]:
    """Fold number of each row: the rows of each class dealt to folds 0, 1, … in turn.

    With fewer rows of a class than ``folds``, that class only fills the first folds."""
    if folds < 2:
        msg = "stratified_folds: at least 2 folds"
        raise ValueError(msg)
    y = np.asarray(labels, dtype=np.int64)
    out = np.zeros(len(y), dtype=np.int64)
    for label in (0, 1):
        rows = np.flatnonzero(y == label)
        out[rows] = np.arange(len(rows)) % folds
    return out


def decision_figures(
    actual: npt.ArrayLike, scores: npt.ArrayLike, threshold: float
) -> dict[str, Any]:
    """Series, pneumonia, selected, precision, recall and AUC of scores against labels."""
    a = np.asarray(actual, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    counts = binary_counts(a.tolist(), (s >= threshold).astype(np.int64).tolist())
    selected = counts.tp + counts.fp
    return {
        "series": int(a.size),
        "pneumonia": int(a.sum()),
        "selected": int(selected),
        "precision": _round(counts.tp / selected if selected else None),
        "recall": _round(sensitivity(counts)),
        "auc": _round(roc_auc(a.tolist(), s.tolist())),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _out_of_part_scores(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    part: npt.NDArray[np.int64],
    l2: float,
    threshold: float,
) -> npt.NDArray[np.float64]:
    """Each row's score from a selector fitted on the rows of the other parts."""
    scores = np.zeros(len(y), dtype=np.float64)
    for p in np.unique(part):
        held = part == p
        model = fit_selector(x[~held], y[~held], l2=l2, threshold=threshold)
        scores[held] = model.predict_proba(x[held])
    return scores


def validate_selector(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    sites: Sequence[str],
    *,
    l2: float,
    threshold: float,
    folds: int,
) -> dict[str, Any]:
    """The validation report of a selector fitted on rows ``x`` (features in
    :data:`FEATURES` order) with labels ``y`` from ``sites``, in audit-list order.

    ``cross_validation`` needs ``folds`` ≥ 2 and at least two rows; ``leave_one_site_out``
    needs two sites or more (otherwise ``None``)."""
    xa = np.asarray(x, dtype=np.float64).reshape(-1, len(FEATURES))
    ya = np.asarray(y, dtype=np.int64)
    site_arr = np.asarray([str(s) for s in sites])
    if not len(ya) == len(xa) == len(site_arr):
        msg = "validate_selector: rows, labels and sites differ in number"
        raise ValueError(msg)
    report: dict[str, Any] = {
        "series": len(ya),
        "pneumonia": int(ya.sum()),
        "threshold": float(threshold),
        "cross_validation": None,
        "leave_one_site_out": None,
    }
    k = min(folds, len(ya))
    if k >= 2:
        part = stratified_folds(ya, k)
        scores = _out_of_part_scores(xa, ya, part, l2, threshold)
        used = len(np.unique(part))  # a class smaller than k fills fewer folds
        report["cross_validation"] = {"folds": used, **decision_figures(ya, scores, threshold)}
    names = sorted(set(site_arr.tolist()))
    if len(names) >= 2:
        part = np.asarray([names.index(s) for s in site_arr], dtype=np.int64)
        scores = _out_of_part_scores(xa, ya, part, l2, threshold)
        per_site = {
            name: decision_figures(ya[site_arr == name], scores[site_arr == name], threshold)
            for name in names
        }
        report["leave_one_site_out"] = {
            "pooled": decision_figures(ya, scores, threshold),
            "per_site": per_site,
        }
    return report
