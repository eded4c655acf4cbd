"""The streaming, incremental, resumable build of an index folder.

Per run:

1. The snapshot listing is checked (every row has a path, no path twice).
2. Rows are reused, keyed on ``(path, size, mtime_ns)``, from the previous index in
   ``out`` (when its ``report.json`` names the same reader fingerprint) and from the
   chunks an interrupted run left in the work folder; files whose outcome may change
   without the file changing (:data:`RETRY_REASONS`, :data:`RETRY_FLAG`) are read again.
3. The other files are read in chunks on the executor; the results stream into work
   chunks of ``shard_size`` rows (one row group at a time, renamed when complete), so a
   killed run resumes where it stopped.
4. DuckDB joins the reused and the new rows into the ledger (a Parquet file in the work
   folder), applies the duplicate rules and streams ``instances/part-*.parquet``
   (``shard_size`` rows each), ``quarantine``, ``skipped`` and ``series`` out in key
   order; the folder is published atomically and the work folder removed.

Nothing holds all rows in memory: DuckDB runs on one thread under
``index.duckdb_memory_mb`` and spills to the work folder beyond, and Python sees one
chunk, row group or batch at a time. The output bytes depend only on
the listing, the files and the reader, never on worker count, chunking, reuse or resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom

from ctcurate.catalog import scan
from ctcurate.catalog.site import DEFAULT_RULE, site_sql
from ctcurate.catalog.tables import (
    INSTANCE_SCHEMA,
    LEDGER_SCHEMA,
    PHI_CENSUS_VIEW,
    REASON_SCHEMA,
    SERIES_COPIED,
    SERIES_SCHEMA,
    SHARED_FLAG,
    VIEWS,
    build_report,
    duplicate_outcomes,
    phi_census_sql,
    series_table,
)
from ctcurate.dicom import archive_file, phi
from ctcurate.dicom import header as dicom
from ctcurate.errors import AccountingError, InputError
from ctcurate.io.atomic import fsync_dir, write_json
from ctcurate.io.outputs import guarded_output, marked_dir
from ctcurate.io.shards import SHARD_GLOB, rebatch, shard_name, write_parquet_stream
from ctcurate.io.tables import write_parquet
from ctcurate.log import get_logger, progress
from ctcurate.params import IndexParams, SiteRule

if TYPE_CHECKING:
    import duckdb

log = get_logger("index")

#: Outcomes read again on every run: they depend on more than the file's bytes (load,
#: installed decoders, other files) or need the header to be re-applied.
RETRY_REASONS = (
    "timeout",
    "unreadable",
    "unsupported_transfer_syntax",
    "uid_conflict",
    "duplicate_identical",
    "worker_died",
)
#: Rows with this flag were read from a file that changed after the listing: read again.
RETRY_FLAG = "changed_since_snapshot"
INSTANCES_DIR = "instances"
WORK_PARTS = "parts"
#: DuckDB settings of the build. Memory is ``index.duckdb_memory_mb`` (small: peak RSS
#: must not grow with the archive; DuckDB sorts, joins, aggregates and windows out of core,
#: spilling to the work folder). One thread: each thread holds its own sort and hash
#: buffers under that limit. Every query whose row order matters says ORDER BY.
#: Options of the build's COPY to Parquet: small row groups (the writer buffers one).
COPY_OPTIONS = "(FORMAT parquet, ROW_GROUP_SIZE 8192)"
DUCKDB_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "threads": 1,
    "preserve_insertion_order": False,
}
#: Rows per Arrow batch fetched from DuckDB.
BATCH_ROWS = 8192
#: Source modules whose code decides the rows (part of the reader fingerprint).
READER_MODULES = (
    "dicom/header.py",
    "dicom/checks.py",
    "dicom/record.py",
    "dicom/lean.py",
    "dicom/archive_file.py",
    "dicom/phi.py",
    "io/paths.py",
    "catalog/site.py",
)
#: Suffix of a work chunk being written (never read as a chunk).
TMP_SUFFIX = ".parquet.tmp"


@dataclass(frozen=True)
class IndexStats:
    """What one run did: files listed, files whose headers it read, rows it reused."""

    files_seen: int
    files_read: int
    files_reused: int


def reader_fingerprint(
    max_bytes: int, site_from: SiteRule | None = None, policy: str = "default"
) -> str:
    """Hash of everything that decides a file's row: reader code, pydicom, size cap, the
    site rule (``None``: the default) and the PHI policy (``policy``: its fingerprint)."""
    digest = hashlib.sha256()
    digest.update(f"pydicom {pydicom.__version__}\nmax_bytes {max_bytes}\n".encode())
    if site_from is not None and site_from != DEFAULT_RULE:
        digest.update(f"site_from {site_from.model_dump_json()}\n".encode())
    digest.update(f"phi {policy}\n".encode())
    folder = Path(dicom.__file__).parents[1]  # the ctcurate package
    for name in READER_MODULES:
        digest.update(name.encode() + b"\n" + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def work_dir(out: Path) -> Path:
    """The work folder of ``out``: chunks of an unfinished run (removed on success)."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def sha256_or_none(
    archive: Path, path: str, max_bytes: int = archive_file.DEFAULT_MAX_BYTES
) -> str | None:
    """Hex sha256 of the DICOM bytes of an archive file (decompressed when gzip, under
    ``max_bytes``), ``None`` if it cannot be read or is no longer a regular file (never a
    FIFO, a device or a link): a ``.dcm.gz`` copy of a ``.dcm`` file is the same instance."""
    digest = hashlib.sha256()
    try:
        with archive_file.open_instance(archive.joinpath(*path.split("/")), max_bytes) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except (OSError, archive_file.InflateError):
        return None
    return digest.hexdigest()


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


