"""``ctcurate lung-mask``: the selector's lung mask of one series as a DICOM SEG."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from helpers.chest import chest, ct_slices
from pydicom.dataset import Dataset

from ctcurate.dicom.seg import read_seg_labels
from ctcurate.errors import InputError, OutputError
from ctcurate.imaging.workgrid import working_volume
from ctcurate.models.metrics import dice
from ctcurate.params import SelectParams
from ctcurate.pipeline.lung_mask import lung_labels, run

ROOT = Path(__file__).resolve().parents[1]
PIXEL_MM = 1.25  # finer than the 2 mm working grid: the mask is brought back up
PARAMS = SelectParams()
SERIES_UID = "1.2.826.0.1.3680043.8.498.77"


def fine_series(
    n: int = 128,
    nz: int = 10,
    *,
    shift: int = 8,
    flip_y: bool = False,
    descending: bool = False,
    transposed: bool = False,
    ggo_slice: int | None = None,
) -> tuple[list[Dataset], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """A small chest at 1.25 mm pixels and slices, off-centre (shifted ``shift`` rows so a
    flipped mask would miss), as CT instances in the given orientation; returns
    (instances, true lung per instance, body per instance)."""
    hu, lung = chest(nz=nz, n=n, ggo=[(ggo_slice, n // 2, n // 3)] if ggo_slice else None)
    hu, lung = np.roll(hu, shift, axis=1), np.roll(lung, shift, axis=1)
    row, col = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    if transposed:  # image rows run along y, columns along x
        row, col = col, row
    if flip_y:
        col = [-v for v in col] if not transposed else col
        row = [-v for v in row] if transposed else row
    datasets = ct_slices(hu, SERIES_UID, z_step=PIXEL_MM)
    for k, ds in enumerate(datasets):
        ds.PixelSpacing, ds.SliceThickness = [PIXEL_MM, PIXEL_MM], PIXEL_MM
        ds.ImageOrientationPatient = [*row, *col]
        z = (nz - 1 - k) * PIXEL_MM if descending else k * PIXEL_MM
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = f"{SERIES_UID}.1", f"{SERIES_UID}.2"
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PSN0001", "", "", "F"
        ds.StudyDate, ds.StudyTime = "20200315", "101500"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
    return datasets, lung, hu > -1000.0


def write_folder(datasets: list[Dataset], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.mark.parametrize(
    ("flip_y", "descending", "transposed"),
    [(False, False, False), (True, True, False), (False, False, True)],
)
def test_mask_comes_back_onto_each_instance_in_any_orientation(
    flip_y: bool, descending: bool, transposed: bool
) -> None:
    datasets, lung, body = fine_series(flip_y=flip_y, descending=descending, transposed=transposed)
    labels, volume_ml = lung_labels(datasets, PARAMS.working_spacing_mm)
    mask = labels.astype(bool)
    assert labels.shape == lung.shape
    score = dice(mask, lung)
    assert score is not None
    assert score >= 0.9
    assert not (mask & ~body).any()
    truth_ml = float(lung.sum()) * PIXEL_MM**3 / 1000.0
    assert volume_ml == pytest.approx(truth_ml, rel=0.1)


@pytest.mark.slow
def test_lung_mask_seg_reads_back_one_segment_per_instance(tmp_path: Path) -> None:
    datasets, lung, body = fine_series(ggo_slice=2)
    for ds in datasets:
        ds.PatientName = "PSN_NAME"  # one component: highdicom warns, quoting it
    series = write_folder(datasets, tmp_path / "series")
    out = tmp_path / "lung.dcm"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume_ml = run(series, out, PARAMS)
    assert volume_ml > 0.0
    assert not [w for w in caught if "PSN_NAME" in str(w.message)]  # no header value leaks

    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1]
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "lung"
    code = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("39607008", "SCT")
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    refs = [
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(refs) == sorted(uids)  # every slice holds lung here: one frame each
    assert (int(seg.Rows), int(seg.Columns)) == (int(datasets[0].Rows), int(datasets[0].Columns))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True
    )
    mask = np.asarray(pixels)[..., 0] > 0
    assert mask.shape == lung.shape
    clear = [k for k in range(len(uids)) if abs(k - 2) > 3]  # slices away from the GGO ball
    score = dice(mask[clear], lung[clear])
    assert score is not None
    assert score >= 0.9
    assert not (mask & ~body).any()
    # the project's own reader finds the same lung (label 1, by the Lung code)
    assert np.array_equal(read_seg_labels(out, uids), mask.astype(np.uint8))


def test_a_grid_the_working_grid_kept_maps_back_unchanged() -> None:
    hu, _ = chest(nz=6, n=40)  # 4 mm pixels and slices: coarser than 2 mm, kept as they are
    volume = working_volume(iter(ct_slices(hu, SERIES_UID)), PARAMS.working_spacing_mm)
    assert volume.hu.shape == hu.shape
    mask = np.random.default_rng(7).random(hu.shape) < 0.3
    assert np.array_equal(volume.mask_onto_source(mask), volume.unorient(mask))
    with pytest.raises(ValueError, match="does not match the working grid"):
        volume.mask_onto_source(mask[1:])


def test_lung_mask_is_byte_identical_on_rerun(tmp_path: Path) -> None:
    series = write_folder(fine_series(nz=6)[0], tmp_path / "series")
    run(series, tmp_path / "a.dcm", PARAMS)
    run(series, tmp_path / "b.dcm", PARAMS)
    first = (tmp_path / "a.dcm").read_bytes()
    assert first == (tmp_path / "b.dcm").read_bytes()
    seg = pydicom.dcmread(tmp_path / "a.dcm")
    assert seg.SeriesInstanceUID != SERIES_UID  # a series of its own, derived from the CT's


def _break(datasets: list[Dataset], how: str) -> list[Dataset]:
    if how == "not_ct":
        for ds in datasets:
            ds.Modality = "MR"
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    elif how == "too_few":
        del datasets[2:]
    elif how == "mixed_orientation":
        datasets[1].ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    elif how == "broken_pixels":
        datasets[1].PixelData = datasets[1].PixelData[:100]
    return datasets


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("not_ct", "not_ct_image"),
        ("too_few", "too_few_slices"),
        ("mixed_orientation", "mixed_orientation"),
        ("broken_pixels", "pixel_data"),
    ],
)
def test_a_series_that_cannot_be_assembled_is_refused(
    tmp_path: Path, how: str, reason: str
) -> None:
    series = write_folder(_break(fine_series(n=48, nz=4)[0], how), tmp_path / "series")
    with pytest.raises(InputError, match=f"cannot assemble the series: {reason}"):
        run(series, tmp_path / "lung.dcm", PARAMS)
    assert not (tmp_path / "lung.dcm").exists()


def test_out_inside_the_series_is_refused(tmp_path: Path) -> None:
    series = write_folder(fine_series(n=48, nz=4)[0], tmp_path / "series")
    with pytest.raises(OutputError):
        run(series, series / "lung.dcm", PARAMS)


@pytest.mark.slow
def test_cli_not_dicom_is_one_line_and_non_zero_exit(tmp_path: Path) -> None:
    series = write_folder(fine_series(n=48, nz=4)[0], tmp_path / "series")
    (series / "notes.txt").write_text("not dicom\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "ctcurate", "lung-mask", "--series", str(series), "--out", "m.dcm"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == InputError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"ctcurate: error: {series / 'notes.txt'}: not a readable DICOM")
    assert not (tmp_path / "m.dcm").exists()
