"""gzip-compressed instances (``.dcm.gz``): read like the DICOM they hold, bombs capped."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers.index import ct_slice, run_index, save, table, write_series

from ctcurate.dicom import archive_file, checks
from ctcurate.dicom import header as dicom

MiB = 2**20


def gzip_file(path: Path) -> Path:
    """Replace ``path`` by its gzip-compressed copy ``<path>.gz``; return the new path."""
    target = path.with_name(path.name + ".gz")
    target.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    path.unlink()
    return target


def read(root: Path, path: Path, *, lean: bool = True, max_bytes: int = 2**30) -> Any:
    st = path.stat()
    rel = path.relative_to(root).as_posix()
    return dicom.read_instance(root, rel, st.st_size, st.st_mtime_ns, max_bytes, lean=lean)


def same_row(a: dict[str, Any], b: dict[str, Any]) -> bool:
    skip = {"path", "size", "mtime_ns"}
    return {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }


def test_gzipped_slice_gives_the_plain_row_on_both_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "H01" / "a.dcm"
    save(ct_slice(0), plain)
    packed = tmp_path / "H01" / "b.dcm.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    reference = read(tmp_path, plain).record
    assert reference is not None
    for lean in (True, False):
        outcome = read(tmp_path, packed, lean=lean)
        assert outcome.status == "indexed"
        assert same_row(outcome.record, reference)
        assert outcome.record["size"] == packed.stat().st_size  # the listed (compressed) size

    def refuse(*args: Any) -> None:
        raise AssertionError

    monkeypatch.setattr(dicom, "_read_checked", refuse)  # the lean reader alone reads it
    assert read(tmp_path, packed).status == "indexed"


def test_index_reads_a_gzipped_series(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    paths = write_series(archive, n=6)
    for path in paths[::2]:
        gzip_file(path)
    report = run_index(archive, tmp_path / "out")
    assert (report["files_indexed"], report["files_quarantined"]) == (6, 0)
    rows = table(tmp_path / "out", "instances")
    assert sum(r["path"].endswith(".dcm.gz") for r in rows) == 3
    (series,) = table(tmp_path / "out", "series")
    assert (series["slice_count"], series["n_gaps"], series["flags"]) == (6, 0, [])


def test_truncated_gzip_is_quarantined(tmp_path: Path) -> None:
    save(ct_slice(0), tmp_path / "H01" / "a.dcm")
    packed = gzip_file(tmp_path / "H01" / "a.dcm")
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2])
    for lean in (True, False):
        outcome = read(tmp_path, packed, lean=lean)
        assert (outcome.status, outcome.reason) == ("quarantined", "truncated")
        assert outcome.detail == "gzip stream is corrupt or ends early"


def test_dicom_whose_preamble_starts_like_gzip_is_read_as_dicom(tmp_path: Path) -> None:
    ds = ct_slice(0)
    ds.preamble = archive_file.GZIP_MAGIC + b"\0" * 125
    save(ds, tmp_path / "H01" / "a.dcm")
    save(ct_slice(0), tmp_path / "H01" / "b.dcm")
    a, b = read(tmp_path, tmp_path / "H01" / "a.dcm"), read(tmp_path, tmp_path / "H01" / "b.dcm")
    assert a.status == "indexed"
    assert same_row(a.record, b.record)


def write_bomb(path: Path, gib: int = 1) -> None:
    """A gzip file inflating to ``gib`` GiB of zeros: 16 MiB members, concatenated (~1 MB)."""
    member = gzip.compress(bytes(16 * MiB), compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fp:
        for _ in range(gib * 64):
            fp.write(member)


def test_gzip_bomb_is_quarantined_quickly_in_little_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "H01" / "bomb.dcm.gz"
    write_bomb(bomb)
    assert bomb.stat().st_size < 2 * MiB
    for lean in (True, False):
        tracemalloc.start()
        start = time.perf_counter()
        outcome = read(tmp_path, bomb, lean=lean, max_bytes=16 * MiB)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert (outcome.status, outcome.reason) == ("quarantined", "too_large")
        assert outcome.detail == "gzip content inflates past the 16777216 byte cap (max_file_mb)"
        assert seconds < 5.0
        assert peak < 100 * MiB  # the cap and a chunk, never the 1 GiB


def test_index_quarantines_a_gzip_bomb_under_max_file_mb(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive, n=4)
    write_bomb(archive / "H01" / "bomb.dcm.gz")
    report = run_index(archive, tmp_path / "out", max_file_mb=8)
    assert report["quarantine_reasons"] == {"too_large": 1}
    (row,) = table(tmp_path / "out", "quarantine")
    assert (row["path"], row["reason"]) == ("H01/bomb.dcm.gz", "too_large")


def test_open_instance_reads_gzip_and_plain_the_same(tmp_path: Path) -> None:
    plain = tmp_path / "a.dcm"
    save(ct_slice(3), plain)
    packed = tmp_path / "b.dcm.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = archive_file.dcmread(plain), archive_file.dcmread(packed)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert np.array_equal(a.pixel_array, b.pixel_array)
    with archive_file.open_instance(packed) as fp:
        assert fp.read() == plain.read_bytes()
    with pytest.raises(archive_file.InflateError, match="inflates past the 100 byte cap"):
        archive_file.dcmread(packed, max_bytes=100)


# --- real gzip-compressed DICOM (nibabel's test data: Siemens and Philips MR) ---------------


def nibabel_files() -> list[Path]:
    nicom = pytest.importorskip("nibabel.nicom")
    folder = Path(nicom.__file__).parent / "tests" / "data"
    files = sorted(folder.glob("*.dcm.gz"))
    if not files:
        pytest.skip("nibabel carries no .dcm.gz")
    return files


def test_real_dcm_gz_read_like_their_decompressed_copies(tmp_path: Path) -> None:
    files = nibabel_files()
    root = tmp_path / "archive" / "S"
    root.mkdir(parents=True)
    for i, src in enumerate(files):
        shutil.copy(src, root / f"{i}.dcm.gz")
        with gzip.open(src) as fp:
            (root / f"{i}.dcm").write_bytes(fp.read())
    statuses = []
    for i in range(len(files)):
        packed, plain = (
            read(root.parent, root / f"{i}.dcm.gz"),
            read(root.parent, root / f"{i}.dcm"),
        )
        slow = read(root.parent, root / f"{i}.dcm.gz", lean=False)
        assert (packed.status, packed.reason, packed.detail) == (
            plain.status,
            plain.reason,
            plain.detail,
        )
        assert (slow.status, slow.reason, slow.detail) == (plain.status, plain.reason, plain.detail)
        if plain.record is not None:
            assert same_row(packed.record, plain.record)
            assert same_row(slow.record, plain.record)
        statuses.append(plain.status)
        ds = archive_file.dcmread(root / f"{i}.dcm.gz")
        reference = pydicom.dcmread(root / f"{i}.dcm")
        assert ds.SOPInstanceUID == reference.SOPInstanceUID
        if "PixelData" in reference:
            assert np.array_equal(ds.pixel_array, reference.pixel_array)
    assert len(statuses) == len(files) >= 3


def test_real_dcm_gz_with_identifying_elements_emptied_are_indexed(tmp_path: Path) -> None:
    """The real files name people (quarantined above); emptied, both readers index them."""
    root = tmp_path / "archive" / "S"
    root.mkdir(parents=True)
    for src in nibabel_files():
        ds = archive_file.dcmread(src)

        def blank(_: Any, elem: Any) -> None:
            if elem.keyword in checks.PHI_KEYWORDS:
                elem.value = [] if elem.VR == "SQ" else ""

        ds.walk(blank)
        buf = io.BytesIO()
        ds.save_as(buf)
        target = root / src.name
        target.write_bytes(gzip.compress(buf.getvalue()))
        fast, slow = read(root.parent, target), read(root.parent, target, lean=False)
        assert fast == slow
        assert fast.status == "indexed", (src.name, fast.reason, fast.detail)
        assert fast.record["sop_instance_uid"] == ds.SOPInstanceUID


def test_no_stage_opens_archive_files_around_the_shared_opener() -> None:
    """select's scorer and pack read archive files through ``archive_file`` only."""
    src = Path(dicom.__file__).parents[1]
    names = (
        "selection/pneumonia.py",
        "pipeline/pack.py",
        "imaging/volume.py",
        "pipeline/select.py",
        "pipeline/select_train.py",
    )
    for name in names:
        text = (src / name).read_text(encoding="utf-8")
        calls = text.count("pydicom.dcmread(")
        allowed = text.count("pydicom.dcmread(seg_path")  # annotations, not archive files
        assert calls == allowed, name
    assert "archive_file.dcmread(" in (src / "selection/pneumonia.py").read_text(encoding="utf-8")
    assert "archive_file.dcmread(" in (src / "pipeline/pack.py").read_text(encoding="utf-8")