#: The DuckDB catalog's file name inside an index folder.
CATALOG_FILE = "catalog.duckdb"
#: The stage name (its output folder's marker) and what it writes into that folder.
STAGE = "index"
OWN_FILES = (
    INSTANCES_DIR,
    "series.parquet",
    "quarantine.parquet",
    "skipped.parquet",
    CATALOG_FILE,
    "report.json",
)


def view_source(view: str) -> str:
    """The Parquet file (or glob) the catalog view ``view`` reads, relative to its folder."""
    return f"{INSTANCES_DIR}/{SHARD_GLOB}" if view == INSTANCES_DIR else f"{view}.parquet"


def write_catalog(folder: Path, site_from: SiteRule = DEFAULT_RULE) -> None:
    """``catalog.duckdb`` in ``folder``: views over the Parquet files, by relative path;
    the PHI census sites quarantined files by the layout rule ``site_from``."""
    import duckdb

    con = duckdb.connect(str(folder / CATALOG_FILE))
    try:
        con.execute(f"SET file_search_path = {_sql_text(str(Path(folder).resolve()))}")
        for view in VIEWS:
            source = _sql_text(view_source(view))
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet({source})")
        census = phi_census_sql("instances", "quarantine", site_sql(site_from))
        con.execute(f"CREATE VIEW {PHI_CENSUS_VIEW} AS {census}")
        con.execute("CHECKPOINT")
    finally:
        con.close()


# --- listing and reuse ---------------------------------------------------------------------


def check_listing(con: duckdb.DuckDBPyConnection, snapshot: Path) -> int:
    """Create the view ``listing`` over the snapshot; return its row count.

    Raises InputError naming the file when it is missing, lacks a column, has a row
    without a path or lists a path twice.
    """
    snapshot = Path(snapshot)
    if not snapshot.is_file():
        msg = f"{snapshot}: no such Parquet file"
        raise InputError(msg)
    try:
        names = pq.read_schema(snapshot).names
    except (pa.ArrowInvalid, OSError) as exc:
        msg = f"{snapshot}: not a readable Parquet file ({exc.__class__.__name__})"
        raise InputError(msg) from exc
    missing = [c for c in ("path", "size", "mtime_ns") if c not in names]
    if missing:
        msg = f"{snapshot}: missing column(s) {', '.join(missing)}"
        raise InputError(msg)
    con.execute(
        "CREATE VIEW listing AS SELECT path::VARCHAR AS path, "
        "coalesce(size, -1)::BIGINT AS size, coalesce(mtime_ns, -1)::BIGINT AS mtime_ns "
        f"FROM read_parquet({_sql_text(str(snapshot.resolve()))})"
    )
    (n, n_path, n_distinct) = con.execute(
        "SELECT count(*), count(path), count(DISTINCT path) FROM listing"
    ).fetchall()[0]
    if n_path < n:
        msg = f"{snapshot}: {n - n_path} row(s) have no path"
        raise InputError(msg)
    if n_distinct < n:
        msg = f"{snapshot}: a path is listed twice ({n - n_distinct} repeated row(s))"
        raise InputError(msg)
    return int(n)


