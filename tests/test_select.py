"""select: rule edge cases, era boundary, report, determinism, failure paths."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from helpers.select import (
    PARAMS,
    REGIONS,
    RULES_DIR,
    chest,
    instances_table,
    series_table,
    write_index,
)

from ctcurate.errors import InputError
from ctcurate.io.outputs import MARKER
from ctcurate.io.tables import read_parquet, write_parquet
from ctcurate.params import SelectParams
from ctcurate.pipeline import select
from ctcurate.selection import rules as sel_rules

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def verdicts(rows: list[dict[str, Any]], params: SelectParams = PARAMS) -> dict[str, Any]:
    """{(site, uid) → row} of the selection of ``rows`` with the project's rule files."""
    con = sel_rules.catalog_from_tables(series_table(rows), instances_table(rows))
    table = sel_rules.apply_rules(con, sel_rules.read_rules(RULES_DIR), params, REGIONS)
    return {(r["site"], r["series_instance_uid"]): r for r in table.to_pylist()}


def reason_of(row: dict[str, Any]) -> str | None:
    out = verdicts([row])[(row["site"], row["series_instance_uid"])]
    assert out["selected"] is (out["rule_reason"] is None)
    return out["rule_reason"]  # type: ignore[no-any-return]


def test_a_plain_chest_ct_passes() -> None:
    assert reason_of(chest("1.1", "9.1")) is None


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"modality": "MR"}, "not_ct"),
        ({"modality": None}, "not_ct"),
        ({"sop_class_uid": SECONDARY_CAPTURE}, "not_ct_image"),  # dose report screenshot
        (
            {"image_type": "ORIGINAL\\PRIMARY\\LOCALIZER", "orientation": "coronal"},
            "localizer",
        ),
        ({"image_type": "DERIVED\\PRIMARY\\AXIAL"}, "derived"),
        ({"image_type": "ORIGINAL\\SECONDARY"}, "derived"),
        ({"orientation": "sagittal"}, "not_axial"),
        ({"body_part_examined": "HEAD", "series_description": "BRAIN"}, "not_chest"),
        ({"slice_thickness": 5.0, "convolution_kernel": "B30f"}, "thick_slices"),
        ({"slice_thickness": None}, "thick_slices"),
        ({"slice_count": 15}, "too_few_slices"),
        ({"z_coverage_mm": 119.9}, "short_z_coverage"),
        ({"n_gaps": 2}, "slice_gaps"),
        ({"n_duplicate_positions": 1}, "duplicate_positions"),
        ({"flags": ["no_meta", "mixed_orientation"]}, "flag_mixed_orientation"),
        ({"flags": ["varying_spacing", "gantry_tilt"]}, "flag_gantry_tilt"),
        ({"study_date": None}, "no_study_date"),
    ],
)
def test_each_rule_rejects_its_case(over: dict[str, Any], reason: str) -> None:
    assert reason_of(chest("1.1", "9.1", **over)) == reason


@pytest.mark.parametrize(
    "over",
    [
        {"slice_thickness": 3.0},  # at the bound: kept
        {"slice_count": 16},
        {"z_coverage_mm": 120.0},
        {"flags": ["no_meta", "uid_shared_across_sites", "changed_since_snapshot"]},
    ],
)
def test_rule_bounds_are_inclusive(over: dict[str, Any]) -> None:
    assert reason_of(chest("1.1", "9.1", **over)) is None


def test_first_failing_rule_is_reported() -> None:
    # a localizer that is also thick, short and not axial is reported as a localizer
    row = chest(
        "1.1",
        "9.1",
        image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
        orientation="coronal",
        slice_thickness=10.0,
        slice_count=1,
    )
    assert reason_of(row) == "localizer"


def test_params_reach_the_rules() -> None:
    row = chest("1.1", "9.1", slice_thickness=5.0, slice_count=10, z_coverage_mm=50.0)
    lenient = SelectParams(max_slice_thickness_mm=5.0, min_slices=10, min_z_coverage_mm=50.0)
    assert verdicts([row], lenient)[("H01", "1.1")]["rule_reason"] is None
    assert reason_of(row) == "thick_slices"


