"""index: header scan, quarantine reasons, duplicates, series geometry, determinism."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pydicom.data
import pytest
from helpers.index import (
    SERIES,
    ct_slice,
    index_digests,
    listing,
    run_index,
    save,
    table,
    write_series,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
)

from ctcurate.dicom import header as dicom
from ctcurate.errors import AccountingError, InputError
from ctcurate.io.tables import write_parquet
from ctcurate.params import IndexParams
from ctcurate.pipeline import index

OUTPUTS = (
    "instances/part-00000.parquet",
    "series.parquet",
    "quarantine.parquet",
    "skipped.parquet",
)


def pixel_offset(data: bytes) -> int:
    return data.rindex(b"\xe0\x7f\x10\x00")


# --- a clean series -------------------------------------------------------------------------


def test_tiny_series_is_indexed_with_geometry(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive)
    report = run_index(archive, tmp_path / "out")
    assert re.fullmatch("[0-9a-f]{16}", report.pop("reader"))
    assert report == {
        "files_seen": 4,
        "files_indexed": 4,
        "files_quarantined": 0,
        "files_skipped": 0,
        "quarantine_reasons": {},
        "skip_reasons": {},
        "series": 1,
        "phi_census": {},
        "site_from": {"path_component": 0},
    }
    inst = table(tmp_path / "out", "instances")
    assert [r["path"] for r in inst] == sorted(r["path"] for r in inst)
    first = inst[0]
    assert first["site"] == "H01"
    assert first["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert first["pixel_spacing_row"] == 0.7
    assert first["pixel_spacing_col"] == 0.8
    assert first["image_orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert first["rescale_intercept"] == -1024.0
    assert first["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert str(first["study_date"]) == "2020-03-15"
    assert first["flags"] == []
    (series,) = table(tmp_path / "out", "series")
    assert series["series_instance_uid"] == SERIES
    assert series["slice_count"] == 4
    assert series["orientation"] == "axial"
    assert series["gantry_tilt_deg"] == 0.0
    assert series["spacing_min_mm"] == pytest.approx(2.5)
    assert series["spacing_max_mm"] == pytest.approx(2.5)
    assert series["z_coverage_mm"] == pytest.approx(7.5)
    assert (series["n_gaps"], series["n_duplicate_positions"]) == (0, 0)
    assert series["body_part_examined"] == "CHEST"
    assert series["study_description"] is None  # not in the header: null
    assert "body_region" not in series  # decided by select from the headers
    assert series["flags"] == []
    assert [p.name for p in (tmp_path / "out" / "instances").iterdir()] == ["part-00000.parquet"]
    assert set(pq.read_schema(tmp_path / "out" / "series.parquet").names) >= {
        "study_instance_uid",
        "patient_id",
        "rows",
        "slice_thickness",
    }


def test_compressed_and_deflated_files_are_indexed(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    rle = ct_slice(0)
    rle.compress(RLELossless)
    save(rle, archive / "H01" / "rle.dcm")
    save(ct_slice(1, ts=DeflatedExplicitVRLittleEndian), archive / "H01" / "deflated.dcm")
    report = run_index(archive, tmp_path / "out")
    assert report["files_indexed"] == 2, table(tmp_path / "out", "quarantine")
    syntaxes = {r["path"]: r["transfer_syntax_uid"] for r in table(tmp_path / "out", "instances")}
    assert syntaxes == {
        "H01/deflated.dcm": DeflatedExplicitVRLittleEndian,
        "H01/rle.dcm": RLELossless,
    }


def test_file_with_meta_but_no_modality_is_indexed_and_flagged(tmp_path: Path) -> None:
    """Modality is optional with file meta (indexed, flagged); without meta it is evidence."""
    archive = tmp_path / "archive"
    with_meta = ct_slice(0, series="1.2.3.30")
    del with_meta.Modality
    save(with_meta, archive / "H01" / "sc.dcm")
    bare = ct_slice(0, series="1.2.3.31")
    del bare.Modality
    bare.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, bare, implicit_vr=True, little_endian=True)
    (archive / "H01" / "bare").write_bytes(buf.getvalue())
    report = run_index(archive, tmp_path / "out")
    assert report["files_indexed"] == 1
    (row,) = table(tmp_path / "out", "instances")
    assert row["path"] == "H01/sc.dcm"
    assert row["modality"] is None
    assert "no_modality" in row["flags"]
    (refused,) = table(tmp_path / "out", "quarantine")
    assert (refused["path"], refused["reason"]) == ("H01/bare", "not_dicom")
    assert "Modality" in refused["detail"]


# --- every file accounted for ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trap_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One archive holding a clean series and one file per trap; index output beside it."""
    root = tmp_path_factory.mktemp("traps")
    archive = root / "archive"
    write_series(archive)
    h02 = archive / "H02"
    h02.mkdir(parents=True)
    (h02 / "notes.txt").write_text("not an image\n")
    (h02 / "empty").write_bytes(b"")
    no_meta = ct_slice(0, series="1.2.3.10")
    no_meta.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, no_meta, implicit_vr=True, little_endian=True)
    (h02 / "no_meta").write_bytes(buf.getvalue())
    data = save(ct_slice(0, series="1.2.3.11"), h02 / "whole.dcm")
    off = pixel_offset(data)
    (h02 / "cut_before_pixels.dcm").write_bytes(data[:off])
    (h02 / "cut_in_pixels.dcm").write_bytes(data[: off + 12 + 40])
    (h02 / "whole.dcm").unlink()
    cut_header = save(ct_slice(0, series="1.2.3.12"), h02 / "cut_header.dcm")
    (h02 / "cut_header.dcm").write_bytes(cut_header[: cut_header.index(b"Thorax") + 3])
    mpeg = ct_slice(0, series="1.2.3.13", ts=MPEG2MPML)
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\0" * 12])
    mpeg["PixelData"].VR = "OB"
    save(mpeg, h02 / "mpeg.dcm")
    save(ct_slice(0, series="1.2.3.14", PatientName="Doe^Jane"), h02 / "phi_top.dcm")
    nested = ct_slice(0, series="1.2.3.15")
    item = Dataset()
    item.InstitutionName = "General Hospital"
    nested.RequestAttributesSequence = [item]
    save(nested, h02 / "phi_nested.dcm")
    save(ct_slice(0, series="1.2.3.16", sop="1.2.3.16.1"), h02 / "conflict_a.dcm")
    save(ct_slice(1, series="1.2.3.16", sop="1.2.3.16.1"), h02 / "conflict_b.dcm")
    shutil.copy(archive / "H01/study/series/0000.dcm", h02 / "copy_of_h01.dcm")
    shutil.copy(h02 / "phi_top.dcm", h02 / "phi_top_copy.dcm")
    save(ct_slice(2, series="1.2.3.17"), h02 / "dup_a.dcm")
    shutil.copy(h02 / "dup_a.dcm", h02 / "dup_b.dcm")
    save(ct_slice(3, series="1.2.3.18"), h02 / "Ünïcode näme #1.dcm")
    shutil.copy(pydicom.data.get_testdata_file("DICOMDIR"), h02 / "DICOMDIR")
    vanished = h02 / "vanished.dcm"
    save(ct_slice(0, series="1.2.3.19"), vanished)
    save(ct_slice(0, series="1.2.3.21"), archive / "at_root.dcm")
    snap = listing(archive, root)
    vanished.unlink()
    os.utime(h02 / "Ünïcode näme #1.dcm", ns=(0, 0))
    index.run(archive, snap, root / "out", IndexParams(workers=2), scheduler=None)
    return root


