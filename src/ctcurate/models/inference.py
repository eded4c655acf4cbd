"""Inference: a models folder applied to one case or one CT series.

:func:`predict_case` is what ``evaluate`` scores on a release case; :func:`predict_series`
runs the same on a series of any grid (``predict``): resampled like ``pack`` onto the release
grid, predicted, mapped back onto the series' pixel grid. :func:`write_outputs` writes one
prediction folder: ``seg.dcm``, ``prediction.json`` and ``overlay.png``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

import ctcurate.release
import ctcurate.release.format
from ctcurate import __version__
from ctcurate.dicom.seg import LABELS, SegAlgorithm, SegWriteError, write_seg
from ctcurate.errors import InputError, ParamsError
from ctcurate.imaging.lungmask import threshold_lung_mask
from ctcurate.imaging.overlay import overlay_panels_png
from ctcurate.imaging.volume import (
    ReleaseGrid,
    SeriesStack,
    assemble_series,
    box_centre,
    centred_grid,
    label_to_stack,
    resample_image,
)
from ctcurate.io.atomic import dumps_json
from ctcurate.labels import CONSOLIDATION, GGO, NORMAL
from ctcurate.models.checkpoint import MODEL_FILE, load_models
from ctcurate.models.nets import (
    LUNG_SOURCES,
    LogisticModel,
    lung_outline_in_plane,
    postprocess_label,
    predict_labels,
    redraw_lesions,
    typicality_features,
)
from ctcurate.params import PackParams

TYPICAL = "typical"


OTHER = "atypical_or_negative"


def lesion_cut_mm3(card: Mapping[str, Any]) -> float:
    """The lesion size cut (mm^3) that train chose, from ``model.json`` (0 when absent)."""
    return float(card.get("postprocess", {}).get("min_lesion_mm3", 0.0))


def lung_source(card: Mapping[str, Any]) -> str:
    """Where the post-processed lung comes from (``train.lung_from``), from ``model.json``;
    ``network`` for models trained before the choice existed. :class:`ParamsError` for a
    value this version does not know."""
    source = str(card.get("postprocess", {}).get("lung_from", "network"))
    if source not in LUNG_SOURCES:
        msg = f"{MODEL_FILE}: unknown postprocess lung_from {source!r}"
        raise ParamsError(msg)
    return source


def lesion_grow_mm(card: Mapping[str, Any]) -> float:
    """How far predicted lesions grow into dense lung (``postprocess.lesion_grow_mm`` of
    ``model.json``, chosen on val by train); 0 for models trained before it existed."""
    return float(card.get("postprocess", {}).get("lesion_grow_mm", 0.0))


def predict_case(
    net: torch.nn.Module,
    classifier: LogisticModel,
    image_hu: torch.Tensor,
    roi: Sequence[int],
    device: torch.device,
    min_lesion_mm3: float,
    spacing_mm: tuple[float, float, float],
    lung_from: str = "network",
    grow_mm: float = 0.0,
) -> tuple[npt.NDArray[np.uint8], float]:
    """One case's post-processed label volume (z, y, x) and typicality probability from its
    HU image (1, z, y, x) on the release grid: what evaluate scores."""
    pred = predict_labels(net, image_hu[None], roi, device)[0]
    hu = image_hu[0].detach().cpu().numpy()
    pred = postprocess_label(pred, hu, spacing_mm, min_lesion_mm3, lung_from, grow_mm)
    feats = typicality_features(pred, spacing_mm)
    return pred, float(classifier.predict_proba(feats[None])[0])


#: The tool's name (its output folder's marker) and what it writes into that folder.
STAGE = "predict"


SEG_FILE = "seg.dcm"


JSON_FILE = "prediction.json"


PNG_FILE = "overlay.png"


REPORT = "report.json"


OWN_FILES = (SEG_FILE, JSON_FILE, PNG_FILE, REPORT)


#: Slices of the series' own grid redrawn at a time by :func:`native_labels`.
NATIVE_SLICES = 16


#: Axial slices shown in the overlay: those with the most predicted lesion (else lung).
OVERLAY_SLICES = 3


DECIMALS = 6


ML_DECIMALS = 3


@dataclass(frozen=True)
class Models:
    """A loaded models folder and what prediction needs from its card."""

    net: torch.nn.Module
    classifier: LogisticModel
    card: dict[str, Any]
    model_id: str
    roi: tuple[int, ...]
    min_lesion_mm3: float
    device: torch.device
    lung_from: str = "network"
    grow_mm: float = 0.0


def load(models: Path, spacing_mm: Sequence[float], device: torch.device) -> Models:
    """Load ``models`` for a release grid of ``spacing_mm`` (z, y, x); refuse models
    trained at another spacing.

    Raises
    ------
    InputError
        When the folder is not a complete models folder.
    ParamsError
        When the models were trained at another voxel spacing than ``spacing_mm``.
    """
    net, classifier, card = load_models(Path(models))
    trained = card.get("input", {}).get("spacing_mm")
    wanted = [float(v) for v in spacing_mm]
    if trained is not None and [float(v) for v in trained] != wanted:
        msg = (
            f"{Path(models) / MODEL_FILE}: trained at spacing {list(trained)} mm but "
            f"pack.spacing_mm is {wanted}"
        )
        raise ParamsError(msg)
    model_id = hashlib.sha256((Path(models) / MODEL_FILE).read_bytes()).hexdigest()
    roi = tuple(int(s) for s in card["input"]["shape"])
    return Models(
        net.to(device),
        classifier,
        card,
        model_id,
        roi,
        lesion_cut_mm3(card),
        device,
        lung_source(card),
        lesion_grow_mm(card),
    )


@dataclass(frozen=True)
class Prediction:
    """One series predicted: the release grid, its image and labels, and the native labels."""

    stack: SeriesStack
    grid: ReleaseGrid
    grid_image: npt.NDArray[np.int16]
    grid_label: npt.NDArray[np.uint8]
    native_label: npt.NDArray[np.uint8]  # (z, y, x) of the stack
    instance_labels: npt.NDArray[np.uint8]  # (n_instances, rows, cols), instance order
    probability: float
    centred_on: str


def lung_centre(stack: SeriesStack, pack: PackParams) -> npt.NDArray[np.float64]:
    """The (z, y, x) voxel index at the centre of the bounding box of a HU-threshold lung
    estimate (:func:`ctcurate.imaging.lungmask.threshold_lung_mask`), found on the stack subsampled
    to about the release spacing; the stack's centre when no lung is found."""
    spacing = np.asarray(pack.spacing_mm, dtype=np.float64)
    step = np.maximum(1, np.floor(spacing / stack.spacing_mm)).astype(np.int64)
    coarse = stack.image[:: step[0], :: step[1], :: step[2]]
    box = box_centre(threshold_lung_mask(coarse))
    if box is None:
        return (np.asarray(stack.image.shape, dtype=np.float64) - 1) / 2.0
    centre: npt.NDArray[np.float64] = box * step
    return centre


