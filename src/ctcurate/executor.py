"""The executor the stages share for per-item work: this process, a local pool or Dask.

``index`` maps its header scan over chunks of files, ``select`` / ``select-train`` the
pneumonia scorer over rule survivors and ``pack`` the volume build over cases, all through
the same two functions:

* :func:`map_unordered` yields ``fn(item)`` in completion order with at most
  ``IN_FLIGHT_PER_WORKER`` items per worker in flight, so memory stays bounded however long
  the input is;
* :func:`map_ordered` returns the results in input order.

``scheduler`` (``tcp://HOST:PORT``) sends the work to a Dask distributed cluster (every
worker needs ctcurate installed and the archive at the same path); otherwise ``workers``
processes of a local pool do it, or this process when ``workers`` is 1. The pool's processes
are forked from a fresh server process that has imported ``fn``'s module (``forkserver``):
the stage's own process is never forked (it runs DuckDB and Arrow threads), and workers do
not each import scipy and pydicom again (``spawn`` where the platform has no fork). ``fn``
must be picklable (a module-level function or a :func:`functools.partial` of one).
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any, Generic, TypeVar

from ctcurate.errors import CtcurateError, InputError
from ctcurate.log import get_logger, progress

T = TypeVar("T")
R = TypeVar("R")

#: Items in flight per worker: enough to keep workers busy, few enough to bound memory.
IN_FLIGHT_PER_WORKER = 2
#: Seconds to wait for a Dask scheduler to answer.
CONNECT_TIMEOUT_S = 30.0

log = get_logger("executor")


def map_unordered(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    scheduler: str | None = None,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
    on_died: Callable[[T], R] | None = None,
    split: Callable[[T], Sequence[T]] | None = None,
) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in completion order.

    ``initializer(*initargs)`` runs once in each local pool process (not in this process
    nor on Dask workers: ``fn`` must set up what it needs there itself).

    A worker process that dies (killed by the OS, a crash in native code) costs the item
    that killed it, not the run: the items in flight on the broken pool (each cut into
    ``split(item)`` when given) are run again one at a time in a fresh pool; one that
    kills its worker alone gives ``on_died(item)`` (without ``on_died``:
    :class:`WorkerDiedError`), and the others go on in a fresh pool. A pool worker kills
    itself when the stage process dies (:func:`_init_worker`): no worker outlives it.
    """
    if scheduler is not None:
        yield from _run_dask(fn, items, scheduler, on_died, split)
        return
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    context: BaseContext
    if "forkserver" in multiprocessing.get_all_start_methods():
        server = multiprocessing.get_context("forkserver")
        server.set_forkserver_preload(_modules_of(fn))  # no effect once the server runs
        context = server
    else:  # platforms without fork (Windows): a fresh interpreter per worker
        context = multiprocessing.get_context("spawn")

    def new_pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=n,
            mp_context=context,
            initializer=_init_worker,
            initargs=(initializer, initargs),
        )

    yield from _run_pool(fn, iter(items), workers, new_pool, on_died, split)


class WorkerDiedError(CtcurateError):
    """A worker process died on an item and the caller gave no ``on_died`` outcome."""