def test_one_series_per_study_thinnest_then_lung_kernel() -> None:
    rows = [
        chest("1.3", "9.1", slice_thickness=2.0, convolution_kernel="LUNG"),
        chest("1.2", "9.1", slice_thickness=1.0, convolution_kernel="STANDARD"),
        chest("1.1", "9.1", slice_thickness=1.0, convolution_kernel="SOFT"),
        chest("1.4", "9.1", slice_thickness=1.0, convolution_kernel="LUNG"),
        chest("1.5", "9.1", slice_thickness=5.0, convolution_kernel="B30f"),
        chest("2.1", "9.2", slice_thickness=1.0, convolution_kernel="SOFT"),
        chest("2.2", "9.2", slice_thickness=1.0, convolution_kernel="SOFT"),
    ]
    out = verdicts(rows)
    reasons = {uid: row["rule_reason"] for (_, uid), row in out.items()}
    assert reasons == {
        "1.1": "not_best_recon",
        "1.2": "not_best_recon",
        "1.3": "not_best_recon",
        "1.4": None,  # thinnest, lung kernel
        "1.5": "thick_slices",  # rejected before the per-study choice
        "2.1": None,  # same thickness and kernel: lowest uid wins
        "2.2": "not_best_recon",
    }


def test_same_series_from_two_sites_is_counted_once() -> None:
    rows = [chest("1.1", "9.1", site="H02"), chest("1.1", "9.1", site="H01")]
    out = verdicts(rows)
    assert out[("H01", "1.1")]["rule_reason"] is None
    assert out[("H02", "1.1")]["rule_reason"] == "duplicate_site"
    assert list(out) == [("H01", "1.1"), ("H02", "1.1")]  # sorted by (site, uid)


def test_a_rejected_copy_does_not_hide_the_good_one() -> None:
    rows = [chest("1.1", "9.1", site="H01", n_gaps=3), chest("1.1", "9.1", site="H02")]
    out = verdicts(rows)
    assert out[("H01", "1.1")]["rule_reason"] == "slice_gaps"
    assert out[("H02", "1.1")]["rule_reason"] is None


def test_era_boundary_on_pandemic_start() -> None:
    start = PARAMS.pandemic_start
    rows = [
        chest("1.1", "9.1", study_date=start - dt.timedelta(days=1)),
        chest("1.2", "9.2", study_date=start),
        chest("1.3", "9.3", study_date=start + dt.timedelta(days=1)),
        chest("1.4", "9.4", study_date=start, modality="MR"),
    ]
    out = verdicts(rows)
    got = {uid: (r["era"], r["cohort"]) for (_, uid), r in out.items()}
    assert got == {
        "1.1": ("pre_pandemic", "non_covid"),
        "1.2": ("pandemic", "covid_candidate"),  # the start day itself is pandemic
        "1.3": ("pandemic", "covid_candidate"),
        "1.4": ("pandemic", None),  # an era for every series, a cohort only when selected
    }


def test_used_parameters_ignores_comments_and_strings() -> None:
    sql = "-- $min_slices\n/* $nope */ SELECT '$x' AS a, $max_slice_thickness_mm, $b$"
    assert sel_rules.used_parameters(sql) == ["b", "max_slice_thickness_mm"]


def write_rules(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql, encoding="utf-8")
    return folder


def test_candidates_view_holds_what_earlier_files_passed(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path / "rules",
        {
            "a.sql": "SELECT site, series_instance_uid, "
            "CASE WHEN slice_count < $min_slices THEN 'few' END AS rule_reason FROM series;",
            "b.sql": "SELECT site, series_instance_uid, 'late' AS rule_reason FROM candidates",
        },
    )
    rows = [chest("1.1", "9.1", slice_count=2), chest("1.2", "9.2")]
    con = sel_rules.catalog_from_tables(series_table(rows), instances_table(rows))
    out = sel_rules.apply_rules(con, sel_rules.read_rules(rules), PARAMS, REGIONS).to_pylist()
    assert [r["rule_reason"] for r in out] == ["few", "late"]


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELECT site, series_instance_uid, NULL AS rule_reason FROM series WHERE $bogus",
         r"bad\.sql: unknown parameter\(s\) \$bogus"),
        ("SELECT site, series_instance_uid FROM series", r"bad\.sql: a rule file must return"),
        ("SELEC nonsense", r"bad\.sql: rule SQL failed"),
        ("SELECT site, series_instance_uid, 'x' AS rule_reason FROM series, range(2)",
         r"bad\.sql: returns 1 repeated"),
        ("-- only a comment\n", r"bad\.sql: rule file holds no SQL"),
    ],
)  # fmt: skip
def test_broken_rule_files_fail_naming_the_file(tmp_path: Path, sql: str, match: str) -> None:
    rules = write_rules(tmp_path / "rules", {"bad.sql": sql})
    rows = [chest("1.1", "9.1")]
    con = sel_rules.catalog_from_tables(series_table(rows), instances_table(rows))
    with pytest.raises(InputError, match=match):
        sel_rules.apply_rules(con, sel_rules.read_rules(rules), PARAMS, REGIONS)


