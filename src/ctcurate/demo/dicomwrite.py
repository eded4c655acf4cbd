"""DICOM datasets of the synthetic archive, with each vendor's tag habits.

Datasets are built fresh per instance (no clock, no random UIDs) and encoded to bytes with
a preamble and file meta. PHI-bearing elements are written empty unless a trap asks for a
leak.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from ctcurate.demo.cohort import Study
from ctcurate.demo.vendors import Site

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}
# Values planted by the PHI traps (fictional).
LEAKED_NAME = "DOE^JANE"
LEAKED_BIRTH_DATE = "19580317"
LEAKED_INSTITUTION = "ST ELSEWHERE GENERAL HOSPITAL"

_STUDY_DESCRIPTION = {
    "chest": "CT THORAX",
    "head": "CT HEAD",
    "abdomen": "CT ABDOMEN",
    "mr": "MR BRAIN",
    "cr": "XR CHEST",
}
_BODY_PART = {"chest": "CHEST", "head": "HEAD", "abdomen": "ABDOMEN", "mr": "BRAIN", "cr": "CHEST"}


@dataclass(frozen=True)
class SeriesInfo:
    """Series-level attributes shared by all instances of one series."""

    series_uid: str
    frame_uid: str
    number: int
    description: str
    kernel: str
    image_type: str
    leak: str | None = None  # "phi_birth_date" | "phi_institution" | "phi_patient_name"


def _base(study: Study, site: Site, series: SeriesInfo, sop_class: str, sop_uid: str) -> Dataset:
    vendor = site.vendor
    date = study.study_date.strftime("%Y%m%d")
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = series.image_type.split("\\")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.ContentDate = date
    ds.StudyTime = f"{8 + study.index % 10:02d}{(study.index * 7) % 60:02d}00"
    ds.AccessionNumber = ""
    ds.Modality = {"mr": "MR", "cr": "CR"}.get(study.kind, "CT")
    ds.Manufacturer = vendor.manufacturer
    if series.leak == "phi_institution":
        ds.InstitutionName = LEAKED_INSTITUTION
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = _STUDY_DESCRIPTION[study.kind]
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = vendor.model
    ds.PatientName = LEAKED_NAME if series.leak == "phi_patient_name" else ""
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = LEAKED_BIRTH_DATE if series.leak == "phi_birth_date" else ""
    ds.PatientSex = "MF"[study.patient_index % 2]
    ds.BodyPartExamined = _BODY_PART[study.kind]
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = str(1000 + study.index)
    ds.SeriesNumber = series.number
    ds.FrameOfReferenceUID = series.frame_uid
    for group, creator, elements in vendor.private:
        block = ds.private_block(group, creator, create=True)
        for offset, vr, value in elements:
            block.add_new(offset, vr, value)
    return ds


def _pixels(ds: Dataset, array: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(array.shape[0]), int(array.shape[1])
    if array.dtype == np.uint8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    elif array.dtype == np.uint16:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    vr = "OB" if array.dtype == np.uint8 else "OW"
    ds[0x7FE00010] = DataElement(0x7FE00010, vr, np.ascontiguousarray(array).tobytes())


def _derive(template: Dataset, sop_uid: str, values: dict[int, tuple[str, object]]) -> Dataset:
    """A per-instance dataset sharing the template's unchanged elements (copy-on-replace)."""
    ds = Dataset(dict(template._dict))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = template.file_meta.MediaStorageSOPClassUID
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds[0x00080018] = DataElement(0x00080018, "UI", sop_uid)
    for tag, (vr, value) in values.items():
        ds[tag] = DataElement(tag, vr, value)
    return ds


def ct_series(
    study: Study,
    site: Site,
    series: SeriesInfo,
    hu: np.ndarray,
    z_mm: np.ndarray,
    pixel_mm: float,
    thickness: float,
    sop_uids: list[str],
    table_offset: float,
) -> list[Dataset]:
    """Axial CT Image Storage instances, one per slice of ``hu`` (z, y, x), head first."""
    vendor = site.vendor
    intercept = vendor.rescale_intercept
    stored = np.clip(np.rint(hu) - intercept, -32768, 32767).astype(np.int16)
    half = (hu.shape[2] - 1) / 2.0 * pixel_mm
    t = _base(study, site, series, CTImageStorage, sop_uids[0])
    t.ConvolutionKernel = series.kernel
    t.SliceThickness = f"{thickness:g}"
    if vendor.manufacturer == "GE MEDICAL SYSTEMS" and z_mm.size > 1:
        t.SpacingBetweenSlices = f"{abs(float(z_mm[1] - z_mm[0])):g}"
    t.KVP = "120"
    t.PatientPosition = "FFS" if vendor.manufacturer == "TOSHIBA" else "HFS"
    t.InstanceNumber = 1
    t.ImagePositionPatient = ["0", "0", "0"]
    t.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    t.SliceLocation = "0"
    t.PixelSpacing = [f"{pixel_mm:.6f}", f"{pixel_mm:.6f}"]
    t.BurnedInAnnotation = "NO"
    t.RescaleIntercept = f"{intercept:g}"
    t.RescaleSlope = "1"
    t.RescaleType = "HU"
    t.WindowCenter = "-600" if thickness < 4 else "40"
    t.WindowWidth = "1500" if thickness < 4 else "400"
    _pixels(t, stored[0])
    out = []
    for k, sop_uid in enumerate(sop_uids):
        z = f"{round(float(z_mm[k]) + table_offset, 3):.3f}"
        values: dict[int, tuple[str, object]] = {
            0x00200013: ("IS", str(k + 1)),
            0x00200032: ("DS", [f"{-half:.3f}", f"{-half:.3f}", z]),
            0x00201041: ("DS", z),
            0x7FE00010: ("OW", stored[k].tobytes()),
        }
        out.append(_derive(t, sop_uid, values))
    return out


