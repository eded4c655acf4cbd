"""Screening of parsed annotation rows against the selection, before the join.

Grade rows of unknown or unselected studies, unknown readers and repeat reads move to the
rejects; PCR sites written in another case than the archive's take its spelling; a file
with too many rejected rows fails (see :mod:`ctcurate.pipeline.annotate_join`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ctcurate.annotations.csvfile import CsvFile, GradeRow, PcrRow, R, Reject, first_lines
from ctcurate.errors import InputError

#: Rejects that lose no information: not counted against ``max_reject_fraction``.
HARMLESS_REJECTS = frozenset({"duplicate_row", "study_not_selected"})


def screen_grades(
    grades: CsvFile[GradeRow],
    selected_studies: set[str],
    known_studies: set[str],
    readers: Sequence[str],
) -> None:
    """Move grade rows of unknown / unselected studies, unknown readers and repeat reads
    from ``grades.rows`` to ``grades.rejects`` (in place)."""
    known_readers = {r.upper() for r in readers}
    kept: list[tuple[int, GradeRow]] = []
    first_read: dict[tuple[str, str], int] = {}
    for line, row in grades.rows:
        reason, detail = None, ""
        key = (row.study_instance_uid, row.reader_id)
        if row.study_instance_uid not in known_studies:
            reason, detail = "unknown_study", "study_instance_uid not in the selection table"
        elif row.study_instance_uid not in selected_studies:
            reason, detail = "study_not_selected", "the study has no selected series"
        elif known_readers and row.reader_id not in known_readers:
            reason, detail = "unknown_reader", "reader_id not in params readers"
        elif key in first_read:
            reason, detail = (
                "repeat_read",
                f"reader already graded the study on line {first_read[key]}",
            )
        if reason is None:
            first_read[key] = line
            kept.append((line, row))
        else:
            grades.rejects.append(Reject(grades.name, line, reason, detail))
    grades.rows = kept


def match_sites(pcr: CsvFile[PcrRow], sites: set[str]) -> int:
    """Rewrite, in place, PCR sites that match a site of ``sites`` only in another case.

    A code equal to a site is kept; one whose case-folded form equals exactly one site's
    takes that site's spelling; any other stays as written. Returns the rows rewritten.
    """
    by_fold: dict[str, list[str]] = {}
    for site in sorted(sites):
        by_fold.setdefault(site.casefold(), []).append(site)
    recased = 0
    rows: list[tuple[int, PcrRow]] = []
    for line, row in pcr.rows:
        found = by_fold.get(row.site.casefold(), [])
        if row.site not in sites and len(found) == 1:
            rows.append((line, row.model_copy(update={"site": found[0]})))
            recased += 1
        else:
            rows.append((line, row))
    pcr.rows = rows
    return recased


def check_reject_fraction(parsed: CsvFile[R], max_fraction: float) -> None:
    """InputError naming the first bad lines when too many rows of a file were rejected."""
    counted = [r for r in parsed.rejects if r.reason not in HARMLESS_REJECTS]
    if not parsed.n_rows or not counted:
        return
    fraction = len(counted) / parsed.n_rows
    if fraction > max_fraction:
        msg = (
            f"{parsed.where}: {len(counted)} of {parsed.n_rows} rows rejected "
            f"({fraction:.1%} > max_reject_fraction {max_fraction:.1%}): "
            f"{first_lines(counted, parsed.where)}"
        )
        raise InputError(msg)