def _previous_index(out: Path, reader: str) -> Path | None:
    """``out`` when it holds a finished index written by the same reader."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("reader") != reader:
        log.info("previous index absent or from another reader: every file is read")
        return None
    needed = [out / "quarantine.parquet", out / "skipped.parquet"]
    if not all(p.is_file() for p in needed) or not list((out / INSTANCES_DIR).glob(SHARD_GLOB)):
        return None
    return out


def _instance_columns(prefix: str = "") -> str:
    return ", ".join(prefix + name for name in INSTANCE_SCHEMA.names)


def _ledger_sources(prev: Path | None, parts: Path, *, reusable_only: bool) -> str:
    """SQL of the ledger rows available before reading: previous index + work chunks.

    Each row carries ``src`` (0 work chunk, 1 previous index) and ``part`` (the chunk's
    file name; later chunks win) for picking one row per path.
    """
    retry = ", ".join(_sql_text(r) for r in RETRY_REASONS)
    keep = (
        f"coalesce(reason, '') NOT IN ({retry}) "
        f"AND NOT coalesce(list_contains(flags, {_sql_text(RETRY_FLAG)}), false)"
    )
    selects = ["SELECT 0 AS src, '' AS part, * FROM ledger_schema"]
    if list(parts.glob("*.parquet")):
        glob = _sql_text(str((parts / "*.parquet").resolve()))
        where = f"WHERE {keep}" if reusable_only else ""
        selects.append(
            "SELECT 0 AS src, parse_filename(filename) AS part, * EXCLUDE (filename) "
            f"FROM read_parquet({glob}, filename = true) {where}"
        )
    if prev is not None:
        other = [n for n in INSTANCE_SCHEMA.names if n not in {"path", "size", "mtime_ns"}]
        cols = ", ".join(n for n in other if n != "flags")
        inst = _sql_text(str((prev / INSTANCES_DIR / SHARD_GLOB).resolve()))
        selects.append(
            "SELECT 1 AS src, '' AS part, path, size, mtime_ns, 'indexed' AS status, "
            f"NULL::VARCHAR AS reason, NULL::VARCHAR AS detail, {cols}, "
            f"list_filter(flags, lambda f: f <> {_sql_text(SHARED_FLAG)}) AS flags "
            f"FROM read_parquet({inst}) "
            f"WHERE NOT list_contains(flags, {_sql_text(RETRY_FLAG)})"
        )
        for name, status in (("quarantine", "quarantined"), ("skipped", "skipped")):
            src = _sql_text(str((prev / f"{name}.parquet").resolve()))
            selects.append(
                f"SELECT 1 AS src, '' AS part, path, size, mtime_ns, '{status}' AS status, "
                f"reason, detail FROM read_parquet({src}) "
                f"WHERE reason NOT IN ({retry})"
            )
    return "\nUNION ALL BY NAME\n".join(selects)


# --- reading --------------------------------------------------------------------------------


def _todo_chunks(todo: Path, per_chunk: int) -> Iterator[list[scan.Entry]]:
    for batch in pq.ParquetFile(todo).iter_batches(batch_size=per_chunk):
        cols = batch.to_pydict()
        yield list(zip(cols["path"], cols["size"], cols["mtime_ns"], strict=True))


#: Rows of read results buffered before they are written as one row group of a work chunk.
PART_ROW_GROUP = 8192


def _finish_part(tmp: Path, final: Path) -> None:
    """Publish a finished work chunk under its final name (the unit a resumed run keeps)."""
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    tmp.replace(final)
    fsync_dir(final.parent)


class _PartWriter:
    """Streams the rows read by this run into work chunks of about ``shard_size`` rows.

    Rows go to a temporary file one row group (:data:`PART_ROW_GROUP` rows) at a time;
    a chunk gets its final name (``chunk-<attempt>-<seq>.parquet``) only once complete,
    so a killed run leaves finished chunks and at most one temporary file (ignored and
    removed by the next run). Memory holds one row group, whatever the archive size.
    """

    def __init__(self, parts: Path, attempt: int, shard_size: int) -> None:
        self.parts, self.attempt, self.shard_size = parts, attempt, shard_size
        self.seq = 0
        self._pending: list[pa.Table] = []
        self._n_pending = 0
        self._n_part = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None

    def add(self, table: pa.Table) -> None:
        """Append the rows of one chunk of results."""
        self._pending.append(table)
        self._n_pending += table.num_rows
        self._n_part += table.num_rows
        if self._n_pending >= PART_ROW_GROUP:
            self._flush()
        if self._n_part >= self.shard_size:
            self._close_part()

    def close(self) -> None:
        """Finish the last chunk."""
        if self._n_part:
            self._close_part()

    def abort(self) -> None:
        """Drop the unfinished chunk (finished chunks stay for a resumed run)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._tmp = self.parts / f".chunk-{self.attempt:04d}-{self.seq:06d}{TMP_SUFFIX}"
            self._writer = pq.ParquetWriter(self._tmp, LEDGER_SCHEMA, compression="zstd")
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=PART_ROW_GROUP)
        self._pending, self._n_pending = [], 0

    def _close_part(self) -> None:
        self._flush()
        if self._writer is None or self._tmp is None:  # no row since the last chunk
            return
        self._writer.close()
        final = self.parts / f"chunk-{self.attempt:04d}-{self.seq:06d}.parquet"
        _finish_part(self._tmp, final)
        self._writer, self._tmp = None, None
        self._n_part, self.seq = 0, self.seq + 1


