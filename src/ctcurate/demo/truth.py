"""The truth tables of a synthetic archive and the fixed file times of its outputs."""

from __future__ import annotations

import calendar
import os
from pathlib import Path

import pyarrow as pa

from ctcurate.demo.archive import TruthRow

__all__ = ["OUTPUT_MTIME", "OWN_FILES", "pin_mtimes", "truth_files_table", "truth_table"]

# Files outside the archive (annotations, truth, preview) get this fixed mtime.
OUTPUT_MTIME = calendar.timegm((2022, 1, 1, 0, 0, 0))
#: What ``synth`` writes into its folder: a folder holding only these is a ``synth`` output.
OWN_FILES = ("annotations", "archive", "preview.png", "truth.parquet", "truth_files.parquet")


def truth_table(rows: list[TruthRow]) -> pa.Table:
    """``truth.parquet``: one row per generated (site, series), sorted by those."""
    rows = sorted(rows, key=lambda r: (r.site, r.series_instance_uid))
    return pa.table(
        {
            "series_instance_uid": pa.array([r.series_instance_uid for r in rows], pa.string()),
            "study_instance_uid": pa.array([r.study_instance_uid for r in rows], pa.string()),
            "patient_id": pa.array([r.patient_id for r in rows], pa.string()),
            "site": pa.array([r.site for r in rows], pa.string()),
            "kind": pa.array([r.kind for r in rows], pa.string()),
            "pattern": pa.array([r.pattern for r in rows], pa.string()),
            "pneumonia": pa.array([r.pneumonia for r in rows], pa.bool_()),
            "covid": pa.array([r.covid for r in rows], pa.bool_()),
            "era": pa.array([r.era for r in rows], pa.string()),
            "study_date": pa.array([r.study_date for r in rows], pa.date32()),
            "severity": pa.array([r.severity for r in rows], pa.float64()),
            "expected_quarantine": pa.array([r.expected_quarantine for r in rows], pa.string()),
            "duplicate_of": pa.array([r.duplicate_of for r in rows], pa.string()),
            "border_consolidation": pa.array([r.border_consolidation for r in rows], pa.bool_()),
        }
    )


def truth_files_table(rows: list[tuple[str, str, str | None, str | None]]) -> pa.Table:
    """``truth_files.parquet``: one row per (trap file, trap), sorted by path then trap."""
    rows = sorted(set(rows), key=lambda r: (r[0], r[1]))
    return pa.table(
        {
            "path": pa.array([r[0] for r in rows], pa.string()),
            "trap": pa.array([r[1] for r in rows], pa.string()),
            "expected_reason": pa.array([r[2] for r in rows], pa.string()),
            "series_instance_uid": pa.array([r[3] for r in rows], pa.string()),
        }
    )


def pin_mtimes(root: Path, archive_mtime: int) -> None:
    """Set every folder's mtime (files already carry theirs), deepest first."""
    folders = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for folder in [*folders, root]:
        stamp = archive_mtime if "archive" in folder.relative_to(root).parts[:1] else OUTPUT_MTIME
        os.utime(folder, (stamp, stamp))
