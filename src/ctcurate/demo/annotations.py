"""PCR results and reader grades consistent with the truth, with realistic noise.

PCR: tests cluster around the CT date, with repeats, false negatives (sensitivity about
0.75) and tests far from any CT. Grades: 2–3 readers per chest study give the RSNA
category (1 typical, 2 indeterminate, 3 atypical, 4 negative) derived from the true
pattern, confusing neighbouring categories more for subtle cases.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from ctcurate.demo.cohort import LAST_DATE, Study

PCR_SENSITIVITY = 0.75
PCR_SPECIFICITY = 0.99
READERS = ("R01", "R02", "R03", "R04", "R05")
CATEGORY = {"typical": 1, "indeterminate": 2, "atypical": 3, "negative": 4}
# P(reader category | true category): rows true 1..4, columns read 1..4.
_CONFUSION = np.array(
    [
        [0.86, 0.10, 0.025, 0.015],
        [0.15, 0.70, 0.09, 0.06],
        [0.03, 0.10, 0.80, 0.07],
        [0.007, 0.036, 0.057, 0.90],
    ]
)


def _fmt(date: dt.date) -> str:
    return date.strftime("%Y-%m-%d")


def pcr_rows(
    studies: list[Study], pandemic_start: dt.date, rng: np.random.Generator
) -> list[tuple[str, str, str, str]]:
    """(patient_id, site, test_date, result) rows sorted, one patient's tests together."""
    rows: list[tuple[str, str, str, str]] = []
    for s in studies:
        if s.kind != "chest":
            continue
        tests: list[tuple[dt.date, str]] = []
        if s.era == "pandemic" and (s.covid or rng.random() < 0.75):
            n = 1 + int(rng.random() < 0.4) + int(rng.random() < 0.1)
            for _ in range(n):
                day = s.study_date + dt.timedelta(days=int(rng.integers(-6, 4)))
                if s.covid:
                    result = "positive" if rng.random() < PCR_SENSITIVITY else "negative"
                else:
                    result = "negative" if rng.random() < PCR_SPECIFICITY else "positive"
                tests.append((max(day, pandemic_start), result))
        if rng.random() < 0.15:
            # a test far from any CT of this patient (another episode)
            day = s.study_date + dt.timedelta(days=int(rng.integers(120, 400)))
            day = min(max(day, pandemic_start), LAST_DATE)
            tests.append((day, "positive" if rng.random() < 0.2 else "negative"))
        rows.extend((s.patient_id, s.site, _fmt(d), r) for d, r in tests)
    return sorted(set(rows))


def grade_rows(
    studies: list[Study], pandemic_start: dt.date, rng: np.random.Generator
) -> list[tuple[str, str, int, str]]:
    """(study_instance_uid, reader_id, category, read_date) rows sorted by study, reader."""
    rows: list[tuple[str, str, int, str]] = []
    for s in studies:
        if s.kind != "chest" or s.pattern is None:
            continue
        true = CATEGORY[s.pattern]
        n_readers = 3 if rng.random() < 0.5 else 2
        readers = sorted(str(r) for r in rng.choice(READERS, size=n_readers, replace=False))
        probs = _CONFUSION[true - 1].copy()
        if s.pneumonia and s.severity < 0.2:  # subtle findings: more disagreement
            probs = 0.6 * probs + 0.4 * np.array([0.15, 0.3, 0.15, 0.4])
        # pre-pandemic studies were read retrospectively after the pandemic began
        start = s.study_date if s.era == "pandemic" else pandemic_start
        for reader in readers:
            category = int(rng.choice(4, p=probs / probs.sum())) + 1
            read = min(start + dt.timedelta(days=int(rng.integers(1, 90))), LAST_DATE)
            rows.append((s.study_uid, reader, category, _fmt(read)))
    return sorted(rows)


def to_csv(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> bytes:
    """Plain comma-separated UTF-8 with a header line and LF line ends."""
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")
