"""The shared executor: this process, a local pool and a Dask cluster give the same results."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ctcurate import executor
from ctcurate.errors import InputError


def slow_first(x: int) -> int:
    """Item 0 takes longest, so completion order differs from input order."""
    if x == 0:
        time.sleep(2.0)
    return x * x


def test_map_ordered_keeps_input_order_on_a_local_pool() -> None:
    items = list(range(6))
    assert executor.map_ordered(slow_first, items, workers=1) == [x * x for x in items]
    done = list(executor.map_unordered(slow_first, items, workers=2))
    assert sorted(done) == [x * x for x in items]
    assert done[0] != 0  # the slow first item did not finish first
    assert executor.map_ordered(slow_first, items, workers=2) == [x * x for x in items]
    assert executor.map_ordered(slow_first, [], workers=2) == []


def test_map_unordered_pulls_a_bounded_number_of_items_ahead() -> None:
    pulled = 0

    def items() -> Iterator[int]:
        nonlocal pulled
        for x in range(50):
            pulled += 1
            yield x

    results = executor.map_unordered(abs, items(), workers=2)
    first = next(results)
    assert pulled <= 2 * executor.IN_FLIGHT_PER_WORKER + 1
    assert sorted([first, *results]) == list(range(50))


def test_map_ordered_on_a_dask_cluster_matches_this_process() -> None:
    from distributed import LocalCluster

    items = list(range(5))
    with LocalCluster(
        processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        got = executor.map_ordered(
            slow_first, items, workers=1, scheduler=cluster.scheduler_address
        )
    assert got == executor.map_ordered(slow_first, items, workers=1)


def test_an_unreachable_scheduler_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "CONNECT_TIMEOUT_S", 0.5)
    with pytest.raises(
        InputError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"
    ):
        executor.map_ordered(abs, [1, -2], workers=1, scheduler="tcp://127.0.0.1:9")


def test_pool_workers_preload_the_module_of_the_mapped_function() -> None:
    from functools import partial

    from ctcurate.index.scan import scan_chunk
    from ctcurate.pneumonia import score_series

    fn = partial(scan_chunk, "archive", max_bytes=1, timeout_s=1.0)
    assert executor._modules_of(fn) == ["ctcurate.executor", "ctcurate.index.scan"]
    indexed = executor._Indexed(score_series)
    assert executor._modules_of(indexed) == ["ctcurate.executor", "ctcurate.pneumonia"]
    assert executor._modules_of(slow_first) == ["ctcurate.executor"]  # not ctcurate's: none
