"""query: ad-hoc SQL over the index catalog (views instances, series, quarantine, skipped).

Read-only by construction: :func:`connect` checks the catalog, writes the same views over
the Parquet files of the catalog's folder by absolute path (the catalog's own views name
them relative to it, which DuckDB would resolve against the working directory first) into
a views-only database in the caller's scratch folder, opens that read-only (so the views
are listed once: ``SHOW TABLES`` shows ``instances``, ``series`` ... and nothing twice),
then confines the connection to the catalog's folder (``allowed_directories``, external
access off, configuration locked, no extension loading). :func:`fetch` runs one SELECT (or EXPLAIN)
statement and refuses anything else before it runs: COPY, CREATE, INSERT, ATTACH, EXPORT,
INSTALL / LOAD, SET, PRAGMA, CALL ...
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctcurate.errors import CtcurateError, InputError
from ctcurate.io.atomic import dumps_json
from ctcurate.params import SiteRule

if TYPE_CHECKING:
    import duckdb

FORMATS = ("table", "csv", "json")
NULL_TEXT = "NULL"


#: Statement types ``query`` runs; every other statement is refused before it runs.
READ_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})
#: Settings of every query connection: no extension is installed or loaded behind a query.
CONNECT_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


#: The views-only database :func:`connect` writes into its scratch folder.
VIEWS_FILE = "views.duckdb"


def connect(catalog: Path, temp_dir: Path) -> duckdb.DuckDBPyConnection:
    """The catalog's views, read-only, confined to the catalog's folder.

    ``temp_dir`` is an empty scratch folder of the caller's, never the index folder: it
    holds the views-only database and what a query larger than memory spills. A catalog
    missing beside an index's ``series.parquet`` (after a ``dvc pull``: DVC does not track
    it, its bytes are not reproducible) is rebuilt first."""
    import duckdb

    from ctcurate.catalog.build import CATALOG_FILE, write_catalog

    catalog = Path(catalog)
    index_dir = catalog.parent
    if (
        not catalog.is_file()
        and catalog.name == CATALOG_FILE
        and (index_dir / "series.parquet").is_file()
    ):
        # an index without its catalog (DVC does not track it): views are cheap to rebuild
        try:
            write_catalog(index_dir, _site_rule(index_dir))
        except (OSError, duckdb.Error) as exc:
            msg = f"{catalog}: cannot rebuild the catalog ({_first_line(exc)})"
            raise InputError(msg) from exc
    if not catalog.is_file():
        msg = f"{catalog}: catalog not found (run `ctcurate index` first)"
        raise InputError(msg)
    try:
        duckdb.connect(str(catalog), read_only=True, config=CONNECT_CONFIG).close()
    except duckdb.Error as exc:
        msg = f"{catalog}: not a readable DuckDB catalog ({_first_line(exc)})"
        raise InputError(msg) from exc
    views = Path(temp_dir).resolve() / VIEWS_FILE
    _write_views(views, catalog.resolve().parent)
    con = duckdb.connect(str(views), read_only=True, config=CONNECT_CONFIG)
    try:
        _confine(con, catalog.resolve().parent, Path(temp_dir))
    except duckdb.Error:
        con.close()
        raise
    return con


def _write_views(views: Path, folder: Path) -> None:
    """``views``: a database of the catalog's views over ``folder``'s Parquet files by
    absolute path, and the PHI census by the index's layout rule; nothing else."""
    import duckdb

    from ctcurate.catalog.build import view_source
    from ctcurate.catalog.site import site_sql
    from ctcurate.catalog.tables import PHI_CENSUS_VIEW, VIEWS, phi_census_sql

    con = duckdb.connect(str(views), config=CONNECT_CONFIG)
    try:
        for view in VIEWS:
            source = folder / view_source(view)
            try:
                parquet = _sql_text(str(source))
                con.execute(f"CREATE OR REPLACE VIEW {view} AS FROM read_parquet({parquet})")
            except duckdb.Error as exc:
                msg = f"{source}: cannot be read as the view {view} ({_first_line(exc)})"
                raise InputError(msg) from exc
        census = phi_census_sql("instances", "quarantine", site_sql(_site_rule(folder)))
        con.execute(f"CREATE OR REPLACE VIEW {PHI_CENSUS_VIEW} AS {census}")
    finally:
        con.close()


