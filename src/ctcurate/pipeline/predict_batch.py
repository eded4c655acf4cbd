"""predict in batch mode: every selected series of an index, on the stages' executor.

Each selected series (``selected`` true in the ``select`` table) is found through the index,
predicted by :mod:`ctcurate.pipeline.predict` into ``<out>/<series uid>/`` and listed in
``<out>/report.json`` as predicted or failed with a reason (:data:`FAILURE_REASONS` or one
of :data:`ctcurate.imaging.volume.REASONS`); ``series_seen == series_predicted + series_failed``.
The series run on a local pool or a Dask cluster (:mod:`ctcurate.executor`), each worker
loading the models once.
"""

from __future__ import annotations

import functools
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctcurate import __version__, executor
from ctcurate.catalog.paths import series_paths
from ctcurate.dicom.seg import SegWriteError
from ctcurate.dicom.series_dir import READ_ERRORS
from ctcurate.errors import AccountingError, InputError, one_line
from ctcurate.imaging.volume import ExcludedSeries
from ctcurate.io.atomic import dumps_json
from ctcurate.io.outputs import check_output_dir, publish_dir
from ctcurate.io.tables import read_parquet
from ctcurate.log import get_logger
from ctcurate.models.checkpoint import resolve_device
from ctcurate.models.inference import (
    OWN_FILES,
    REPORT,
    STAGE,
    Models,
    load,
    predict_series,
    release_origins,
    write_outputs,
)
from ctcurate.params import EvaluateParams, PackParams

log = get_logger("predict")

#: Why a selected series is not predicted (batch), besides the series assembly's reasons.
FAILURE_REASONS = (
    "bad_uid",
    "duplicate_series_uid",
    "no_instances",
    "unreadable",
    "seg_unwritable",
)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class _Task:
    """One selected series for :func:`_predict_task` (picklable)."""

    site: str
    uid: str
    paths: tuple[Path, ...]
    out: Path
    models: Path
    model_id: str
    pack: PackParams
    params: EvaluateParams
    device: str
    origin: tuple[float, ...] | None
    failure: str | None = None


@functools.lru_cache(maxsize=2)
def _worker_models(
    models: Path, model_id: str, spacing_mm: tuple[float, ...], device: str, threads: int
) -> Models:
    """The models of a worker process, loaded once per process and ``model.json`` hash."""
    torch.set_num_threads(threads)
    loaded = load(models, spacing_mm, torch.device(device))
    if loaded.model_id != model_id:
        msg = f"{models}: the models changed while the batch ran"
        raise InputError(msg)
    return loaded


def _predict_task(task: _Task) -> dict[str, Any]:
    """Predict one selected series into ``task.out``; its report row."""
    import pydicom

    row: dict[str, Any] = {"series_instance_uid": task.uid, "site": task.site}
    if task.failure is not None:
        return {**row, "status": "failed", "reason": task.failure}
    models = _worker_models(
        task.models, task.model_id, tuple(task.pack.spacing_mm), task.device, task.params.threads
    )
    try:
        datasets = []
        for path in task.paths:
            try:
                datasets.append(pydicom.dcmread(path))
            except (pydicom.errors.InvalidDicomError, *READ_ERRORS) as exc:
                raise ExcludedSeries(
                    reason="unreadable",
                    detail=f"an instance could not be read ({type(exc).__name__})",
                ) from exc
        prediction = predict_series(datasets, models, task.pack, task.origin)
    except ExcludedSeries as exc:
        return {**row, "status": "failed", "reason": exc.reason, "detail": one_line(exc.detail)}
    folder = task.out / task.uid
    folder.mkdir()
    try:
        content = write_outputs(folder, datasets, prediction, models, task.params.threshold)
    except SegWriteError as exc:
        shutil.rmtree(folder)
        return {**row, "status": "failed", "reason": "seg_unwritable", "detail": str(exc)}
    return {
        **row,
        "status": "predicted",
        "probability": content["typicality"]["probability"],
        "label": content["typicality"]["label"],
    }