def _init_worker(initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    """Pool worker set-up: exit when the stage process dies, then the caller's initializer.

    A watcher thread waits on the parent's sentinel (a pipe the stage process holds; it
    reads as ready when that process is gone, however it died) and kills this worker, so
    no worker outlives a killed stage even while it is busy with an item. (A worker's OS
    parent is the fork server, which itself waits for its workers: ``PR_SET_PDEATHSIG``
    would not see the stage die.)
    """
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    if isinstance(sentinel, int):
        threading.Thread(
            target=_exit_with_parent, args=(sentinel,), daemon=True, name="parent-watch"
        ).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os.kill(os.getpid(), signal.SIGKILL)


def _run_pool(
    fn: Callable[[T], R],
    items: Iterator[T],
    workers: int,
    new_pool: Callable[[int], ProcessPoolExecutor],
    on_died: Callable[[T], R] | None,
    split: Callable[[T], Sequence[T]] | None,
) -> Iterator[R]:
    limit = max(1, workers) * IN_FLIGHT_PER_WORKER
    pool = new_pool(workers)
    pending: dict[Future[R], T] = {}
    try:
        while True:
            suspects: list[T] = []
            for item in itertools.islice(items, max(0, limit - len(pending))):
                try:
                    pending[pool.submit(fn, item)] = item
                except BrokenProcessPool:
                    suspects.append(item)
                    break
            if not pending and not suspects:
                return
            if not suspects:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                if not any(_broken(f) for f in done):
                    for future in done:
                        del pending[future]
                        yield future.result()
                    continue
            wait(pending)  # a broken pool fails every future it holds at once
            for future, item in list(pending.items()):
                if _broken(future):
                    suspects.append(item)
                else:
                    yield future.result()
            pending.clear()
            pool.shutdown(wait=True, cancel_futures=True)
            log.warning(
                "a worker process died: %d item(s) in flight run again one at a time",
                len(suspects),
            )
            yield from _isolate(fn, suspects, new_pool, on_died, split)
            pool = new_pool(workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _broken(future: Future[Any]) -> bool:
    return isinstance(future.exception(), BrokenProcessPool)


def _isolate(
    fn: Callable[[T], R],
    suspects: Sequence[T],
    new_pool: Callable[[int], ProcessPoolExecutor],
    on_died: Callable[[T], R] | None,
    split: Callable[[T], Sequence[T]] | None,
) -> Iterator[R]:
    """``fn`` of each suspect (or of each part of it), one at a time in a one-worker pool."""
    pool = new_pool(1)
    try:
        for suspect in suspects:
            for part in split(suspect) if split is not None else [suspect]:
                future = pool.submit(fn, part)
                if not _broken(future):
                    yield future.result()
                    continue
                pool.shutdown(wait=True)
                if on_died is None:
                    msg = "a worker process died on one item (killed by the OS or crashed)"
                    raise WorkerDiedError(msg)
                log.warning("a worker process died on one item: it is marked, the run goes on")
                yield on_died(part)
                pool = new_pool(1)
    finally:
        pool.shutdown(wait=True)


def map_ordered(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    scheduler: str | None = None,
    progress_to: tuple[logging.Logger, str, str] | None = None,
    on_died: Callable[[T], R] | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` on the executor :func:`map_unordered` picks.

    A local pool never gets more processes than there are items. ``progress_to`` =
    (logger, label, unit) shows progress as results come in (:func:`ctcurate.log.progress`).
    ``on_died(item)`` is the result of an item whose worker process died (see
    :func:`map_unordered`).
    """
    out: list[R | None] = [None] * len(items)
    results = map_unordered(
        _Indexed(fn),
        enumerate(items),
        workers=min(workers, max(1, len(items))),
        scheduler=scheduler,
        on_died=None if on_died is None else _Indexed(on_died),
    )
    if progress_to is not None:
        logger, label, unit = progress_to
        results = progress(results, len(items), label, logger, unit=unit)
    for i, result in results:
        out[i] = result
    return out  # type: ignore[return-value]  # every slot is filled above


@dataclass(frozen=True)
class _Indexed(Generic[T, R]):
    """``fn`` on ``(position, item)`` pairs, keeping the position (picklable)."""

    fn: Callable[[T], R]

    def __call__(self, pair: tuple[int, T]) -> tuple[int, R]:
        return pair[0], self.fn(pair[1])


def _modules_of(fn: Callable[..., object]) -> list[str]:
    """The ctcurate modules a worker needs for ``fn`` (through partials and :class:`_Indexed`)."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, _Indexed):
            fn = fn.fn
        else:
            break
    module = getattr(fn, "__module__", "") or ""
    return sorted({__name__, module} if module.startswith("ctcurate.") else {__name__})


def _run_dask(
    fn: Callable[[T], R],
    items: Iterable[T],
    scheduler: str,
    on_died: Callable[[T], R] | None,
    split: Callable[[T], Sequence[T]] | None,
) -> Iterator[R]:
    from distributed import Client, as_completed
    from distributed.scheduler import KilledWorker

    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)  # type: ignore[no-untyped-call]
    except OSError as exc:
        msg = f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__})"
        raise InputError(msg) from exc

    def outcome(future: Any, item: T) -> Iterator[R]:
        try:
            yield future.result()
            return
        except KilledWorker:  # the task killed every worker the scheduler tried it on
            pass
        for part in split(item) if split is not None else [item]:
            try:
                yield client.submit(fn, part, pure=False).result()
            except KilledWorker:
                if on_died is None:
                    msg = "a Dask worker died on one item (killed by the OS or crashed)"
                    raise WorkerDiedError(msg) from None
                log.warning("a Dask worker died on one item: it is marked, the run goes on")
                yield on_died(part)

    try:
        threads = client.nthreads()  # type: ignore[no-untyped-call]
        limit = max(1, sum(threads.values())) * IN_FLIGHT_PER_WORKER
        queue = as_completed(loop=client.loop)  # type: ignore[no-untyped-call]
        submitted: dict[Any, T] = {}
        n = 0
        for item in items:
            future = client.submit(fn, item, pure=False)
            submitted[future.key] = item
            queue.add(future)  # type: ignore[no-untyped-call]
            n += 1
            if n >= limit:
                done = next(queue)
                yield from outcome(done, submitted.pop(done.key))
                n -= 1
        for done in queue:
            yield from outcome(done, submitted.pop(done.key))
    finally:
        client.close()  # type: ignore[no-untyped-call]
