"""Minimal single-frame CT instances and axial series (enough for pydicom and highdicom)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def make_ct(
    pixels: npt.NDArray[np.int16],
    position: Sequence[float],
    *,
    series_uid: str,
    index: int,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (2.0, 2.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    study_uid: str = "1.2.3.4",
    patient_id: str = "P1",
    manufacturer: str = "ACME",
) -> Dataset:
    """A minimal, complete single-frame CT instance (enough for pydicom and highdicom)."""
    sop_uid = generate_uid(entropy_srcs=[series_uid, str(index)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "for"])
    ds.PatientID = patient_id
    ds.PatientName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDate = "20200301"
    ds.StudyTime = "000000"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = manufacturer
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def make_series(
    n: int = 6,
    size: int = 8,
    *,
    dz: float = 2.0,
    seed: int = 0,
    series_uid: str = "1.2.826.0.1.1",
    z_positions: Sequence[float] | None = None,
    **kwargs: object,
) -> tuple[list[Dataset], npt.NDArray[np.uint8], npt.NDArray[np.int16]]:
    """Axial series (slice i at z = i * dz), lung labels in the middle, and the raw pixels."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 1500, size=(n, size, size)).astype(np.int16)
    zs = list(z_positions) if z_positions is not None else [i * dz for i in range(n)]
    datasets = [
        make_ct(raw[i], (-7.0, -7.0, zs[i]), series_uid=series_uid, index=i, **kwargs)  # type: ignore[arg-type]
        for i in range(n)
    ]
    labels = np.zeros((n, size, size), dtype=np.uint8)
    labels[1:-1, 2:-2, 1:-1] = 1
    labels[n // 2, 3:5, 3:5] = 2
    return datasets, labels, raw