@pytest.mark.parametrize(
    ("path", "reason", "detail"),
    [
        ("H02/notes.txt", "not_dicom", "no DICOM file meta"),
        ("H02/empty", "not_dicom", "SOPInstanceUID"),
        ("H02/cut_before_pixels.dcm", "no_pixel_data", "no PixelData"),
        ("H02/cut_in_pixels.dcm", "pixel_length_short", "PixelData holds 40 of 128 bytes"),
        ("H02/cut_header.dcm", "truncated", "SeriesDescription declares more bytes"),
        ("H02/mpeg.dcm", "unsupported_transfer_syntax", r"1\.2\.840\.10008\.1\.2\.4\.100 \(MPEG2"),
        ("H02/phi_top.dcm", "phi_present", "^PatientName$"),
        ("H02/phi_top_copy.dcm", "phi_present", "^PatientName$"),
        ("H02/phi_nested.dcm", "phi_present", "^RequestAttributesSequence>InstitutionName$"),
        ("H02/conflict_a.dcm", "uid_conflict", "bytes differ"),
        ("H02/conflict_b.dcm", "uid_conflict", "bytes differ"),
        ("H02/vanished.dcm", "unreadable", "vanished"),
    ],
)
def test_trap_is_quarantined(trap_archive: Path, path: str, reason: str, detail: str) -> None:
    rows = {r["path"]: r for r in table(trap_archive / "out", "quarantine")}
    assert rows[path]["reason"] == reason
    assert re.search(detail, rows[path]["detail"]), rows[path]["detail"]


