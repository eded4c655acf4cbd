"""query: SQL over the index catalog in table, csv and json formats."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from ctcurate.dicom.header import FileOutcome
from ctcurate.errors import CtcurateError, InputError
from ctcurate.io.tables import write_parquet
from ctcurate.pipeline import index, query


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
    with pytest.raises(CtcurateError, match="query refused: CREATE statement"):
        query.run(catalog, "CREATE TABLE t AS SELECT 1", "table")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


WRITES = [
    ("COPY (SELECT 1 AS a) TO '{index}/series.parquet' (FORMAT parquet)", "COPY"),
    ("COPY series TO '{out}/series.csv'", "COPY"),
    ("CREATE VIEW v AS SELECT 1", "CREATE"),
    ("CREATE TEMP TABLE t AS SELECT * FROM series", "CREATE"),
    ("INSERT INTO series SELECT * FROM series", "INSERT"),
    ("ATTACH '{out}/new.duckdb' AS new", "ATTACH"),
    ("EXPORT DATABASE '{out}/export'", "EXPORT"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("CALL pragma_version()", "CALL"),
    ("DROP VIEW series", "DROP"),
    ("SELECT 1; COPY (SELECT 1) TO '{out}/x.csv'", "one statement expected, got 2"),
]


@pytest.mark.parametrize(("sql", "kind"), WRITES, ids=[w[1] + str(i) for i, w in enumerate(WRITES)])
def test_statements_that_write_or_configure_are_refused(
    catalog: Path, tmp_path: Path, sql: str, kind: str
) -> None:
    before = _tree(catalog.parent)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CtcurateError, match=rf"^query refused: {kind}") as info:
        query.run(catalog, sql.format(index=catalog.parent, out=out), "table")
    assert "\n" not in str(info.value)
    assert _tree(catalog.parent) == before
    assert list(out.iterdir()) == []
    assert query.run(catalog, "SELECT count(*) AS n FROM series", "csv") == "n\n1\n"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_text('{secret}')",
        "SELECT * FROM read_blob('{secret}')",
        "SELECT * FROM read_csv('{secret}')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('{outside}')",
        "SELECT * FROM '{outside}'",
        "SELECT * FROM read_text('{index}/../secret.csv')",
        "SELECT * FROM read_text('secret.csv')",
        "SELECT * FROM glob('{tmp}/*')",
        "SELECT * FROM read_parquet('https://example.org/x.parquet')",
    ],
)
def test_files_outside_the_index_are_refused(
    catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sql: str
) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("token\nSECRETVALUE\n", encoding="utf-8")
    outside = tmp_path / "outside.parquet"
    shutil.copy(catalog.parent / "series.parquet", outside)
    monkeypatch.chdir(tmp_path)
    text = sql.format(secret=secret, outside=outside, index=catalog.parent, tmp=tmp_path)
    with pytest.raises(CtcurateError, match=r"^query (refused|failed): ") as info:
        query.run(catalog, text, "csv")
    assert "\n" not in str(info.value)
    assert "SECRETVALUE" not in str(info.value)
    if "/etc/passwd" in text or str(tmp_path) in text or "https" in text:
        assert str(info.value).startswith("query refused: Permission Error")


def test_the_connection_itself_cannot_write_or_reach_other_files(
    catalog: Path, tmp_path: Path
) -> None:
    """Below the statement check: DuckDB's own file access is confined and locked."""
    import duckdb

    spill = tmp_path / "spill"
    spill.mkdir()
    con = query.connect(catalog, spill)
    try:
        with pytest.raises(duckdb.PermissionException, match="disabled by configuration"):
            con.execute(f"COPY (SELECT 1) TO '{tmp_path}/x.csv'")
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"ATTACH '{tmp_path}/x.duckdb'")
        with pytest.raises(duckdb.Error, match="configuration has been locked"):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error, match="configuration has been locked"):
            con.execute(f"SET allowed_directories = ['{tmp_path}/']")
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("CREATE TABLE main.t AS SELECT 1")
        setting = "SELECT current_setting('temp_directory')"
        assert con.execute(setting).fetchall() == [(str(spill.resolve()),)]
    finally:
        con.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spill"]


def test_views_read_the_index_not_the_working_directory(
    catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "series.parquet").write_bytes(b"not the index")
    (tmp_path / "instances").mkdir()
    monkeypatch.chdir(tmp_path)
    assert query.run(catalog, "SELECT count(*) AS n FROM instances", "csv") == "n\n3\n"
    assert query.run(catalog, "SELECT slice_count FROM series", "csv") == "slice_count\n3\n"


def test_read_statements_and_index_files_still_work(catalog: Path) -> None:
    described = query.run(catalog, "DESCRIBE series", "csv")
    assert "slice_count" in described
    assert "EXPLAIN" not in query.run(catalog, "EXPLAIN SELECT * FROM series", "csv")
    inside = catalog.parent / "quarantine.parquet"
    text = query.run(catalog, f"SELECT reason FROM read_parquet('{inside}')", "csv")
    assert text == "reason\nnot_dicom\n"
    summary = query.run(
        catalog,
        "WITH s AS (SELECT site FROM instances) SELECT site, count(*) AS n FROM s "
        "GROUP BY site ORDER BY site",
        "csv",
    )
    assert summary == "site,n\nH01,3\n"


def test_cli_refusal_is_one_line_and_a_non_zero_exit(catalog: Path, tmp_path: Path) -> None:
    target = tmp_path / "dump.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctcurate",
            "query",
            "--catalog",
            str(catalog),
            f"COPY series TO '{target}'",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "ctcurate: error: query refused: COPY statement (query runs SELECT only; the catalog "
        "is read-only)"
    ]
    assert not target.exists()


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


def test_show_tables_lists_each_view_once(catalog: Path) -> None:
    """The views live in one views-only database: nothing is listed twice (an earlier
    version shadowed the catalog's views with temporary ones, and both were listed)."""
    from ctcurate.catalog.tables import PHI_CENSUS_VIEW, VIEWS

    names = query.run(catalog, "SHOW TABLES", "csv").splitlines()[1:]
    assert sorted(names) == sorted([*VIEWS, PHI_CENSUS_VIEW])
    assert query.run(catalog, f"SELECT count(*) AS n FROM {PHI_CENSUS_VIEW}", "csv").startswith(
        "n\n"
    )
