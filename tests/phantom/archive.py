"""Write a phantom archive: ``archive/<site>/<patient>/<study>/<series>/NNNN.dcm``,
``truth.parquet`` and (optionally) ``annotations/seg/<series uid>.dcm`` truth SEGs.

Deterministic: one seeded ``numpy.random.Generator`` per patient (``[seed, patient]``),
UIDs derived from the seed, no clock; the same params give byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from phantom.chest import AIR_HU, Grid, build_chest
from phantom.patterns import CONSOLIDATION, GGO, paint

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PANDEMIC_START = dt.date(2020, 3, 1)
#: Pre-pandemic studies end before this day, so any era cut-off from 2020-01-01 to
#: 2020-03-01 puts them in the same era.
PRE_PANDEMIC_END = dt.date(2019, 12, 15)
#: (Manufacturer, model, sharp kernel, smooth kernel)
VENDORS = (
    ("SIEMENS", "SOMATOM Phantom", "B70f", "B31f"),
    ("GE MEDICAL SYSTEMS", "LightSpeed Phantom", "LUNG", "STANDARD"),
    ("TOSHIBA", "Aquilion Phantom", "FC86", "FC08"),
    ("Philips", "Brilliance Phantom", "YC", "B"),
)
SERIES_DESCRIPTIONS = ("THORAX {t} {k}", "Chest {t}mm", "AX LUNG {t}", "Recon {t} {k}")
TRUTH_SCHEMA = pa.schema(
    [
        ("series_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("patient_id", pa.string()),
        ("site", pa.string()),
        ("kind", pa.string()),
        ("pattern", pa.string()),
        ("variant", pa.string()),
        ("atelectasis", pa.bool_()),
        ("pneumonia", pa.bool_()),
        ("covid", pa.bool_()),
        ("covid_typicality", pa.int8()),
        ("era", pa.string()),
        ("study_date", pa.date32()),
        ("severity", pa.float64()),
        ("expected_quarantine", pa.string()),
        ("duplicate_of", pa.string()),
        ("lung_volume_ml", pa.float64()),
        ("ggo_ml", pa.float64()),
        ("consolidation_ml", pa.float64()),
        ("lesion_volume_ml", pa.float64()),
        ("manufacturer", pa.string()),
        ("convolution_kernel", pa.string()),
        ("rows", pa.int32()),
        ("pixel_spacing_mm", pa.float64()),
        ("slice_thickness_mm", pa.float64()),
        ("slice_interval_mm", pa.float64()),
        ("slices", pa.int32()),
        ("noise_sigma_hu", pa.float64()),
        ("body_part_examined", pa.string()),
        ("path", pa.string()),
    ]
)


@dataclass(frozen=True)
class PhantomParams:
    """What the phantom archive holds; ranges are drawn uniformly per patient/series."""

    seed: int = 0
    patients: int = 6
    sites: tuple[str, ...] = ("PHA", "PHB", "PHC")
    pneumonia_share: float = 0.5
    matrix: tuple[int, int] = (128, 256)  # rows = columns, a multiple of 16 in this range
    pixel_spacing_at_512_mm: tuple[float, float] = (0.6, 0.9)  # scaled by 512 / matrix
    slices: tuple[int, int] = (10, 40)
    z_extent_mm: tuple[float, float] = (240.0, 300.0)  # apex to base plus margins
    slice_thickness_mm: tuple[float, float] = (1.0, 2.5)
    noise_sigma_hu: tuple[float, float] = (10.0, 40.0)
    patient_name: Literal["pseudonym", "empty"] = "pseudonym"
    write_seg: bool = False
    pandemic_covid_share: float = 0.8


@dataclass(frozen=True)
class Series:
    """One generated series before it is written (HU, truth labels, header values)."""

    hu: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    grid: Grid
    truth: dict[str, Any]
    header: dict[str, Any]


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["ctcurate-phantom", str(seed), *map(str, parts)]))


def _pattern_for(pneumonia: bool, covid: bool, rng: np.random.Generator) -> str:
    if not pneumonia:
        return "negative"
    if covid:
        return str(rng.choice(["typical", "indeterminate", "atypical"], p=[0.6, 0.25, 0.15]))
    return str(rng.choice(["typical", "indeterminate", "atypical"], p=[0.15, 0.3, 0.55]))


def _study_date(pandemic: bool, rng: np.random.Generator) -> dt.date:
    if pandemic:
        return PANDEMIC_START + dt.timedelta(days=int(rng.integers(0, 670)))
    start = dt.date(2017, 1, 1)
    return start + dt.timedelta(days=int(rng.integers(0, (PRE_PANDEMIC_END - start).days + 1)))


def make_series(
    params: PhantomParams, index: int, pneumonia: bool, pattern: str | None = None
) -> Series:
    """Draw patient ``index`` (its own generator) and render its one chest CT series;
    ``pattern`` forces the pattern (and ``pneumonia`` follows it)."""
    rng = np.random.default_rng([params.seed, index])
    site = params.sites[int(rng.integers(0, len(params.sites)))]
    pandemic = bool(rng.random() < 0.5)
    if pattern is not None:
        pneumonia = pattern != "negative"
    covid = pneumonia and pandemic and bool(rng.random() < params.pandemic_covid_share)
    drawn = _pattern_for(pneumonia, covid, rng)
    pattern = pattern or drawn
    severity = float(rng.uniform(0.05, 1.0)) if pneumonia else 0.0
    date = _study_date(pandemic, rng)

    lo, hi = params.matrix
    n = int(rng.integers(lo // 16, hi // 16 + 1)) * 16
    px = float(rng.uniform(*params.pixel_spacing_at_512_mm)) * 512.0 / n
    nz = int(rng.integers(params.slices[0], params.slices[1] + 1))
    extent = float(rng.uniform(*params.z_extent_mm))
    interval = round(extent / max(nz - 1, 1), 3)
    thickness = round(float(rng.uniform(*params.slice_thickness_mm)), 2)
    thickness = min(thickness, interval)
    z_top = float(rng.uniform(-120.0, -60.0))
    coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(px)
    z = (z_top - interval * (nz - 1) + interval * np.arange(nz)).astype(np.float32)
    grid = Grid(z=z, y=coords, x=coords.copy())
    fov = n * px

    chest = build_chest(grid, fov, rng)
    lesions = paint(chest, grid, pattern, severity, rng)

    vendor = VENDORS[(params.sites.index(site) + int(rng.random() < 0.25)) % len(VENDORS)]
    sharp = bool(rng.random() < 0.6)
    kernel = vendor[2] if sharp else vendor[3]
    sigma = float(rng.uniform(*params.noise_sigma_hu)) * (1.3 if sharp else 1.0)
    body_part = "CHEST" if rng.random() < 0.7 else ""
    desc = str(rng.choice(SERIES_DESCRIPTIONS)).format(t=thickness, k=kernel)
    patient = f"PH{_uid(params.seed, 'patient', index)[-8:]}"
    voxel_ml = px * px * interval / 1000.0
    counts = np.bincount(lesions.labels.ravel(), minlength=4)
    truth = {
        "series_instance_uid": _uid(params.seed, "series", index),
        "study_instance_uid": _uid(params.seed, "study", index),
        "patient_id": patient,
        "site": site,
        "kind": "chest_ct",
        "pattern": pattern,
        "variant": lesions.variant,
        "atelectasis": lesions.atelectasis,
        "pneumonia": pneumonia,
        "covid": covid,
        "covid_typicality": int(pattern in ("typical", "indeterminate")),
        "era": "pandemic" if pandemic else "pre_pandemic",
        "study_date": date,
        "severity": round(severity, 4),
        "expected_quarantine": None,
        "duplicate_of": None,
        "lung_volume_ml": round(float(counts[1:].sum()) * voxel_ml, 3),
        "ggo_ml": round(float(counts[GGO]) * voxel_ml, 3),
        "consolidation_ml": round(float(counts[CONSOLIDATION]) * voxel_ml, 3),
        "lesion_volume_ml": round(float(counts[GGO] + counts[CONSOLIDATION]) * voxel_ml, 3),
        "manufacturer": vendor[0],
        "convolution_kernel": kernel,
        "rows": n,
        "pixel_spacing_mm": round(px, 6),
        "slice_thickness_mm": thickness,
        "slice_interval_mm": interval,
        "slices": nz,
        "noise_sigma_hu": round(sigma, 3),
        "body_part_examined": body_part,
    }
    header = {
        "manufacturer": vendor[0],
        "model": vendor[1],
        "kernel": kernel,
        "sharp": sharp,
        "unsharp": float(rng.uniform(0.4, 1.2)),
        "smooth_px": float(rng.uniform(0.5, 1.0)),
        "noise_corr_px": float(rng.uniform(0.6, 1.3)),
        "signed": bool(rng.random() < 0.5),
        "description": desc,
        "body_part": body_part,
        "pixel_spacing": px,
        "thickness": thickness,
        "noise_seed": int(rng.integers(0, 2**31)),
        "study_time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        "sex": str(rng.choice(["F", "M"])),
        "age": f"{int(rng.integers(25, 90)):03d}Y",
    }
    return Series(hu=lesions.hu, labels=lesions.labels, grid=grid, truth=truth, header=header)


def _slice_image(
    clean: npt.NDArray[np.float32], h: dict[str, Any], sigma: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """Reconstruction kernel and correlated noise on one slice."""
    if h["sharp"]:
        img = clean + h["unsharp"] * (clean - ndimage.gaussian_filter(clean, 1.0))
    else:
        img = ndimage.gaussian_filter(clean, h["smooth_px"])
    corr = h["noise_corr_px"]
    white = rng.standard_normal(clean.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(white, corr) * np.float32(2.0 * np.sqrt(np.pi) * corr)
    return (img + sigma * noise).astype(np.float32)


def _dataset(series: Series, k: int, params: PhantomParams) -> Dataset:
    t, h, g = series.truth, series.header, series.grid
    sop = _uid(params.seed, "instance", t["series_instance_uid"], k)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    date = t["study_date"].strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = h["study_time"]
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = h["manufacturer"]
    ds.ManufacturerModelName = h["model"]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "THORAX"
    ds.SeriesDescription = h["description"]
    ds.PatientName = t["patient_id"] if params.patient_name == "pseudonym" else ""
    ds.PatientID = t["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = h["sex"]
    ds.PatientAge = h["age"]
    ds.BodyPartExamined = h["body_part"]
    ds.SliceThickness = f"{h['thickness']:.2f}"
    ds.KVP = "120"
    ds.ConvolutionKernel = h["kernel"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = t["study_instance_uid"]
    ds.SeriesInstanceUID = t["series_instance_uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.InstanceNumber = k + 1
    x0 = float(g.x[0])
    y0 = float(g.y[0])
    ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{float(g.z[k]):.4f}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid(params.seed, "frame", t["series_instance_uid"])
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{float(g.z[k]):.4f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = g.shape[1]
    ps = f"{h['pixel_spacing']:.6f}"
    ds.PixelSpacing = [ps, ps]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if h["signed"] else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if h["signed"] else 0
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = "0" if h["signed"] else "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def write_series(series: Series, archive: Path, params: PhantomParams) -> list[Dataset]:
    """Write one series slice by slice; return the datasets (for the SEG writer)."""
    t, h = series.truth, series.header
    rel = Path(t["site"], t["patient_id"], f"ST{t['study_instance_uid'][-6:]}", "SE0002")
    folder = archive / rel
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(h["noise_seed"])
    written = []
    for k in range(series.grid.shape[0]):
        img = _slice_image(series.hu[k], h, float(t["noise_sigma_hu"]), rng)
        img = np.maximum(img, AIR_HU - 24.0)
        ds = _dataset(series, k, params)
        if h["signed"]:
            stored = np.clip(np.rint(img), -32768, 32767).astype(np.int16)
        else:
            stored = np.clip(np.rint(img + 1024.0), 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        pydicom.dcmwrite(folder / f"{k + 1:04d}.dcm", ds, enforce_file_format=True)
        written.append(ds)
    t["path"] = rel.as_posix()
    return written


def build_archive(out: Path, params: PhantomParams | None = None) -> pa.Table:
    """Write ``out/archive``, ``out/truth.parquet`` (and SEGs); return the truth table."""
    params = params or PhantomParams()
    if not 2 <= len(params.sites) <= 3:
        msg = "phantom: 2 or 3 sites"
        raise ValueError(msg)
    archive = out / "archive"
    archive.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([params.seed, 2**31]).permutation(params.patients)
    n_pos = round(params.pneumonia_share * params.patients)
    rows = []
    for i in range(params.patients):
        series = make_series(params, i, pneumonia=bool(order[i] < n_pos))
        datasets = write_series(series, archive, params)
        if params.write_seg:
            from ctcurate.dicom.seg import write_seg

            seg_dir = out / "annotations" / "seg"
            seg_dir.mkdir(parents=True, exist_ok=True)
            uid = series.truth["series_instance_uid"]
            with warnings.catch_warnings():
                # a one-component pseudonym PatientName is intended (== PatientID)
                warnings.filterwarnings("ignore", "The string .* single component", UserWarning)
                write_seg(seg_dir / f"{uid}.dcm", datasets, series.labels)
        rows.append(series.truth)
    rows.sort(key=lambda r: (r["site"], r["patient_id"], r["series_instance_uid"]))
    table = pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)
    pq.write_table(table, out / "truth.parquet")
    return table


#: RSNA COVID-19 CT category of each pattern (1 typical … 4 negative).
CATEGORY = {"typical": 1, "indeterminate": 2, "atypical": 3, "negative": 4}


def write_annotations(out: Path, truth: pa.Table, seed: int = 0) -> None:
    """A hospital's annotation files for the archive of ``truth`` (docs/annotations.md):
    ``out/pcr.csv`` (pandemic-era studies: a positive swab two days before a COVID-19 CT,
    two negative ones otherwise) and ``out/grades.csv`` (three readers; each read moves one
    category off the pattern's with probability 0.15)."""
    rng = np.random.default_rng([seed, 7])
    out.mkdir(parents=True, exist_ok=True)
    rows = truth.to_pylist()
    pcr = ["patient_id,site,test_date,result"]
    grades = ["study_instance_uid,reader_id,category,read_date"]
    for r in rows:
        date = r["study_date"]
        if r["era"] == "pandemic":
            tests = [(2, "positive")] if r["covid"] else [(1, "negative"), (3, "negative")]
            for days, result in tests:
                day = (date - dt.timedelta(days=days)).isoformat()
                pcr.append(f"{r['patient_id']},{r['site']},{day},{result}")
        for reader in ("R01", "R02", "R03"):
            category = CATEGORY[r["pattern"]]
            if rng.random() < 0.15:
                category = min(4, max(1, category + int(rng.choice([-1, 1]))))
            day = (date + dt.timedelta(days=30)).isoformat()
            grades.append(f"{r['study_instance_uid']},{reader},{category},{day}")
    (out / "pcr.csv").write_text("\n".join(pcr) + "\n", encoding="utf-8")
    (out / "grades.csv").write_text("\n".join(grades) + "\n", encoding="utf-8")
