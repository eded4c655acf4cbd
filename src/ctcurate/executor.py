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
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any, Generic, TypeVar

from ctcurate.errors import InputError
from ctcurate.log import progress

T = TypeVar("T")
R = TypeVar("R")

#: Items in flight per worker: enough to keep workers busy, few enough to bound memory.
IN_FLIGHT_PER_WORKER = 2
#: Seconds to wait for a Dask scheduler to answer.
CONNECT_TIMEOUT_S = 30.0


def map_unordered(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    scheduler: str | None = None,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in completion order.

    ``initializer(*initargs)`` runs once in each local pool process (not in this process
    nor on Dask workers: ``fn`` must set up what it needs there itself).
    """
    if scheduler is not None:
        yield from _run_dask(fn, items, scheduler)
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
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=initializer, initargs=initargs
    ) as pool:
        yield from _bounded(items, lambda item: pool.submit(fn, item), workers)


def map_ordered(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    scheduler: str | None = None,
    progress_to: tuple[logging.Logger, str, str] | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` on the executor :func:`map_unordered` picks.

    A local pool never gets more processes than there are items. ``progress_to`` =
    (logger, label, unit) shows progress as results come in (:func:`ctcurate.log.progress`).
    """
    out: list[R | None] = [None] * len(items)
    results = map_unordered(
        _Indexed(fn),
        enumerate(items),
        workers=min(workers, max(1, len(items))),
        scheduler=scheduler,
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


def _bounded(items: Iterable[T], submit: Callable[[T], Future[R]], workers: int) -> Iterator[R]:
    limit = max(1, workers) * IN_FLIGHT_PER_WORKER
    pending: set[Future[R]] = set()
    for item in items:
        pending.add(submit(item))
        if len(pending) >= limit:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            yield future.result()


def _run_dask(fn: Callable[[T], R], items: Iterable[T], scheduler: str) -> Iterator[R]:
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
        for item in items:
            queue.add(client.submit(fn, item, pure=False))  # type: ignore[no-untyped-call]
            n += 1
            if n >= limit:
                yield next(queue).result()
                n -= 1
        for future in queue:
            yield future.result()
    finally:
        client.close()  # type: ignore[no-untyped-call]
