"""Parquet tables: deterministic, atomic writes and validated reads."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ctcurate.errors import InputError
from ctcurate.io.atomic import atomic_path


def write_parquet(path: Path, table: pa.Table) -> None:
    """Atomically write ``table`` to ``path``.

    The bytes depend only on the table: no statistics timestamps, fixed compression, one
    row group per 128k rows. Callers sort the table on a unique key before writing.
    """
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=131072,
            write_statistics=True,
            store_schema=True,
        )


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet table, failing with a clear message naming the file."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such Parquet file"
        raise InputError(msg)
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        msg = f"{path}: not a readable Parquet file ({exc.__class__.__name__})"
        raise InputError(msg) from exc
    except KeyError as exc:  # a requested column is missing
        msg = f"{path}: missing column {exc}"
        raise InputError(msg) from exc
    missing = [c for c in columns or [] if c not in table.column_names]
    if missing:
        msg = f"{path}: missing column(s) {', '.join(missing)}"
        raise InputError(msg)
    return table