def test_inflate_stops_at_the_cap(tmp_path: Path) -> None:
    data = gzip.compress(os.urandom(1000) * 50)
    assert len(archive_file.inflate(io.BytesIO(data), 50_000)) == 50_000
    with pytest.raises(archive_file.InflateError) as err:
        archive_file.inflate(io.BytesIO(data), 49_999)
    assert err.value.reason == "too_large"


def test_gzip_copy_of_an_instance_is_a_duplicate_not_a_conflict(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    paths = write_series(archive, n=3)
    copy = paths[0].with_name("copy.dcm.gz")
    copy.write_bytes(gzip.compress(paths[0].read_bytes()))
    other = paths[1].with_name("other.dcm.gz")  # same SOPInstanceUID, other content
    changed = pydicom.dcmread(paths[1])
    changed.SeriesDescription = "changed"
    buf = io.BytesIO()
    changed.save_as(buf)
    other.write_bytes(gzip.compress(buf.getvalue()))
    report = run_index(archive, tmp_path / "out")
    assert report["skip_reasons"] == {"duplicate_identical": 1}
    assert report["quarantine_reasons"] == {"uid_conflict": 2}
    (skipped,) = table(tmp_path / "out", "skipped")
    assert skipped["path"] == "H01/study/series/copy.dcm.gz"
