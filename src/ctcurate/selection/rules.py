"""Selection rules: the reviewable SQL files of ``stages/select/`` run over the catalog.

Each rule file is a DuckDB query over the ``series`` view; ``$name`` parameters come from the
``select`` params. :func:`apply_rules` gives every series one row: its era, cohort, body
region and the first rule that rejected it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ctcurate.errors import InputError
from ctcurate.log import get_logger
from ctcurate.params import SelectParams
from ctcurate.selection.region import BodyRegions

log = get_logger("select")

_PARAM_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


_LINE_COMMENT_RE = re.compile(r"--[^\n]*")


_BLOCK_COMMENT_RE = re.compile(r"/\*.*?\*/", re.DOTALL)


_STRING_RE = re.compile(r"'(?:[^']|'')*'")


# DuckDB errors whose text describes the SQL, never the data (safe to show to the user)
_SQL_ERRORS: tuple[type[Exception], ...] = (
    duckdb.ParserException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.InvalidInputException,
)


#: The catalog view of every index series; the rules' ``series`` view leaves out those with
#: no site (a file at the archive root), which are rejected ``no_site`` (site ``''``).
ALL_SERIES = "series_all"


SERIES_VIEW = f"CREATE VIEW series AS SELECT * FROM {ALL_SERIES} WHERE site IS NOT NULL"


def rule_parameters(params: SelectParams) -> dict[str, Any]:
    """The DuckDB named parameters a rule file may use (``$name``)."""
    return {
        "min_slices": params.min_slices,
        "max_slice_thickness_mm": params.max_slice_thickness_mm,
        "min_z_coverage_mm": params.min_z_coverage_mm,
        "pandemic_start": params.pandemic_start,
    }


def used_parameters(sql: str) -> list[str]:
    """Sorted names of the ``$name`` parameters in ``sql`` (comments and strings ignored)."""
    code = _BLOCK_COMMENT_RE.sub(" ", sql)
    code = _STRING_RE.sub("''", code)
    code = _LINE_COMMENT_RE.sub(" ", code)
    return sorted(set(_PARAM_RE.findall(code)))


def read_rules(rules_dir: Path) -> list[tuple[str, str]]:
    """Return ``(file name, SQL)`` of every ``*.sql`` file in ``rules_dir``, sorted by name."""
    rules_dir = Path(rules_dir)
    if not rules_dir.is_dir():
        msg = f"{rules_dir}: rules folder not found"
        raise InputError(msg)
    files = sorted(p for p in rules_dir.glob("*.sql") if p.is_file())
    if not files:
        msg = f"{rules_dir}: no *.sql rule files"
        raise InputError(msg)
    rules = []
    for path in files:
        try:
            sql = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"{path}: unreadable rule file ({exc.__class__.__name__})"
            raise InputError(msg) from exc
        if not _LINE_COMMENT_RE.sub("", _BLOCK_COMMENT_RE.sub("", sql)).strip(" \t\r\n;"):
            msg = f"{path}: rule file holds no SQL"
            raise InputError(msg)
        rules.append((path.name, sql))
    return rules


def _sql_literal(path: Path) -> str:
    return "'" + path.as_posix().replace("'", "''") + "'"


def _check_series(con: duckdb.DuckDBPyConnection, where: str) -> None:
    columns = {row[0] for row in con.sql(f"DESCRIBE {ALL_SERIES}").fetchall()}
    missing = [c for c in SERIES_KEY_COLUMNS if c not in columns]
    if missing:
        msg = f"{where}: missing column(s) {', '.join(missing)}"
        raise InputError(msg)
    n_rows, n_keys = con.sql(
        f"SELECT count(*), count(DISTINCT (site, series_instance_uid)) FROM {ALL_SERIES}"
    ).fetchall()[0]
    if n_rows == 0:
        msg = f"{where}: no series (empty table)"
        raise InputError(msg)
    if n_keys != n_rows:
        msg = f"{where}: {n_rows - n_keys} duplicate (site, series_instance_uid) row(s)"
        raise InputError(msg)


def open_catalog(series_path: Path, instances_path: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views ``series`` and ``instances`` over the index files.

    Raises :class:`InputError` naming the file when one is missing, unreadable or empty,
    or when ``series`` lacks a key column or repeats a (site, series uid).
    """
    sources = {series_path: [Path(series_path)]}  # instances: a folder of Parquet shards
    sources[instances_path] = sorted(Path(instances_path).glob("part-*.parquet"))
    for path, files in sources.items():
        if not files or not all(f.is_file() for f in files):
            msg = f"{path}: no such Parquet file" if files else f"{path}: no Parquet shards"
            raise InputError(msg)
        try:
            n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        except (pa.ArrowInvalid, OSError) as exc:
            msg = f"{path}: not a readable Parquet file ({exc.__class__.__name__})"
            raise InputError(msg) from exc
        if n_rows == 0:
            msg = f"{path}: empty table"
            raise InputError(msg)
    con = duckdb.connect(":memory:")
    con.execute(
        f"CREATE VIEW {ALL_SERIES} AS SELECT * FROM read_parquet({_sql_literal(series_path)})"
    )
    con.execute(
        "CREATE VIEW instances AS SELECT * FROM "
        f"read_parquet({_sql_literal(Path(instances_path) / 'part-*.parquet')})"
    )
    _check_series(con, str(series_path))
    con.execute(SERIES_VIEW)
    return con


