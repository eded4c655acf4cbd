"""One set of series checks: pack's assembly and the selector's working grid refuse alike."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers.chest import chest, ct_slices

from ctcurate.imaging.volume import ExcludedSeries, assemble_series
from ctcurate.imaging.workgrid import working_volume

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _series() -> list[Any]:
    hu, _ = chest(nz=12, n=24)
    return ct_slices(hu, "1.2.3.4", z_step=4.0)


def _localizer(ds: list[Any]) -> list[Any]:
    ds[5].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return ds


def _not_ct(ds: list[Any]) -> list[Any]:
    ds[3].SOPClassUID = SECONDARY_CAPTURE
    return ds


def _tilt(ds: list[Any]) -> list[Any]:
    for k, d in enumerate(ds):
        d.ImagePositionPatient = [0.0, 1.0 * k, 4.0 * k]  # 14 deg off the normal
    return ds


def _gap(ds: list[Any]) -> list[Any]:
    return ds[:5] + ds[7:]


def _mixed_spacing(ds: list[Any]) -> list[Any]:
    ds[4].PixelSpacing = [3.0, 3.0]
    return ds


def _oblique(ds: list[Any]) -> list[Any]:
    for d in ds:
        d.ImageOrientationPatient = [0.866, 0.5, 0, -0.5, 0.866, 0]
    return ds


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_localizer, "localizer"),
        (_not_ct, "not_ct_image"),
        (_tilt, "gantry_tilt"),
        (_gap, "gap"),
        (_mixed_spacing, "mixed_geometry"),
        (_oblique, "non_axial"),
    ],
)
def test_both_assemblies_refuse_a_bad_series_for_the_same_reason(
    spoil: Callable[[list[Any]], list[Any]], reason: str
) -> None:
    for assemble in (assemble_series, lambda ds: working_volume(iter(ds), 2.0)):
        with pytest.raises(ExcludedSeries) as caught:
            assemble(spoil(copy.deepcopy(_series())))
        assert caught.value.reason == reason


def test_both_assemblies_accept_the_clean_series_and_a_repeated_slice() -> None:
    clean = _series()
    assert assemble_series(copy.deepcopy(clean)).image.shape[0] == 12
    assert working_volume(iter(copy.deepcopy(clean)), 2.0).source_shape[0] == 12
    repeated = copy.deepcopy(clean)
    twin = copy.deepcopy(repeated[6])
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.999"
    repeated.append(twin)  # the same position and pixels: kept once, no gap, no error
    assert assemble_series(copy.deepcopy(repeated)).image.shape[0] == 12
    assert working_volume(iter(repeated), 2.0).source_shape[0] == 13


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("flips", [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
def test_slices_are_oriented_one_at_a_time_as_a_stacked_copy_would_be(
    transposed: bool, flips: tuple[int, int, int]
) -> None:
    from ctcurate.imaging.volume import _orient_slices

    rng = np.random.default_rng(5)
    slices = {i: rng.normal(size=(3, 5)) for i in range(6)}
    kept = [4, 0, 2, 5]
    expected = np.stack([slices[i] for i in kept])  # the volume as one stacked copy
    if transposed:
        expected = expected.transpose(0, 2, 1)
    for axis, flip in enumerate(flips):
        if flip:
            expected = np.flip(expected, axis=axis)
    got = _orient_slices(
        lambda i: slices[i], kept, transposed, tuple(map(bool, flips)), (3, 5), np.float64
    )
    assert got.flags.c_contiguous
    assert got.dtype == np.float64
    assert np.array_equal(got, expected)


def test_box_centre_is_the_centre_of_the_true_voxels_bounding_box() -> None:
    from ctcurate.imaging.volume import box_centre

    rng = np.random.default_rng(8)
    mask = rng.random((6, 7, 9)) > 0.97
    where = np.argwhere(mask)
    expected = (where.min(axis=0) + where.max(axis=0)) / 2.0
    got = box_centre(mask)
    assert got is not None
    assert got.tolist() == expected.tolist()
    assert box_centre(np.zeros((3, 4, 5), dtype=bool)) is None
