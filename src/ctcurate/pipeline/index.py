"""index: DICOM headers of every listed archive file → instances, series, quarantine.

Every file of the snapshot listing ends in exactly one of ``instances/`` (indexed, Parquet
shards), ``quarantine.parquet`` (a reason code and a detail naming tags, never values) or
``skipped.parquet`` (DICOMDIR, byte-identical copies of an instance), and the run checks
``files_seen == files_indexed + files_quarantined + files_skipped`` before publishing.

Duplicates are keyed on (site, SOPInstanceUID): within one site, identical bytes are indexed
once and the other copies skipped, different bytes quarantine every copy ``uid_conflict``.
The same instance sent by two sites is indexed under both and flagged
``uid_shared_across_sites`` (sites anonymize independently, so their bytes may differ).

Layers: pure tables (:mod:`ctcurate.catalog.tables`), the chunk function and its executors
(:mod:`ctcurate.catalog.scan`: local process pool or Dask cluster) and the streaming,
incremental, resumable build (:mod:`ctcurate.catalog.build`), which :func:`run` calls.
"""

from __future__ import annotations

from pathlib import Path

from ctcurate.catalog.build import (
    INSTANCES_DIR,
    IndexStats,
    check_listing,
    index_archive,
    reader_fingerprint,
    sha256_or_none,
    work_dir,
    write_catalog,
)
from ctcurate.catalog.tables import (
    INSTANCE_SCHEMA,
    LEDGER_SCHEMA,
    REASON_SCHEMA,
    SERIES_SCHEMA,
    VIEWS,
    SeriesGeometry,
    build_report,
    duplicate_outcomes,
    instances_table,
    ledger_table,
    orientation_label,
    reasons_table,
    resolve_duplicates,
    series_geometry,
    series_table,
)
from ctcurate.params import IndexParams

__all__ = [
    "INSTANCES_DIR",
    "INSTANCE_SCHEMA",
    "LEDGER_SCHEMA",
    "REASON_SCHEMA",
    "SERIES_SCHEMA",
    "VIEWS",
    "IndexStats",
    "SeriesGeometry",
    "build_report",
    "check_listing",
    "duplicate_outcomes",
    "index_archive",
    "instances_table",
    "ledger_table",
    "orientation_label",
    "reader_fingerprint",
    "reasons_table",
    "resolve_duplicates",
    "run",
    "series_geometry",
    "series_table",
    "sha256_or_none",
    "work_dir",
    "write_catalog",
]


def run(
    archive: Path,
    snapshot: Path,
    out: Path,
    params: IndexParams,
    scheduler: str | None,
) -> None:
    """Index every file of the ``snapshot`` listing of ``archive`` into the folder ``out``.

    ``scheduler`` (``tcp://HOST:PORT``) runs the header reads on a Dask distributed
    cluster instead of ``params.workers`` local processes.
    """
    index_archive(archive, snapshot, out, params, scheduler)