def _confine(con: duckdb.DuckDBPyConnection, folder: Path, temp_dir: Path) -> None:
    """Read only under ``folder``, spill only into ``temp_dir`` (DuckDB's default would be a
    folder beside the database), and never change the settings back."""
    spill = str(Path(temp_dir).resolve())
    con.execute(f"SET temp_directory = {_sql_text(spill)}")
    con.execute(f"SET allowed_directories = [{_sql_text(str(folder) + os.sep)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse ``sql`` unless it is one statement of a :data:`READ_STATEMENTS` type."""
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        msg = f"query failed: {_first_line(exc)}"
        raise CtcurateError(msg) from exc
    if len(statements) != 1:
        msg = f"query refused: one statement expected, got {len(statements)}"
        raise CtcurateError(msg)
    kind = statements[0].type.name
    if kind not in READ_STATEMENTS:
        msg = f"query refused: {kind} statement (query runs SELECT only; the catalog is read-only)"
        raise CtcurateError(msg)


def fetch(catalog: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of ``sql`` (one SELECT statement) run on the catalog."""
    with tempfile.TemporaryDirectory(prefix="ctcurate-query-") as spill:
        return _fetch(connect(catalog, Path(spill)), sql)


def _fetch(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` on ``con`` if it is a read statement; close ``con``."""
    import duckdb

    try:
        check_read_only(con, sql)
        cursor = con.execute(sql)
        if cursor.description is None:
            return [], []
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    except duckdb.PermissionException as exc:  # a file outside the index folder
        msg = f"query refused: {_first_line(exc)}"
        raise CtcurateError(msg) from exc
    except duckdb.Error as exc:
        msg = f"query failed: {_first_line(exc)}"
        raise CtcurateError(msg) from exc
    finally:
        con.close()
    return names, rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _plain(value: Any) -> Any:
    """A JSON-ready value: dates as ISO text, decimals as floats, NaN/inf as null."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, decimal.Decimal):
        value = float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _text(value: Any) -> str:
    plain = _plain(value)
    if plain is None:
        return NULL_TEXT
    if isinstance(plain, bool):
        return "true" if plain else "false"
    if isinstance(plain, list):
        return "[" + ", ".join(_text(v) for v in plain) + "]"
    return str(plain)


def format_table(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table: header, a rule, one line per row (numbers right)."""
    cells = [[_text(v) for v in row] for row in rows]
    widths = [max([len(n)] + [len(r[j]) for r in cells]) for j, n in enumerate(names)]
    numeric = [
        bool(rows)
        and all(isinstance(r[j], (int, float, decimal.Decimal)) or r[j] is None for r in rows)
        for j in range(len(names))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(out) + "\n"


def format_csv(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV with a header line; NULL as an empty field, lists as JSON arrays."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        values = []
        for v in row:
            plain = _plain(v)
            if plain is None:
                values.append("")
            elif isinstance(plain, (list, dict)):
                values.append(json.dumps(plain, sort_keys=True, separators=(",", ":")))
            else:
                values.append(_text(plain))
        writer.writerow(values)
    return buf.getvalue()


def format_json(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A canonical JSON list of row objects."""
    return dumps_json([{n: _plain(v) for n, v in zip(names, row, strict=True)} for row in rows])


def run(catalog: Path, sql: str, fmt: str) -> str:
    """Run ``sql`` on the catalog and return the text to print in ``fmt`` (table|csv|json)."""
    if fmt not in FORMATS:
        msg = f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}"
        raise CtcurateError(msg)
    names, rows = fetch(catalog, sql)
    if fmt == "csv":
        return format_csv(names, rows)
    if fmt == "json":
        return format_json(names, rows)
    return format_table(names, rows)


def _site_rule(index_dir: Path) -> SiteRule:
    """The layout rule the index in ``index_dir`` was built with (its ``report.json``)."""
    from ctcurate.catalog.site import DEFAULT_RULE

    try:
        recorded = json.loads((index_dir / "report.json").read_text(encoding="utf-8"))
        return SiteRule.model_validate(recorded["site_from"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_RULE