def localizer(
    study: Study, site: Site, series: SeriesInfo, hu: np.ndarray, sop_uid: str, top_z: float
) -> Dataset:
    """A coronal projection radiograph (CT localizer) of the chest volume."""
    mu = np.clip((hu + 1000.0) / 1000.0, 0.0, None).sum(axis=1)  # (z, x)
    rows = hu.shape[2]
    zi = np.linspace(0, mu.shape[0] - 1, rows)
    proj = np.stack([np.interp(zi, np.arange(mu.shape[0]), mu[:, i]) for i in range(rows)], 1)
    image = np.clip(proj / max(float(proj.max()), 1e-6) * 2000.0, 0, 4095).astype(np.int16)
    ds = _base(study, site, series, CTImageStorage, sop_uid)
    ds.ConvolutionKernel = series.kernel
    ds.SliceThickness = "1"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ["-250.000", "0.000", f"{top_z:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = ["4.000000", "4.000000"]
    ds.BurnedInAnnotation = "NO"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    _pixels(ds, image)
    return ds


def dose_report(study: Study, site: Site, series: SeriesInfo, size: int, sop_uid: str) -> Dataset:
    """A secondary-capture screenshot of a dose table with burned-in text."""
    image = np.zeros((size, size), np.uint8)
    for row in range(6, size - 6, 8):  # lines of "text": blocks of varying width
        widths = [(row * 7 + k * 13) % 9 + 3 for k in range(size // 12)]
        col = 4
        for w in widths:
            if col + w >= size - 4:
                break
            image[row : row + 4, col : col + w] = 220
            col += w + 3
    ds = _base(study, site, series, SecondaryCaptureImageStorage, sop_uid)
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    _pixels(ds, image)
    return ds


def mr_series(
    study: Study, site: Site, series: SeriesInfo, image: np.ndarray, sop_uids: list[str]
) -> list[Dataset]:
    """Axial MR Image Storage instances from a uint16 volume (z, y, x)."""
    out = []
    half = (image.shape[2] - 1) / 2.0
    for k, sop_uid in enumerate(sop_uids):
        ds = _base(study, site, series, MRImageStorage, sop_uid)
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.MagneticFieldStrength = "1.5"
        ds.SliceThickness = "5"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{-half * 3.75:.3f}", f"{-half * 3.75:.3f}", f"{-5.0 * k:.3f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["3.750000", "3.750000"]
        _pixels(ds, image[k])
        out.append(ds)
    return out


def cr_image(
    study: Study, site: Site, series: SeriesInfo, image: np.ndarray, sop_uid: str
) -> Dataset:
    """A Computed Radiography chest image (uint16)."""
    ds = _base(study, site, series, CR_IMAGE_STORAGE, sop_uid)
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = ["0.700000", "0.700000"]
    ds.InstanceNumber = 1
    _pixels(ds, image)
    return ds


def encode(ds: Dataset, syntax: str = "explicit") -> bytes:
    """The Part 10 file bytes of ``ds`` in the named transfer syntax."""
    ts = TRANSFER_SYNTAXES[syntax]
    if syntax != "explicit":
        ds.compress(ts, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode_series(datasets: list[Dataset]) -> list[bytes]:
    """Explicit VR Little Endian Part 10 bytes of each dataset.

    Elements shared between the datasets of a series (see :func:`ct_series`) are encoded
    once; the result equals :func:`encode` of each dataset.
    """
    cache: dict[int, bytes] = {}
    out = []
    for ds in datasets:
        fp = DicomBytesIO()
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        for tag in sorted(ds._dict):
            elem = ds[tag]
            key = id(elem)
            chunk = cache.get(key)
            if chunk is None:
                part = DicomBytesIO()
                part.is_little_endian, part.is_implicit_VR = True, False
                write_data_element(part, elem)
                chunk = part.getvalue()
                if tag != 0x7FE00010:
                    cache[key] = chunk
            fp.write(chunk)
        out.append(fp.getvalue())
    return out
