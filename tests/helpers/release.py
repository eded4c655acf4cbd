"""The 14-case pack input (archive, SEGs, cases table, index) several release tests share."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctcurate.dicom.seg import write_seg
from ctcurate.io.tables import write_parquet
from ctcurate.params import PackParams
from helpers.ct import make_ct

# The salt puts the 9 packable patients in all three splits (4 train, 2 val, 3 test).
PARAMS = PackParams(
    spacing_mm=(3.0, 3.0, 3.0), shape=(4, 6, 6), shard_max_cases=3, split_salt="test-1"
)

CANARY = "CANARYPATIENT"
N_SLICES, SIZE = 6, 10


@dataclass(frozen=True)
class Inputs:
    root: Path
    cases: Path
    index_dir: Path
    archive: Path
    annotations: Path


def case_id(site: str, series_uid: str) -> str:
    return hashlib.sha256(f"{site}/{series_uid}".encode()).hexdigest()[:16]


def _write_series(
    archive: Path,
    seg_dir: Path,
    site: str,
    series_uid: str,
    patient: str,
    seed: int,
    seg: str = "ok",
) -> list[dict[str, Any]]:
    """One CT series on disk (files named against InstanceNumber order) + its SEG.

    ``seg``: ``ok``, ``none`` (no SEG file), ``mismatch`` (a SEG of other instances) or
    ``empty`` (a SEG without any labelled voxel).
    """
    rng = np.random.default_rng(seed)
    zs = [i * 2.0 for i in range(N_SLICES)]
    if seed % 100 == 99:  # the series with a missing slice
        zs = [0.0, 2.0, 4.0, 8.0, 10.0, 12.0]
    datasets = []
    for i, z in enumerate(zs):
        pixels = rng.integers(0, 1400, size=(SIZE, SIZE)).astype(np.int16)
        datasets.append(
            make_ct(
                pixels,
                (-9.0, -9.0, z),
                series_uid=series_uid,
                index=i,
                patient_id=patient,
                manufacturer="SIEMENS" if site == "H01" else "GE MEDICAL SYSTEMS",
            )
        )
    rows = []
    folder = archive / site / series_uid.rsplit(".", 1)[-1]
    folder.mkdir(parents=True)
    for i, ds in enumerate(datasets):
        rel = f"{site}/{folder.name}/IM{(N_SLICES - i) * 7 % 10:04d}"
        ds.save_as(archive / rel, enforce_file_format=True)
        rows.append(
            {
                "path": rel,
                "site": site,
                "series_instance_uid": series_uid,
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "manufacturer": str(ds.Manufacturer),
                "slice_thickness": float(ds.SliceThickness),
                "patient_id": patient,
            }
        )
    labels = np.zeros((N_SLICES, SIZE, SIZE), dtype=np.uint8)
    if seg != "empty":
        labels[1:5, 2:8, 1:9] = 1
        labels[2:4, 3 + seed % 3 : 6, 3:6] = 2
    if seg == "mismatch":
        for i, ds in enumerate(datasets):
            ds.SOPInstanceUID = f"{series_uid}.{900 + i}"
    if seg != "none":
        write_seg(seg_dir / f"{series_uid}.dcm", datasets, labels)
    return rows


def write_cases(path: Path, rows: list[dict[str, Any]]) -> None:
    schema = pa.schema(
        [
            ("case_id", pa.string()),
            ("series_instance_uid", pa.string()),
            ("study_instance_uid", pa.string()),
            ("patient_id", pa.string()),
            ("site", pa.string()),
            ("study_date", pa.date32()),
            ("era", pa.string()),
            ("cohort", pa.string()),
            ("exclusion", pa.string()),
            ("pcr", pa.string()),
            ("consensus_grade", pa.int8()),
            ("typical", pa.int8()),
        ]
    )
    write_parquet(path, pa.Table.from_pylist(rows, schema=schema))


def make_inputs(root: Path) -> Inputs:
    """14 cases from 10 patients on 2 sites: 9 packable; 1 unlabeled, 1 without SEG, 1 gap,
    1 whose SEG references other instances, 1 with an empty SEG (all of patient 9)."""
    archive, annotations = root / "archive", root / "annotations"
    seg_dir = annotations / "seg"
    seg_dir.mkdir(parents=True)
    instances: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    seg_modes = {10: "none", 12: "mismatch", 13: "empty"}
    for k in range(14):
        site = "H01" if k % 2 == 0 else "H02"
        patient = f"{CANARY}{min(k, 9)}"  # cases 9 to 13 share patient 9
        series_uid = f"1.2.826.0.1.3680043.{k + 1}"
        seed = 99 if k == 11 else k
        instances += _write_series(
            archive, seg_dir, site, series_uid, patient, seed, seg_modes.get(k, "ok")
        )
        typical = None if k == 9 else (k // 2) % 2
        cases.append(
            {
                "case_id": case_id(site, series_uid),
                "series_instance_uid": series_uid,
                "study_instance_uid": f"1.2.826.0.2.{k}",
                "patient_id": patient,
                "site": site,
                "study_date": dt.date(2019 + k % 3, 3, 1),
                "era": "pre_pandemic" if k % 3 == 0 else "pandemic",
                "cohort": None if k % 3 == 0 else "covid",
                "exclusion": None,
                "pcr": "positive" if typical == 1 else "negative",
                "consensus_grade": None if typical is None else (1 if typical else 4),
                "typical": typical,
            }
        )
    write_cases(root / "cases.parquet", sorted(cases, key=lambda c: str(c["case_id"])))
    write_parquet(
        root / "index" / "instances" / "part-00000.parquet",
        pa.Table.from_pylist(sorted(instances, key=lambda r: str(r["path"]))),
    )
    return Inputs(root, root / "cases.parquet", root / "index", archive, annotations)