def predict_series(
    datasets: Sequence[Any],
    models: Models,
    pack: PackParams,
    origin_mm: Sequence[float] | None = None,
) -> Prediction:
    """Predict one series' labels and typicality probability.

    ``origin_mm`` (x, y, z, as a release records it) pins the release grid; without it the
    grid is centred on :func:`lung_centre`. Raises :class:`ExcludedSeries` when the series
    cannot be assembled.
    """
    stack = assemble_series(datasets)
    if origin_mm is None:
        grid, centred_on = centred_grid(stack, lung_centre(stack, pack), pack), "lung_estimate"
    else:
        origin = np.asarray([origin_mm[2], origin_mm[1], origin_mm[0]], dtype=np.float64)
        spacing = np.asarray(pack.spacing_mm, dtype=np.float64)
        shape = (int(pack.shape[0]), int(pack.shape[1]), int(pack.shape[2]))
        grid, centred_on = ReleaseGrid(origin, spacing, shape), "release_case"
    image = resample_image(stack, grid, pack)
    spacing_mm = (float(grid.spacing_mm[0]), float(grid.spacing_mm[1]), float(grid.spacing_mm[2]))
    tensor = torch.from_numpy(image.astype(np.float32))[None]
    label, probability = predict_case(
        models.net,
        models.classifier,
        tensor,
        models.roi,
        models.device,
        models.min_lesion_mm3,
        spacing_mm,
        models.lung_from,
        models.grow_mm,
    )
    native = native_labels(stack, grid, label, models.lung_from, models.grow_mm)
    return Prediction(
        stack, grid, image, label, native, stack.unorient(native), probability, centred_on
    )


