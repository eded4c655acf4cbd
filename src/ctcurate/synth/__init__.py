"""``synth``: the built-in synthetic multi-hospital CT archive.

Writes ``archive/<site>/`` (DICOM from five hospitals and four vendors, with the traps a
real export holds), ``annotations/`` (PCR results, reader grades, lesion SEGs),
``truth.parquet`` / ``truth_files.parquet`` (what was generated and which file is which
trap) and ``preview.png``. Same params → byte-identical tree, file mtimes included.
"""

from __future__ import annotations

import calendar
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ctcurate.io.atomic import atomic_dir
from ctcurate.io.tables import write_parquet
from ctcurate.log import get_logger, progress
from ctcurate.params import SynthParams
from ctcurate.synth.annotations import grade_rows, pcr_rows, to_csv
from ctcurate.synth.archive import ArchiveWriter, TruthRow
from ctcurate.synth.cohort import plan_cohort
from ctcurate.synth.preview import render_montage

__all__ = ["run", "truth_files_table", "truth_table"]

# Files outside the archive (annotations, truth, preview) get this fixed mtime.
OUTPUT_MTIME = calendar.timegm((2022, 1, 1, 0, 0, 0))


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


def _pin_mtimes(root: Path, archive_mtime: int) -> None:
    """Set every folder's mtime (files already carry theirs), deepest first."""
    folders = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for folder in [*folders, root]:
        stamp = archive_mtime if "archive" in folder.relative_to(root).parts[:1] else OUTPUT_MTIME
        os.utime(folder, (stamp, stamp))


def run(out: Path, params: SynthParams) -> None:
    """Generate the synthetic archive into ``out`` (published atomically).

    Parameters
    ----------
    out
        Folder to create or replace: ``archive/``, ``annotations/``, ``truth.parquet``,
        ``truth_files.parquet`` and ``preview.png``.
    params
        The validated ``synth`` params section.
    """
    log = get_logger("synth")
    rng = np.random.default_rng(params.seed)
    studies = plan_cohort(params, rng)
    ann_rng = np.random.default_rng([params.seed, 1])
    with atomic_dir(Path(out)) as tmp:
        writer = ArchiveWriter(root=tmp, seed=params.seed, matrix=params.matrix)
        for study in progress(studies, len(studies), "synth", log, unit="studies"):
            writer.write_study(study)
        writer.write_non_dicom()

        ann = tmp / "annotations"
        ann.mkdir(parents=True, exist_ok=True)
        pcr = pcr_rows(studies, params.pandemic_start, ann_rng)
        grades = grade_rows(studies, params.pandemic_start, ann_rng)
        (ann / "pcr.csv").write_bytes(
            to_csv(("patient_id", "site", "test_date", "result"), list(pcr))
        )
        (ann / "grades.csv").write_bytes(
            to_csv(("study_instance_uid", "reader_id", "category", "read_date"), list(grades))
        )
        write_parquet(tmp / "truth.parquet", truth_table(writer.truth))
        write_parquet(tmp / "truth_files.parquet", truth_files_table(writer.trap_files))
        (tmp / "preview.png").write_bytes(render_montage(writer.tiles))
        for path in [
            ann / "pcr.csv",
            ann / "grades.csv",
            tmp / "truth.parquet",
            tmp / "truth_files.parquet",
            tmp / "preview.png",
            *sorted((ann / "seg").glob("*.dcm")),
        ]:
            os.utime(path, (OUTPUT_MTIME, OUTPUT_MTIME))
        _pin_mtimes(tmp, OUTPUT_MTIME)
        log.info(
            "wrote %d files, %d series, %d studies, %d trap files, %d PCR rows, %d grades",
            writer.n_files,
            len(writer.truth),
            len(studies),
            len(writer.trap_files),
            len(pcr),
            len(grades),
        )
