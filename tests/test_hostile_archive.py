"""A hostile archive: odd names, links, FIFOs, sockets, unlistable folders, stray files.

Every entry ends in the index (indexed or quarantined with a reason), nothing hangs, and
no later stage opens what is not a regular file.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from helpers.index import run_index, table, write_series
from helpers.select import PARAMS, RULES_DIR

from ctcurate.catalog import build, scan
from ctcurate.io.paths import fs_path
from ctcurate.params import PackParams
from ctcurate.pipeline import index, pack, select
from ctcurate.selection import pneumonia
from ctcurate.selection.pneumonia import ScoreResult, ScoreTask, score_series

#: A test that would hang (a FIFO opened for reading) fails after this many seconds.
HANG_S = 60


class Hung(BaseException):
    """Raised by the alarm: no ``except OSError`` of the code under test may swallow it."""


@contextlib.contextmanager
def no_hang() -> Iterator[None]:
    """Fail with :class:`Hung` after :data:`HANG_S` (armed after ``index``, whose per-file
    time cap shares the process's real-time timer)."""

    def hung(signum: int, frame: FrameType | None) -> None:
        msg = "hung (a FIFO opened for reading?)"
        raise Hung(msg)

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def hostile_archive(root: Path) -> Path:
    """A clean 4-slice series in H01 plus one entry of every odd kind."""
    archive = root / "archive"
    paths = write_series(archive)
    slice0 = paths[0].read_bytes()
    odd = archive / "H01" / "odd"
    odd.mkdir()
    Path(os.fsdecode(os.fsencode(odd) + b"/\xff\xfe.dcm")).write_bytes(slice0)
    Path(os.fsdecode(os.fsencode(archive) + b"/H\xe9/1.dcm")).parent.mkdir()
    Path(os.fsdecode(os.fsencode(archive) + b"/H\xe9/1.dcm")).write_bytes(slice0)
    (odd / "link.dcm").symlink_to(paths[0])
    (odd / "loop.dcm").symlink_to(odd / "loop.dcm")
    (odd / "dangling.dcm").symlink_to(odd / "gone.dcm")
    outside = root / "outside.dcm"
    outside.write_bytes(slice0)
    (odd / "outside.dcm").symlink_to(outside)
    (archive / "H05").symlink_to(archive / "H01")
    (archive / "H06").symlink_to(root)
    os.mkfifo(odd / "fifo.dcm")
    (archive / "H01" / "locked").mkdir()
    (archive / "H01" / "locked" / "hidden.dcm").write_bytes(slice0)
    return archive


EXPECTED = {
    "H01/odd/\\xff\\xfe.dcm": ("undecodable_name", "not UTF-8"),
    "H\\xe9/1.dcm": ("undecodable_name", "not UTF-8"),
    "H01/odd/link.dcm": ("symlink", "to a regular file inside the archive"),
    "H01/odd/loop.dcm": ("symlink_loop", "loop"),
    "H01/odd/dangling.dcm": ("symlink", "dangling"),
    "H01/odd/outside.dcm": ("symlink", "to a regular file outside the archive"),
    "H05": ("symlink", "to a folder inside the archive"),
    "H06": ("symlink", "to a folder outside the archive"),
    "H01/odd/fifo.dcm": ("not_regular_file", "FIFO"),
    "H01/odd/sock.dcm": ("not_regular_file", "socket"),
    "H01/locked": ("unlistable_folder", "could not be listed"),
}


@pytest.mark.parametrize("workers", [1, 2])
def test_index_quarantines_every_odd_entry_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    archive = hostile_archive(tmp_path)
    scandir = os.scandir

    def locked(path: Any) -> Any:  # tests run as root: chmod 000 would not stop the walk
        if isinstance(path, (str, os.PathLike)) and Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(archive / "H01" / "odd" / "sock.dcm"))
        with no_hang():
            report = run_index(archive, tmp_path / "out", workers=workers)
    got = {r["path"]: (r["reason"], r["detail"]) for r in table(tmp_path / "out", "quarantine")}
    assert set(got) == set(EXPECTED)
    for path, (reason, detail) in EXPECTED.items():
        assert got[path][0] == reason, path
        assert detail in got[path][1], (path, got[path])
    assert report["files_indexed"] == 4
    assert report["files_seen"] == 4 + len(EXPECTED)
    assert report["files_seen"] == (
        report["files_indexed"] + report["files_quarantined"] + report["files_skipped"]
    )
    # a listed path round-trips to the file it names
    assert Path(os.fsdecode(fs_path(archive, "H\\xe9/1.dcm"))).is_file()


