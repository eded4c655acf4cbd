"""annotate_join: link PCR results and reader grades to the selected series.

Rules (params section ``annotate_join``):

* Sites: a PCR row's ``site`` is the archive's top-level folder. A code that matches no site
  of the selection table exactly but exactly one in another case (``h01`` for ``H01``) is
  read as that site and counted (``pcr_sites_recased`` in the report); anything else is
  kept as written and links to nothing.
* PCR window: a test of the same (patient_id, site) dated within
  [CT − pcr_days_before, CT + pcr_days_after] (bounds included) is linked to the CT.
  ``positive`` when a linked test is positive; ``conflict`` when a positive and a negative
  test were taken on the same day (the lab contradicts itself; neither wins);
  ``negative`` only with ≥ pcr_min_negatives linked negatives and no positive; otherwise
  ``unlabeled`` — a CT without tests in its window is never negative. Each case keeps the
  links' provenance: ``pcr_tests``, ``pcr_days`` (test date − CT date) and
  ``pcr_results``, sorted by day.
* Consensus: the majority of the study's reader grades; a tie is broken by ``tie_break``
  (``most_typical``: lowest category among the tied, ``least_typical``: highest,
  ``unresolved``: no consensus). ``typical`` = 1 for consensus 1–2, 0 for 3–4.
* Cohorts: pre-pandemic pneumonia → ``non_covid``; pandemic era, PCR positive and
  pneumonia → ``covid``. Pneumonia is the ``select`` scorer's verdict (column
  ``pneumonia``); a selection without that column (rules only) is taken as pneumonia.
  Every other selected series gets an ``exclusion`` (``not_pneumonia``,
  ``pneumonia_unscored``, ``pandemic_pcr_negative``, ``pandemic_pcr_unlabeled``,
  ``pandemic_pcr_conflict``, ``no_era``).
* Grade rows are also rejected for an ``unknown_study`` (not in the selection table at all),
  ``unknown_reader`` (when ``readers`` lists the known readers; reader ids are compared
  upper-cased, as the CSV reader normalises them) and ``repeat_read`` (the
  reader already graded the study on an earlier line, which is kept); rows of a study that
  was indexed but not selected go to the rejects as ``study_not_selected``.
* The stage fails (nothing written) when a file's rejected fraction exceeds
  ``max_reject_fraction`` (``duplicate_row`` and ``study_not_selected`` lose no information
  and are not counted), when fewer than ``min_coverage`` of the selected series have a
  consensus grade, or when fewer than ``min_pcr_coverage`` of the pandemic-era selected
  series have a linked PCR test (a site or patient id written differently from the archive
  links nothing).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ctcurate.annotations.agreement import fleiss_kappa, pairwise_cohen
from ctcurate.annotations.csvfile import CsvFile, GradeRow, PcrRow, R, decode_text, parse_csv
from ctcurate.annotations.screen import check_reject_fraction, match_sites, screen_grades
from ctcurate.errors import AccountingError, CtcurateError, InputError
from ctcurate.io.atomic import write_json
from ctcurate.io.outputs import check_output_dir, publish_dir
from ctcurate.io.report import ratio, rounded
from ctcurate.io.tables import read_parquet, write_parquet
from ctcurate.log import get_logger
from ctcurate.params import AnnotateJoinParams

log = get_logger("annotate_join")

PCR_FILE = "pcr.csv"
GRADES_FILE = "grades.csv"
SELECTED_COLUMNS = [
    "series_instance_uid",
    "site",
    "study_instance_uid",
    "patient_id",
    "study_date",
    "era",
    "selected",
]
PCR_LABELS = ("conflict", "negative", "positive", "unlabeled")

CASES_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("series_instance_uid", pa.string(), nullable=False),
        pa.field("study_instance_uid", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("site", pa.string(), nullable=False),
        pa.field("study_date", pa.date32()),
        pa.field("era", pa.string()),
        pa.field("cohort", pa.string()),
        pa.field("exclusion", pa.string()),
        pa.field("pcr", pa.string(), nullable=False),
        pa.field("pcr_tests", pa.int32(), nullable=False),
        pa.field("pcr_days", pa.list_(pa.int32()), nullable=False),
        pa.field("pcr_results", pa.list_(pa.string()), nullable=False),
        pa.field("n_reads", pa.int32(), nullable=False),
        pa.field("grades", pa.list_(pa.int8()), nullable=False),
        pa.field("readers", pa.list_(pa.string()), nullable=False),
        pa.field("consensus_grade", pa.int8()),
        pa.field("typical", pa.int8()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("line", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)


def case_id(site: str, series_instance_uid: str) -> str:
    """Stable case id: ``c`` + the first 12 hex digits of sha256(site/series uid)."""
    digest = hashlib.sha256(f"{site}/{series_instance_uid}".encode()).hexdigest()
    return "c" + digest[:12]


@dataclass(frozen=True)
class PcrLink:
    """The PCR tests linked to one CT and the label they give."""

    label: str
    days: tuple[int, ...]
    results: tuple[str, ...]


def pcr_label(days: Sequence[int], results: Sequence[str], min_negatives: int) -> str:
    """The PCR label of a CT from its linked tests (see the module docstring)."""
    positive_days = {d for d, r in zip(days, results, strict=True) if r == "positive"}
    negative_days = {d for d, r in zip(days, results, strict=True) if r == "negative"}
    if positive_days & negative_days:
        return "conflict"
    if positive_days:
        return "positive"
    if sum(r == "negative" for r in results) >= min_negatives:
        return "negative"
    return "unlabeled"


def link_pcr(
    study_date: dt.date | None,
    tests: Iterable[tuple[dt.date, str]],
    params: AnnotateJoinParams,
) -> PcrLink:
    """Link the (test date, result) ``tests`` of a patient to a CT taken on ``study_date``."""
    if study_date is None:
        return PcrLink("unlabeled", (), ())
    linked = sorted(
        ((test_date - study_date).days, result)
        for test_date, result in tests
        if -params.pcr_days_before <= (test_date - study_date).days <= params.pcr_days_after
    )
    days = tuple(d for d, _ in linked)
    results = tuple(r for _, r in linked)
    return PcrLink(pcr_label(days, results, params.pcr_min_negatives), days, results)


def consensus_grade(grades: Sequence[int], tie_break: str) -> int | None:
    """Majority category of ``grades``; ties resolved by ``tie_break``; None without reads."""
    if not grades:
        return None
    counts = Counter(grades)
    top = max(counts.values())
    tied = sorted(g for g, c in counts.items() if c == top)
    if len(tied) == 1:
        return tied[0]
    if tie_break == "most_typical":
        return tied[0]
    if tie_break == "least_typical":
        return tied[-1]
    return None


def typical_of(grade: int | None) -> int | None:
    """Binary typicality: 1 for categories 1–2, 0 for 3–4, None without a grade."""
    if grade is None:
        return None
    return 1 if grade <= 2 else 0


def cohort_of(
    era: str | None, pcr: str, pneumonia: bool | None = True
) -> tuple[str | None, str | None]:
    """(cohort, exclusion) of a selected series from its era, PCR label and pneumonia verdict.

    ``pneumonia`` False → ``not_pneumonia``; None (selected but never scored) →
    ``pneumonia_unscored``; both cohorts need pneumonia.
    """
    if pneumonia is None:
        return None, "pneumonia_unscored"
    if not pneumonia:
        return None, "not_pneumonia"
    if era == "pre_pandemic":
        return "non_covid", None
    if era == "pandemic":
        if pcr == "positive":
            return "covid", None
        return None, f"pandemic_pcr_{pcr}"
    return None, "no_era"


@dataclass(frozen=True)
class Joined:
    """What ``annotate_join`` publishes."""

    cases: pa.Table
    rejects: pa.Table
    report: dict[str, Any]


def join_annotations(
    selection: pa.Table,
    pcr: CsvFile[PcrRow],
    grades: CsvFile[GradeRow],
    params: AnnotateJoinParams,
) -> Joined:
    """Join PCR results and reader grades to the selected rows of ``selection``.

    ``selection`` is the ``select`` stage's table (every indexed series, ``selected``
    flagging the chosen ones). Raises :class:`InputError` when a file has too many
    rejected rows and :class:`CtcurateError` when grade coverage is below
    ``min_coverage`` or PCR coverage below ``min_pcr_coverage``; nothing is returned then.
    """
    all_rows = selection.to_pylist()
    chosen = sorted(
        (r for r in all_rows if r["selected"]),
        key=lambda r: (str(r["site"]), str(r["series_instance_uid"])),
    )
    known_studies = {str(r["study_instance_uid"]) for r in all_rows}
    selected_studies = {str(r["study_instance_uid"]) for r in chosen}
    screen_grades(grades, selected_studies, known_studies, params.readers)
    recased = match_sites(pcr, {str(r["site"]) for r in all_rows})
    check_reject_fraction(pcr, params.max_reject_fraction)
    check_reject_fraction(grades, params.max_reject_fraction)

    tests: dict[tuple[str, str], list[tuple[dt.date, str, int]]] = {}
    for line, p in pcr.rows:
        tests.setdefault((p.patient_id, p.site), []).append((p.test_date, p.result, line))
    reads: dict[str, dict[str, int]] = {}
    for _, g in grades.rows:
        reads.setdefault(g.study_instance_uid, {})[g.reader_id] = g.category

    linked_lines: set[int] = set()
    cases: list[dict[str, Any]] = []
    ties = 0
    for row in chosen:
        site, uid = str(row["site"]), str(row["series_instance_uid"])
        patient = row["patient_id"]
        patient_tests = tests.get((str(patient), site), []) if patient is not None else []
        link = link_pcr(row["study_date"], [(d, r) for d, r, _ in patient_tests], params)
        if row["study_date"] is not None:
            for test_date, _, line in patient_tests:
                delta = (test_date - row["study_date"]).days
                if -params.pcr_days_before <= delta <= params.pcr_days_after:
                    linked_lines.add(line)
        by_reader = reads.get(str(row["study_instance_uid"]), {})
        names = sorted(by_reader)
        study_grades = [by_reader[n] for n in names]
        consensus = consensus_grade(study_grades, params.tie_break)
        counts = Counter(study_grades)
        if counts and sum(c == max(counts.values()) for c in counts.values()) > 1:
            ties += 1
        cohort, exclusion = cohort_of(row["era"], link.label, row.get("pneumonia", True))
        cases.append(
            {
                "case_id": case_id(site, uid),
                "series_instance_uid": uid,
                "study_instance_uid": row["study_instance_uid"],
                "patient_id": row["patient_id"],
                "site": site,
                "study_date": row["study_date"],
                "era": row["era"],
                "cohort": cohort,
                "exclusion": exclusion,
                "pcr": link.label,
                "pcr_tests": len(link.days),
                "pcr_days": list(link.days),
                "pcr_results": list(link.results),
                "n_reads": len(study_grades),
                "grades": study_grades,
                "readers": names,
                "consensus_grade": consensus,
                "typical": typical_of(consensus),
            }
        )
    cases.sort(key=lambda c: str(c["case_id"]))
    if len({c["case_id"] for c in cases}) != len(cases):
        msg = "selection: repeated (site, series_instance_uid) rows"
        raise InputError(msg)

    n = len(cases)
    graded = sum(c["consensus_grade"] is not None for c in cases)
    pandemic = [c for c in cases if c["era"] == "pandemic"]
    pandemic_with_pcr = sum(c["pcr_tests"] > 0 for c in pandemic)
    coverage = {
        "ct_with_pcr": ratio(sum(c["pcr_tests"] > 0 for c in cases), n),
        "pcr_tests_with_ct": ratio(len(linked_lines), len(pcr.rows)),
        "studies_with_2_reads": ratio(
            sum(len(reads.get(s, {})) >= 2 for s in selected_studies), len(selected_studies)
        ),
        "graded": ratio(graded, n),
        "pandemic_ct_with_pcr": ratio(pandemic_with_pcr, len(pandemic)),
    }
    if n == 0 or graded / n < params.min_coverage:
        msg = (
            f"grade coverage {graded}/{n} selected series below min_coverage "
            f"{params.min_coverage:g}: check {grades.where} against the selection"
        )
        raise CtcurateError(msg)
    if pandemic and pandemic_with_pcr / len(pandemic) < params.min_pcr_coverage:
        msg = (
            f"PCR coverage {pandemic_with_pcr}/{len(pandemic)} pandemic-era selected series "
            f"below min_pcr_coverage {params.min_pcr_coverage:g}: check patient_id and site "
            f"of {pcr.where} against the selection"
        )
        raise CtcurateError(msg)

    # agreement: one subject per selected study, its site the first site holding it
    study_site: dict[str, str] = {}
    for c in sorted(cases, key=lambda c: (c["site"], c["series_instance_uid"])):
        study_site.setdefault(str(c["study_instance_uid"]), c["site"])
    subjects = {s: reads[s] for s in sorted(study_site) if s in reads}
    per_site: dict[str, list[list[int]]] = {}
    for s, by_reader in subjects.items():
        per_site.setdefault(study_site[s], []).append(list(by_reader.values()))
    pairwise = pairwise_cohen(subjects)
    for value in pairwise.values():
        kappa = value["kappa"]
        value["kappa"] = rounded(kappa if isinstance(kappa, float) else None)

    rejects = sorted(pcr.rejects + grades.rejects)
    report: dict[str, Any] = {
        "cases": n,
        "cohorts": dict(sorted(Counter(str(c["cohort"]) for c in cases if c["cohort"]).items())),
        "exclusions": dict(
            sorted(Counter(str(c["exclusion"]) for c in cases if c["exclusion"]).items())
        ),
        "pcr": {label: sum(c["pcr"] == label for c in cases) for label in PCR_LABELS},
        "pcr_window_days": [-params.pcr_days_before, params.pcr_days_after],
        "consensus": {
            "rule": params.consensus,
            "tie_break": params.tie_break,
            "ties": ties,
            "graded": graded,
        },
        "fleiss_kappa": rounded(fleiss_kappa([list(v.values()) for v in subjects.values()])),
        "fleiss_subjects": sum(len(v) >= 2 for v in subjects.values()),
        "fleiss_kappa_per_site": {
            site: rounded(fleiss_kappa(rows)) for site, rows in sorted(per_site.items())
        },
        "cohen_kappa_pairs": pairwise,
        "coverage": coverage,
        "min_coverage": params.min_coverage,
        "min_pcr_coverage": params.min_pcr_coverage,
        "pcr_sites_recased": recased,
        "rows": {
            parsed.name: {
                "seen": parsed.n_rows,
                "used": len(parsed.rows),
                "rejected": len(parsed.rejects),
                "blank_lines": parsed.n_blank,
            }
            for parsed in (pcr, grades)
        },
        "rejects": {
            parsed.name: dict(sorted(Counter(r.reason for r in parsed.rejects).items()))
            for parsed in (pcr, grades)
        },
        "rejects_total": len(rejects),
    }
    for parsed in (pcr, grades):
        if parsed.n_rows != len(parsed.rows) + len(parsed.rejects):
            msg = f"{parsed.where}: rows seen != used + rejected"
            raise AccountingError(msg)

    cases_table = pa.Table.from_pylist(cases, schema=CASES_SCHEMA)
    rejects_table = pa.Table.from_pylist(
        [{"file": r.file, "line": r.line, "reason": r.reason, "detail": r.detail} for r in rejects],
        schema=REJECTS_SCHEMA,
    )
    return Joined(cases_table, rejects_table, report)


def read_selection(path: Path) -> pa.Table:
    """The ``select`` table, checked: the documented columns, at least one selected row."""
    table = read_parquet(path)
    missing = [c for c in SELECTED_COLUMNS if c not in table.column_names]
    if missing:
        msg = f"{path}: missing column(s) {', '.join(missing)}"
        raise InputError(msg)
    columns = [*SELECTED_COLUMNS, "pneumonia"] if "pneumonia" in table.column_names else []
    table = table.select(columns or SELECTED_COLUMNS)
    if table.num_rows == 0:
        msg = f"{path}: empty table"
        raise InputError(msg)
    if not any(table.column("selected").to_pylist()):
        msg = f"{path}: no selected series"
        raise InputError(msg)
    return table


def read_annotation(path: Path, model: type[R]) -> CsvFile[R]:
    """Read and validate one annotation CSV file (InputError naming it when unusable)."""
    if not path.is_file():
        msg = f"{path}: annotation file not found"
        raise InputError(msg)
    try:
        data = path.read_bytes()
    except OSError as exc:
        msg = f"{path}: unreadable ({exc.__class__.__name__})"
        raise InputError(msg) from exc
    return parse_csv(decode_text(data, str(path)), model, path.name, str(path))


#: The stage name (its output folder's marker) and what it writes into that folder.
STAGE = "annotate_join"
OWN_FILES = ("cases.parquet", "rejects.parquet", "report.json")


def run(selected: Path, annotations_dir: Path, out: Path, params: AnnotateJoinParams) -> None:
    """Join ``annotations_dir``/{pcr,grades}.csv to ``selected`` into the folder ``out``.

    Writes ``cases.parquet``, ``rejects.parquet`` and ``report.json`` atomically; on any
    error nothing is written.
    """
    inputs = [Path(selected), Path(annotations_dir)]
    check_output_dir(Path(out), STAGE, inputs, OWN_FILES)
    selection = read_selection(Path(selected))
    annotations_dir = Path(annotations_dir)
    pcr = read_annotation(annotations_dir / PCR_FILE, PcrRow)
    grades = read_annotation(annotations_dir / GRADES_FILE, GradeRow)
    joined = join_annotations(selection, pcr, grades, params)
    report = joined.report
    if report["pcr_sites_recased"]:
        log.info(
            "%s: %d rows matched a site in another case", PCR_FILE, report["pcr_sites_recased"]
        )
    for name, reasons in report["rejects"].items():
        for reason, count in reasons.items():
            log.info("%s: %d rows rejected (%s)", name, count, reason)
    log.info(
        "%d cases: %s; excluded: %s",
        report["cases"],
        ", ".join(f"{k} {v}" for k, v in report["cohorts"].items()) or "none",
        ", ".join(f"{k} {v}" for k, v in report["exclusions"].items()) or "none",
    )
    log.info(
        "fleiss kappa %s over %d studies; graded %s, CTs with PCR %s",
        report["fleiss_kappa"],
        report["fleiss_subjects"],
        report["coverage"]["graded"],
        report["coverage"]["ct_with_pcr"],
    )
    with publish_dir(Path(out), STAGE, inputs=inputs, own=OWN_FILES) as tmp:
        write_parquet(tmp / "cases.parquet", joined.cases)
        write_parquet(tmp / "rejects.parquet", joined.rejects)
        write_json(tmp / "report.json", report)
