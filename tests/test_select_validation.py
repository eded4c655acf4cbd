"""The selector's validation report: cross-validation and leave one site out."""

from __future__ import annotations

import numpy as np
import pytest

from ctcurate.selection.pneumonia import FEATURES, LOG_FEATURES
from ctcurate.selection.validation import (
    decision_figures,
    review_csv,
    stratified_folds,
    validate,
)

L2, THRESHOLD = 0.1, 0.5


def rows(rng: np.random.Generator, opacity: float, n: int) -> np.ndarray:
    """``n`` feature rows whose fractions scatter (×/÷ 1.3) around ``opacity``."""
    x = np.zeros((n, len(FEATURES)))
    for name in LOG_FEATURES:
        x[:, FEATURES.index(name)] = opacity * np.exp(rng.normal(0.0, 0.25, n))
    x[:, FEATURES.index("bilateral_share")] = rng.uniform(0.2, 0.8, n)
    return x


def two_sites(seed: int = 0) -> tuple[np.ndarray, list[int], list[str]]:
    """Site A: clear lungs 0.001, pneumonia 0.05; site B, whose clear lungs read denser (as
    a heavier vessel load or another kernel makes them): clear 0.01, pneumonia 0.3. Over
    both sites the classes separate (0.001 < 0.01 < 0.05 < 0.3); a fit on one site does not
    carry to the other."""
    rng = np.random.default_rng(seed)
    parts = [("A", 0.001, 0), ("A", 0.05, 1), ("B", 0.01, 0), ("B", 0.3, 1)]
    x = np.vstack([rows(rng, level, 12) for _, level, _ in parts])
    y = [label for _, _, label in parts for _ in range(12)]
    sites = [site for site, _, _ in parts for _ in range(12)]
    order = rng.permutation(len(y))  # audit lists are not sorted by class
    return x[order], [y[i] for i in order], [sites[i] for i in order]


def test_stratified_folds_deal_each_class_in_turn() -> None:
    labels = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    folds = stratified_folds(labels, 3)
    assert folds.tolist() == [0, 0, 1, 2, 1, 2, 0, 0, 1, 2]
    for f in range(3):  # every fold holds both classes
        assert {labels[i] for i in np.flatnonzero(folds == f)} == {0, 1}
    with pytest.raises(ValueError, match="at least 2 folds"):
        stratified_folds(labels, 1)


def test_decision_figures_count_what_the_threshold_selects() -> None:
    fig = decision_figures([1, 1, 0, 0, 1], [0.9, 0.2, 0.7, 0.1, 0.6], 0.5)
    assert fig == {
        "series": 5,
        "pneumonia": 3,
        "selected": 3,
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "auc": pytest.approx(4 / 6),  # 4 of the 6 (pneumonia, clear) pairs ordered
    }
    none = decision_figures([0, 0], [0.1, 0.2], 0.5)
    assert none["precision"] is None
    assert none["recall"] is None
    assert none["auc"] is None


def test_one_site_separates_within_and_across_folds() -> None:
    x, y, sites = two_sites()
    a = [i for i, s in enumerate(sites) if s == "A"]
    report = validate(
        x[a], [y[i] for i in a], ["A"] * len(a), l2=L2, threshold=THRESHOLD, folds=5
    ).report
    cv = report["cross_validation"]
    assert cv["folds"] == 5
    assert (cv["precision"], cv["recall"], cv["auc"]) == (1.0, 1.0, 1.0)
    assert report["leave_one_site_out"] is None  # one site: nothing to leave out


def test_leave_one_site_out_shows_a_fit_that_does_not_carry_to_another_site() -> None:
    x, y, sites = two_sites()
    report = validate(x, y, sites, l2=L2, threshold=THRESHOLD, folds=5).report
    assert report["series"] == 48
    assert report["pneumonia"] == 24
    cv = report["cross_validation"]
    loso = report["leave_one_site_out"]
    # mixed sites in every fold: the fit sees both sites' clear lungs and ranks well
    assert cv["auc"] == 1.0
    assert cv["precision"] >= 0.9
    assert cv["recall"] >= 0.9
    # fitted on A, B's denser clear lungs read as pneumonia; fitted on B, A's pneumonias
    # read as clear
    per_site = loso["per_site"]
    assert per_site["B"]["precision"] <= 0.6
    assert per_site["A"]["recall"] < 0.5
    assert per_site["A"]["auc"] == per_site["B"]["auc"] == 1.0  # the ranking still holds
    pooled = loso["pooled"]
    assert pooled["series"] == 48
    assert pooled["precision"] < cv["precision"]
    assert pooled["recall"] < cv["recall"]


def test_the_report_is_deterministic_and_follows_the_audit_order() -> None:
    x, y, sites = two_sites()
    one = validate(x, y, sites, l2=L2, threshold=THRESHOLD, folds=4).report
    assert validate(x, y, sites, l2=L2, threshold=THRESHOLD, folds=4).report == one
    assert one["cross_validation"]["folds"] == 4
    small = validate(x[:3], y[:3], sites[:3], l2=L2, threshold=THRESHOLD, folds=5).report
    assert small["cross_validation"]["folds"] <= 3
    with pytest.raises(ValueError, match="differ in number"):
        validate(x, y[:-1], sites, l2=L2, threshold=THRESHOLD, folds=5)


def test_the_review_list_puts_the_largest_disagreements_first() -> None:
    x, y, sites = two_sites()
    y = list(y)
    y[7] = 1 - y[7]  # a label slip
    checked = validate(x, y, sites, l2=L2, threshold=THRESHOLD, folds=5)
    keys = [(s, f"1.2.{i}") for i, s in enumerate(sites)]
    text = review_csv(keys, y, checked, THRESHOLD).decode()
    lines = text.splitlines()
    assert len(lines) == 1 + len(y)
    first = lines[1].split(",")
    assert first[1] == "1.2.7"  # the slipped label is the first to look at again
    assert first[5] == "yes"
    assert first[4] != ""  # two sites: the site-held-out score is there too
    cv = checked.cross_validated
    assert cv is not None
    misses = [abs(int(r.split(",")[2] == "yes") - float(r.split(",")[3])) for r in lines[1:]]
    assert misses == sorted(misses, reverse=True)
    assert review_csv(keys, y, checked, THRESHOLD).decode() == text  # deterministic