def _read_files(
    archive: Path,
    todo: Path,
    n_todo: int,
    parts: Path,
    params: IndexParams,
    scheduler: str | None,
    policy: phi.Policy,
) -> None:
    """Read the files listed in ``todo``; write their rows to ``parts`` in chunks."""
    attempts = [int(p.name.split("-")[1]) for p in parts.glob("chunk-*.parquet")]
    attempt = max(attempts, default=0) + 1
    per_chunk = max(1, min(params.chunk_files, math.ceil(n_todo / (4 * params.workers))))
    results = scan.run_chunks(
        _todo_chunks(todo, per_chunk),
        str(archive),
        int(params.max_file_mb * 2**20),
        params.timeout_s,
        params.workers,
        scheduler,
        params.site_from,
        policy,
    )

    def per_file() -> Iterator[pa.Table | None]:
        for table in results:
            yield from repeat(None, table.num_rows - 1)
            yield table

    writer = _PartWriter(parts, attempt, params.shard_size)
    try:
        for item in progress(per_file(), n_todo, "index", log):
            if item is not None:
                writer.add(item)
        writer.close()
    finally:
        writer.abort()


# --- publishing ------------------------------------------------------------------------------


def _stream(con: duckdb.DuckDBPyConnection, sql: str) -> Iterator[pa.RecordBatch]:
    yield from con.sql(sql).to_arrow_reader(BATCH_ROWS)


def _series_batches(con: duckdb.DuckDBPyConnection, folder: Path) -> Iterator[pa.RecordBatch]:
    """Series rows from the written instance shards, one batch of whole series at a time."""
    needed = [
        "path",
        "site",
        "series_instance_uid",
        *SERIES_COPIED,
        "image_position_x",
        "image_position_y",
        "image_position_z",
        "image_orientation",
        "flags",
    ]
    cols = ", ".join(dict.fromkeys(needed))
    glob = _sql_text(str((folder / INSTANCES_DIR / SHARD_GLOB).resolve()))
    sql = (
        f"SELECT {cols} FROM read_parquet({glob}) "
        "ORDER BY site ASC NULLS LAST, series_instance_uid, path"
    )
    carry: pa.Table | None = None
    for batch in _stream(con, sql):
        table = pa.Table.from_batches([batch])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        sites = table["site"].to_pylist()
        uids = table["series_instance_uid"].to_pylist()
        last = (sites[-1], uids[-1])
        start = len(sites) - 1
        while start > 0 and (sites[start - 1], uids[start - 1]) == last:
            start -= 1
        carry = table.slice(start)
        if start:
            yield from series_table(table.slice(0, start)).to_batches()
    if carry is not None and carry.num_rows:
        yield from series_table(carry).to_batches()


