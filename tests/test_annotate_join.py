"""annotate_join: CSV hygiene, PCR window, consensus, agreement, cohorts, failure paths."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from ctcurate.annotations.agreement import cohen_kappa, fleiss_kappa, pairwise_cohen
from ctcurate.annotations.csvfile import GradeRow, PcrRow, decode_text, parse_csv
from ctcurate.errors import CtcurateError, InputError
from ctcurate.io.outputs import MARKER
from ctcurate.io.tables import read_parquet, write_parquet
from ctcurate.params import AnnotateJoinParams
from ctcurate.pipeline import annotate_join as aj

PARAMS = AnnotateJoinParams()  # window −14 … +7 days, 1 negative needed
CT_DAY = dt.date(2020, 3, 10)

SELECTION_SCHEMA = pa.schema(
    [
        ("series_instance_uid", pa.string()),
        ("site", pa.string()),
        ("study_instance_uid", pa.string()),
        ("patient_id", pa.string()),
        ("study_date", pa.date32()),
        ("rule_reason", pa.string()),
        ("era", pa.string()),
        ("selected", pa.bool_()),
        ("cohort", pa.string()),
    ]
)


def series(
    uid: str,
    study: str,
    patient: str,
    day: dt.date = CT_DAY,
    site: str = "H01",
    selected: bool = True,
) -> dict[str, Any]:
    era = "pandemic" if day >= dt.date(2020, 1, 1) else "pre_pandemic"
    return {
        "series_instance_uid": uid,
        "site": site,
        "study_instance_uid": study,
        "patient_id": patient,
        "study_date": day,
        "rule_reason": None if selected else "not_chest",
        "era": era,
        "selected": selected,
        "cohort": ({"pandemic": "covid_candidate", "pre_pandemic": "non_covid"}[era])
        if selected
        else None,
    }


def selection(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SELECTION_SCHEMA)


def pcr_file(lines: list[str]) -> Any:
    text = "patient_id,site,test_date,result\n" + "".join(line + "\n" for line in lines)
    return parse_csv(text, PcrRow, "pcr.csv", "ann/pcr.csv")


def grades_file(lines: list[str]) -> Any:
    text = "study_instance_uid,reader_id,category,read_date\n" + "".join(
        line + "\n" for line in lines
    )
    return parse_csv(text, GradeRow, "grades.csv", "ann/grades.csv")


def two_reads(*studies: str) -> list[str]:
    return [f"{s},{r},1,2020-04-01" for s in studies for r in ("R1", "R2")]


# --- CSV hygiene -------------------------------------------------------------------


def test_bom_semicolons_and_stray_spaces_are_accepted() -> None:
    raw = "\ufeff patient_id ; site;test_date ;result\r\n P1 ; H01 ;2020-03-01; Positive \r\n"
    parsed = parse_csv(decode_text(raw.encode("utf-8"), "x"), PcrRow, "pcr.csv", "x")
    assert parsed.rejects == []
    assert [(line, row.model_dump()) for line, row in parsed.rows] == [
        (
            2,
            {
                "patient_id": "P1",
                "site": "H01",
                "test_date": dt.date(2020, 3, 1),
                "result": "positive",
            },
        )
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("P1,H01,2020-03-01", "wrong_field_count"),
        (",H01,2020-03-01,positive", "missing_value"),
        ("P1,H01,2020/03/01,positive", "bad_date"),
        ("P1,H01,2020-02-30,positive", "bad_date"),
        ("P1,H01,01/02/2020,positive", "ambiguous_date"),
        ("P1,H01,2020-03-01,maybe", "bad_result"),
    ],
)
def test_pcr_row_rejects(line: str, reason: str) -> None:
    parsed = pcr_file(["P1,H01,2020-03-01,negative", line])
    assert [(r.file, r.line, r.reason) for r in parsed.rejects] == [("pcr.csv", 3, reason)]
    assert len(parsed.rows) == 1
    assert parsed.n_rows == 2


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("9.1,R2,5,2020-04-01", "grade_out_of_range"),
        ("9.1,R2,0,2020-04-01", "grade_out_of_range"),
        ("9.1,R2,2.5,2020-04-01", "bad_grade"),
        ("9.1,R2,typical,2020-04-01", "bad_grade"),
        ("9.1,R2,2,04-01-2020", "ambiguous_date"),
        ("9.1,,2,2020-04-01", "missing_value"),
    ],
)
def test_grade_row_rejects(line: str, reason: str) -> None:
    parsed = grades_file(["9.1,R1,2,2020-04-01", line])
    assert [(r.line, r.reason) for r in parsed.rejects] == [(3, reason)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("9.1,R2,\uff12,2020-04-01", "bad_grade"),  # full-width 2: int() would take it
        ("9.1,R2,\u0663,2020-04-01", "bad_grade"),  # Arabic-Indic 3
        ("9.1,R2,+\u0967,2020-04-01", "bad_grade"),  # Devanagari 1
        ("9.1,R2,2,\uff12\uff10\uff12\uff10-04-01", "bad_date"),
    ],
)
def test_grades_and_dates_take_ascii_digits_only(line: str, reason: str) -> None:
    parsed = grades_file(["9.1,R1,2,2020-04-01", line])
    assert [(r.line, r.reason) for r in parsed.rejects] == [(3, reason)]
    assert len(parsed.rows) == 1


def test_reader_ids_are_upper_cased() -> None:
    parsed = grades_file(["9.1,r1,1,2020-04-01", "9.1,R1,3,2020-04-02", "9.1,r2,2,2020-04-01"])
    assert [row.reader_id for _, row in parsed.rows] == ["R1", "R1", "R2"]
    aj.screen_grades(parsed, {"9.1"}, {"9.1"}, ("r1", "R2"))
    assert [(r.line, r.reason) for r in parsed.rejects] == [(3, "repeat_read")]
    assert [line for line, _ in parsed.rows] == [2, 4]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("patient_id,site,test_date,result\nP1,H01,2020-03-01,positive\nP2\0,H01\n", r":3: NUL"),
        ("patient_id,site,test_date,result\0\n", r":1: NUL"),
    ],
)
def test_nul_byte_rejects_the_file_naming_its_line(text: str, match: str) -> None:
    with pytest.raises(InputError, match=r"^ann/pcr\.csv" + match + " byte"):
        parse_csv(text, PcrRow, "pcr.csv", "ann/pcr.csv")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        # no header line: the first row is data and must not be echoed
        ("PSECRET1,HSECRET,2020-03-01,positive\n", r":1: missing column\(s\) patient_id"),
        ("PSECRET1,PSECRET1,2020-03-01,positive\n", r":1: column\(s\) named twice \(fields 1, 2\)"),
        ('patient_id,site,test_date,result\nPSECRET1,"H0"1,2020-03-01,x\n', r":2: unreadable CSV"),
    ],
)
def test_file_errors_never_echo_cell_content(text: str, match: str) -> None:
    with pytest.raises(InputError, match=r"^ann/pcr\.csv" + match) as info:
        parse_csv(text, PcrRow, "pcr.csv", "ann/pcr.csv")
    assert "secret" not in str(info.value).lower()


def test_exact_duplicate_rows_are_dropped_and_counted() -> None:
    parsed = pcr_file(
        [
            "P1,H01,2020-03-01,positive",
            "",
            " P1 ,H01, 2020-03-01 ,positive",
            "P1,H01,2020-03-02,positive",
        ]
    )
    assert [(r.line, r.reason, r.detail) for r in parsed.rejects] == [
        (4, "duplicate_row", "same as line 2")
    ]
    assert [line for line, _ in parsed.rows] == [2, 5]
    assert (parsed.n_rows, parsed.n_blank) == (3, 1)


def test_grade_screening_rejects_unknown_study_reader_and_repeat_read() -> None:
    parsed = grades_file(
        [
            "9.1,R1,1,2020-04-01",
            "9.9,R1,1,2020-04-01",  # not in the selection table at all
            "9.2,R1,1,2020-04-01",  # indexed but not selected
            "9.1,R3,1,2020-04-01",  # reader not in params
            "9.1,R1,3,2020-04-02",  # R1 already read 9.1 on line 2
        ]
    )
    aj.screen_grades(parsed, {"9.1"}, {"9.1", "9.2"}, ("R1", "R2"))
    assert [(r.line, r.reason) for r in sorted(parsed.rejects)] == [
        (3, "unknown_study"),
        (4, "study_not_selected"),
        (5, "unknown_reader"),
        (6, "repeat_read"),
    ]
    assert [line for line, _ in parsed.rows] == [2]


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ("patient_id,site,test_date", r"ann/pcr\.csv:1: missing column\(s\) result"),
        ("patient_id;site;test_date;result;site", r"ann/pcr\.csv:1: column\(s\) named twice"),
        ("", r"ann/pcr\.csv:1: empty file"),
    ],
)
def test_malformed_header_rejects_the_file(header: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_csv(header + "\nP1,H01,2020-03-01,positive\n", PcrRow, "pcr.csv", "ann/pcr.csv")


def test_non_utf8_file_names_its_line() -> None:
    data = b"patient_id,site,test_date,result\nP1,H01,2020-03-01,positive\nP\xe9,H01\n"
    with pytest.raises(InputError, match=r"pcr\.csv:3: not UTF-8"):
        decode_text(data, "pcr.csv")


def test_broken_quoting_rejects_the_file() -> None:
    with pytest.raises(InputError, match=r"ann/pcr\.csv:2: unreadable CSV"):
        pcr_file(['P1,"H0"1,2020-03-01,positive'])


# --- PCR window ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "linked"),
    [(-15, False), (-14, True), (0, True), (7, True), (8, False)],
)
def test_pcr_window_boundary_days(delta: int, linked: bool) -> None:
    test_day = CT_DAY + dt.timedelta(days=delta)
    link = aj.link_pcr(CT_DAY, [(test_day, "negative")], PARAMS)
    assert link.days == ((delta,) if linked else ())
    assert link.label == ("negative" if linked else "unlabeled")  # outside: never negative


@pytest.mark.parametrize(
    ("tests", "min_neg", "label"),
    [
        ([(-3, "negative"), (1, "positive")], 1, "positive"),
        ([(-3, "positive"), (5, "negative")], 1, "positive"),  # negative after recovery
        ([(2, "positive"), (2, "negative")], 1, "conflict"),  # same day, both
        ([(-2, "negative")], 2, "unlabeled"),  # too few negatives
        ([(-2, "negative"), (3, "negative")], 2, "negative"),
        ([], 1, "unlabeled"),
    ],
)
def test_pcr_labels(tests: list[tuple[int, str]], min_neg: int, label: str) -> None:
    params = AnnotateJoinParams(pcr_min_negatives=min_neg)
    dated = [(CT_DAY + dt.timedelta(days=d), r) for d, r in tests]
    link = aj.link_pcr(CT_DAY, dated, params)
    assert link.label == label
    assert link.days == tuple(sorted(d for d, _ in tests))


def test_pcr_links_only_the_same_patient_at_the_same_site() -> None:
    sel = selection([series("1.1", "9.1", "P1"), series("1.2", "9.2", "P2")])
    pcr = pcr_file(["P1,H02,2020-03-10,positive", "P1,H01,2020-03-09,negative"])
    joined = aj.join_annotations(sel, pcr, grades_file(two_reads("9.1", "9.2")), PARAMS)
    cases = {c["series_instance_uid"]: c for c in joined.cases.to_pylist()}
    assert (cases["1.1"]["pcr"], cases["1.1"]["pcr_days"]) == ("negative", [-1])
    assert cases["1.1"]["pcr_results"] == ["negative"]
    assert (cases["1.2"]["pcr"], cases["1.2"]["pcr_tests"]) == ("unlabeled", 0)
    assert joined.report["coverage"]["pcr_tests_with_ct"] == 0.5


# --- consensus and agreement ---------------------------------------------------------


@pytest.mark.parametrize(
    ("grades", "tie_break", "grade", "typical"),
    [
        ([1, 1, 3], "most_typical", 1, 1),
        ([3, 4, 4], "most_typical", 4, 0),
        ([2, 3], "most_typical", 2, 1),
        ([2, 3], "least_typical", 3, 0),
        ([2, 3], "unresolved", None, None),
        ([1, 4, 2, 3], "least_typical", 4, 0),
        ([], "most_typical", None, None),
    ],
)
def test_consensus(
    grades: list[int], tie_break: str, grade: int | None, typical: int | None
) -> None:
    assert aj.consensus_grade(grades, tie_break) == grade
    assert aj.typical_of(grade) == typical


def test_fleiss_kappa_classic_example() -> None:
    # Fleiss (1971)-style table: 10 subjects, 14 raters, 5 categories (counts per category).
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    subjects = [[cat for cat, n in enumerate(row) for _ in range(n)] for row in table]
    # P̄ = 0.378022, p_j = (.143, .2, .279, .150, .229), P_e = 0.213473
    # κ = (0.378022 − 0.213473) / (1 − 0.213473) = 0.209930
    assert fleiss_kappa(subjects) == pytest.approx(0.209930, abs=1e-6)


def test_fleiss_kappa_with_a_varying_number_of_reads() -> None:
    subjects = [[1, 1, 1], [1, 2], [3, 3], [2, 2, 4], [4]]
    # P_i: [1,1,1] → 3·2/(3·2) = 1; [1,2] → 0; [3,3] → 1; [2,2,4] → 2·1/(3·2) = 1/3;
    # [4] has one read: left out.  P̄ = (1 + 0 + 1 + 1/3) / 4 = 7/12.
    # 10 reads: p = (4, 3, 2, 1)/10 → P_e = .16 + .09 + .04 + .01 = 0.30.
    # κ = (7/12 − 3/10) / (7/10) = 17/42.
    assert fleiss_kappa(subjects) == pytest.approx(17 / 42)
    assert fleiss_kappa([[4]]) is None
    assert fleiss_kappa([[2, 2], [2, 2]]) is None  # one category only: undefined
    assert fleiss_kappa([[1, 1], [2, 2]]) == pytest.approx(1.0)


def test_cohen_kappa_by_hand() -> None:
    # p_o = 3/4; marginals A (1: .5, 2: .25, 3: .25), B (1: .25, 2: .5, 3: .25)
    # p_e = .125 + .125 + .0625 = .3125; κ = (.75 − .3125) / .6875 = 7/11
    assert cohen_kappa([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(7 / 11)
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="differ in length"):
        cohen_kappa([1], [1, 2])
    pairs = pairwise_cohen({"s1": {"B": 1, "A": 1}, "s2": {"A": 2, "B": 3, "C": 3}})
    assert list(pairs) == ["A|B", "A|C", "B|C"]
    assert pairs["A|B"]["n"] == 2
    assert pairs["B|C"] == {"kappa": None, "n": 1}


# --- join, cohorts, coverage ---------------------------------------------------------


def demo() -> tuple[pa.Table, list[str], list[str]]:
    rows = [
        series("1.1", "9.1", "P1"),  # pandemic, PCR positive → covid
        series("1.2", "9.2", "P2"),  # pandemic, PCR negative → excluded
        series("1.3", "9.3", "P3"),  # pandemic, no PCR → excluded (unlabeled)
        series("1.4", "9.4", "P4"),  # pandemic, conflict → excluded
        series("2.1", "8.1", "P5", day=dt.date(2019, 5, 1), site="H02"),  # non_covid
        series("2.2", "8.2", "P6", day=dt.date(2019, 6, 1), site="H02"),  # non_covid
        series("3.1", "7.1", "P7", selected=False),
    ]
    pcr = [
        "P1,H01,2020-03-08,positive",
        "P2,H01,2020-03-12,negative",
        "P3,H01,2020-02-01,negative",  # 38 days before: outside the window
        "P4,H01,2020-03-11,positive",
        "P4,H01,2020-03-11,negative",
        "P1,H01,2020-03-08,positive",  # exact duplicate
        "P9,H01,2020-03-08,positive",  # a patient without a CT
    ]
    grades = [
        "9.1,R1,1,2020-04-01",
        "9.1,R2,1,2020-04-01",
        "9.1,R3,2,2020-04-01",
        "9.2,R1,3,2020-04-01",
        "9.2,R2,4,2020-04-01",
        "9.3,R1,4,2020-04-01",
        "9.3,R2,4,2020-04-01",
        "9.4,R1,2,2020-04-01",
        "8.1,R1,1,2020-04-01",
        "8.1,R2,2,2020-04-01",
        "8.2,R1,3,2020-04-01",
        "8.2,R2,3,2020-04-01",
        "7.1,R1,3,2020-04-01",  # study not selected
    ]
    return selection(rows), pcr, grades


def test_join_builds_cases_and_cohorts() -> None:
    sel, pcr, grades = demo()
    joined = aj.join_annotations(sel, pcr_file(pcr), grades_file(grades), PARAMS)
    cases = {c["series_instance_uid"]: c for c in joined.cases.to_pylist()}
    assert sorted(cases) == ["1.1", "1.2", "1.3", "1.4", "2.1", "2.2"]
    got = {uid: (c["cohort"], c["exclusion"], c["pcr"]) for uid, c in cases.items()}
    assert got == {
        "1.1": ("covid", None, "positive"),
        "1.2": (None, "pandemic_pcr_negative", "negative"),
        "1.3": (None, "pandemic_pcr_unlabeled", "unlabeled"),
        "1.4": (None, "pandemic_pcr_conflict", "conflict"),
        "2.1": ("non_covid", None, "unlabeled"),
        "2.2": ("non_covid", None, "unlabeled"),
    }
    c = cases["1.1"]
    assert (c["grades"], c["readers"], c["n_reads"]) == ([1, 1, 2], ["R1", "R2", "R3"], 3)
    assert (c["consensus_grade"], c["typical"]) == (1, 1)
    assert (c["pcr_days"], c["pcr_tests"]) == ([-2], 1)
    assert cases["1.2"]["consensus_grade"] == 3  # tie 3 / 4 → most typical
    assert cases["2.1"]["case_id"] == aj.case_id("H02", "2.1")
    assert joined.cases.column("case_id").to_pylist() == sorted(
        joined.cases.column("case_id").to_pylist()
    )

    report = joined.report
    assert report["cohorts"] == {"covid": 1, "non_covid": 2}
    assert report["exclusions"] == {
        "pandemic_pcr_conflict": 1,
        "pandemic_pcr_negative": 1,
        "pandemic_pcr_unlabeled": 1,
    }
    assert report["rejects"] == {
        "grades.csv": {"study_not_selected": 1},
        "pcr.csv": {"duplicate_row": 1},
    }
    assert report["rows"]["pcr.csv"] == {"seen": 7, "used": 6, "rejected": 1, "blank_lines": 0}
    cov = report["coverage"]
    assert cov["ct_with_pcr"] == pytest.approx(3 / 6, abs=1e-6)  # 1.1, 1.2, 1.4
    assert cov["pcr_tests_with_ct"] == pytest.approx(4 / 6, abs=1e-6)
    assert cov["studies_with_2_reads"] == pytest.approx(5 / 6, abs=1e-6)  # 9.4 has one read
    assert cov["graded"] == 1.0
    # subjects with ≥ 2 reads: [1,1,2] [3,4] [4,4] [1,2] [3,3] (9.4 has one read)
    expected = fleiss_kappa([[1, 1, 2], [3, 4], [4, 4], [1, 2], [3, 3]])
    assert report["fleiss_kappa"] == pytest.approx(expected, abs=1e-6)
    assert report["fleiss_subjects"] == 5
    assert report["fleiss_kappa_per_site"]["H02"] == pytest.approx(
        fleiss_kappa([[1, 2], [3, 3]]), abs=1e-6
    )
    assert report["cohen_kappa_pairs"]["R1|R2"]["n"] == 5


def test_low_grade_coverage_fails() -> None:
    sel, pcr, _ = demo()
    strict = AnnotateJoinParams(min_coverage=0.9)
    with pytest.raises(CtcurateError, match=r"grade coverage 1/6 .* below min_coverage 0\.9"):
        aj.join_annotations(sel, pcr_file(pcr), grades_file(["9.1,R1,1,2020-04-01"]), strict)


def test_low_pcr_coverage_fails() -> None:
    sel, pcr, grades = demo()
    # a site code the archive does not know: every PCR link is lost
    moved = [line.replace(",H01,", ",H1,") for line in pcr]
    with pytest.raises(
        CtcurateError,
        match=r"PCR coverage 0/4 pandemic-era selected series below min_pcr_coverage 0\.5: "
        r"check patient_id and site of ann/pcr\.csv",
    ):
        aj.join_annotations(sel, pcr_file(moved), grades_file(grades), PARAMS)
    # 3 of the 4 pandemic-era CTs have a linked test (1.3's is outside the window)
    joined = aj.join_annotations(sel, pcr_file(pcr), grades_file(grades), PARAMS)
    assert joined.report["coverage"]["pandemic_ct_with_pcr"] == 0.75
    strict = AnnotateJoinParams(min_pcr_coverage=0.8)
    with pytest.raises(CtcurateError, match=r"PCR coverage 3/4 .* min_pcr_coverage 0\.8"):
        aj.join_annotations(sel, pcr_file(pcr), grades_file(grades), strict)


def test_pcr_site_in_another_case_is_matched() -> None:
    sel, pcr, grades = demo()
    lower = [line.replace(",H01,", ",h01,") for line in pcr]
    joined = aj.join_annotations(sel, pcr_file(lower), grades_file(grades), PARAMS)
    expected = aj.join_annotations(sel, pcr_file(pcr), grades_file(grades), PARAMS)
    assert joined.cases.equals(expected.cases)
    assert joined.report["pcr_sites_recased"] == 6  # the 7th line is a duplicate row
    assert expected.report["pcr_sites_recased"] == 0


def test_pcr_site_matching_two_sites_in_another_case_stays_unlinked() -> None:
    sel = selection([series("1.1", "9.1", "P1", site="Ab"), series("1.2", "9.2", "P2", site="AB")])
    pcr = pcr_file(["P1,ab,2020-03-10,positive", "P2,AB,2020-03-10,positive"])
    joined = aj.join_annotations(sel, pcr, grades_file(two_reads("9.1", "9.2")), PARAMS)
    cases = {c["series_instance_uid"]: c["pcr"] for c in joined.cases.to_pylist()}
    assert cases == {"1.1": "unlabeled", "1.2": "positive"}
    assert joined.report["pcr_sites_recased"] == 0


def test_too_many_rejects_fail_naming_the_first_lines() -> None:
    sel, pcr, grades = demo()
    bad = [*grades, "9.1,R4,7,2020-04-01", "9.2,R4,1,2020/04/01"]
    with pytest.raises(
        InputError,
        match=r"ann/grades\.csv: 2 of 15 rows rejected .*: "
        r"ann/grades\.csv:15 grade_out_of_range, ann/grades\.csv:16 bad_date",
    ):
        aj.join_annotations(sel, pcr_file(pcr), grades_file(bad), PARAMS)
    lenient = AnnotateJoinParams(max_reject_fraction=0.2)
    joined = aj.join_annotations(sel, pcr_file(pcr), grades_file(bad), lenient)
    got = [(r["file"], r["line"], r["reason"]) for r in joined.rejects.to_pylist()]
    assert got == [
        ("grades.csv", 14, "study_not_selected"),
        ("grades.csv", 15, "grade_out_of_range"),
        ("grades.csv", 16, "bad_date"),
        ("pcr.csv", 7, "duplicate_row"),
    ]


# --- run -----------------------------------------------------------------------------


def write_inputs(tmp: Path, pcr: list[str], grades: list[str], sel: pa.Table) -> tuple[Path, Path]:
    ann = tmp / "annotations"
    ann.mkdir(parents=True)
    (ann / "pcr.csv").write_text(
        "patient_id,site,test_date,result\n" + "\n".join(pcr) + "\n", encoding="utf-8"
    )
    (ann / "grades.csv").write_text(
        "\ufeffstudy_instance_uid;reader_id;category;read_date\n"
        + "\n".join(g.replace(",", ";") for g in grades)
        + "\n",
        encoding="utf-8",
    )
    write_parquet(tmp / "series.parquet", sel)
    return tmp / "series.parquet", ann


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_run_writes_cases_deterministically(tmp_path: Path) -> None:
    sel, pcr, grades = demo()
    selected, ann = write_inputs(tmp_path, pcr, grades, sel)
    aj.run(selected, ann, tmp_path / "a", PARAMS)
    aj.run(selected, ann, tmp_path / "b", PARAMS)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert sorted(digest(tmp_path / "a")) == [
        MARKER,
        "cases.parquet",
        "rejects.parquet",
        "report.json",
    ]
    cases = read_parquet(tmp_path / "a" / "cases.parquet")
    assert cases.schema.equals(aj.CASES_SCHEMA)
    assert cases.num_rows == 6
    rejects = read_parquet(tmp_path / "a" / "rejects.parquet").to_pylist()
    assert [(r["file"], r["line"], r["reason"]) for r in rejects] == [
        ("grades.csv", 14, "study_not_selected"),
        ("pcr.csv", 7, "duplicate_row"),
    ]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["cohorts"] == {"covid": 1, "non_covid": 2}
    assert report["rejects_total"] == 2


def test_malformed_file_fails_and_writes_nothing(tmp_path: Path) -> None:
    sel, pcr, grades = demo()
    selected, ann = write_inputs(tmp_path, pcr, grades, sel)
    (ann / "grades.csv").write_text("study_instance_uid,reader,category,read_date\n")
    out = tmp_path / "cases"
    with pytest.raises(InputError, match=r"grades\.csv:1: missing column\(s\) reader_id"):
        aj.run(selected, ann, out, PARAMS)
    assert not out.exists()


def test_failure_keeps_the_previous_output(tmp_path: Path) -> None:
    sel, pcr, grades = demo()
    selected, ann = write_inputs(tmp_path, pcr, grades, sel)
    out = tmp_path / "cases"
    aj.run(selected, ann, out, PARAMS)
    before = digest(out)
    (ann / "pcr.csv").write_text(
        "patient_id,site,test_date,result\n" + "".join(f"P{i},H01,x,y\n" for i in range(3))
    )
    with pytest.raises(InputError, match=r"pcr\.csv: 3 of 3 rows rejected .*pcr\.csv:2 bad_date"):
        aj.run(selected, ann, out, PARAMS)
    assert digest(out) == before


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("no_pcr", r"pcr\.csv: annotation file not found"),
        ("no_selected", r"series\.parquet: no selected series"),
        ("empty_selection", r"series\.parquet: empty table"),
        ("bad_columns", r"series\.parquet: missing column"),
    ],
)
def test_unusable_inputs_fail(tmp_path: Path, setup: str, match: str) -> None:
    sel, pcr, grades = demo()
    selected, ann = write_inputs(tmp_path, pcr, grades, sel)
    if setup == "no_pcr":
        (ann / "pcr.csv").unlink()
    elif setup == "no_selected":
        rows = [dict(r, selected=False) for r in sel.to_pylist()]
        write_parquet(selected, selection(rows))
    elif setup == "empty_selection":
        write_parquet(selected, selection([]))
    else:
        write_parquet(selected, sel.drop_columns(["era"]))
    with pytest.raises(InputError, match=match):
        aj.run(selected, ann, tmp_path / "out", PARAMS)
    assert not (tmp_path / "out").exists()


def test_cli_malformed_file_exits_non_zero_naming_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctcurate import cli

    sel, pcr, grades = demo()
    selected, ann = write_inputs(tmp_path, pcr, grades, sel)
    (ann / "pcr.csv").write_bytes(
        b"patient_id,site,test_date,result\nP1,H01,2020-03-01,positive\n\xff"
    )
    params = tmp_path / "params.yaml"
    params.write_text("annotate_join:\n  pcr_days_before: 14\n", encoding="utf-8")
    out = tmp_path / "cases"
    argv = ["ctcurate", "annotate-join", "--params", str(params), "--selected", str(selected)]
    argv += ["--annotations", str(ann), "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == InputError.exit_code
    assert "pcr.csv:3: not UTF-8" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("era", "pcr", "pneumonia", "expected"),
    [
        ("pandemic", "positive", True, ("covid", None)),
        ("pandemic", "positive", False, (None, "not_pneumonia")),
        ("pandemic", "positive", None, (None, "pneumonia_unscored")),
        ("pre_pandemic", "unlabeled", True, ("non_covid", None)),
        ("pre_pandemic", "unlabeled", False, (None, "not_pneumonia")),
        ("pandemic", "negative", True, (None, "pandemic_pcr_negative")),
        (None, "positive", True, (None, "no_era")),
    ],
)
def test_cohorts_need_pneumonia(
    era: str | None, pcr: str, pneumonia: bool | None, expected: tuple[str | None, str | None]
) -> None:
    assert aj.cohort_of(era, pcr, pneumonia) == expected


def test_read_selection_keeps_the_scorer_verdict(tmp_path: Path) -> None:
    table = pa.table(
        {
            "series_instance_uid": ["1.2"],
            "site": ["H01"],
            "study_instance_uid": ["9.1"],
            "patient_id": ["P1"],
            "study_date": pa.array([dt.date(2020, 1, 1)], pa.date32()),
            "era": ["pandemic"],
            "selected": [True],
            "pneumonia": [True],
        }
    )
    write_parquet(tmp_path / "s.parquet", table)
    assert aj.read_selection(tmp_path / "s.parquet").column("pneumonia").to_pylist() == [True]
    write_parquet(tmp_path / "r.parquet", table.drop_columns(["pneumonia"]))
    assert "pneumonia" not in aj.read_selection(tmp_path / "r.parquet").column_names
