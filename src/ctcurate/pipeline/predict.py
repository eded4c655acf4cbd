"""predict: the trained models on any CT series — a DICOM SEG, a JSON summary, an overlay.

A tool, not a pipeline stage. One series folder (``--series``) or the selected series of an
index (``--selected``) go through the same preprocessing as ``pack``
(:func:`ctcurate.imaging.volume.assemble_series`, :func:`~ctcurate.imaging.volume.centred_grid`,
:func:`~ctcurate.imaging.volume.resample_image`) and the same per-case prediction as ``evaluate``
(:func:`ctcurate.pipeline.evaluate.predict_case`): on the release grid (``pack.spacing_mm``,
``pack.shape``), centred on a HU-threshold lung estimate of the series — or, with
``--release``, on the grid that release recorded for the series, which reproduces what
``evaluate`` computed for it. The predicted labels are mapped back onto the series' own
pixel grid (the inverse resampling, nearest neighbour; 0 outside the release grid) and
written as a DICOM SEG whose frames reference their CT instances.

Per series: ``seg.dcm``, ``prediction.json`` (canonical JSON) and ``overlay.png``; batch mode
(:mod:`ctcurate.pipeline.predict_batch`) writes them under ``<out>/<series uid>/`` with a
``report.json`` accounting for every selected series (``seen == predicted + failed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctcurate.dicom.record import column_value
from ctcurate.dicom.seg import SegWriteError
from ctcurate.dicom.series_dir import read_series_dir
from ctcurate.errors import InputError, one_line
from ctcurate.imaging.volume import ExcludedSeries
from ctcurate.io.outputs import check_output_dir, publish_dir
from ctcurate.log import get_logger
from ctcurate.models.checkpoint import resolve_device
from ctcurate.models.inference import (
    OWN_FILES,
    STAGE,
    load,
    predict_series,
    release_origins,
    write_outputs,
)
from ctcurate.params import EvaluateParams, PackParams
from ctcurate.selection.region import CHEST, UNKNOWN, BodyRegions

log = get_logger("predict")


# --------------------------------------------------------------------------- reading


def _region_headers(regions: BodyRegions, ds: Any) -> list[str | None]:
    """The headers ``regions`` reads, converted as ``index`` records them for ``select``."""
    kinds = {"AnatomicRegionSequence": "codes"}
    return [column_value(ds, kinds.get(h, "text"), h)[0] for h in regions.headers]


def run_series(
    series: Path,
    models_dir: Path,
    out: Path,
    pack: PackParams,
    params: EvaluateParams,
    release: Path | None = None,
    regions: BodyRegions | None = None,
) -> dict[str, Any]:
    """Predict one series folder into the folder ``out``; returns ``prediction.json``'s content.

    With ``regions`` (the body region vocabulary of ``select``), a series whose headers name
    another region and not the chest (a head CT) is refused: the models know only chests.

    Raises
    ------
    InputError
        When the series cannot be read or assembled (naming why), is not a chest CT by its
        headers, or an input is unusable.
    """
    series, models_dir, out = Path(series), Path(models_dir), Path(out)
    inputs = [series, models_dir, *([Path(release)] if release else [])]
    check_output_dir(out, STAGE, inputs, OWN_FILES)
    origin = None
    if release is not None:
        pack, origins = release_origins(Path(release))
    device = resolve_device(params.device, section="evaluate")
    torch.set_num_threads(params.threads)
    models = load(models_dir, pack.spacing_mm, device)
    datasets = read_series_dir(series)
    if regions is not None:
        region, header = regions.classify(_region_headers(regions, datasets[0]))
        if region not in (CHEST, UNKNOWN):
            msg = (
                f"{series}: its headers name the {region}, not the chest ({header}); the "
                "models are for chest CT (--any-region predicts anyway)"
            )
            raise InputError(msg)
    if release is not None:
        uid = str(datasets[0].get("SeriesInstanceUID", ""))
        found = [o for (_, u), o in sorted(origins.items()) if u == uid]
        origin = found[0] if len(found) == 1 else None
        if origin is None:
            log.warning("the series is not one case of the release: grid centred on the lung")
    try:
        prediction = predict_series(datasets, models, pack, origin)
    except ExcludedSeries as exc:
        msg = f"{series}: cannot assemble the series: {exc.reason} ({one_line(exc.detail)})"
        raise InputError(msg) from exc
    try:
        with publish_dir(out, STAGE, inputs=inputs, own=OWN_FILES) as tmp:
            content = write_outputs(tmp, datasets, prediction, models, params.threshold)
    except SegWriteError as exc:
        msg = f"{series}: {exc}"
        raise InputError(msg) from exc
    log.info(
        "predicted 1 series of %d instances on %s: typicality %.3f, lesion %.1f mL of %.1f mL",
        len(datasets),
        device.type,
        prediction.probability,
        content["volumes_ml"]["lesion"],
        content["volumes_ml"]["lung"],
    )
    return content
