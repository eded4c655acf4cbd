"""Tiny DICOM archives for the index tests: 8×8 CT slices, series on disk, index runs."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ctcurate.io.shards import read_shards
from ctcurate.io.tables import write_parquet
from ctcurate.params import IndexParams
from ctcurate.pipeline import index
from ctcurate.pipeline.snapshot import list_archive

STUDY = "1.2.826.0.1.3680043.8.498.1"

SERIES = "1.2.826.0.1.3680043.8.498.2"


def ct_slice(
    i: int,
    *,
    series: str = SERIES,
    sop: str | None = None,
    z_step: float = 2.5,
    ts: str = ExplicitVRLittleEndian,
    **attrs: Any,
) -> FileDataset:
    """Slice ``i`` of an 8×8 axial chest CT series (16-bit, no PHI)."""
    sop = sop or f"{series}.{i + 1}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.PatientID = "PSEUDO01"
    ds.StudyDate = "20200315"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = "Thorax 1.0 B70f"
    ds.BodyPartExamined = "CHEST"
    ds.ConvolutionKernel = "B70f"
    ds.Manufacturer = "ACME"
    ds.SliceThickness = 2.5
    ds.PixelSpacing = [0.7, 0.8]
    ds.ImagePositionPatient = [-100.0, -120.0, 10.0 + i * z_step]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber = i + 1
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.BurnedInAnnotation = "NO"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.PixelData = (np.arange(64, dtype=np.int16) + i).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def write_series(archive: Path, site: str = "H01", n: int = 4, **kw: Any) -> list[Path]:
    paths = []
    for i in range(n):
        path = archive / site / "study" / "series" / f"{i:04d}.dcm"
        save(ct_slice(i, **kw), path)
        paths.append(path)
    return paths


def listing(archive: Path, tmp: Path) -> Path:
    path = tmp / "listing.parquet"
    write_parquet(path, list_archive(archive))
    return path


def run_index(archive: Path, out: Path, workers: int = 1, **params: Any) -> dict[str, Any]:
    snap = listing(archive, out.parent / f"{out.name}-snap")
    index.run(archive, snap, out, IndexParams(workers=workers, **params), scheduler=None)
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def table(out: Path, name: str) -> list[dict[str, Any]]:
    if name == "instances":
        rows: list[dict[str, Any]] = read_shards(out / "instances").to_pylist()
        return rows
    rows = pq.read_table(out / f"{name}.parquet").to_pylist()
    return rows


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def index_digests(out: Path) -> dict[str, str]:
    """sha256 of every output file but catalog.duckdb (its bytes are DuckDB's business)."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "catalog.duckdb")
    return {p.relative_to(out).as_posix(): sha(p) for p in files}
