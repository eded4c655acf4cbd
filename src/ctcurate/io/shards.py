"""Sharded and streamed Parquet tables: bounded memory, deterministic bytes.

A sharded table is a folder of ``part-00000.parquet``, ``part-00001.parquet``, ... with a
fixed number of rows per shard (the last one shorter; an empty table is one empty shard).
Readers use the glob ``<folder>/part-*.parquet`` (DuckDB) or :func:`read_shards`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ctcurate.errors import InputError
from ctcurate.io.atomic import atomic_path
from ctcurate.io.tables import write_parquet

SHARD_GLOB = "part-*.parquet"
#: Rows per row group of a streamed file (as :func:`ctcurate.io.tables.write_parquet`).
ROW_GROUP = 131072


def shard_name(i: int) -> str:
    """File name of shard ``i``."""
    return f"part-{i:05d}.parquet"


def shard_paths(folder: Path) -> list[Path]:
    """The shards of a sharded table, in order; InputError if there is none."""
    folder = Path(folder)
    paths = sorted(folder.glob(SHARD_GLOB)) if folder.is_dir() else []
    if not paths:
        msg = f"{folder}: no Parquet shards ({SHARD_GLOB})"
        raise InputError(msg)
    return paths


def read_shards(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of a sharded table (for small tables and tests), in shard order."""
    tables = []
    for path in shard_paths(folder):
        try:
            tables.append(pq.read_table(path, columns=columns))
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            msg = f"{path}: not a readable Parquet shard ({exc.__class__.__name__})"
            raise InputError(msg) from exc
    return pa.concat_tables(tables)


def rebatch(batches: Iterable[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one shorter) cast to ``schema``.

    Batch sizes of a query engine vary; the cut points here depend only on the row count,
    so the written files do not.
    """
    pending: list[pa.Table] = []
    n = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(pa.Table.from_batches([batch]))
        n += batch.num_rows
        while n >= rows:
            table = pa.concat_tables(pending)
            yield table.slice(0, rows).cast(schema)
            rest = table.slice(rows)
            pending, n = ([rest] if rest.num_rows else []), rest.num_rows
    if n:
        yield pa.concat_tables(pending).cast(schema)


def write_shards(
    folder: Path, batches: Iterable[pa.RecordBatch], schema: pa.Schema, shard_size: int
) -> int:
    """Write ``batches`` as shards of ``shard_size`` rows into ``folder``; return the rows.

    At least one shard is written (an empty one for no rows) so that a glob over the
    folder always has a schema.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    total, i = 0, 0
    for table in rebatch(batches, schema, shard_size):
        write_parquet(folder / shard_name(i), table)
        total += table.num_rows
        i += 1
    if i == 0:
        write_parquet(folder / shard_name(0), schema.empty_table())
    return total


def write_parquet_stream(path: Path, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> int:
    """Atomically write ``batches`` as one Parquet file, one row group at a time.

    Memory holds one row group (:data:`ROW_GROUP` rows); the bytes depend only on the rows.
    Returns the number of rows written.
    """
    total = 0
    with (
        atomic_path(Path(path)) as tmp,
        contextlib.closing(
            pq.ParquetWriter(
                tmp, schema, compression="zstd", write_statistics=True, store_schema=True
            )
        ) as writer,
    ):
        for table in rebatch(batches, schema, ROW_GROUP):
            writer.write_table(table, row_group_size=ROW_GROUP)
            total += table.num_rows
        if total == 0:
            writer.write_table(schema.empty_table())
    return total
