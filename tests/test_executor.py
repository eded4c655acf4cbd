"""The shared executor: this process, a local pool and a Dask cluster give the same results."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctcurate import executor
from ctcurate.errors import InputError


def slow_first(x: int) -> int:
    """Item 0 takes longest, so completion order differs from input order."""
    if x == 0:
        time.sleep(2.0)
    return x * x


@pytest.mark.slow
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
        processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0"
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

    from ctcurate.catalog.scan import scan_chunk
    from ctcurate.selection.pneumonia import score_series

    fn = partial(scan_chunk, "archive", max_bytes=1, timeout_s=1.0)
    assert executor._modules_of(fn) == ["ctcurate.catalog.scan", "ctcurate.executor"]
    indexed = executor._Indexed(score_series)
    assert executor._modules_of(indexed) == ["ctcurate.executor", "ctcurate.selection.pneumonia"]
    assert executor._modules_of(slow_first) == ["ctcurate.executor"]  # not ctcurate's: none


def die_on_3(x: int) -> int:
    """Kills its own worker process on item 3 (as the OOM killer or a segfault would)."""
    if x == 3 and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def test_a_worker_killed_on_one_item_costs_that_item_only() -> None:
    items = list(range(10))
    got = sorted(executor.map_unordered(die_on_3, items, workers=2, on_died=lambda x: -x))
    assert got == sorted([-3, *(x * x for x in items if x != 3)])
    ordered = executor.map_ordered(die_on_3, items, workers=2, on_died=lambda x: -1)
    assert ordered == [-1 if x == 3 else x * x for x in items]
    # the items of a batch are retried one by one: only the culprit part is marked
    pairs = executor.map_unordered(
        sum, [[1, 2], [3, 4], [5]], workers=2, split=lambda batch: [[v] for v in batch]
    )
    assert sorted(pairs) == [3, 5, 7]


def die_on_3_in_batch(batch: list[int]) -> list[int]:
    return [die_on_3(x) for x in batch]


def test_a_killed_batch_is_retried_item_by_item() -> None:
    got = list(
        executor.map_unordered(
            die_on_3_in_batch,
            [[0, 1], [2, 3, 4], [5]],
            workers=2,
            split=lambda batch: [[x] for x in batch],
            on_died=lambda batch: [-v for v in batch],
        )
    )
    assert sorted(v for batch in got for v in batch) == sorted([-3, 0, 1, 4, 16, 25])


def test_a_worker_death_without_an_outcome_is_a_typed_error() -> None:
    with pytest.raises(executor.WorkerDiedError, match="worker process died"):
        list(executor.map_unordered(die_on_3, range(5), workers=2))


ORPHAN_SCRIPT = """
import os, sys, time
from ctcurate import executor

def sleep_long(x):
    open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
    time.sleep(120)
    return x

if __name__ == "__main__":
    list(executor.map_unordered(sleep_long, range(4), workers=2))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state not in {"Z", "X"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_no_worker_outlives_a_killed_stage(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text(ORPHAN_SCRIPT)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(pids)])
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2:
            assert proc.poll() is None, "the stage ended before its workers started"
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    workers = [int(p.name) for p in pids.iterdir()]
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "orphan workers left behind"


def test_a_dask_worker_killed_on_one_item_costs_that_item_only() -> None:
    import dask
    from distributed import LocalCluster

    items = list(range(6))
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            processes=True, n_workers=1, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
    ):
        got = executor.map_ordered(
            die_on_3, items, workers=1, scheduler=cluster.scheduler_address, on_died=lambda x: -1
        )
    assert got == [-1 if x == 3 else x * x for x in items]