def native_labels(
    stack: SeriesStack,
    grid: ReleaseGrid,
    label: npt.NDArray[np.uint8],
    lung_from: str,
    grow_mm: float = 0.0,
) -> npt.NDArray[np.uint8]:
    """The release-grid ``label`` on the stack's own (z, y, x) grid (0 outside the grid).

    With ``lung_from`` ``"hu"`` the lung's outline is drawn again from HU at the series'
    own resolution (:func:`ctcurate.models.nets.lung_outline_in_plane`, inside the part of
    the series the release grid covers), so the SEG follows the pleura pixel by pixel
    instead of in release-grid steps. With ``grow_mm`` > 0 (the model card's lesion growth)
    the lesions are then drawn again from HU within that reach of the network's
    (:func:`ctcurate.models.nets.redraw_lesions`), so their borders follow the series'
    pixels too; otherwise they stay the network's, brought over by nearest neighbour. Both
    work on :data:`NATIVE_SLICES` slices at a time (the lesions with the slices within the
    reach on either side), so memory does not grow with the series' length. The
    release-grid labels (what ``evaluate`` scores) are unchanged.
    """
    native = label_to_stack(stack, grid, label)
    if lung_from == "hu":
        covered = label_to_stack(stack, grid, np.ones(grid.shape, dtype=np.uint8)).astype(bool)
        for start in range(0, native.shape[0], NATIVE_SLICES):
            part = slice(start, start + NATIVE_SLICES)
            native[part] = lung_outline_in_plane(native[part], stack.image[part], covered[part])
    if grow_mm <= 0 or not (native >= GGO).any():
        return native
    spacing = [float(v) for v in stack.spacing_mm]
    halo = int(np.ceil(grow_mm / spacing[0])) + 1
    drawn = native.copy()
    n = native.shape[0]
    for start in range(0, n, NATIVE_SLICES):
        stop = min(start + NATIVE_SLICES, n)
        lo, hi = max(start - halo, 0), min(stop + halo, n)
        slab = redraw_lesions(native[lo:hi], stack.image[lo:hi], spacing, grow_mm)
        drawn[start:stop] = slab[start - lo : stop - lo]
    return drawn


def label_counts(label: npt.NDArray[np.uint8], minlength: int) -> npt.NDArray[np.int64]:
    """``np.bincount`` of a label volume, one slice at a time: a bincount of the whole
    volume first widens it to 64-bit integers (800 MB for 512 × 512 × 400 slices)."""
    n = max(minlength, int(label.max()) + 1) if label.size else minlength
    counts = np.zeros(n, dtype=np.int64)
    for part in label.reshape(label.shape[0], -1) if label.ndim > 1 else [label]:
        counts += np.bincount(part, minlength=n)
    return counts


def summary(
    prediction: Prediction, models: Models, threshold: float, series_uid: str
) -> dict[str, Any]:
    """The content of ``prediction.json``; volumes are measured on the series' own grid."""
    voxel_ml = float(np.prod(prediction.stack.spacing_mm)) / 1000.0
    counts = label_counts(prediction.native_label, len(LABELS) + 1)

    def ml(n: int) -> float:
        return round(float(n) * voxel_ml, ML_DECIMALS)

    grid = prediction.grid
    p = round(prediction.probability, DECIMALS)
    return {
        "code_version": __version__,
        "model": {"id": models.model_id, "release_id": models.card.get("release_id")},
        "series_instance_uid": series_uid,
        "n_instances": len(prediction.instance_labels),
        "duplicates_dropped": len(prediction.instance_labels) - len(prediction.stack.kept),
        "typicality": {
            "probability": p,
            "label": TYPICAL if prediction.probability >= threshold else OTHER,
            "threshold": threshold,
        },
        "volumes_ml": {
            "lung": ml(int(counts[1:].sum())),
            "normal_lung": ml(int(counts[NORMAL])),
            "ground_glass_opacity": ml(int(counts[GGO])),
            "consolidation": ml(int(counts[CONSOLIDATION])),
            "lesion": ml(int(counts[GGO] + counts[CONSOLIDATION])),
        },
        "grid": {
            "centred_on": prediction.centred_on,
            "origin_mm": [
                float(grid.origin_mm[2]),
                float(grid.origin_mm[1]),
                float(grid.origin_mm[0]),
            ],
            "spacing_mm": [float(v) for v in grid.spacing_mm],
            "shape": list(grid.shape),
        },
    }


