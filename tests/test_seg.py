"""DICOM SEG write / read round trips (ctcurate.dicom.seg)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from ctcurate.dicom import seg as seg_module
from ctcurate.dicom.seg import (
    SegError,
    _scan_frame_references,
    read_seg_labels,
    segment_label_values,
    write_seg,
)
from ctcurate.errors import InputError

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


# -- the shortcut for write_seg's own files against highdicom ----------------------------


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
def test_shortcut_equals_highdicom(tmp_path: Path, n: int, rows: int, cols: int) -> None:
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
    with pytest.MonkeyPatch.context() as patch:
        no_shortcut(patch)
        np.testing.assert_array_equal(read_seg_labels(path, asked), got)


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
            str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
        )
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    assert scanned == parsed
    assert _scan_frame_references(raw, int(ds.NumberOfFrames) + 1) is None


def no_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every read go through highdicom."""
    monkeypatch.setattr(seg_module, "_read_own", lambda *args: None)


def test_other_layouts_are_read_by_highdicom(
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

    def refuse(raw: bytes, n_frames: int) -> None:
        msg = "the byte scan is for write_seg's own files only"
        raise AssertionError(msg)

    monkeypatch.setattr(seg_module, "_scan_frame_references", refuse)
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


# -- SEGs of other tools -------------------------------------------------------------------

DATA = Path(__file__).parent / "data" / "seg"


def segment(number: int, label: str, code: Code) -> object:
    import highdicom as hd

    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


#: Another tool's numbering: consolidation first, an organ we do not know, GGO by its DICOM
#: code under a free-text label, normal lung by its label under an unknown code.
OTHER_SEGMENTS = [
    (1, "Lesion A", Code("95436008", "SCT", "Lung consolidation"), 3),
    (2, "Heart", Code("80891009", "SCT", "Heart"), 0),
    (3, "lesion b", Code("112120", "DCM", "Ground glass opacity"), 2),
    (4, "Normal_Lung", Code("T-0001", "99OTHER", "Parenchyma"), 1),
]


def write_other_seg(
    path: Path, source: list[Dataset], pixels: np.ndarray, seg_type: str, **kwargs: object
) -> None:
    """A SEG the way another highdicom-based tool might write it (not write_seg's layout)."""
    import highdicom as hd

    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues[seg_type],
        segment_descriptions=[segment(n, label, code) for n, label, code, _ in OTHER_SEGMENTS],
        series_instance_uid=generate_uid(),
        series_number=7,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Other",
        manufacturer_model_name="Other model",
        software_versions="1",
        device_serial_number="1",
        **kwargs,
    )
    seg.save_as(path)


def expected_from_other(masks: np.ndarray) -> np.ndarray:
    """Label values of per-segment masks (n, rows, cols, 4); the higher label wins."""
    out = np.zeros(masks.shape[:3], np.uint8)
    for (_, _, _, value), i in sorted(
        ((seg, i) for i, seg in enumerate(OTHER_SEGMENTS)), key=lambda t: t[0][3]
    ):
        if value:
            out[masks[..., i]] = value
    return out


