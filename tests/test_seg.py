"""DICOM SEG write / read round trips (ctcurate.io.seg)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from ctcurate.errors import InputError
from ctcurate.io import seg as seg_module
from ctcurate.io.seg import _scan_frame_references, read_seg_labels, write_seg

N_SLICES, ROWS, COLS = 5, 8, 10
SPACING_Z = 2.5


def make_ct_series(n: int = N_SLICES, rows: int = ROWS, cols: int = COLS) -> list[Dataset]:
    """A tiny axial CT series, slices ordered head → feet."""
    study = generate_uid(entropy_srcs=["test-study"])
    series = generate_uid(entropy_srcs=["test-series"])
    frame = generate_uid(entropy_srcs=["test-frame"])
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["test-sop", str(i)])
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID = "PSN0001"
        ds.PatientName = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = "F"
        ds.StudyDate, ds.StudyTime = "20200315", "101500"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 2, i + 1
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [0.8, 0.7]
        ds.SliceThickness = SPACING_Z
        ds.ImagePositionPatient = [-3.0, -4.0, 10.0 - SPACING_Z * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((rows, cols), np.int16).tobytes()
        out.append(ds)
    return out


def make_labels(n: int = N_SLICES) -> np.ndarray:
    labels = np.zeros((n, ROWS, COLS), np.uint8)
    labels[:, 1:7, 1:9] = 1
    labels[1, 2:4, 2:5] = 2
    labels[3, 4:6, 5:8] = 3
    labels[2, 2, 2] = 2
    return labels


def test_round_trip_in_shuffled_order(tmp_path: Path) -> None:
    source = make_ct_series()
    labels = make_labels()
    path = tmp_path / "seg.dcm"
    write_seg(path, source, labels)
    uids = [str(ds.SOPInstanceUID) for ds in source]
    order = [3, 0, 4, 2, 1]
    got = read_seg_labels(path, [uids[i] for i in order])
    assert got.dtype == np.uint8
    assert got.shape == (N_SLICES, ROWS, COLS)
    np.testing.assert_array_equal(got, labels[order])


def test_frames_keep_the_source_geometry(tmp_path: Path) -> None:
    source = make_ct_series()
    labels = make_labels()
    path = tmp_path / "seg.dcm"
    write_seg(path, source, labels)
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    by_uid = {ds.SOPInstanceUID: ds for ds in source}
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([0.8, 0.7])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        expected = [float(v) for v in by_uid[ref].ImagePositionPatient]
        assert position == pytest.approx(expected)


def test_write_is_deterministic(tmp_path: Path) -> None:
    source, labels = make_ct_series(), make_labels()
    write_seg(tmp_path / "a.dcm", source, labels)
    write_seg(tmp_path / "b.dcm", source, labels)
    digest_a = hashlib.sha256((tmp_path / "a.dcm").read_bytes()).hexdigest()
    digest_b = hashlib.sha256((tmp_path / "b.dcm").read_bytes()).hexdigest()
    assert digest_a == digest_b
    labels[0, 1, 1] = 2
    write_seg(tmp_path / "c.dcm", source, labels)
    assert hashlib.sha256((tmp_path / "c.dcm").read_bytes()).hexdigest() != digest_a


def test_absent_segments_and_unknown_uids_read_as_zeros(tmp_path: Path) -> None:
    source = make_ct_series()
    labels = np.zeros((N_SLICES, ROWS, COLS), np.uint8)
    labels[2, 3:5, 3:5] = 3  # only consolidation, on one slice
    path = tmp_path / "seg.dcm"
    write_seg(path, source, labels)
    uids = [str(ds.SOPInstanceUID) for ds in source]
    got = read_seg_labels(path, [*uids, "1.2.3.4.5"])
    np.testing.assert_array_equal(got[:N_SLICES], labels)
    assert not got[N_SLICES].any()


def test_all_background_round_trips(tmp_path: Path) -> None:
    source = make_ct_series()
    path = tmp_path / "seg.dcm"
    write_seg(path, source, np.zeros((N_SLICES, ROWS, COLS), np.uint8))
    got = read_seg_labels(path, [str(ds.SOPInstanceUID) for ds in source])
    assert got.shape == (N_SLICES, ROWS, COLS)
    assert not got.any()


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((N_SLICES - 1, ROWS, COLS), np.uint8), "4 slices but source has 5"),
        (np.zeros((N_SLICES, ROWS, COLS + 1), np.uint8), "frames are"),
        (np.full((N_SLICES, ROWS, COLS), 4, np.uint8), "label value 4"),
        (np.zeros((ROWS, COLS), np.uint8), "must be 3D"),
    ],
)
def test_write_rejects_mismatched_labels(tmp_path: Path, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_seg(tmp_path / "seg.dcm", make_ct_series(), labels)
    assert not (tmp_path / "seg.dcm").exists()


def test_write_rejects_empty_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one CT instance"):
        write_seg(tmp_path / "seg.dcm", [], np.zeros((0, ROWS, COLS), np.uint8))


def test_read_rejects_non_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("not a segmentation\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"notes\.dcm: not a readable DICOM SEG"):
        read_seg_labels(path, ["1.2.3"])


def test_read_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"absent\.dcm: not a readable DICOM SEG"):
        read_seg_labels(tmp_path / "absent.dcm", ["1.2.3"])


def test_read_rejects_a_ct_image(tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    make_ct_series()[0].save_as(path, enforce_file_format=True)
    with pytest.raises(InputError, match=r"ct\.dcm: not a DICOM SEG"):
        read_seg_labels(path, ["1.2.3"])


def test_read_rejects_a_broken_seg(tmp_path: Path) -> None:
    source, labels = make_ct_series(), make_labels()
    path = tmp_path / "seg.dcm"
    write_seg(path, source, labels)
    ds = pydicom.dcmread(path)
    del ds.SegmentSequence
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    with pytest.raises(InputError, match=r"broken\.dcm: not a readable DICOM SEG"):
        read_seg_labels(broken, [str(s.SOPInstanceUID) for s in source])


# -- the numpy reader against highdicom's -----------------------------------------------------


def highdicom_labels(path: Path, uids: list[str]) -> np.ndarray:
    """Reference reading of a SEG through highdicom (as the reader did before)."""
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path), copy=False)
    referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
    wanted = [u for u in uids if u in referenced]
    out = np.zeros((len(uids), int(seg.Rows), int(seg.Columns)), np.uint8)
    if not wanted:
        return out
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=wanted,
        combine_segments=True,
        relabel=False,
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
        dtype=np.uint8,
    )
    for i, uid in enumerate(uids):
        if uid in wanted:
            out[i] = pixels[wanted.index(uid)]
    return out


def random_labels(seed: int, n: int, rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, rows, cols)) < 0.6).astype(np.uint8)
    labels[rng.random((n, rows, cols)) < 0.15] = 2
    labels[rng.random((n, rows, cols)) < 0.1] = 3
    labels[n // 2] = 0  # an empty slice: its frames are omitted
    return labels


@pytest.mark.parametrize(("n", "rows", "cols"), [(5, 8, 10), (7, 5, 3), (12, 16, 16)])
def test_numpy_reader_equals_highdicom(tmp_path: Path, n: int, rows: int, cols: int) -> None:
    # odd frame sizes put frame boundaries inside bytes of the bit-packed pixel data
    source = make_ct_series(n, rows, cols)
    labels = random_labels(n * rows, n, rows, cols)
    path = tmp_path / "seg.dcm"
    write_seg(path, source, labels)
    uids = [str(ds.SOPInstanceUID) for ds in source]
    order = list(np.random.default_rng(n).permutation(n))
    asked = [uids[i] for i in order] + ["1.2.3.4.5"]
    got = read_seg_labels(path, asked)
    np.testing.assert_array_equal(got, highdicom_labels(path, asked))
    np.testing.assert_array_equal(got[:n], labels[order])


def test_byte_scan_equals_parsed_references(tmp_path: Path) -> None:
    source = make_ct_series()
    path = tmp_path / "seg.dcm"
    write_seg(path, source, make_labels())
    ds = pydicom.dcmread(path)
    raw = ds.get_item(0x52009230).value
    scanned = _scan_frame_references(raw, int(ds.NumberOfFrames))
    assert scanned is not None
    parsed = [
        (
            int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
            [
                str(s.ReferencedSOPInstanceUID)
                for s in item.DerivationImageSequence[0].SourceImageSequence
            ],
        )
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    assert scanned == parsed
    assert _scan_frame_references(raw, int(ds.NumberOfFrames) + 1) is None


def test_reader_falls_back_to_parsed_sequences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, labels = make_ct_series(), make_labels()
    path = tmp_path / "seg.dcm"
    write_seg(path, source, labels)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = tmp_path / "implicit.dcm"
    ds.save_as(implicit)
    assert pydicom.dcmread(implicit).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian

    def no_scan(raw: bytes, n_frames: int) -> None:
        msg = "the byte scan is for Explicit VR Little Endian only"
        raise AssertionError(msg)

    monkeypatch.setattr(seg_module, "_scan_frame_references", no_scan)
    uids = [str(s.SOPInstanceUID) for s in source]
    np.testing.assert_array_equal(read_seg_labels(implicit, uids), labels)


def test_read_rejects_short_pixel_data(tmp_path: Path) -> None:
    source, labels = make_ct_series(), make_labels()
    path = tmp_path / "seg.dcm"
    write_seg(path, source, labels)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:2]
    short = tmp_path / "short.dcm"
    ds.save_as(short)
    with pytest.raises(InputError, match=r"short\.dcm: not a readable DICOM SEG \(ValueError\)"):
        read_seg_labels(short, [str(s.SOPInstanceUID) for s in source])


def test_fractional_seg_reads_at_half_maximum(tmp_path: Path) -> None:
    source, labels = make_ct_series(), make_labels()
    path = tmp_path / "seg.dcm"
    write_seg(path, source, labels)
    ds = pydicom.dcmread(path)
    uids = [str(s.SOPInstanceUID) for s in source]
    n = int(ds.NumberOfFrames)
    masks = np.unpackbits(
        np.frombuffer(ds.PixelData, np.uint8), count=n * ROWS * COLS, bitorder="little"
    ).reshape(n, ROWS, COLS)
    fractional = np.where(masks > 0, 200, 90).astype(np.uint8)  # 200/255 set, 90/255 not
    ds.SegmentationType = "FRACTIONAL"
    ds.SegmentationFractionalType = "PROBABILITY"
    ds.MaximumFractionalValue = 255
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = fractional.tobytes()
    frac_path = tmp_path / "fractional.dcm"
    ds.save_as(frac_path)
    np.testing.assert_array_equal(read_seg_labels(frac_path, uids), labels)
