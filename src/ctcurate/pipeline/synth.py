"""``synth``: the built-in synthetic multi-hospital CT archive.

Writes ``archive/<site>/`` (DICOM from five hospitals and four vendors, with the traps a
real export holds), ``annotations/`` (PCR results, reader grades, lesion SEGs),
``truth.parquet`` / ``truth_files.parquet`` (what was generated and which file is which
trap) and ``preview.png``. Same params → byte-identical tree, file mtimes included.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ctcurate.demo.annotations import grade_rows, pcr_rows, to_csv
from ctcurate.demo.archive import ArchiveWriter
from ctcurate.demo.cohort import plan_cohort
from ctcurate.demo.headerheavy import write_header_heavy
from ctcurate.demo.preview import render_montage
from ctcurate.demo.truth import OUTPUT_MTIME, OWN_FILES, pin_mtimes, truth_files_table, truth_table
from ctcurate.io.outputs import guarded_output, marked_dir
from ctcurate.io.tables import write_parquet
from ctcurate.log import get_logger, progress
from ctcurate.params import SynthParams

__all__ = ["run", "truth_files_table", "truth_table", "write_header_heavy"]


def release_freed_memory() -> None:
    """Hand the heap memory freed by one study back to the OS (glibc's ``malloc_trim``).

    A study at matrix 512 frees hundreds of MB of encoded slices; without a trim they stay
    in the process and add to the next study's peak. A no-op where there is no glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


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
    with (
        guarded_output(Path(out), "synth", own=OWN_FILES),
        marked_dir(Path(out), "synth", fsync_each_file=False) as tmp,  # many small files
    ):
        writer = ArchiveWriter(
            root=tmp,
            seed=params.seed,
            matrix=params.matrix,
            options=params,
        )
        for study in progress(studies, len(studies), "synth", log, unit="studies"):
            writer.write_study(study)
            release_freed_memory()
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
        pin_mtimes(tmp, OUTPUT_MTIME)
        log.info(
            "wrote %d files, %d series, %d studies, %d trap files, %d PCR rows, %d grades",
            writer.n_files,
            len(writer.truth),
            len(studies),
            len(writer.trap_files),
            len(pcr),
            len(grades),
        )