def other_masks(n: int = N_SLICES) -> np.ndarray:
    rng = np.random.default_rng(3)
    masks = rng.random((n, ROWS, COLS, len(OTHER_SEGMENTS))) < 0.3
    masks[n // 2] = False
    return masks


def test_labelmap_seg_of_another_tool(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import highdicom as hd

    if not hasattr(hd.seg.SegmentationTypeValues, "LABELMAP"):
        pytest.skip("this highdicom writes no LABELMAP SEG")
    source = make_ct_series()
    masks = other_masks()
    labelmap = np.zeros(masks.shape[:3], np.uint8)  # one segment per pixel in a LABELMAP
    for i in range(len(OTHER_SEGMENTS)):
        labelmap[masks[..., i]] = i + 1
    path = tmp_path / "labelmap.dcm"
    write_other_seg(path, source[::-1], labelmap[::-1], "LABELMAP")  # frames in reverse order
    assert pydicom.dcmread(path).SegmentationType == "LABELMAP"
    one_hot = np.stack([labelmap == i + 1 for i in range(len(OTHER_SEGMENTS))], axis=-1)
    uids = [str(ds.SOPInstanceUID) for ds in source]
    with caplog.at_level("INFO", logger="seg"):
        got = read_seg_labels(path, uids)
    np.testing.assert_array_equal(got, expected_from_other(one_hot))
    assert set(np.unique(got)) == {0, 1, 2, 3}
    assert "1 of 4 segments not recognised" in caplog.text
    assert uids[0] not in caplog.text


def test_binary_seg_of_another_tool_with_overlaps(tmp_path: Path) -> None:
    source = make_ct_series()
    masks = other_masks()
    path = tmp_path / "binary.dcm"
    write_other_seg(path, source, masks.astype(np.uint8), "BINARY")
    uids = [str(ds.SOPInstanceUID) for ds in source]
    got = read_seg_labels(path, uids[::-1])
    np.testing.assert_array_equal(got, expected_from_other(masks)[::-1])


def test_fractional_seg_of_another_tool_thresholds_at_half(tmp_path: Path) -> None:
    source = make_ct_series()
    rng = np.random.default_rng(5)
    fractions = rng.integers(0, 5, (N_SLICES, ROWS, COLS, len(OTHER_SEGMENTS))) / 4.0
    path = tmp_path / "fractional.dcm"
    write_other_seg(
        path,
        source,
        fractions.astype(np.float32),
        "FRACTIONAL",
        max_fractional_value=4,
    )
    uids = [str(ds.SOPInstanceUID) for ds in source]
    got = read_seg_labels(path, uids)
    np.testing.assert_array_equal(got, expected_from_other(fractions >= 0.5))
    assert (fractions == 0.5).any()  # the threshold itself is set
    assert ((fractions > 0) & (fractions < 0.5)).any()  # below it is not


def third_party(name: str, labels: dict[int, str]) -> Dataset:
    """A highdicom test file with its segments given our labels (their codes are unknown)."""
    ds = pydicom.dcmread(DATA / name)
    for item in ds.SegmentSequence:
        item.SegmentLabel = labels[int(item.SegmentNumber)]
    return ds


def referenced_uids(ds: Dataset) -> list[str]:
    return [
        str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for item in ds.PerFrameFunctionalGroupsSequence
    ]


def test_highdicom_test_file_with_overlapping_segments(tmp_path: Path) -> None:
    import highdicom as hd

    ds = third_party("seg_image_ct_binary_overlap.dcm", {1: "lung", 2: "Consolidation"})
    path = tmp_path / "overlap.dcm"
    ds.save_as(path)
    uids = list(dict.fromkeys(referenced_uids(ds)))[::-1]
    got = read_seg_labels(path, [*uids, "1.2.3.4"])
    seg = hd.seg.segread(DATA / "seg_image_ct_binary_overlap.dcm")
    per_segment = seg.get_pixels_by_source_instance(uids, ignore_spatial_locations=True)
    expected = np.where(per_segment[..., 1] > 0, 3, np.where(per_segment[..., 0] > 0, 1, 0))
    assert (per_segment[..., 0] & per_segment[..., 1]).any()  # the file does overlap
    np.testing.assert_array_equal(got[:-1], expected)
    assert not got[-1].any()


def test_highdicom_test_file_fractional(tmp_path: Path) -> None:
    import highdicom as hd

    ds = third_party("seg_image_ct_true_fractional.dcm", {1: "ground-glass opacity"})
    path = tmp_path / "fractional.dcm"
    ds.save_as(path)
    uids = referenced_uids(ds)
    seg = hd.seg.segread(DATA / "seg_image_ct_true_fractional.dcm")
    fractions = seg.get_pixels_by_source_instance(uids, ignore_spatial_locations=True)[..., 0]
    assert ((fractions > 0) & (fractions < 0.5)).any()
    np.testing.assert_array_equal(
        read_seg_labels(path, uids), np.where(fractions >= 0.5, 2, 0).astype(np.uint8)
    )


def test_unknown_segments_read_as_zeros(caplog: pytest.LogCaptureFixture) -> None:
    path = DATA / "seg_image_ct_binary_overlap.dcm"  # segments Bone and Spine
    uids = referenced_uids(pydicom.dcmread(path))
    with caplog.at_level("INFO", logger="seg"):
        got = read_seg_labels(path, uids)
    assert not got.any()
    assert "2 of 2 segments not recognised" in caplog.text


def test_seg_of_another_series_is_a_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    write_seg(path, make_ct_series(), make_labels())
    with pytest.raises(SegError, match=r"seg\.dcm: no frame matches any of the series' 2") as info:
        read_seg_labels(path, ["1.2.3", "1.2.4"])
    assert info.value.reason == "seg_mismatch"
    with pytest.raises(SegError, match="no frame matches") as info:
        read_seg_labels(DATA / "seg_image_ct_true_fractional.dcm", ["1.2.3"])
    assert info.value.reason == "seg_mismatch"


def test_frames_without_references_match_by_position(tmp_path: Path) -> None:
    source = make_ct_series()
    masks = other_masks()
    path = tmp_path / "binary.dcm"
    write_other_seg(path, source, masks.astype(np.uint8), "BINARY")
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare)
    order = [4, 1, 0, 3, 2]
    uids = [str(source[i].SOPInstanceUID) for i in order]
    positions = [[float(v) for v in source[i].ImagePositionPatient] for i in order]
    positions[0][2] += 0.01  # within the tolerance
    got = read_seg_labels(bare, uids, positions=positions)
    np.testing.assert_array_equal(got, expected_from_other(masks)[order])
    with pytest.raises(SegError, match="no frame matches") as info:
        read_seg_labels(bare, uids)
    assert info.value.reason == "seg_mismatch"
    far = [[x, y, z + 1.0] for x, y, z in positions]  # between two frames
    with pytest.raises(SegError, match="no frame matches"):
        read_seg_labels(bare, uids, positions=far)


def test_segment_label_values() -> None:
    def item(number: int, label: str, scheme: str, value: str) -> Dataset:
        ds = Dataset()
        ds.SegmentNumber, ds.SegmentLabel = number, label
        code = Dataset()
        code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning = scheme, value, "x"
        ds.SegmentedPropertyTypeCodeSequence = [code]
        return ds

    got = segment_label_values(
        [
            item(1, "whatever", "SCT", "39607008"),  # Lung by code
            item(2, "GROUND_GLASS opacity", "99X", "1"),  # by label
            item(5, "consolidation", "SCT", "39607008"),  # the code wins over the label
            item(7, "Heart", "SCT", "80891009"),  # neither
        ]
    )
    assert got == {1: 1, 2: 2, 5: 1}


def test_pack_keeps_a_labelmap_seg_and_records_a_mismatch(tmp_path: Path) -> None:
    import highdicom as hd

    from ctcurate.imaging.volume import ExcludedSeries
    from ctcurate.pipeline import pack

    if not hasattr(hd.seg.SegmentationTypeValues, "LABELMAP"):
        pytest.skip("this highdicom writes no LABELMAP SEG")
    source = make_ct_series()
    rows = []
    for i, ds in enumerate(source):
        ds.save_as(tmp_path / f"ct{i}.dcm", enforce_file_format=True)
        rows.append({"path": f"ct{i}.dcm"})
    labelmap = np.zeros((N_SLICES, ROWS, COLS), np.uint8)
    labelmap[1:4, 2:6, 2:8] = 4  # Normal_Lung
    labelmap[2, 3:5, 3:5] = 1  # Lesion A: consolidation
    seg_path = tmp_path / "seg.dcm"
    write_other_seg(seg_path, source, labelmap, "LABELMAP")
    _, labels = pack._load_series(tmp_path, seg_path, rows)
    expected = np.where(labelmap == 4, 1, np.where(labelmap == 1, 3, 0))
    np.testing.assert_array_equal(labels, expected)

    other = make_ct_series()
    for ds in other:
        ds.SOPInstanceUID = generate_uid()
    write_other_seg(seg_path, other, labelmap, "LABELMAP")
    with pytest.raises(ExcludedSeries, match="no frame matches") as info:
        pack._load_series(tmp_path, seg_path, rows)
    assert info.value.reason == "seg_mismatch"
