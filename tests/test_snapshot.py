"""snapshot: a sorted, deterministic listing of the archive."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from ctcurate.errors import InputError
from ctcurate.io.paths import escaped_bytes, fs_path, open_regular
from ctcurate.io.tables import read_parquet
from ctcurate.params import SnapshotParams
from ctcurate.pipeline import snapshot
from ctcurate.pipeline.snapshot import list_archive, run


def _make_archive(root: Path) -> None:
    for rel, data in {
        "H02/b/2.dcm": b"x" * 10,
        "H01/z.dcm": b"yy",
        "H01/a/1": b"",
        "H01/Thumbs.db": b"junk",
        "H03/ünïcode name.dcm": b"abc",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))


def test_listing_sorted_with_sizes(tmp_path: Path) -> None:
    _make_archive(tmp_path / "archive")
    table = list_archive(tmp_path / "archive", ignore=("Thumbs.db",))
    assert table.column("path").to_pylist() == [
        "H01/a/1",
        "H01/z.dcm",
        "H02/b/2.dcm",
        "H03/ünïcode name.dcm",
    ]
    assert table.column("size").to_pylist() == [0, 2, 10, 3]
    assert set(table.column("mtime_ns").to_pylist()) == {1_600_000_000_000_000_000}


def test_symlinks_are_listed_not_followed(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    _make_archive(archive)
    (archive / "H04").symlink_to(archive / "H01")  # a folder: listed once, not walked
    (archive / "H01" / "link.dcm").symlink_to(archive / "H01" / "z.dcm")
    (archive / "H01" / "loop").symlink_to(archive / "H01" / "loop")
    (archive / "H01" / "out").symlink_to(tmp_path)
    paths = list_archive(archive).column("path").to_pylist()
    assert [p for p in paths if p.startswith("H04")] == ["H04"]
    assert {"H01/link.dcm", "H01/loop", "H01/out"} <= set(paths)
    assert "H04/z.dcm" not in paths


def test_fifo_socket_and_non_utf8_names_are_listed(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    _make_archive(archive)
    os.mkfifo(archive / "H01" / "fifo.dcm")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(archive / "H01" / "sock.dcm"))
        raw = os.fsencode(archive) + b"/H02/\xff\xfe.dcm"
        Path(os.fsdecode(raw)).write_bytes(b"bytes")
        run(archive, tmp_path / "listing.parquet", SnapshotParams())  # no UnicodeEncodeError
    paths = read_parquet(tmp_path / "listing.parquet").column("path").to_pylist()
    assert {"H01/fifo.dcm", "H01/sock.dcm", "H02/\\xff\\xfe.dcm"} <= set(paths)
    with open_regular(fs_path(archive, "H02/\\xff\\xfe.dcm")) as fh:  # round trip
        assert fh.read() == b"bytes"
    assert escaped_bytes("H02/\\xff\\xfe.dcm") == b"H02/\xff\xfe.dcm"
    assert escaped_bytes("H03/ünïcode name.dcm") is None


def test_unlistable_folder_is_listed_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "archive"
    _make_archive(archive)
    scandir = os.scandir

    def denied(path: Any) -> Any:
        if Path(path).name == "a":
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    monkeypatch.setattr(snapshot.log, "handlers", [logging.StreamHandler(sys.stderr)])
    paths = list_archive(archive).column("path").to_pylist()
    assert "H01/a" in paths
    assert "H01/a/1" not in paths
    assert "cannot list 1 folder(s) (PermissionError 1)" in capsys.readouterr().err
    monkeypatch.setattr(os, "scandir", lambda path: denied(Path(path) / "a"))
    with pytest.raises(InputError, match="archive folder cannot be listed"):
        list_archive(archive)


def test_run_is_deterministic(tmp_path: Path) -> None:
    _make_archive(tmp_path / "archive")
    digests = []
    for name in ("a.parquet", "b.parquet"):
        run(tmp_path / "archive", tmp_path / name, SnapshotParams())
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    # Nothing is ignored by default: junk such as Thumbs.db is listed, and index
    # quarantines it, so every file of the archive is accounted for.
    assert read_parquet(tmp_path / "a.parquet").num_rows == 5


def test_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="archive folder not found"):
        list_archive(tmp_path / "nope")


def test_an_escape_that_names_another_file_is_not_listed_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "archive"
    (archive / "H01").mkdir(parents=True)
    (archive / "H01" / "\\xff.dcm").write_bytes(b"literal")  # a real name with a backslash
    Path(os.fsdecode(os.fsencode(archive) + b"/H01/\xff.dcm")).write_bytes(b"raw")
    monkeypatch.setattr(snapshot.log, "handlers", [logging.StreamHandler(sys.stderr)])
    assert list_archive(archive).column("path").to_pylist() == ["H01/\\xff.dcm"]
    assert "1 name(s) not UTF-8 whose escaped spelling is another file's name" in (
        capsys.readouterr().err
    )
    with open_regular(fs_path(archive, "H01/\\xff.dcm")) as fh:
        assert fh.read() == b"literal"  # the listed path opens the listed file


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists a chmod 000 folder anyway")
def test_chmod_000_folder_is_listed_for_quarantine(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    _make_archive(archive)
    locked = archive / "H01" / "a"
    locked.chmod(0)
    try:
        paths = list_archive(archive).column("path").to_pylist()
    finally:
        locked.chmod(0o755)
    assert "H01/a" in paths
    assert "H01/a/1" not in paths