def test_audit_against_truth() -> None:
    rows = [
        chest("1.1", "9.1", site="H01"),  # pneumonia, selected
        chest("1.2", "9.2", site="H01"),  # no pneumonia, selected → false positive
        chest("1.3", "9.3", site="H02", modality="MR"),  # pneumonia missed (wrong modality)
        chest("1.4", "9.4", site="H02"),  # not in the truth → false positive, unmatched
    ]
    truth = pa.Table.from_pylist(
        [
            {"series_instance_uid": "1.1", "study_instance_uid": "9.1", "site": "H01",
             "kind": "chest_ct", "pneumonia": True, "duplicate_of": None},
            {"series_instance_uid": "1.1s", "study_instance_uid": "9.1", "site": "H01",
             "kind": "chest_ct_soft", "pneumonia": True, "duplicate_of": None},
            {"series_instance_uid": "1.2", "study_instance_uid": "9.2", "site": "H01",
             "kind": "chest_ct", "pneumonia": False, "duplicate_of": None},
            {"series_instance_uid": "1.3", "study_instance_uid": "9.3", "site": "H02",
             "kind": "chest_ct", "pneumonia": True, "duplicate_of": None},
            {"series_instance_uid": "1.1", "study_instance_uid": "9.1", "site": "H03",
             "kind": "chest_ct", "pneumonia": True, "duplicate_of": "1.1"},
        ]
    )  # fmt: skip
    con = sel_rules.catalog_from_tables(series_table(rows), instances_table(rows))
    selection = sel_rules.apply_rules(con, sel_rules.read_rules(RULES_DIR), PARAMS, REGIONS)
    report = select.summarize(selection, truth)
    assert report["series_selected"] == 3
    assert report["precision"] == pytest.approx(1 / 3)
    assert report["recall"] == pytest.approx(1 / 2)  # studies 9.1 found, 9.3 missed
    # 9.1 and 9.3 hold an eligible pneumonia chest CT; 9.3 was missed
    assert report["eligible_recall"] == pytest.approx(1 / 2)
    assert report["pneumonia_studies"] == {
        "total": 2,
        "found": 1,
        "eligible": 2,
        "eligible_found": 1,
    }
    assert report["truth_unmatched"] == 1
    assert report["per_site"]["H01"] == {
        "precision": 0.5,
        "recall": 1.0,
        "eligible_recall": 1.0,
    }
    assert report["per_site"]["H02"] == {"precision": 0.0, "recall": 0.0, "eligible_recall": 0.0}
    # a trap that makes a rule reject 9.3's only series takes it out of the eligible recall
    blocked = select.summarize(selection, truth, frozenset({"1.3"}))
    assert blocked["recall"] == pytest.approx(1 / 2)
    assert blocked["eligible_recall"] == 1.0
    assert blocked["pneumonia_studies"]["eligible"] == 1
    assert blocked["per_site"]["H02"]["eligible_recall"] is None


