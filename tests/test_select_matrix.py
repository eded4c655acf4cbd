"""The scorer's decisions do not depend on the matrix: one chest written at 96, 256 and 512."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from ctcurate.selection.pneumonia import FEATURES, ScoreTask, fit_selector, score_series

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
FOV_MM = 380.0
SLICE_MM = 1.25
SLICES = 40  # 50 mm of chest
#: Lesions (z, y, x centre in mm from the first slice / the centre, radius mm, HU).
LESIONS = ((22.0, 20.0, -70.0, 22.0, -600.0), (28.0, -30.0, 72.0, 18.0, -450.0))
#: The features of one chest agree across matrices within max(REL_TOL x value, ABS_TOL[f]):
#: fractions of the lung to 20 % or 0.3 % of the lung, shares to 0.05, densities to 3 small
#: components per litre (one or two components in this slab's half litre of lung).
REL_TOL = 0.2
ABS_TOL = {
    "ggo_fraction": 0.003,
    "consolidation_fraction": 0.003,
    "blob_fraction": 0.003,
    "border_fill_fraction": 0.003,
    "deep_opacity_fraction": 0.003,
    "posterior_basal_symmetry": 0.05,
    "small_opacity_density": 3.0,
    "nodule_density": 3.0,
    "bilateral_share": 0.05,
    "peripheral_share": 0.05,
    "lower_zone_share": 0.05,
}


def chest_slice(z_mm: float, n: int, sick: bool, rng: np.random.Generator) -> npt.NDArray[Any]:
    """One axial slice (y, x) in HU of a chest defined in millimetres (any matrix ``n``):
    body, ribs round a cavity that the two lungs fill, spine, lesions when ``sick``."""
    c = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * (FOV_MM / n)
    y, x = c[:, None], c[None, :]
    hu = np.full((n, n), -1000.0)
    hu[(x / 165.0) ** 2 + (y / 125.0) ** 2 <= 1.0] = 40.0
    r_cav = np.sqrt((x / 135.0) ** 2 + (y / 100.0) ** 2)
    ribs = (r_cav > 1.0) & (r_cav < 1.07) & (np.cos(np.arctan2(y, x) * 9.0 + z_mm / 8.0) > 0.0)
    hu[ribs] = 650.0
    hu[x**2 + (y - 80.0) ** 2 <= 17.0**2] = 380.0  # vertebral body
    lung = np.zeros((n, n), dtype=bool)
    for side in (-1.0, 1.0):
        lung |= ((x - side * 76.0) / 57.0) ** 2 + ((y + 2.0) / 92.0) ** 2 <= 1.0
    lung &= (r_cav < 0.99) & (x**2 + (y - 80.0) ** 2 > 22.0**2)
    hu[lung] = -860.0
    if sick:
        for lz, ly, lx, radius, value in LESIONS:
            hu[((z_mm - lz) ** 2 + (y - ly) ** 2 + (x - lx) ** 2 <= radius**2) & lung] = value
        hu[lung & (y > 30.0) & (x < -85.0)] = 30.0  # consolidation against the chest wall
    return hu + rng.normal(0.0, 15.0, hu.shape)


def write_chest(folder: Path, n: int, sick: bool) -> tuple[str, ...]:
    """The chest at matrix ``n`` as int16 CT files, one slice at a time."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    series = f"1.2.826.0.1.3680043.8.498.{n}.{int(sick)}"
    paths = []
    for k in range(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE
        meta.MediaStorageSOPInstanceUID = f"{series}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-FOV_MM / 2, -FOV_MM / 2, -k * SLICE_MM]
        ds.PixelSpacing = [FOV_MM / n, FOV_MM / n]
        ds.Rows, ds.Columns = n, n
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        hu = chest_slice(k * SLICE_MM, n, sick, rng)
        ds.PixelData = (np.rint(hu) + 1024).astype(np.int16).tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return tuple(paths)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, bool], dict[str, float]]:
    """Features of the clear and the sick chest at each matrix."""
    root = tmp_path_factory.mktemp("matrix")
    out = {}
    for n in (96, 256, 512):
        for sick in (False, True):
            paths = write_chest(root / f"{n}_{int(sick)}", n, sick)
            result = score_series(
                ScoreTask("H01", f"{n}.{int(sick)}", paths, None, working_spacing_mm=2.0)
            )
            assert result.features is not None, result.error
            out[n, sick] = dict(zip(FEATURES, result.features, strict=True))
    return out


@pytest.mark.parametrize("n", [96, 256])
@pytest.mark.parametrize("sick", [False, True])
def test_features_agree_across_matrices(
    features: dict[tuple[int, bool], dict[str, float]], n: int, sick: bool
) -> None:
    ref, other = features[512, sick], features[n, sick]
    for name in FEATURES:
        tol = max(REL_TOL * abs(ref[name]), ABS_TOL[name])
        assert abs(other[name] - ref[name]) <= tol, (name, ref[name], other[name])


def test_selections_agree_across_matrices(
    features: dict[tuple[int, bool], dict[str, float]],
) -> None:
    # a selector fitted on the 512 chests decides the same for every matrix
    x = [[features[512, sick][f] for f in FEATURES] for sick in (False, True)]
    model = fit_selector(x, [0, 1], l2=0.1, threshold=0.5)
    sick_ggo = features[512, True]["ggo_fraction"] + features[512, True]["consolidation_fraction"]
    assert sick_ggo > 0.01  # the sick chest is visibly sick
    for n in (96, 256, 512):
        rows = [[features[n, sick][f] for f in FEATURES] for sick in (False, True)]
        assert list(model.predict_proba(rows) >= 0.5) == [False, True], n
