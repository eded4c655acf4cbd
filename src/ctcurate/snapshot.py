"""snapshot: list the archive root into one sorted Parquet listing.

DVC hashes this one file instead of every image of the archive, so ``dvc repro`` reruns
``index`` only when a file was added, removed, resized or touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from ctcurate.errors import InputError
from ctcurate.io.outputs import guarded_output
from ctcurate.io.tables import write_parquet
from ctcurate.log import get_logger
from ctcurate.params import SnapshotParams

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
    ]
)

log = get_logger("snapshot")


def _walk(root: Path, ignore: frozenset[str]) -> Iterator[tuple[str, int, int]]:
    """Yield (relative POSIX path, size, mtime_ns) of every regular file under ``root``.

    Symbolic links are not followed; a file that vanishes or cannot be stat-ed while the
    walk runs is still listed (size -1) so that ``index`` accounts for it.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("cannot list a folder (%s); its files are not listed", type(exc).__name__)
            continue
        for entry in entries:
            if entry.name in ignore:
                continue
            rel = Path(entry.path).relative_to(root).as_posix()
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                yield rel, -1, -1
                continue
            yield rel, st.st_size, st.st_mtime_ns


def list_archive(archive: Path, ignore: Sequence[str] = ()) -> pa.Table:
    """Return the sorted listing (path, size, mtime_ns) of every file under ``archive``."""
    archive = Path(archive)
    if not archive.is_dir():
        msg = f"{archive}: archive folder not found"
        raise InputError(msg)
    rows = sorted(_walk(archive, frozenset(ignore)))
    return pa.table(
        {
            "path": pa.array([r[0] for r in rows], pa.string()),
            "size": pa.array([r[1] for r in rows], pa.int64()),
            "mtime_ns": pa.array([r[2] for r in rows], pa.int64()),
        },
        schema=SCHEMA,
    )


def run(archive: Path, out: Path, params: SnapshotParams) -> None:
    """List ``archive`` into the Parquet file ``out`` (atomically)."""
    with guarded_output(Path(out), "snapshot", inputs=[archive], folder=False):
        table = list_archive(archive, params.ignore)
        write_parquet(out, table)
    total = sum(v for v in table.column("size").to_pylist() if v > 0)
    log.info("listed %d files, %d bytes", table.num_rows, total)