def test_no_phi_value_in_any_output(trap_archive: Path) -> None:
    for name in (*OUTPUTS, "report.json", "catalog.duckdb"):
        data = (trap_archive / "out" / name).read_bytes()
        assert b"Doe" not in data
        assert b"General Hospital" not in data


def test_skips_duplicates_and_flags_cross_site_copies(trap_archive: Path) -> None:
    out = trap_archive / "out"
    skipped = {r["path"]: (r["reason"], r["detail"]) for r in table(out, "skipped")}
    assert skipped == {
        "H02/DICOMDIR": ("dicomdir", "media storage directory (DICOMDIR)"),
        "H02/dup_b.dcm": ("duplicate_identical", "same bytes as H02/dup_a.dcm"),
    }
    inst = {r["path"]: r for r in table(out, "instances")}
    assert "H02/dup_a.dcm" in inst
    assert inst["H02/copy_of_h01.dcm"]["flags"] == ["uid_shared_across_sites"]
    assert inst["H01/study/series/0000.dcm"]["flags"] == ["uid_shared_across_sites"]
    assert inst["H02/no_meta"]["flags"] == ["no_meta"]
    assert inst["H02/no_meta"]["transfer_syntax_uid"] is None
    assert inst["H02/Ünïcode näme #1.dcm"]["flags"] == ["changed_since_snapshot"]
    assert (inst["at_root.dcm"]["site"], inst["at_root.dcm"]["flags"]) == (None, ["no_site"])
    series = {(r["site"], r["series_instance_uid"]): r for r in table(out, "series")}
    assert series["H01", SERIES]["slice_count"] == 4
    assert series["H02", SERIES]["slice_count"] == 1
    assert "uid_shared_across_sites" in series["H01", SERIES]["flags"]
    assert table(out, "series")[-1]["site"] is None  # null site sorts last


def test_every_listed_file_is_accounted_for_once(trap_archive: Path) -> None:
    out = trap_archive / "out"
    report = json.loads((out / "report.json").read_text())
    listed = pq.read_table(trap_archive / "listing.parquet")["path"].to_pylist()
    seen = [r["path"] for name in ("instances", "quarantine", "skipped") for r in table(out, name)]
    assert sorted(seen) == sorted(listed)
    assert report["files_seen"] == len(listed)
    assert report["files_seen"] == (
        report["files_indexed"] + report["files_quarantined"] + report["files_skipped"]
    )
    assert report["quarantine_reasons"]["phi_present"] == 3
    assert report["skip_reasons"] == {"dicomdir": 1, "duplicate_identical": 1}


def test_catalog_views_answer_queries(trap_archive: Path) -> None:
    from ctcurate.pipeline import query

    text = query.run(
        trap_archive / "out" / "catalog.duckdb",
        "SELECT reason, count(*) AS n FROM quarantine GROUP BY reason ORDER BY reason",
        "json",
    )
    counts = {r["reason"]: r["n"] for r in json.loads(text)}
    report = json.loads((trap_archive / "out" / "report.json").read_text())
    assert counts == report["quarantine_reasons"]


