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

:func:`review_csv` lists the audited series from the largest held-out disagreement with
their label down: where a radiologist looks again (a label slip, or a kind of series the
features miss).

Every fit is :func:`ctcurate.selection.pneumonia.fit_selector` with the stage's ``l2`` and
``threshold``; a training part with one class only gives the class prior, as the stage
does. Undefined figures (no positive decision, no actual positive, one class only) are
``None``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Validation:
    """The report and each row's held-out scores (``None`` where the report's part is)."""

    report: dict[str, Any]
    cross_validated: npt.NDArray[np.float64] | None
    site_held_out: npt.NDArray[np.float64] | None


def validate(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    sites: Sequence[str],
    *,
    l2: float,
    threshold: float,
    folds: int,
) -> Validation:
    """Validate a selector fitted on rows ``x`` (features in :data:`FEATURES` order) with
    labels ``y`` from ``sites``, in audit-list order: the report and the held-out scores.

    ``cross_validation`` needs ``folds`` ≥ 2 and at least two rows; ``leave_one_site_out``
    needs two sites or more (otherwise ``None``)."""
    xa = np.asarray(x, dtype=np.float64).reshape(-1, len(FEATURES))
    ya = np.asarray(y, dtype=np.int64)
    site_arr = np.asarray([str(s) for s in sites])
    if not len(ya) == len(xa) == len(site_arr):
        msg = "validate: rows, labels and sites differ in number"
        raise ValueError(msg)
    report: dict[str, Any] = {
        "series": len(ya),
        "pneumonia": int(ya.sum()),
        "threshold": float(threshold),
        "cross_validation": None,
        "leave_one_site_out": None,
    }
    cv_scores = site_scores = None
    k = min(folds, len(ya))
    if k >= 2:
        part = stratified_folds(ya, k)
        cv_scores = _out_of_part_scores(xa, ya, part, l2, threshold)
        used = len(np.unique(part))  # a class smaller than k fills fewer folds
        report["cross_validation"] = {"folds": used, **decision_figures(ya, cv_scores, threshold)}
    names = sorted(set(site_arr.tolist()))
    if len(names) >= 2:
        part = np.asarray([names.index(s) for s in site_arr], dtype=np.int64)
        site_scores = _out_of_part_scores(xa, ya, part, l2, threshold)
        per_site = {
            name: decision_figures(ya[site_arr == name], site_scores[site_arr == name], threshold)
            for name in names
        }
        report["leave_one_site_out"] = {
            "pooled": decision_figures(ya, site_scores, threshold),
            "per_site": per_site,
        }
    return Validation(report, cv_scores, site_scores)


REVIEW_COLUMNS = (
    "site",
    "series_instance_uid",
    "pneumonia",
    "cross_validated_score",
    "site_held_out_score",
    "disagrees",
)


def review_csv(
    keys: Sequence[tuple[str, str]],
    labels: Sequence[int],
    validation: Validation,
    threshold: float,
) -> bytes:
    """The audited series as a reviewer would take them up (CSV bytes), one row per
    (site, series uid) in ``keys``: the audited label, the cross-validated and the
    site-held-out scores (6 decimals; empty where not measured) and whether the
    cross-validated decision disagrees with the label. Rows run from the largest
    disagreement (|label − cross-validated score|) down, ties by (site, uid)."""
    cv, held = validation.cross_validated, validation.site_held_out

    def score(values: npt.NDArray[np.float64] | None, i: int) -> str:
        return "" if values is None else f"{values[i]:.6f}"

    rows = []
    for i, ((site, uid), label) in enumerate(zip(keys, labels, strict=True)):
        miss = abs(int(label) - round(float(cv[i]), 6)) if cv is not None else 0.0
        disagrees = cv is not None and (cv[i] >= threshold) != bool(label)
        rows.append(
            (
                -miss,
                site,
                uid,
                [
                    site,
                    uid,
                    "yes" if label else "no",
                    score(cv, i),
                    score(held, i),
                    "yes" if disagrees else "no",
                ],
            )
        )
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(REVIEW_COLUMNS)
    writer.writerows(r[3] for r in rows)
    return out.getvalue().encode()