def _selected_series(selected: Path) -> list[tuple[str, str]]:
    table = read_parquet(Path(selected), columns=["site", "series_instance_uid", "selected"])
    rows = [r for r in table.to_pylist() if r["selected"]]
    return sorted({(str(r["site"]), str(r["series_instance_uid"])) for r in rows})


def batch_report(seen: int, rows: Sequence[Mapping[str, Any]], model_id: str) -> dict[str, Any]:
    """``report.json``: counts, reasons, and every series with its outcome."""
    failed = [r for r in rows if r["status"] == "failed"]
    return {
        "code_version": __version__,
        "model_id": model_id,
        "series_seen": seen,
        "series_predicted": sum(1 for r in rows if r["status"] == "predicted"),
        "series_failed": len(failed),
        "failed_reasons": dict(sorted(Counter(str(r["reason"]) for r in failed).items())),
        "series": sorted(rows, key=lambda r: (str(r["site"]), str(r["series_instance_uid"]))),
    }


def run_batch(
    selected: Path,
    index_dir: Path,
    archive: Path,
    models_dir: Path,
    out: Path,
    pack: PackParams,
    params: EvaluateParams,
    release: Path | None = None,
    workers: int = 1,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Predict every selected series into ``out/<series uid>/``; ``out/report.json`` lists
    each one as predicted or failed with a reason.

    Raises
    ------
    InputError
        When a table or the models folder is unusable.
    AccountingError
        When seen series do not balance predicted + failed.
    """
    out = Path(out)
    inputs = [Path(selected), Path(index_dir), Path(archive), Path(models_dir)]
    inputs += [Path(release)] if release else []
    check_output_dir(out, STAGE, inputs, OWN_FILES)
    origins: dict[tuple[str, str], list[float]] = {}
    if release is not None:
        pack, origins = release_origins(Path(release))
    device = resolve_device(params.device, section="evaluate")
    models = load(Path(models_dir), pack.spacing_mm, torch.device("cpu"))  # fail fast
    if device.type == "cuda" and workers > 1:
        log.info("device cuda: the series are predicted one at a time in this process")
        workers = 1
    series = _selected_series(Path(selected))
    paths = series_paths(Path(index_dir) / "instances")
    with publish_dir(out, STAGE, inputs=inputs, own=OWN_FILES) as tmp:
        tasks, named = [], set()
        for site, uid in series:  # sorted by (site, uid)
            failure = None
            if not _UID.match(uid) or len(uid) > 64:
                failure = "bad_uid"
            elif uid in named:  # its folder holds the first site's prediction
                failure = "duplicate_series_uid"
            elif not paths.get((site, uid)):
                failure = "no_instances"
            if failure is None:
                named.add(uid)
            origin = origins.get((site, uid))
            tasks.append(
                _Task(
                    site,
                    uid,
                    tuple(Path(archive) / p for p in paths.get((site, uid), [])),
                    tmp,
                    Path(models_dir).resolve(),
                    models.model_id,
                    pack,
                    params,
                    device.type,
                    None if origin is None else tuple(origin),
                    failure,
                )
            )
        rows = executor.map_ordered(
            _predict_task,
            tasks,
            workers=workers,
            scheduler=scheduler,
            progress_to=(log, "predict", "series"),
        )
        report = batch_report(len(series), rows, models.model_id)
        if report["series_seen"] != report["series_predicted"] + report["series_failed"]:
            msg = f"{selected}: series seen != predicted + failed"
            raise AccountingError(msg)
        (tmp / REPORT).write_text(dumps_json(report), encoding="utf-8")
    log.info(
        "predicted %d of %d selected series (%d failed: %s)",
        report["series_predicted"],
        report["series_seen"],
        report["series_failed"],
        ", ".join(f"{k}={v}" for k, v in report["failed_reasons"].items()) or "none",
    )
    return report
