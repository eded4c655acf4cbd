"""query: SQL over the index catalog in table, csv and json formats."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from ctcurate import index, query
from ctcurate.errors import CtcurateError, InputError
from ctcurate.io.dicom import FileOutcome
from ctcurate.io.tables import write_parquet


def instance(path: str, z: float, site: str = "H01") -> dict[str, object]:
    row: dict[str, object] = {name: None for name in index.INSTANCE_SCHEMA.names}
    row |= {
        "path": path,
        "size": 100,
        "mtime_ns": 0,
        "site": site,
        "sop_instance_uid": f"1.2.3.{int(z)}",
        "series_instance_uid": "1.2.3",
        "modality": "CT",
        "image_position_x": 0.0,
        "image_position_y": 0.0,
        "image_position_z": z,
        "image_orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "body_part_examined": "CHEST",
        "flags": [],
    }
    return row


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index folder built from three instances and one quarantined file."""
    folder = tmp_path_factory.mktemp("index")
    outcomes = [
        FileOutcome(f"H01/{i}.dcm", "indexed", record=instance(f"H01/{i}.dcm", 2.0 * i))
        for i in range(3)
    ] + [FileOutcome("H01/x.txt", "quarantined", "not_dicom", "no DICOM file meta")]
    instances = index.instances_table(outcomes)
    write_parquet(folder / "instances" / "part-00000.parquet", instances)
    write_parquet(folder / "series.parquet", index.series_table(instances))
    write_parquet(folder / "quarantine.parquet", index.reasons_table(outcomes, "quarantined"))
    write_parquet(folder / "skipped.parquet", index.reasons_table(outcomes, "skipped"))
    index.write_catalog(folder)
    return folder / "catalog.duckdb"


SQL = "SELECT path, image_position_z AS z, flags FROM instances ORDER BY path"


def test_table_format_is_aligned(
    catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # views resolve from the catalog's folder, not the CWD
    text = query.run(catalog, SQL, "table")
    lines = text.splitlines()
    assert lines[0].split() == ["path", "z", "flags"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["H01/0.dcm", "0.0", "[]"]
    assert lines[-1] == "(3 rows)"
    spans = [m.span() for m in re.finditer("-+", lines[1])]
    cells = [[line[a:b] for a, b in spans] for line in lines[2:-1]]
    assert cells == [
        ["H01/0.dcm", "0.0", "[]"],
        ["H01/1.dcm", "2.0", "[]"],
        ["H01/2.dcm", "4.0", "[]"],
    ]
    assert [lines[0][a:b] for a, b in spans] == ["path     ", "  z", "flags"]


def test_csv_format_has_a_header(catalog: Path) -> None:
    rows = list(csv.reader(io.StringIO(query.run(catalog, SQL, "csv"))))
    assert rows[0] == ["path", "z", "flags"]
    assert rows[1:] == [
        ["H01/0.dcm", "0.0", "[]"],
        ["H01/1.dcm", "2.0", "[]"],
        ["H01/2.dcm", "4.0", "[]"],
    ]


def test_json_format_is_canonical(catalog: Path) -> None:
    text = query.run(
        catalog,
        "SELECT slice_count, z_coverage_mm, study_date, orientation FROM series",
        "json",
    )
    assert json.loads(text) == [
        {"orientation": "axial", "slice_count": 3, "study_date": None, "z_coverage_mm": 4.0}
    ]
    assert text.endswith("\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_dates_and_nulls_are_rendered() -> None:
    names = ["d", "n"]
    rows = [(dt.date(2020, 1, 2), None)]
    assert json.loads(query.format_json(names, rows)) == [{"d": "2020-01-02", "n": None}]
    assert query.format_csv(names, rows) == "d,n\n2020-01-02,\n"
    assert "NULL" in query.format_table(names, rows)


def test_quarantine_and_skipped_views(catalog: Path) -> None:
    text = query.run(
        catalog, "SELECT reason FROM quarantine UNION ALL SELECT 'n' FROM skipped", "csv"
    )
    assert text == "reason\nnot_dicom\n"


def test_bad_sql_is_one_line_error(catalog: Path) -> None:
    with pytest.raises(CtcurateError, match=r"^query failed: .*nosuch") as info:
        query.run(catalog, "SELECT * FROM nosuch", "table")
    assert "\n" not in str(info.value)


def test_catalog_is_read_only(catalog: Path) -> None:
    with pytest.raises(CtcurateError, match="query failed"):
        query.run(catalog, "CREATE TABLE t AS SELECT 1", "table")


def test_missing_catalog_and_unknown_format(tmp_path: Path, catalog: Path) -> None:
    with pytest.raises(InputError, match="catalog not found"):
        query.run(tmp_path / "nope.duckdb", "SELECT 1", "table")
    with pytest.raises(CtcurateError, match="unknown format 'xml'"):
        query.run(catalog, "SELECT 1", "xml")
    bad = tmp_path / "bad.duckdb"
    bad.write_text("not a database")
    with pytest.raises(InputError, match="not a readable DuckDB catalog"):
        query.run(bad, "SELECT 1", "table")


def test_empty_result(catalog: Path) -> None:
    text = query.run(catalog, "SELECT path FROM instances WHERE false", "table")
    assert text.splitlines()[-1] == "(0 rows)"
    assert json.loads(query.run(catalog, "SELECT path FROM instances WHERE false", "json")) == []


def test_instances_table_keeps_schema_for_no_rows() -> None:
    empty = index.instances_table([])
    assert empty.schema == index.INSTANCE_SCHEMA
    assert index.series_table(empty).schema == index.SERIES_SCHEMA
    assert isinstance(empty, pa.Table)


def test_a_pulled_index_without_its_catalog_gets_it_rebuilt(catalog: Path, tmp_path: Path) -> None:
    pulled = tmp_path / "index"
    shutil.copytree(catalog.parent, pulled, ignore=shutil.ignore_patterns("catalog.duckdb"))
    assert not (pulled / "catalog.duckdb").exists()
    assert query.run(pulled / "catalog.duckdb", SQL, "csv") == query.run(catalog, SQL, "csv")
    assert (pulled / "catalog.duckdb").is_file()
    with pytest.raises(InputError, match="catalog not found"):  # no index there either
        query.run(tmp_path / "catalog.duckdb", "SELECT 1", "table")
