"""Series and instance rows for the select tests: a chest row that passes every rule."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa

from ctcurate.io.tables import write_parquet
from ctcurate.params import SelectParams
from ctcurate.selection.region import VOCABULARY_FILE, read_vocabulary

RULES_DIR = Path(__file__).resolve().parents[2] / "stages" / "select"

REGIONS = read_vocabulary(RULES_DIR / VOCABULARY_FILE)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

PARAMS = SelectParams()

SERIES_SCHEMA = pa.schema(
    [
        ("series_instance_uid", pa.string()),
        ("site", pa.string()),
        ("study_instance_uid", pa.string()),
        ("patient_id", pa.string()),
        ("study_date", pa.date32()),
        ("modality", pa.string()),
        ("sop_class_uid", pa.string()),
        ("image_type", pa.string()),
        ("series_description", pa.string()),
        ("body_part_examined", pa.string()),
        ("convolution_kernel", pa.string()),
        ("manufacturer", pa.string()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("pixel_spacing_row", pa.float64()),
        ("pixel_spacing_col", pa.float64()),
        ("slice_thickness", pa.float64()),
        ("slice_count", pa.int32()),
        ("orientation", pa.string()),
        ("gantry_tilt_deg", pa.float64()),
        ("spacing_min_mm", pa.float64()),
        ("spacing_max_mm", pa.float64()),
        ("z_coverage_mm", pa.float64()),
        ("n_gaps", pa.int32()),
        ("n_duplicate_positions", pa.int32()),
        ("study_description", pa.string()),
        ("protocol_name", pa.string()),
        ("requested_procedure_description", pa.string()),
        ("anatomic_region", pa.string()),
        ("flags", pa.list_(pa.string())),
    ]
)

INSTANCES_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("site", pa.string()),
        ("sop_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
    ]
)


def chest(uid: str, study: str, site: str = "H01", **over: Any) -> dict[str, Any]:
    """A series row that passes every rule unless ``over`` breaks one."""
    row: dict[str, Any] = {
        "series_instance_uid": uid,
        "site": site,
        "study_instance_uid": study,
        "patient_id": "P" + study,
        "study_date": dt.date(2019, 6, 1),
        "modality": "CT",
        "sop_class_uid": CT_IMAGE,
        "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
        "series_description": "CHEST",
        "body_part_examined": "CHEST",
        "convolution_kernel": "B70f",
        "manufacturer": "ACME",
        "rows": 8,
        "columns": 8,
        "pixel_spacing_row": 0.7,
        "pixel_spacing_col": 0.7,
        "slice_thickness": 1.0,
        "slice_count": 200,
        "orientation": "axial",
        "gantry_tilt_deg": 0.0,
        "spacing_min_mm": 1.0,
        "spacing_max_mm": 1.0,
        "z_coverage_mm": 300.0,
        "n_gaps": 0,
        "n_duplicate_positions": 0,
        "flags": [],
    }
    row.update(over)
    return row


def series_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SERIES_SCHEMA)


def instances_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "path": f"{r['site']}/{r['series_instance_uid']}/1.dcm",
                "site": r["site"],
                "sop_instance_uid": r["series_instance_uid"] + ".1",
                "series_instance_uid": r["series_instance_uid"],
                "study_instance_uid": r["study_instance_uid"],
            }
            for r in rows
        ],
        schema=INSTANCES_SCHEMA,
    )


def write_index(folder: Path, rows: list[dict[str, Any]]) -> Path:
    write_parquet(folder / "series.parquet", series_table(rows))
    write_parquet(folder / "instances" / "part-00000.parquet", instances_table(rows))
    return folder
