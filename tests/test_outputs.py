"""Output guard, locks, stale temporaries and a full disk (ctcurate.io.outputs)."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.index import listing, run_index, write_series

from ctcurate.errors import InputError, LockedError, OutputError
from ctcurate.io.outputs import (
    MARKER,
    check_output_dir,
    check_output_file,
    guarded_output,
    lock_path,
    output_lock,
    publish_dir,
)
from ctcurate.params import IndexParams, SnapshotParams
from ctcurate.pipeline import index, snapshot


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_an_absent_or_empty_folder_or_own_output_may_be_replaced(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "absent", "index")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "index")
    with publish_dir(tmp_path / "out", "index") as tmp:
        (tmp / "report.json").write_text("{}\n")
    assert (tmp_path / "out" / MARKER).read_text() == "index\n"
    check_output_dir(tmp_path / "out", "index")
    # a folder of only the stage's own names: an output written before the marker existed
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "report.json").write_text("{}\n")
    check_output_dir(legacy, "index", own=("report.json", "series.parquet"))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "H01").mkdir(), r"refusing to replace a folder that `index` did not write"),
        (lambda d: (d / MARKER).write_text("pack\n"), r"output of another stage \(`pack`"),
        (lambda d: (d / ".git").mkdir(), r"refusing to replace a repository"),
        (lambda d: (d / "dvc.yaml").write_text(""), r"refusing to replace a repository"),
    ],
)
def test_a_foreign_folder_is_refused(tmp_path: Path, setup: object, message: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    setup(out)  # type: ignore[operator]
    with pytest.raises(OutputError, match=message):
        check_output_dir(out, "index", own=("report.json",))


def test_an_output_may_not_be_hold_or_lie_inside_an_input(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    (archive / "H01").mkdir(parents=True)
    for out in (archive, archive / "H01" / "index", tmp_path):
        with pytest.raises(OutputError, match=r"over or inside the input .*archive"):
            check_output_dir(out, "index", inputs=[archive])
    with pytest.raises(OutputError, match=r"over or inside the input"):
        check_output_file(archive / "listing.parquet", inputs=[archive])
    with pytest.raises(OutputError, match=r"not a file"):
        check_output_file(archive, inputs=[])


def test_a_symlink_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match=r"not a folder of `index`"):
        check_output_dir(tmp_path / "link", "index")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctcurate", *args], capture_output=True, text=True, check=False
    )


def test_index_into_its_own_archive_deletes_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive)
    (archive / "notes.txt").write_text("keep me\n")
    snap = listing(archive, tmp_path)
    before = _tree(archive)
    for out in (archive, archive / "H01"):
        proc = _cli("index", "--archive", str(archive), "--snapshot", str(snap), "--out", str(out))
        assert proc.returncode == OutputError.exit_code, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1
        assert "refusing to write an output over or inside the input" in lines[0]
    assert _tree(archive) == before


def test_index_synth_and_pack_refuse_a_user_folder(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive)
    snap = listing(archive, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    commands = [
        ["index", "--archive", str(archive), "--snapshot", str(snap), "--out", str(mine)],
        ["synth", "--out", str(mine), "--patients", "1"],
        [
            "pack",
            "--cases",
            str(tmp_path / "cases.parquet"),
            "--index",
            str(tmp_path / "index"),
            "--archive",
            str(archive),
            "--annotations",
            str(tmp_path / "ann"),
            "--out",
            str(mine),
        ],
    ]
    for args in commands:
        proc = _cli(*args)
        assert proc.returncode == OutputError.exit_code, (args[0], proc.stderr)
        assert "refusing to replace a folder" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert _tree(mine) == {"thesis.tex": b"years of work\n"}


def test_a_second_index_run_into_one_out_fails_fast(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive)
    out = tmp_path / "index"
    run_index(archive, out)
    before = _tree(out)
    snap = listing(archive, tmp_path)
    with output_lock(out) as lock:
        assert lock == tmp_path / ".index.lock"
        with pytest.raises(LockedError, match=r"index: another process is writing this output"):
            index.run(archive, snap, out, IndexParams(workers=1), scheduler=None)
    assert _tree(out) == before
    assert not lock.exists()


def test_a_killed_run_leaves_temporaries_that_the_next_run_removes(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive)
    out = tmp_path / "index"
    stale_dir = tmp_path / ".index.k1ll3d00.tmp"
    (stale_dir / "instances").mkdir(parents=True)
    (tmp_path / ".index.old").mkdir()
    stranger = tmp_path / ".index-other.k1ll3d00.tmp"  # another output's: not touched
    stranger.mkdir()
    run_index(archive, out)
    assert not stale_dir.exists()
    assert not (tmp_path / ".index.old").exists()
    assert stranger.exists()


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "archive"
    write_series(archive)
    out = tmp_path / "index"
    run_index(archive, out)
    before = _tree(out)
    snap = listing(archive, tmp_path)

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ctcurate.catalog.build.write_json", full)
    with pytest.raises(OutputError, match=r"index: no space left on the device"):
        index.run(archive, snap, out, IndexParams(workers=1), scheduler=None)
    assert _tree(out) == before
    assert not list(tmp_path.glob(".index.*.tmp"))

    listing_file = tmp_path / "listing.parquet"
    old = listing_file.read_bytes()
    monkeypatch.setattr("ctcurate.pipeline.snapshot.write_parquet", full)
    with pytest.raises(OutputError, match=r"listing.parquet: no space left"):
        snapshot.run(archive, listing_file, SnapshotParams())
    assert listing_file.read_bytes() == old


def test_other_errors_pass_through_the_guard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OSError, match="Permission denied"), guarded_output(out, "index"):
        raise OSError(errno.EACCES, "Permission denied")
    assert not lock_path(out).exists()


def test_duckdb_out_of_memory_is_one_line(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    for site in ("H01", "H02", "H03"):
        write_series(archive, site=site, n=8)
    snap = listing(archive, tmp_path)
    # below the params floor on purpose (model_copy does not validate)
    starved = IndexParams(workers=1).model_copy(update={"duckdb_memory_mb": 4})
    with pytest.raises(
        InputError, match=r"outgrew DuckDB's memory limit \(index.duckdb_memory_mb = 4\)"
    ):
        index.run(archive, snap, tmp_path / "index", starved, scheduler=None)
    assert not (tmp_path / "index").exists()
