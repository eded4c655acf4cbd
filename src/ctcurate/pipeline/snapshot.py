"""snapshot: list the archive root into one sorted Parquet listing.

DVC hashes this one file instead of every image of the archive, so ``dvc repro`` reruns
``index`` only when a file was added, removed, resized or touched.

Every entry of the archive but its folders is listed, whatever it is: symbolic links,
FIFOs, sockets and device files are listed unfollowed and unopened (``index`` quarantines
them), a folder that cannot be listed is listed itself, a name that is not UTF-8 is listed
escaped. Nothing under the archive is opened, written or followed.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ctcurate.errors import InputError
from ctcurate.io.outputs import guarded_output
from ctcurate.io.paths import file_kind, listed_path
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


@dataclass
class _Tally:
    """What the walk met besides regular files (counts for the log, no names)."""

    unlistable: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    escaped: int = 0
    ambiguous: int = 0


def _walk(root: Path, ignore: frozenset[str], tally: _Tally) -> Iterator[tuple[str, int, int]]:
    """Yield (listing path, size, mtime_ns) of every entry under ``root`` but its folders.

    Nothing is followed or opened: a symbolic link (to a file or a folder, inside or outside
    the archive, dangling or looping), a FIFO, a socket or a device file is listed with its
    own ``lstat`` size and mtime, for ``index`` to quarantine. A folder that cannot be
    listed is listed itself (``index`` quarantines it ``unlistable_folder``). A file that
    vanishes or cannot be stat-ed while the walk runs is still listed (size -1). A name that
    is not UTF-8 is listed escaped (:func:`ctcurate.io.paths.listed_path`).
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            if folder == root:
                msg = f"{root}: archive folder cannot be listed ({type(exc).__name__})"
                raise InputError(msg) from exc
            tally.unlistable[type(exc).__name__] += 1
            listed, _ = listed_path(folder.relative_to(root).as_posix())
            yield listed, -1, -1
            continue
        for entry in entries:
            if entry.name in ignore:
                continue
            rel, escaped = listed_path(Path(entry.path).relative_to(root).as_posix())
            if escaped:
                if os.path.lexists(os.fsencode(root) + b"/" + rel.encode("utf-8")):
                    tally.ambiguous += 1  # a real file bears the escaped spelling
                    continue
                tally.escaped += 1
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                yield rel, -1, -1
                continue
            if not stat.S_ISREG(st.st_mode):
                tally.kinds[file_kind(st.st_mode)] += 1
            yield rel, st.st_size, st.st_mtime_ns


def list_archive(archive: Path, ignore: Sequence[str] = ()) -> pa.Table:
    """Return the sorted listing (path, size, mtime_ns) of every file under ``archive``."""
    archive = Path(archive)
    if not archive.is_dir():
        msg = f"{archive}: archive folder not found"
        raise InputError(msg)
    tally = _Tally()
    rows = sorted(_walk(archive, frozenset(ignore), tally))
    if tally.unlistable:
        which = ", ".join(f"{k} {v}" for k, v in sorted(tally.unlistable.items()))
        log.warning(
            "cannot list %d folder(s) (%s): listed for index to quarantine",
            sum(tally.unlistable.values()),
            which,
        )
    for kind, n in sorted(tally.kinds.items()):
        log.warning("%d %s entr(ies) listed, not followed: index quarantines them", n, kind)
    if tally.escaped:
        log.warning("%d name(s) not UTF-8: listed escaped, index quarantines them", tally.escaped)
    if tally.ambiguous:
        log.warning(
            "%d name(s) not UTF-8 whose escaped spelling is another file's name: not listed",
            tally.ambiguous,
        )
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