def test_device_file_is_quarantined_unopened(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive)
    try:
        os.mknod(archive / "H01" / "null.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("no permission to create a device file")
    report = run_index(archive, tmp_path / "out")
    assert report["quarantine_reasons"] == {"not_regular_file": 1}
    (row,) = table(tmp_path / "out", "quarantine")
    assert (row["path"], row["detail"]) == ("H01/null.dcm", "character device (not opened)")


def test_a_stray_file_at_the_archive_root_is_rejected_no_site(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    paths = write_series(archive)
    save_root = archive / "stray.dcm"
    save_root.write_bytes(paths[0].read_bytes())
    # the root copy shares the SOPInstanceUID with H01's slice, but not the site: indexed
    report = run_index(archive, tmp_path / "index")
    assert report["files_indexed"] == 5
    select.run(tmp_path / "index", RULES_DIR, tmp_path / "select", None, PARAMS)
    rows = {(r["site"], r["rule_reason"]) for r in table(tmp_path / "select", "series")}
    assert ("", "no_site") in rows
    out = json.loads((tmp_path / "select" / "report.json").read_text())
    assert out["rule_rejections"]["no_site"] == 1


def test_scorer_and_pack_never_open_a_fifo(tmp_path: Path) -> None:
    from ctcurate.imaging.volume import ExcludedSeries
    from ctcurate.pipeline.pack import _load_series

    archive = tmp_path / "archive"
    paths = write_series(archive)
    run_index(archive, tmp_path / "index", workers=1)
    paths[1].unlink()
    os.mkfifo(paths[1])  # replaced by a FIFO after the index: opening it would block
    with no_hang():
        result = score_series(ScoreTask("H01", "1.2", tuple(str(p) for p in paths), None))
    assert result.error == "unreadable"
    rows = [{"path": str(p.relative_to(archive))} for p in paths]
    with no_hang(), pytest.raises(ExcludedSeries, match="not a regular file"):
        _load_series(archive, tmp_path / "seg.dcm", rows)


# --- workers killed by the OS ---------------------------------------------------------------

real_scan_chunk = scan.scan_chunk


def in_worker() -> bool:
    return multiprocessing.parent_process() is not None


def killing_scan_chunk(archive: str, entries: list[scan.Entry], **kw: Any) -> Any:
    """The header scan, but the worker reading ``boom.dcm`` is SIGKILLed (as by the OOM killer)."""
    if in_worker() and any(path.endswith("boom.dcm") for path, _, _ in entries):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_scan_chunk(archive, entries, **kw)


def test_index_quarantines_the_file_whose_worker_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "archive"
    write_series(archive, site="H01")
    paths = write_series(archive, site="H02")
    (archive / "H02" / "boom.dcm").write_bytes(paths[0].read_bytes())
    monkeypatch.setattr(scan, "scan_chunk", killing_scan_chunk)
    with no_hang():
        report = run_index(archive, tmp_path / "out", workers=2)
    assert report["quarantine_reasons"] == {"worker_died": 1}
    (row,) = table(tmp_path / "out", "quarantine")
    assert (row["path"], row["detail"]) == ("H02/boom.dcm", scan.DIED_DETAIL)
    assert report["files_indexed"] == 8
    assert report["files_seen"] == 9 == report["files_indexed"] + report["files_quarantined"]
    assert "worker_died" in build.RETRY_REASONS  # a later run reads it again


def killing_score(task: ScoreTask) -> ScoreResult:
    if in_worker() and task.series_instance_uid == "dead":
        os.kill(os.getpid(), signal.SIGKILL)
    return ScoreResult(task.site, task.series_instance_uid, (1.0,), None)


def test_scorer_marks_the_series_whose_worker_died(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pneumonia, "score_series", killing_score)
    tasks = [ScoreTask("H01", uid, (), None) for uid in ("a", "dead", "b", "c")]
    with no_hang():
        results = pneumonia.score_all(tasks, workers=2)
    assert [(r.series_instance_uid, r.error) for r in results] == [
        ("a", None),
        ("dead", "worker_died"),
        ("b", None),
        ("c", None),
    ]


def killing_pack_one(task: Any) -> dict[str, str]:
    if in_worker() and task.case["case_id"] == "dead":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"case_id": str(task.case["case_id"]), "reason": "fine"}


def test_pack_excludes_the_case_whose_worker_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pack, "_pack_one", killing_pack_one)
    cases = [{"case_id": c, "site": "H01", "series_instance_uid": c} for c in ("a", "dead", "b")]
    with no_hang():
        packed, excluded = pack._pack_cases(
            cases, {}, tmp_path, tmp_path, tmp_path, PackParams(workers=2)
        )
    assert packed == []
    assert excluded == [
        {"case_id": "a", "reason": "fine"},
        {"case_id": "dead", "reason": "worker_died"},
        {"case_id": "b", "reason": "fine"},
    ]


def test_duplicate_check_never_opens_a_fifo(tmp_path: Path) -> None:
    (tmp_path / "H01").mkdir()
    (tmp_path / "H01" / "a.dcm").write_bytes(b"same")
    os.mkfifo(tmp_path / "H01" / "b.dcm")  # indexed, then replaced by a FIFO
    with no_hang():
        assert index.sha256_or_none(tmp_path, "H01/b.dcm") is None
    assert index.sha256_or_none(tmp_path, "H01/a.dcm") is not None


def test_a_fifo_named_like_a_seg_is_a_reason_not_a_hang(tmp_path: Path) -> None:
    from ctcurate.dicom.seg import SegError, read_seg_labels

    fifo = tmp_path / "1.2.3.dcm"
    os.mkfifo(fifo)
    with pytest.raises(SegError, match=r"1\.2\.3\.dcm: not a readable DICOM SEG") as caught:
        read_seg_labels(fifo, ["1.2.3.1"])
    assert caught.value.reason == "seg_unreadable"
