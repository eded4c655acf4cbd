"""index survives a real SIGKILL, and its per-file time cap holds on worker threads."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from helpers.index import ct_slice, index_digests, listing, save

from ctcurate.dicom import header as dicom
from ctcurate.params import IndexParams
from ctcurate.pipeline import index

PLACEHOLDER = "1.2.826.0.1.3680043.8.498.99.1000"


def dataset_bytes(slow: bool) -> bytes:
    """A clean slice with PLACEHOLDER as its SOPInstanceUID; ``slow``: 1,500 private
    elements and an UN element, so that the lean reader gives up and pydicom parses it."""
    ds = ct_slice(0, sop=PLACEHOLDER)
    if slow:
        ds.add_new(0x00110010, "LO", "ACME 1")
        for k in range(1500):
            ds.add_new(0x00111000 + k, "LO", f"v{k}")
        ds.add_new(0x00130010, "UN", b"ab")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_copies(folder: Path, data: bytes, n: int, first: int) -> None:
    """``n`` files of ``data``, each with its own SOPInstanceUID (same length)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        uid = f"{PLACEHOLDER[:-4]}{first + i:04d}".encode()
        (folder / f"{i:04d}.dcm").write_bytes(data.replace(PLACEHOLDER.encode(), uid))


@pytest.mark.slow
def test_sigkilled_run_resumes_without_redoing_finished_chunks(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_copies(archive / "H01" / "a", dataset_bytes(slow=False), 80, 0)  # two chunks of 40
    write_copies(archive / "H01" / "b", dataset_bytes(slow=True), 60, 100)  # ~1 s on pydicom
    snap = listing(archive, tmp_path)
    (tmp_path / "params.yaml").write_text(
        "index:\n  workers: 1\n  shard_size: 40\n  chunk_files: 8\n"
    )
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).parent / "ctcurate"),
        "index",
        *("--archive", str(archive), "--snapshot", str(snap), "--out", str(out)),
        *("--params", str(tmp_path / "params.yaml")),
    ]
    parts = index.work_dir(out) / "parts"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list(parts.glob("chunk-*.parquet"))) < 2:
            assert proc.poll() is None, "index finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    finished = sorted(parts.glob("chunk-*.parquet"))
    n_saved = sum(pq.read_metadata(p).num_rows for p in finished)
    assert n_saved >= 80

    rerun = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = re.search(r"listing holds (\d+) files: (\d+) reused, (\d+) to read", rerun.stderr)
    assert found is not None, rerun.stderr
    # the rows of the finished chunks were reused: only the other files were read again
    assert [int(g) for g in found.groups()] == [140, n_saved, 140 - n_saved]
    assert not index.work_dir(out).exists()
    scratch = IndexParams(workers=1, shard_size=40, chunk_files=8)
    index.index_archive(archive, snap, tmp_path / "scratch", scratch)
    assert index_digests(out) == index_digests(tmp_path / "scratch")


def busy_read(slow_name: str) -> Any:
    """``dicom.read_instance`` spinning in Python for 5 s on ``slow_name``."""
    real = dicom.read_instance

    def read(root: Path, path: str, *args: Any, **kwargs: Any) -> dicom.FileOutcome:
        if path.endswith(slow_name):
            end = time.monotonic() + 5
            while time.monotonic() < end:
                pass
        return real(root, path, *args, **kwargs)

    return read


def test_time_cap_holds_on_a_thread_without_signals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i, name in enumerate(("a.dcm", "b.dcm")):
        save(ct_slice(i), tmp_path / "H01" / name)
    entries = [(f"H01/{n}", (tmp_path / "H01" / n).stat().st_size, 0) for n in ("a.dcm", "b.dcm")]
    monkeypatch.setattr(dicom, "read_instance", busy_read("a.dcm"))
    result: list[dicom.FileOutcome] = []
    start = time.monotonic()
    worker = threading.Thread(
        target=lambda: result.extend(dicom.scan_files(str(tmp_path), entries, 2**30, 0.2))
    )
    worker.start()
    worker.join(10)
    assert time.monotonic() - start < 3
    assert [(o.status, o.reason) for o in result] == [
        ("quarantined", "timeout"),
        ("indexed", None),
    ]
    assert result[0].detail == "over 0.2 s"


def test_time_cap_holds_on_dask_worker_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import LocalCluster

    archive = tmp_path / "archive"
    for i in range(4):
        save(ct_slice(i), archive / "H01" / f"{i}.dcm")
    snap = listing(archive, tmp_path)
    monkeypatch.setattr(dicom, "read_instance", busy_read("2.dcm"))
    params = IndexParams(timeout_s=0.3, chunk_files=2)
    with LocalCluster(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"
    ) as cluster:
        index.index_archive(archive, snap, tmp_path / "out", params, cluster.scheduler_address)
    quarantined = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert [(q["path"], q["reason"]) for q in quarantined] == [("H01/2.dcm", "timeout")]