def overlay_slices(label: npt.NDArray[np.uint8], n: int = OVERLAY_SLICES) -> list[int]:
    """Up to ``n`` axial slices, in order: the most predicted lesion, then the most lung."""
    lesion = (label >= GGO).sum(axis=(1, 2))
    lung = (label > 0).sum(axis=(1, 2))
    ranked = sorted(range(len(label)), key=lambda k: (-int(lesion[k]), -int(lung[k]), k))
    return sorted(ranked[:n])


def overlay(prediction: Prediction, threshold: float) -> bytes:
    """``overlay.png``: the predicted labels over the most affected slices of the series."""
    stack, label = prediction.stack, prediction.native_label
    panels = [(stack.image[k], label[k], f"slice {k}") for k in overlay_slices(label)]
    verdict = TYPICAL if prediction.probability >= threshold else OTHER
    title = f"predicted: {verdict} (p = {prediction.probability:.3f})"
    return overlay_panels_png(panels, title, width_in=3.2 * len(panels))


def algorithm(models: Models) -> SegAlgorithm:
    """The SEG's algorithm identification: ctcurate predict with this model."""
    return SegAlgorithm(
        name="ctcurate predict",
        version=f"{__version__} model {models.model_id[:16]}",
        family=("123110", "DCM", "Artificial Intelligence"),
        automatic=True,
        series_description="predicted lung and lesion segmentation",
        uid_salt=models.model_id,
    )


def write_outputs(
    folder: Path,
    datasets: Sequence[Any],
    prediction: Prediction,
    models: Models,
    threshold: float,
) -> dict[str, Any]:
    """Write ``seg.dcm``, ``prediction.json`` and ``overlay.png`` into ``folder``.

    The SEG is derived from the instances at distinct positions: an identical duplicate
    slice (dropped by the assembly, as pack drops it) is represented by its twin.

    Raises
    ------
    SegWriteError
        When highdicom refuses to derive a SEG from the instances.
    """
    uid = str(datasets[0].get("SeriesInstanceUID", ""))
    kept = list(prediction.stack.kept)
    try:
        write_seg(
            folder / SEG_FILE,
            [datasets[i] for i in kept],
            prediction.instance_labels[kept],
            algorithm=algorithm(models),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        msg = f"the SEG could not be derived from the instances ({type(exc).__name__})"
        raise SegWriteError(msg) from exc
    content = summary(prediction, models, threshold, uid)
    (folder / JSON_FILE).write_text(dumps_json(content), encoding="utf-8")
    (folder / PNG_FILE).write_bytes(overlay(prediction, threshold))
    return content


def release_origins(release: Path) -> tuple[PackParams, dict[tuple[str, str], list[float]]]:
    """A release's pack params and the recorded grid origin of each (site, series uid)."""

    manifest = ctcurate.release.format.read_manifest(Path(release))
    try:
        pack = PackParams.model_validate(manifest.get("params", {}))
    except ValueError as exc:
        msg = f"{Path(release) / 'manifest.json'}: params are not valid pack params"
        raise InputError(msg) from exc
    origins = {
        (str(c.get("site")), str(c.get("series_instance_uid"))): [float(v) for v in c["origin_mm"]]
        for c in manifest["cases"]
        if c.get("origin_mm") is not None
    }
    return pack, origins
