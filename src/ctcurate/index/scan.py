"""The header scan of ``index``: one chunk function, two executors.

:func:`scan_chunk` reads a chunk of listed files and returns their ledger rows as an Arrow
table. :func:`run_chunks` maps it over chunks on a local process pool or on a Dask
distributed cluster (the same function, another executor) and yields the results as they
complete, with at most a few chunks in flight so that memory stays bounded.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import pyarrow as pa

from ctcurate.errors import InputError
from ctcurate.index.tables import ledger_table
from ctcurate.io import dicom

Entry = tuple[str, int, int]
#: Chunks in flight per worker: enough to keep workers busy, few enough to bound memory.
IN_FLIGHT_PER_WORKER = 2
#: Seconds to wait for a Dask scheduler to answer.
CONNECT_TIMEOUT_S = 30.0


def scan_chunk(archive: str, entries: list[Entry], max_bytes: int, timeout_s: float) -> pa.Table:
    """Ledger rows of ``entries`` (``(path, size, mtime_ns)``) read under ``archive``.

    The per-file time cap is SIGALRM where the chunk runs on a process's main thread (the
    local pool), a watcher thread on the threads of a Dask worker; the size caps apply
    everywhere.
    """
    if threading.current_thread() is threading.main_thread():
        if dicom.timeout_s() != timeout_s:
            dicom.init_worker(timeout_s)
    else:
        dicom.quiet_pydicom()
    return ledger_table(dicom.scan_files(archive, entries, max_bytes, timeout_s))


def run_chunks(
    chunks: Iterable[list[Entry]],
    archive: str,
    max_bytes: int,
    timeout_s: float,
    workers: int,
    scheduler: str | None,
) -> Iterator[pa.Table]:
    """Yield :func:`scan_chunk` of every chunk, in completion order."""
    if scheduler is not None:
        yield from _run_dask(chunks, archive, max_bytes, timeout_s, scheduler)
        return
    if workers == 1:
        yield from _run_here(chunks, archive, max_bytes, timeout_s)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=dicom.init_worker,
        initargs=(timeout_s,),
    ) as pool:

        def submit(chunk: list[Entry]) -> Future[pa.Table]:
            return pool.submit(scan_chunk, archive, chunk, max_bytes, timeout_s)

        yield from _bounded(chunks, submit, workers * IN_FLIGHT_PER_WORKER)


def _run_here(
    chunks: Iterable[list[Entry]], archive: str, max_bytes: int, timeout_s: float
) -> Iterator[pa.Table]:
    """One worker: read in this process (no start-up cost), restoring its alarm handler."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGALRM) if main else None
    try:
        for chunk in chunks:
            yield scan_chunk(archive, chunk, max_bytes, timeout_s)
    finally:
        if main:
            dicom.init_worker(0)
            signal.signal(signal.SIGALRM, previous)


def _bounded(chunks: Iterable[list[Entry]], submit: Any, limit: int) -> Iterator[pa.Table]:
    pending: set[Any] = set()
    for chunk in chunks:
        pending.add(submit(chunk))
        if len(pending) >= limit:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            yield future.result()


def _run_dask(
    chunks: Iterable[list[Entry]], archive: str, max_bytes: int, timeout_s: float, scheduler: str
) -> Iterator[pa.Table]:
    from distributed import Client, as_completed

    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)  # type: ignore[no-untyped-call]
    except OSError as exc:
        msg = f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__})"
        raise InputError(msg) from exc
    try:
        threads = client.nthreads()  # type: ignore[no-untyped-call]
        limit = max(1, sum(threads.values())) * IN_FLIGHT_PER_WORKER
        queue = as_completed(loop=client.loop)  # type: ignore[no-untyped-call]
        n = 0
        for chunk in chunks:
            future = client.submit(scan_chunk, archive, chunk, max_bytes, timeout_s, pure=False)
            queue.add(future)  # type: ignore[no-untyped-call]
            n += 1
            if n >= limit:
                yield next(queue).result()
                n -= 1
        for future in queue:
            yield future.result()
    finally:
        client.close()  # type: ignore[no-untyped-call]