def test_unbalanced_accounting_fails() -> None:
    with pytest.raises(AccountingError, match=r"5 files seen, 3 indexed \+ 1 quarantined"):
        index.build_report(5, 3, {"not_dicom": 1}, {}, n_series=1, reader="r")


# --- per-file caps ----------------------------------------------------------------------------


def test_too_large_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "H01" / "big.dcm"
    data = save(ct_slice(0), path)
    out = dicom.read_instance(tmp_path, "H01/big.dcm", len(data), 0, max_bytes=100)
    assert (out.status, out.reason) == ("quarantined", "too_large")
    assert "100 byte cap" in str(out.detail)


def test_deflate_bomb_is_capped(tmp_path: Path) -> None:
    bomb = ct_slice(0, ts=DeflatedExplicitVRLittleEndian, Rows=512, Columns=512)
    bomb.PixelData = bytes(512 * 512 * 2)
    data = save(bomb, tmp_path / "H01" / "bomb.dcm")
    assert len(data) < 10_000
    out = dicom.read_instance(tmp_path, "H01/bomb.dcm", len(data), 0, max_bytes=100_000)
    assert (out.status, out.reason) == ("quarantined", "too_large")
    assert "inflates past" in str(out.detail)


def test_slow_file_times_out(tmp_path: Path) -> None:
    data = save(ct_slice(0), tmp_path / "H01" / "a.dcm")
    previous = signal.getsignal(signal.SIGALRM)
    try:
        dicom.init_worker(1e-6)
        (out,) = dicom.scan_files(str(tmp_path), [("H01/a.dcm", len(data), 0)], 2**30)
    finally:
        dicom.init_worker(0)
        dicom._timeout_s = 0.0
        signal.signal(signal.SIGALRM, previous)
    assert (out.status, out.reason) == ("quarantined", "timeout")


def test_path_outside_archive_and_directory_are_not_read(tmp_path: Path) -> None:
    (tmp_path / "H01" / "folder").mkdir(parents=True)
    for rel, reason, detail in (
        ("../etc/passwd", "unreadable", "outside the archive"),
        ("H01/folder", "unlistable_folder", "could not be listed"),
    ):
        out = dicom.read_instance(tmp_path, rel, 0, 0, 2**30)
        assert (out.status, out.reason) == ("quarantined", reason)
        assert detail in str(out.detail)


# --- pydicom's own test files -------------------------------------------------------------------