def catalog_from_tables(series: pa.Table, instances: pa.Table) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views ``series`` and ``instances`` over Arrow tables."""
    con = duckdb.connect(":memory:")
    con.register("series_table", series)
    con.register("instances_table", instances)
    con.execute(f"CREATE VIEW {ALL_SERIES} AS SELECT * FROM series_table")
    con.execute("CREATE VIEW instances AS SELECT * FROM instances_table")
    _check_series(con, "series")
    con.execute(SERIES_VIEW)
    return con


def _sql_error(name: str, exc: duckdb.Error) -> InputError:
    if isinstance(exc, _SQL_ERRORS):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        msg = f"{name}: rule SQL failed: {first[:300]}"
    else:  # conversion errors may quote data values: name the class only
        msg = f"{name}: rule SQL failed ({exc.__class__.__name__})"
    return InputError(msg)


def _run_rule_file(
    con: duckdb.DuckDBPyConnection, rank: int, name: str, sql: str, values: Mapping[str, Any]
) -> None:
    names = used_parameters(sql)
    unknown = [n for n in names if n not in values]
    if unknown:
        msg = (
            f"{name}: unknown parameter(s) {', '.join('$' + n for n in unknown)} "
            f"(known: {', '.join('$' + n for n in sorted(values))})"
        )
        raise InputError(msg)
    body = sql.rstrip().rstrip(";").rstrip()
    try:
        con.execute("DROP TABLE IF EXISTS rule_out")
        con.execute(f"CREATE TEMP TABLE rule_out AS {body}\n", {n: values[n] for n in names})
    except duckdb.Error as exc:
        raise _sql_error(name, exc) from exc
    columns = [row[0] for row in con.sql("DESCRIBE rule_out").fetchall()]
    wanted = ["site", "series_instance_uid", "rule_reason"]
    if sorted(columns) != sorted(wanted):
        msg = f"{name}: a rule file must return the columns {', '.join(wanted)} (got {columns})"
        raise InputError(msg)
    n_rows, n_keys, n_unknown = con.sql(
        """
        SELECT count(*), count(DISTINCT (r.site, r.series_instance_uid)),
               count(*) FILTER (WHERE s.series_instance_uid IS NULL)
        FROM rule_out AS r
        LEFT JOIN series AS s USING (site, series_instance_uid)
        """
    ).fetchall()[0]
    if n_keys != n_rows:
        msg = f"{name}: returns {n_rows - n_keys} repeated (site, series_instance_uid) row(s)"
        raise InputError(msg)
    if n_unknown:
        msg = f"{name}: returns {n_unknown} row(s) that are not in `series`"
        raise InputError(msg)
    con.execute(
        """
        INSERT INTO verdicts
        SELECT $rank, site, series_instance_uid, CAST(rule_reason AS VARCHAR) FROM rule_out
        WHERE rule_reason IS NOT NULL
        """,
        {"rank": rank},
    )
    con.execute("DROP TABLE rule_out")


def attach_regions(con: duckdb.DuckDBPyConnection, regions: BodyRegions) -> Counter[str]:
    """Give the ``series_all`` and ``series`` views of ``con`` the columns ``body_region``
    and ``body_region_source`` (:mod:`ctcurate.selection.region`); returns the series count per
    region.

    The index table becomes the view ``series_headers``; a header column it lacks counts
    as empty, a ``body_region`` it holds is replaced.
    """
    columns = {row[0] for row in con.sql(f"DESCRIBE {ALL_SERIES}").fetchall()}
    values = ", ".join(
        f'CAST("{c}" AS VARCHAR)' if c in columns else "NULL" for c in regions.columns
    )
    rows = con.sql(f"SELECT site, series_instance_uid, {values} FROM {ALL_SERIES}").fetchall()
    found = [regions.classify(row[2:]) for row in rows]
    con.register(
        "series_regions",
        pa.table(
            {
                "site": pa.array([r[0] for r in rows], pa.string()),
                "series_instance_uid": pa.array([r[1] for r in rows], pa.string()),
                "body_region": pa.array([f[0] for f in found], pa.string()),
                "body_region_source": pa.array([f[1] for f in found], pa.string()),
            }
        ),
    )
    replaced = [c for c in ("body_region", "body_region_source") if c in columns]
    every = f"s.* EXCLUDE ({', '.join(replaced)})" if replaced else "s.*"
    con.execute("DROP VIEW series")
    con.execute(f"ALTER VIEW {ALL_SERIES} RENAME TO series_headers")
    con.execute(
        f"CREATE VIEW {ALL_SERIES} AS SELECT {every}, r.body_region, r.body_region_source "
        "FROM series_headers AS s JOIN series_regions AS r "
        "ON s.site IS NOT DISTINCT FROM r.site "
        "AND s.series_instance_uid IS NOT DISTINCT FROM r.series_instance_uid"
    )
    con.execute(SERIES_VIEW)
    return Counter(f[0] for f in found)


def apply_rules(
    con: duckdb.DuckDBPyConnection,
    rules: Sequence[tuple[str, str]],
    params: SelectParams,
    regions: BodyRegions,
) -> pa.Table:
    """Run ``rules`` (name, SQL) in order on the catalog ``con``; one verdict per series.

    The series get their body region first (:func:`attach_regions`). Returns the table
    of :data:`OUTPUT_SCHEMA`, sorted by (site, series_instance_uid).
    """
    for name, count in sorted(attach_regions(con, regions).items()):
        log.info("body region %s: %d series", name, count)
    values = rule_parameters(params)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE verdicts "
        "(file_rank INTEGER, site VARCHAR, series_instance_uid VARCHAR, rule_reason VARCHAR)"
    )
    con.execute(
        """
        CREATE OR REPLACE TEMP VIEW candidates AS
        SELECT s.* FROM series AS s
        WHERE NOT EXISTS (
            SELECT 1 FROM verdicts AS v
            WHERE v.site = s.site AND v.series_instance_uid = s.series_instance_uid
        )
        """
    )
    for rank, (name, sql) in enumerate(rules):
        _run_rule_file(con, rank, name, sql, values)
    table = con.sql(
        """
        WITH first_reason AS (
            SELECT site, series_instance_uid, arg_min(rule_reason, file_rank) AS rule_reason
            FROM verdicts
            GROUP BY site, series_instance_uid
        ),
        judged AS (
            SELECT
                CAST(s.series_instance_uid AS VARCHAR) AS series_instance_uid,
                CAST(coalesce(s.site, '') AS VARCHAR) AS site,
                CAST(s.study_instance_uid AS VARCHAR) AS study_instance_uid,
                CAST(s.patient_id AS VARCHAR) AS patient_id,
                CAST(s.study_date AS DATE) AS study_date,
                CAST(s.body_region AS VARCHAR) AS body_region,
                CAST(s.body_region_source AS VARCHAR) AS body_region_source,
                CASE WHEN s.site IS NULL THEN 'no_site' ELSE f.rule_reason END AS rule_reason,
                CASE
                    WHEN s.study_date IS NULL THEN NULL
                    WHEN CAST(s.study_date AS DATE) >= $pandemic_start THEN 'pandemic'
                    ELSE 'pre_pandemic'
                END AS era,
                s.site IS NOT NULL AND f.rule_reason IS NULL AS selected
            FROM series_all AS s
            LEFT JOIN first_reason AS f USING (site, series_instance_uid)
        )
        SELECT *,
            CASE
                WHEN selected AND era = 'pre_pandemic' THEN 'non_covid'
                WHEN selected AND era = 'pandemic' THEN 'covid_candidate'
            END AS cohort
        FROM judged
        ORDER BY site, series_instance_uid
        """,
        params={"pandemic_start": params.pandemic_start},
    ).to_arrow_table()
    return table.cast(OUTPUT_SCHEMA)


#: Columns of the index ``series`` table the runner itself needs (rules may use any).
SERIES_KEY_COLUMNS = (
    "series_instance_uid",
    "site",
    "study_instance_uid",
    "patient_id",
    "study_date",
)


OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("series_instance_uid", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("study_instance_uid", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("study_date", pa.date32()),
        pa.field("body_region", pa.string()),
        pa.field("body_region_source", pa.string()),
        pa.field("rule_reason", pa.string()),
        pa.field("era", pa.string()),
        pa.field("selected", pa.bool_(), nullable=False),
        pa.field("cohort", pa.string()),
    ]
)
