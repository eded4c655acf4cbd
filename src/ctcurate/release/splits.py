"""Stable, patient-disjoint splits of a release (docs/release.md, "Splits: stable by patient").

A case's split is where its patient's :func:`split_point` — sha256 of (salt, site, patient
id) as a number in [0, 1) — falls in the cumulative split fractions. It depends on nothing
else: not on the other cases of the release, their order or their labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

SPLITS = ("train", "val", "test")


def split_point(salt: str, site: str, patient_id: str) -> float:
    """A patient's point in [0, 1): sha256 of (salt, site, patient id), its first 53 bits.

    It depends on nothing else — not on the other cases of the release, their order, or
    the patient's labels — so a patient keeps its point in every release with that salt.
    """
    message = f"{salt}\x1f{site}\x1f{patient_id}".encode()
    head = int.from_bytes(hashlib.sha256(message).digest()[:8], "big")
    return (head >> 11) / float(1 << 53)


def split_of(point: float, fractions: tuple[float, float, float]) -> str:
    """The split whose interval of the cumulative ``fractions`` holds ``point``."""
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        edge += fraction
        if point < edge:
            return name
    return next(n for n, f in zip(reversed(SPLITS), reversed(fractions), strict=True) if f > 0)


def assign_splits(
    cases: Sequence[Mapping[str, Any]],
    fractions: tuple[float, float, float],
    salt: str,
) -> dict[str, str]:
    """Stable, patient-disjoint splits: each case gets the split of its patient's
    :func:`split_point` under ``salt`` within the cumulative ``fractions``.

    ``cases`` rows need ``case_id``, ``site`` and ``patient_id``. A case's split depends
    only on its (site, patient id), the salt and the fractions: cases that come or go,
    and changed labels, move no other case. The points are uniform, so every stratum
    (label, site, era ...) follows ``fractions`` in expectation — not exactly: a small
    release can leave a split short, or empty.
    """
    return {
        str(case["case_id"]): split_of(
            split_point(salt, str(case["site"]), str(case["patient_id"])), fractions
        )
        for case in cases
    }
