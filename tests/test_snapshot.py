"""snapshot: a sorted, deterministic listing of the archive."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ctcurate.errors import InputError
from ctcurate.io.tables import read_parquet
from ctcurate.params import SnapshotParams
from ctcurate.snapshot import list_archive, run


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


def test_symlinks_not_followed(tmp_path: Path) -> None:
    _make_archive(tmp_path / "archive")
    (tmp_path / "archive" / "H04").symlink_to(tmp_path / "archive" / "H01")
    paths = list_archive(tmp_path / "archive").column("path").to_pylist()
    assert not any(p.startswith("H04") for p in paths)


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
