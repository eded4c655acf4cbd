"""The header scan of ``index``: one chunk function, two executors.

:func:`scan_chunk` reads a chunk of listed files and returns their ledger rows as an Arrow
table. :func:`run_chunks` maps it over chunks with :mod:`ctcurate.executor` (a local process
pool or a Dask distributed cluster, the executor ``select`` scores with too) and yields the
results as they complete, with at most a few chunks in flight so that memory stays bounded.
A worker that dies on a chunk costs one file: the chunk is read again file by file and the
file whose worker died alone is quarantined ``worker_died``.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterable, Iterator
from functools import partial

import pyarrow as pa

from ctcurate import executor
from ctcurate.catalog.site import DEFAULT_RULE, site_of
from ctcurate.catalog.tables import ledger_table
from ctcurate.dicom import header as dicom
from ctcurate.dicom import phi
from ctcurate.params import SiteRule

Entry = tuple[str, int, int]


def scan_chunk(
    archive: str,
    entries: list[Entry],
    max_bytes: int,
    timeout_s: float,
    site_from: SiteRule = DEFAULT_RULE,
    policy: phi.Policy = phi.DEFAULT_POLICY,
) -> pa.Table:
    """Ledger rows of ``entries`` (``(path, size, mtime_ns)``) read under ``archive``,
    identifying attributes judged by the PHI ``policy``.

    Each row's site follows the layout rule ``site_from`` (:mod:`ctcurate.catalog.site`).

    The per-file time cap is SIGALRM where the chunk runs on a process's main thread (the
    local pool), a watcher thread on the threads of a Dask worker; the size caps apply
    everywhere.
    """
    if threading.current_thread() is threading.main_thread():
        if dicom.timeout_s() != timeout_s:
            dicom.init_worker(timeout_s)
    else:
        dicom.quiet_pydicom()
    if site_from != DEFAULT_RULE:  # rows and per-site PHI rules follow the layout rule
        policy = dataclasses.replace(policy, site_rule=partial(site_of, rule=site_from))
    return ledger_table(dicom.scan_files(archive, entries, max_bytes, timeout_s, policy))


def run_chunks(
    chunks: Iterable[list[Entry]],
    archive: str,
    max_bytes: int,
    timeout_s: float,
    workers: int,
    scheduler: str | None,
    site_from: SiteRule = DEFAULT_RULE,
    policy: phi.Policy = phi.DEFAULT_POLICY,
) -> Iterator[pa.Table]:
    """Yield :func:`scan_chunk` of every chunk, in completion order."""
    if scheduler is None and workers == 1:
        yield from _run_here(chunks, archive, max_bytes, timeout_s, site_from, policy)
        return
    yield from executor.map_unordered(
        partial(
            scan_chunk,
            archive,
            max_bytes=max_bytes,
            timeout_s=timeout_s,
            site_from=site_from,
            policy=policy,
        ),
        chunks,
        workers=workers,
        scheduler=scheduler,
        initializer=dicom.init_worker,
        initargs=(timeout_s,),
        on_died=died_chunk,
        split=one_by_one,
    )


#: Detail of a file whose reading process died (OOM kill, crash in native code).
DIED_DETAIL = "the reading process died (killed by the OS or crashed)"


def one_by_one(chunk: list[Entry]) -> list[list[Entry]]:
    """A chunk cut into one-file chunks (to find the file a dead worker was reading)."""
    return [[entry] for entry in chunk]


def died_chunk(chunk: list[Entry]) -> pa.Table:
    """Ledger rows of a chunk whose worker died reading it alone: quarantined ``worker_died``."""
    return ledger_table(
        dicom.FileOutcome(path, "quarantined", "worker_died", DIED_DETAIL, None, size, mtime)
        for path, size, mtime in chunk
    )


def _run_here(
    chunks: Iterable[list[Entry]],
    archive: str,
    max_bytes: int,
    timeout_s: float,
    site_from: SiteRule,
    policy: phi.Policy,
) -> Iterator[pa.Table]:
    """One worker: read in this process (no start-up cost), restoring its alarm handler."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGALRM) if main else None
    try:
        for chunk in chunks:
            yield scan_chunk(archive, chunk, max_bytes, timeout_s, site_from, policy)
    finally:
        if main:
            dicom.init_worker(0)
            signal.signal(signal.SIGALRM, previous)