def test_pydicom_test_files_each_give_a_row_or_a_reason(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    files = [Path(f) for f in pydicom.data.get_testdata_files() if Path(f).is_file()]
    assert len(files) > 100
    for i, src in enumerate(files):
        dst = archive / f"S{i % 3}" / f"{i:03d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    report = run_index(archive, tmp_path / "out", workers=2)
    assert report["files_seen"] == len(files)
    assert report["files_indexed"] >= 3
    assert report["quarantine_reasons"]["phi_present"] > 50
    assert report["skip_reasons"]["dicomdir"] >= 5
    reasons = {r["reason"] for r in table(tmp_path / "out", "quarantine")}
    assert reasons <= {
        "not_dicom",
        "truncated",
        "no_pixel_data",
        "pixel_length_short",
        "phi_present",
        "unsupported_transfer_syntax",
        "missing_attributes",
        "uid_conflict",
        "unreadable",
    }


# --- determinism and executors -------------------------------------------------------------------


def small_archive(archive: Path) -> None:
    """Three sites, a duplicate pair, a conflict pair and a non-DICOM file (25 files)."""
    write_series(archive, n=12)
    write_series(archive, site="H02", n=8, series="1.2.3.20")
    (archive / "H02" / "junk.txt").write_text("x")
    save(ct_slice(0, series="1.2.3.30"), archive / "H03" / "dup_a.dcm")
    shutil.copy(archive / "H03" / "dup_a.dcm", archive / "H03" / "dup_b.dcm")
    save(ct_slice(0, series="1.2.3.31", sop="1.2.3.31.1"), archive / "H03" / "conflict_a.dcm")
    save(ct_slice(1, series="1.2.3.31", sop="1.2.3.31.1"), archive / "H03" / "conflict_b.dcm")


SMALL = {"shard_size": 5, "chunk_files": 3}
#: Files of small_archive read on every run: their outcome comes from the duplicate rules.
DUPLICATE_RULE_FILES = 3


def test_sharded_output_does_not_depend_on_workers(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    small_archive(archive)
    snap = listing(archive, tmp_path)
    a = index.index_archive(archive, snap, tmp_path / "a", IndexParams(workers=1, **SMALL))
    index.index_archive(archive, snap, tmp_path / "b", IndexParams(workers=2, **SMALL))
    assert (a.files_seen, a.files_read, a.files_reused) == (25, 25, 0)
    digests = index_digests(tmp_path / "a")
    assert digests == index_digests(tmp_path / "b")
    shards = sorted(p for p in digests if p.startswith("instances/"))
    assert shards == [f"instances/part-{i:05d}.parquet" for i in range(5)]  # 21 rows by 5
    sizes = [pq.read_metadata(tmp_path / "a" / p).num_rows for p in shards]
    assert sizes == [5, 5, 5, 5, 1]
    assert not index.work_dir(tmp_path / "a").exists()


def test_rerun_reads_only_new_and_changed_files(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    small_archive(archive)
    out, params = tmp_path / "out", IndexParams(workers=1, **SMALL)
    first = index.index_archive(archive, listing(archive, tmp_path / "s1"), out, params)
    assert first.files_read == 25
    # change one file, add one, delete one
    changed = archive / "H01" / "study" / "series" / "0003.dcm"
    save(ct_slice(3, RescaleIntercept=-1000), changed)
    os.utime(changed, ns=(10**18, 10**18))
    save(ct_slice(0, series="1.2.3.40"), archive / "H04" / "new.dcm")
    (archive / "H02" / "study" / "series" / "0000.dcm").unlink()
    snap = listing(archive, tmp_path / "s2")
    again = index.index_archive(archive, snap, out, params)
    assert (again.files_seen, again.files_read) == (25, 2 + DUPLICATE_RULE_FILES)
    scratch = index.index_archive(archive, snap, tmp_path / "scratch", params)
    assert scratch.files_read == 25
    assert index_digests(out) == index_digests(tmp_path / "scratch")
    inst = {r["path"]: r for r in table(out, "instances")}
    assert "H02/study/series/0000.dcm" not in inst
    assert inst["H01/study/series/0003.dcm"]["rescale_intercept"] == -1000.0
    assert inst["H04/new.dcm"]["series_instance_uid"] == "1.2.3.40"
    # An unchanged (path, size, mtime) is not read: same-size garbage with the old mtime
    # still gives the old row.
    kept = archive / "H01" / "study" / "series" / "0000.dcm"
    st = kept.stat()
    kept.write_bytes(bytes(st.st_size))
    os.utime(kept, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = index.index_archive(archive, listing(archive, tmp_path / "s3"), out, params)
    assert third.files_read == DUPLICATE_RULE_FILES
    assert index_digests(out) == index_digests(tmp_path / "scratch")


def test_rows_of_another_reader_are_not_reused(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive, n=3)
    out, snap = tmp_path / "out", listing(archive, tmp_path)
    index.index_archive(archive, snap, out, IndexParams(workers=1))
    report = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps(report | {"reader": "0" * 16}))
    assert index.index_archive(archive, snap, out, IndexParams(workers=1)).files_read == 3
    bigger_cap = IndexParams(workers=1, max_file_mb=1000)  # another fingerprint
    assert index.index_archive(archive, snap, out, bigger_cap).files_read == 3
    assert index.index_archive(archive, snap, out, bigger_cap).files_read == 0


def test_killed_run_resumes_without_redoing_finished_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctcurate.catalog import build

    archive = tmp_path / "archive"
    small_archive(archive)
    snap, out = listing(archive, tmp_path), tmp_path / "out"
    params = IndexParams(workers=1, shard_size=4, chunk_files=2)
    finish_part = build._finish_part
    calls: list[int] = []

    def crash_after_two(tmp: Path, final: Path) -> None:
        if len(calls) == 2:
            msg = "killed"
            raise RuntimeError(msg)
        finish_part(tmp, final)
        calls.append(pq.ParquetFile(final).metadata.num_rows)

    monkeypatch.setattr(build, "_finish_part", crash_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        index.index_archive(archive, snap, out, params)
    assert not out.exists()
    saved = sorted((index.work_dir(out) / "parts").glob("*"))
    assert len(saved) == 2  # the unfinished chunk was dropped
    monkeypatch.setattr(build, "_finish_part", finish_part)
    resumed = index.index_archive(archive, snap, out, params)
    assert resumed.files_read == 25 - sum(calls)
    assert sum(calls) >= 8
    index.index_archive(archive, snap, tmp_path / "scratch", params)
    assert index_digests(out) == index_digests(tmp_path / "scratch")
    assert not index.work_dir(out).exists()


@pytest.mark.slow
def test_dask_cluster_gives_the_local_bytes(tmp_path: Path) -> None:
    from distributed import LocalCluster

    archive = tmp_path / "archive"
    small_archive(archive)
    snap = listing(archive, tmp_path)
    index.index_archive(archive, snap, tmp_path / "local", IndexParams(workers=1, **SMALL))
    with LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as cluster:
        stats = index.index_archive(
            archive, snap, tmp_path / "dask", IndexParams(**SMALL), cluster.scheduler_address
        )
    assert stats.files_read == 25
    assert index_digests(tmp_path / "dask") == index_digests(tmp_path / "local")


def test_unreachable_scheduler_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctcurate import executor

    monkeypatch.setattr(executor, "CONNECT_TIMEOUT_S", 0.5)
    archive = tmp_path / "archive"
    write_series(archive, n=1)
    with pytest.raises(
        InputError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"
    ):
        index.run(
            archive, listing(archive, tmp_path), tmp_path / "o", IndexParams(), "tcp://127.0.0.1:9"
        )


def test_missing_listing_and_archive_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="archive folder not found"):
        index.run(tmp_path / "nope", tmp_path / "l.parquet", tmp_path / "o", IndexParams(), None)
    (tmp_path / "archive").mkdir()
    with pytest.raises(InputError, match=r"l\.parquet: no such Parquet file"):
        index.run(tmp_path / "archive", tmp_path / "l.parquet", tmp_path / "o", IndexParams(), None)


@pytest.mark.parametrize(
    ("listed", "message"),
    [
        ({"path": ["a", "a"], "size": [1, 1], "mtime_ns": [0, 0]}, "a path is listed twice"),
        ({"path": ["a", None], "size": [1, 1], "mtime_ns": [0, 0]}, "1 row"),
        ({"path": ["a"], "size": [1]}, r"missing column\(s\) mtime_ns"),
    ],
)
def test_bad_listing_is_rejected(tmp_path: Path, listed: dict[str, Any], message: str) -> None:
    snap = tmp_path / "l.parquet"
    write_parquet(snap, pa.table(listed))
    (tmp_path / "archive").mkdir()
    with pytest.raises(InputError, match=message):
        index.run(tmp_path / "archive", snap, tmp_path / "o", IndexParams(), None)
    assert not (tmp_path / "o").exists()


def test_empty_listing_gives_empty_tables(tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    report = run_index(tmp_path / "archive", tmp_path / "out")
    assert report["files_seen"] == report["series"] == 0
    assert pq.read_table(tmp_path / "out" / "series.parquet").num_rows == 0


# --- series geometry ---------------------------------------------------------------------------

AXIAL = np.array([1.0, 0, 0, 0, 1, 0])


def stack(z: list[float], ori: np.ndarray = AXIAL, shear: float = 0.0) -> index.SeriesGeometry:
    pos = np.array([[0.0, shear * zi, zi] for zi in z])
    return index.series_geometry(pos, np.tile(ori, (len(z), 1)))


def test_gap_and_duplicate_positions_are_counted() -> None:
    geo = stack([0, 2, 4, 4, 8, 10])
    assert geo.n_duplicate_positions == 1
    assert geo.n_gaps == 1
    assert (geo.spacing_min_mm, geo.spacing_max_mm, geo.z_coverage_mm) == (2.0, 4.0, 10.0)
    assert set(geo.flags) == {"gaps", "duplicate_positions", "varying_spacing"}


def test_shuffled_positions_give_the_same_geometry() -> None:
    assert stack([6, 0, 2, 4]) == stack([0, 2, 4, 6])


def test_gantry_tilt_is_the_angle_between_stack_and_normal() -> None:
    geo = stack([0, 1, 2, 3], shear=math.tan(math.radians(15)))
    assert geo.gantry_tilt_deg == pytest.approx(15.0, abs=1e-3)
    assert geo.orientation == "axial"
    assert "gantry_tilt" in geo.flags
    assert stack([0, 1, 2]).gantry_tilt_deg == 0.0


@pytest.mark.parametrize(
    ("ori", "label"),
    [
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([1, 0, 0, 0, math.cos(0.9), -math.sin(0.9)], "oblique"),
        ([1, 0, 0, 0, math.cos(0.2), -math.sin(0.2)], "axial"),
    ],
)
def test_orientation_labels(ori: list[float], label: str) -> None:
    assert stack([0, 1], ori=np.array(ori, dtype=float)).orientation == label


def test_missing_geometry_is_flagged_not_guessed() -> None:
    pos = np.array([[0.0, 0, 0], [np.nan, np.nan, np.nan]])
    geo = index.series_geometry(pos, np.tile(AXIAL, (2, 1)))
    assert geo.flags == ("missing_geometry",)
    assert geo.z_coverage_mm == 0.0
    nothing = index.series_geometry(np.full((1, 3), np.nan), np.full((1, 6), np.nan))
    assert (nothing.orientation, nothing.z_coverage_mm) == ("unknown", None)


# --- fuzzing ------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("sdi")),
        min_size=1,
        max_size=6,
    ),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_mutated_files_give_a_row_or_a_reason(
    fuzz_base: tuple[Path, bytes], edits: list[tuple[int, int, str]], cut: int | None
) -> None:
    folder, base = fuzz_base
    data = bytearray(base)
    for pos, value, op in edits:
        i = pos % len(data)
        if op == "s":
            data[i] = value
        elif op == "d":
            del data[i : i + 1 + value % 16]
        else:
            data[i:i] = bytes([value]) * (1 + value % 8)
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    (folder / "H01" / "f.dcm").write_bytes(bytes(data))
    out = dicom.read_instance(folder, "H01/f.dcm", len(data), 0, 2**30)
    assert out == dicom.read_instance(folder, "H01/f.dcm", len(data), 0, 2**30, lean=False)
    if out.status == "indexed":
        assert out.record is not None
        rows = index.instances_table([out])
        assert index.series_table(rows).num_rows == 1
    else:
        assert out.reason
        assert out.detail
        assert out.record is None


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, save(ct_slice(0), folder / "H01" / "base.dcm")


def test_progress_counts_the_files_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctcurate.catalog import build

    seen: list[tuple[int, int, str]] = []
    real = build.progress

    def recording(items: Any, total: int, label: str, logger: Any, **kw: Any) -> Any:
        n = 0
        for item in real(items, total, label, logger, **kw):
            n += 1
            yield item
        seen.append((total, n, label))

    monkeypatch.setattr(build, "progress", recording)
    archive = tmp_path / "archive"
    write_series(archive, n=5)
    index.index_archive(archive, listing(archive, tmp_path), tmp_path / "o", IndexParams(workers=1))
    assert seen == [(5, 5, "index")]  # one tick per file: the bar's files/s