#: Rows per row group of an ``instances`` shard (memory holds one row group, not a shard).
INSTANCE_ROW_GROUP = 8192


def write_instance_shards(folder: Path, batches: Iterator[pa.RecordBatch], shard_size: int) -> int:
    """Write ``batches`` as ``instances`` shards of ``shard_size`` rows; return the rows.

    Each shard is streamed one row group (:data:`INSTANCE_ROW_GROUP` rows) at a time, so
    memory does not grow with the shard size. Row groups and shards are cut at row counts
    only: the bytes depend on the rows alone. At least one (empty) shard is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    total, shard, in_shard = 0, 0, 0
    writer: pq.ParquetWriter | None = None
    try:
        for table in rebatch(batches, INSTANCE_SCHEMA, min(INSTANCE_ROW_GROUP, shard_size)):
            rest = table
            while rest.num_rows:
                if writer is None:
                    writer = pq.ParquetWriter(
                        folder / shard_name(shard),
                        INSTANCE_SCHEMA,
                        compression="zstd",
                        write_statistics=True,
                        store_schema=True,
                    )
                take = min(rest.num_rows, shard_size - in_shard)
                writer.write_table(rest.slice(0, take), row_group_size=INSTANCE_ROW_GROUP)
                rest = rest.slice(take)
                in_shard, total = in_shard + take, total + take
                if in_shard == shard_size:
                    writer.close()
                    writer, shard, in_shard = None, shard + 1, 0
    finally:
        if writer is not None:
            writer.close()
    if total == 0:
        write_parquet(folder / shard_name(0), INSTANCE_SCHEMA.empty_table())
    return total


def _publish(
    con: duckdb.DuckDBPyConnection,
    archive: Path,
    out: Path,
    params: IndexParams,
    files_seen: int,
    reader: str,
) -> dict[str, Any]:
    """Apply the duplicate rules to the ``ledger`` table and write the index folder."""
    groups = [
        list(row[0])
        for row in con.execute(
            # keys first (a plain aggregate spills), then lists for the few duplicates only
            "WITH dup AS (SELECT coalesce(site, '') AS s, sop_instance_uid AS u FROM ledger "
            "WHERE status = 'indexed' GROUP BY 1, 2 HAVING count(*) > 1) "
            "SELECT list(l.path ORDER BY l.path) FROM ledger l JOIN dup "
            "ON coalesce(l.site, '') = dup.s AND l.sop_instance_uid IS NOT DISTINCT FROM dup.u "
            "WHERE l.status = 'indexed' GROUP BY dup.s, dup.u ORDER BY 1"
        ).fetchall()
    ]
    max_bytes = int(params.max_file_mb * 2**20)
    taken = duplicate_outcomes(groups, lambda p: sha256_or_none(archive, p, max_bytes))
    overrides = pa.table(
        {
            k: pa.array([t[i] for t in taken], pa.string())
            for i, k in enumerate(("path", "status", "reason", "detail"))
        }
    )
    con.register("overrides", overrides)
    con.execute(
        "CREATE TEMP TABLE shared AS SELECT sop_instance_uid FROM ledger "
        "WHERE status = 'indexed' AND path NOT IN (SELECT path FROM overrides) "
        "GROUP BY sop_instance_uid HAVING count(DISTINCT coalesce(site, '')) > 1"
    )
    cols = ", ".join(f"l.{n}" for n in INSTANCE_SCHEMA.names if n != "flags")
    instances_sql = (
        f"SELECT {cols}, CASE WHEN s.sop_instance_uid IS NULL THEN l.flags "
        f"ELSE list_sort(list_distinct(list_append(l.flags, {_sql_text(SHARED_FLAG)}))) "
        "END AS flags FROM ledger l LEFT JOIN shared s USING (sop_instance_uid) "
        "WHERE l.status = 'indexed' AND l.path NOT IN (SELECT path FROM overrides) "
        "ORDER BY l.path"
    )

    def reasons_sql(status: str) -> str:
        return (
            "SELECT path, size, mtime_ns, reason, detail FROM ("
            f"SELECT path, size, mtime_ns, reason, detail FROM ledger WHERE status = '{status}' "
            "UNION ALL SELECT o.path, l.size, l.mtime_ns, o.reason, o.detail "
            f"FROM overrides o JOIN ledger l USING (path) WHERE o.status = '{status}'"
            ") ORDER BY path"
        )

    with marked_dir(out, STAGE) as tmp:
        n_indexed = write_instance_shards(
            tmp / INSTANCES_DIR, _stream(con, instances_sql), params.shard_size
        )
        write_parquet_stream(
            tmp / "quarantine.parquet", _stream(con, reasons_sql("quarantined")), REASON_SCHEMA
        )
        write_parquet_stream(
            tmp / "skipped.parquet", _stream(con, reasons_sql("skipped")), REASON_SCHEMA
        )
        n_series = write_parquet_stream(
            tmp / "series.parquet", _series_batches(con, tmp), SERIES_SCHEMA
        )
        counts = {}
        for name in ("quarantine", "skipped"):
            src = _sql_text(str((tmp / f"{name}.parquet").resolve()))
            counts[name] = dict(
                con.execute(
                    f"SELECT reason, count(*) FROM read_parquet({src}) GROUP BY reason"
                ).fetchall()
            )
        shards = _sql_text(str((tmp / INSTANCES_DIR / SHARD_GLOB).resolve()))
        quarantined = _sql_text(str((tmp / "quarantine.parquet").resolve()))
        census = phi_census_sql(
            f"read_parquet({shards})", f"read_parquet({quarantined})", site_sql(params.site_from)
        )
        report = build_report(
            files_seen,
            n_indexed,
            counts["quarantine"],
            counts["skipped"],
            n_series,
            reader,
            con.execute(census).fetchall(),
        )
        report["site_from"] = params.site_from.model_dump(mode="json", exclude_none=True)
        write_catalog(tmp, params.site_from)
        write_json(tmp / "report.json", report)
    return report


def _prepare_work(out: Path, stamp: str) -> Path:
    """The work folder's chunk folder; chunks of another reader or archive are dropped,
    and so are the unfinished chunk and the DuckDB spill files of a killed run."""
    work = work_dir(out)
    stamp_file = work / "reader"
    if work.exists() and (not stamp_file.is_file() or stamp_file.read_text() != stamp):
        shutil.rmtree(work)
    parts = work / WORK_PARTS
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(f"*{TMP_SUFFIX}"):
        stale.unlink()
    shutil.rmtree(work / "duckdb", ignore_errors=True)
    stamp_file.write_text(stamp)
    return parts


def index_archive(
    archive: Path,
    snapshot: Path,
    out: Path,
    params: IndexParams,
    scheduler: str | None = None,
) -> IndexStats:
    """Index every file of the ``snapshot`` listing of ``archive`` into the folder ``out``.

    Reuses the rows of unchanged files from a previous index in ``out`` and from the work
    folder of an interrupted run (see the module docstring); returns what it did. ``out``
    must be absent, empty or a previous index (see :func:`ctcurate.io.outputs.guarded_output`);
    a second run into the same ``out`` fails fast.
    """
    archive, out = Path(archive), Path(out)
    if not archive.is_dir():
        msg = f"{archive}: archive folder not found"
        raise InputError(msg)
    with guarded_output(out, STAGE, inputs=[archive, snapshot], own=OWN_FILES):
        return _index_archive(archive, snapshot, out, params, scheduler)


def _index_archive(
    archive: Path, snapshot: Path, out: Path, params: IndexParams, scheduler: str | None
) -> IndexStats:
    import duckdb

    policy = params.phi.compiled()
    reader = reader_fingerprint(
        int(params.max_file_mb * 2**20), params.site_from, policy.fingerprint
    )
    config = DUCKDB_CONFIG | {"memory_limit": f"{params.duckdb_memory_mb}MB"}
    con = duckdb.connect(":memory:", config=config)
    try:
        parts = _prepare_work(out, f"{reader} {archive.resolve()}\n")
        con.execute(f"SET temp_directory = {_sql_text(str((parts.parent / 'duckdb').resolve()))}")
        try:
            files_seen = check_listing(con, Path(snapshot))
        except InputError:
            if not list(parts.glob("chunk-*.parquet")):  # nothing of an earlier run to keep
                shutil.rmtree(work_dir(out), ignore_errors=True)
            raise
        con.register("ledger_schema", LEDGER_SCHEMA.empty_table())
        prev = _previous_index(out, reader)
        reusable = _ledger_sources(prev, parts, reusable_only=True)
        todo = parts.parent / "todo.parquet"
        con.execute(
            "COPY (SELECT l.path, l.size, l.mtime_ns FROM listing l "
            f"ANTI JOIN ({reusable}) r ON l.path = r.path AND l.size = r.size "
            "AND l.mtime_ns = r.mtime_ns ORDER BY l.path) "
            f"TO {_sql_text(str(todo.resolve()))} {COPY_OPTIONS}"
        )
        n_todo = pq.ParquetFile(todo).metadata.num_rows
        log.info(
            "listing holds %d files: %d reused, %d to read on %s",
            files_seen,
            files_seen - n_todo,
            n_todo,
            "a Dask cluster" if scheduler else f"{params.workers} worker(s)",
        )
        if n_todo:
            _read_files(archive, todo, n_todo, parts, params, scheduler, policy)
        sources = _ledger_sources(prev, parts, reusable_only=False)
        names = ", ".join(f"x.{n}" for n in LEDGER_SCHEMA.names)
        # one row per listed path: a work chunk's (the latest) before the previous index's;
        # the winner is found on narrow columns (an aggregate and a join: both spill)
        # and the ledger goes to a Parquet file, not to DuckDB's memory
        ledger = _sql_text(str((parts.parent / "ledger.parquet").resolve()))
        con.execute(
            "COPY (WITH x AS NOT MATERIALIZED ("
            f"SELECT s.* FROM ({sources}) s JOIN listing l "
            "ON s.path = l.path AND s.size = l.size AND s.mtime_ns = l.mtime_ns), "
            "win AS (SELECT path, min(src) AS src, max(part) FILTER (WHERE src = 0) AS part "
            "FROM x GROUP BY path) "
            f"SELECT {names} FROM x JOIN win ON x.path = win.path AND x.src = win.src "
            f"AND x.part = coalesce(win.part, '')) TO {ledger} {COPY_OPTIONS}"
        )
        con.execute(f"CREATE VIEW ledger AS SELECT * FROM read_parquet({ledger})")
        (n_ledger,) = con.execute("SELECT count(*) FROM ledger").fetchall()[0]
        if n_ledger != files_seen:
            msg = f"index does not balance: {files_seen} files listed, {n_ledger} read or reused"
            raise AccountingError(msg)
        report = _publish(con, archive, out, params, files_seen, reader)
    except duckdb.OutOfMemoryException:
        msg = (
            f"{out}: the index tables outgrew DuckDB's memory limit "
            f"(index.duckdb_memory_mb = {params.duckdb_memory_mb}); raise it and run again "
            "(finished chunks are kept)"
        )
        raise InputError(msg) from None
    finally:
        con.close()
    shutil.rmtree(work_dir(out), ignore_errors=True)
    log.info(
        "indexed %d, quarantined %d, skipped %d of %d files; %d series",
        report["files_indexed"],
        report["files_quarantined"],
        report["files_skipped"],
        files_seen,
        report["series"],
    )
    return IndexStats(files_seen=files_seen, files_read=n_todo, files_reused=files_seen - n_todo)
