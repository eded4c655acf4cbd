"""A tiny chest phantom in HU (body, two lungs, optional GGO balls) and its CT slices."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def chest(
    nz: int = 8, n: int = 40, ggo: list[tuple[int, int, int]] | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """A tiny chest (z, y, x): body at 40 HU, two lungs at -850 HU; optional GGO balls
    (z, y, x centres, radius 3 px) at -600 HU. Returns (hu, true lung)."""
    z, y, x = np.mgrid[0:nz, 0:n, 0:n].astype(np.float64)
    c = (n - 1) / 2.0
    body = ((y - c) / (0.42 * n)) ** 2 + ((x - c) / (0.46 * n)) ** 2 <= 1.0
    lung = np.zeros(body.shape, dtype=bool)
    for side in (-1, 1):
        cx = c + side * 0.2 * n
        lung |= ((y - c) / (0.3 * n)) ** 2 + ((x - cx) / (0.13 * n)) ** 2 <= 1.0
    hu = np.full(body.shape, -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[lung] = -850.0
    for kz, ky, kx in ggo or []:
        ball = ((z - kz) ** 2 + (y - ky) ** 2 + (x - kx) ** 2 <= 9.0) & lung
        hu[ball] = -600.0
    return hu, lung


def ct_slices(hu: npt.NDArray[np.float32], series_uid: str, z_step: float = 4.0) -> list[Dataset]:
    """One CT Image Storage dataset per slice of ``hu`` (z ascending = head-wards)."""
    out = []
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * z_step]
        ds.PixelSpacing = [4.0, 4.0]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (np.rint(hu[k]) + 1024).astype(np.int16).tobytes()
        out.append(ds)
    return out
