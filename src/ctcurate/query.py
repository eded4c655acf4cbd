"""query: ad-hoc SQL over the index catalog (views instances, series, quarantine, skipped).

The catalog's views name their Parquet files relative to the catalog's folder; a
connection from :func:`connect` resolves them from there, whatever the working directory.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctcurate.errors import CtcurateError, InputError
from ctcurate.io.atomic import dumps_json

if TYPE_CHECKING:
    import duckdb

FORMATS = ("table", "csv", "json")
NULL_TEXT = "NULL"


def connect(catalog: Path) -> duckdb.DuckDBPyConnection:
    """Open ``catalog.duckdb`` read-only with its folder as the file search path.

    A catalog missing beside an index's ``series.parquet`` (after a ``dvc pull``: DVC does not
    track it, its bytes are not reproducible) is rebuilt first."""
    import duckdb

    from ctcurate.index.build import CATALOG_FILE, write_catalog

    catalog = Path(catalog)
    index_dir = catalog.parent
    if (
        not catalog.is_file()
        and catalog.name == CATALOG_FILE
        and (index_dir / "series.parquet").is_file()
    ):
        # an index without its catalog (DVC does not track it): views are cheap to rebuild
        try:
            write_catalog(index_dir)
        except (OSError, duckdb.Error) as exc:
            msg = f"{catalog}: cannot rebuild the catalog ({_first_line(exc)})"
            raise InputError(msg) from exc
    if not catalog.is_file():
        msg = f"{catalog}: catalog not found (run `ctcurate index` first)"
        raise InputError(msg)
    try:
        con = duckdb.connect(str(catalog), read_only=True)
    except duckdb.Error as exc:
        msg = f"{catalog}: not a readable DuckDB catalog ({_first_line(exc)})"
        raise InputError(msg) from exc
    folder = str(catalog.resolve().parent).replace("'", "''")
    con.execute(f"SET file_search_path = '{folder}'")
    return con


def fetch(catalog: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of ``sql`` run on the catalog."""
    import duckdb

    con = connect(catalog)
    try:
        cursor = con.execute(sql)
        if cursor.description is None:
            return [], []
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
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