def demo_rows() -> list[dict[str, Any]]:
    return [
        chest("1.1", "9.1"),
        chest("1.2", "9.1", slice_thickness=2.0),
        chest("1.3", "9.3", image_type="ORIGINAL\\PRIMARY\\LOCALIZER", orientation="coronal"),
        chest("1.4", "9.4", study_date=dt.date(2020, 3, 1), site="H02"),
        chest("1.4", "9.4", study_date=dt.date(2020, 3, 1), site="H03"),
        chest("1.5", "9.5", body_part_examined="HEAD", series_description="BRAIN"),
    ]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_run_writes_selection_and_report_deterministically(tmp_path: Path) -> None:
    index = write_index(tmp_path / "index", demo_rows())
    truth = tmp_path / "truth.parquet"
    write_parquet(
        truth,
        pa.Table.from_pylist(
            [
                {"series_instance_uid": r["series_instance_uid"],
                 "study_instance_uid": r["study_instance_uid"], "site": r["site"],
                 "kind": "chest_ct", "pneumonia": True, "duplicate_of": None}
                for r in demo_rows()[:4]
            ]
        ),
    )  # fmt: skip
    select.run(index, RULES_DIR, tmp_path / "a", truth, PARAMS)
    select.run(index, RULES_DIR, tmp_path / "b", truth, PARAMS)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert sorted(digest(tmp_path / "a")) == [MARKER, "report.json", "series.parquet"]

    table = read_parquet(tmp_path / "a" / "series.parquet")
    assert table.schema.equals(select.SCORED_SCHEMA)  # scorer columns null: no model
    assert set(table.column("selector_version").to_pylist()) == {None}
    keys = list(
        zip(table["site"].to_pylist(), table["series_instance_uid"].to_pylist(), strict=True)
    )
    assert keys == sorted(keys)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["series_seen"] == 6
    assert report["series_selected"] == 2
    assert report["rule_rejections"] == {
        "duplicate_site": 1,
        "localizer": 1,
        "not_best_recon": 1,
        "not_chest": 1,
    }
    assert report["cohorts"] == {"covid_candidate": 1, "non_covid": 1}
    assert report["precision"] == 1.0
    assert report["recall"] == pytest.approx(2 / 3)  # 9.3 (the localizer's study) missed


def test_run_without_truth_has_no_audit(tmp_path: Path) -> None:
    index = write_index(tmp_path / "index", demo_rows())
    select.run(index, RULES_DIR, tmp_path / "out", None, PARAMS)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "precision" not in report


def test_missing_index_file_fails_naming_it(tmp_path: Path) -> None:
    index = write_index(tmp_path / "index", demo_rows())
    for shard in (index / "instances").iterdir():
        shard.unlink()
    with pytest.raises(InputError, match=r"instances: no Parquet shards"):
        select.run(index, RULES_DIR, tmp_path / "out", None, PARAMS)
    assert not (tmp_path / "out").exists()


def test_empty_series_table_fails_naming_it(tmp_path: Path) -> None:
    index = write_index(tmp_path / "index", demo_rows())
    write_parquet(index / "series.parquet", series_table([]))
    with pytest.raises(InputError, match=r"series\.parquet: empty table"):
        select.run(index, RULES_DIR, tmp_path / "out", None, PARAMS)


def test_series_table_without_key_column_fails(tmp_path: Path) -> None:
    index = write_index(tmp_path / "index", demo_rows())
    write_parquet(index / "series.parquet", series_table(demo_rows()).drop_columns(["site"]))
    with pytest.raises(InputError, match=r"series\.parquet: missing column\(s\) site"):
        select.run(index, RULES_DIR, tmp_path / "out", None, PARAMS)


def test_missing_rules_folder_fails(tmp_path: Path) -> None:
    index = write_index(tmp_path / "index", demo_rows())
    with pytest.raises(InputError, match=r"nowhere: rules folder not found"):
        select.run(index, tmp_path / "nowhere", tmp_path / "out", None, PARAMS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no \*\.sql rule files"):
        select.run(index, tmp_path / "empty", tmp_path / "out", None, PARAMS)


def test_a_series_without_site_is_rejected_no_site(tmp_path: Path) -> None:
    # a DICOM file at the archive root has no site folder: its series has site NULL
    rows = [*demo_rows(), chest("1.9", "9.9", site=None), chest("1.1", "9.1", site=None)]
    index = write_index(tmp_path / "index", rows)
    select.run(index, RULES_DIR, tmp_path / "out", None, PARAMS)
    table = read_parquet(tmp_path / "out" / "series.parquet").to_pylist()
    stray = [r for r in table if r["site"] == ""]
    assert [(r["series_instance_uid"], r["rule_reason"], r["selected"]) for r in stray] == [
        ("1.1", "no_site", False),
        ("1.9", "no_site", False),
    ]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["series_seen"] == 8
    assert report["rule_rejections"]["no_site"] == 2
    assert report["series_selected"] == 2  # the sited copy of 1.1 is still selected
