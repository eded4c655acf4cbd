"""The ``evaluate`` stage: the trained models on the release's ``test`` split.

Per test case the network predicts a label volume (whole when the case has the training
shape, else a sliding window), lesion components below the size cut chosen on val by
train (``model.json`` ``postprocess.min_lesion_mm3``) become normal lung, and the
classifier gives a typicality probability from features of that prediction; a case is
called typical when the probability is ``>= threshold``.

``metrics/eval.json`` (canonical JSON, numbers rounded to 6 decimals):

- ``lung_dice``, ``lesion_dice``, ``ggo_dice``, ``consolidation_dice``: mean over cases of
  the per-case Dice of lung (label > 0), lesion (GGO or consolidation), GGO and
  consolidation; a case where both masks are empty is left out of that mean;
- ``typicality_accuracy``, ``typicality_balanced_accuracy``, ``typicality_auc``,
  ``sensitivity`` (typical cases called typical), ``specificity``, over the cases whose
  binary typicality is known (``n_typicality`` of ``n_test``);
- ``lung_dice_consolidated`` and ``threshold_lung_dice_consolidated``: lung Dice of the
  network and of a plain HU-threshold lung mask (:func:`threshold_lung_mask`) on the
  ``n_consolidated`` cases with reference consolidation;
- ``per_site``: the same per site. A metric that is undefined (no case, one class for the
  AUC, see :mod:`ctcurate.metrics`) is ``null``.

``plots/`` (published atomically): ``roc.json``, ``confusion.json`` (one row per case with
a known label) and ``overlays/<case_id>.png``: the reference and predicted labels on one
axial slice (the one with most reference lesion, else most lung), normal lung green, GGO
yellow, consolidation red.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

import ctcurate.release
from ctcurate.io.atomic import dumps_json
from ctcurate.io.outputs import check_output_dir, check_output_file, publish_dir, publish_file
from ctcurate.log import get_logger, progress
from ctcurate.metrics import (
    accuracy,
    balanced_accuracy,
    binary_counts,
    dice,
    mean_defined,
    roc_auc,
    roc_curve,
    sensitivity,
    specificity,
)
from ctcurate.nets import (
    CONSOLIDATION,
    GGO,
    LogisticModel,
    predict_labels,
    remove_small_lesions,
    typicality_features,
)
from ctcurate.params import EvaluateParams
from ctcurate.train import load_models, resolve_device, spacing_of

log = get_logger("evaluate")

#: The stage name (the plots folder's marker) and what it writes into that folder.
STAGE = "evaluate"
PLOT_FILES = ("roc.json", "confusion.json", "overlays")

TYPICAL = "typical"
OTHER = "atypical_or_negative"
DECIMALS = 6
#: Display window (HU) of the overlay images: a lung window.
OVERLAY_WINDOW = (-1350.0, 150.0)
#: RGBA of normal lung, GGO and consolidation in the overlays.
OVERLAY_COLOURS: dict[int, tuple[float, float, float, float]] = {
    1: (0.0, 0.8, 0.0, 0.35),
    2: (1.0, 0.9, 0.0, 0.6),
    3: (0.9, 0.0, 0.0, 0.6),
}


def threshold_lung_mask(
    image_hu: npt.NDArray[np.floating[Any]], hu_max: float
) -> npt.NDArray[np.bool_]:
    """A plain HU-threshold lung mask, the baseline the network is compared with.

    Voxels below ``hu_max`` inside the body (the largest component at or above ``hu_max``
    with each axial slice's holes filled), the two largest such components, with each axial
    slice's holes (vessels) filled. Consolidation at the lung's edge is not a hole, so it is
    lost: that is the weakness the learned lung shape addresses.
    """
    img = np.asarray(image_hu)
    air = img < hu_max
    tissue, n = ndimage.label(~air)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(tissue.ravel())[1:]
    body = tissue == (int(np.argmax(sizes)) + 1)
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    labels, n = ndimage.label(air & body)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(-sizes, kind="stable")[:2] + 1
    lung = np.isin(labels, keep)
    return np.stack([ndimage.binary_fill_holes(s) for s in lung]).astype(bool)


@dataclass(frozen=True)
class CaseResult:
    """What evaluate measured on one test case."""

    case_id: str
    site: str
    typical: int
    probability: float
    lung_dice: float | None
    lesion_dice: float | None
    ggo_dice: float | None
    consolidation_dice: float | None
    consolidated: bool
    threshold_lung_dice: float | None


def evaluate_case(
    case_id: str,
    site: str,
    typical: int,
    image_hu: npt.NDArray[np.floating[Any]],
    truth: npt.NDArray[np.uint8],
    pred: npt.NDArray[np.uint8],
    probability: float,
    hu_lung_max: float,
) -> CaseResult:
    """Per-case Dice figures and, on consolidated cases, the threshold baseline's lung Dice."""
    consolidated = bool((truth == CONSOLIDATION).any())
    baseline = dice(threshold_lung_mask(image_hu, hu_lung_max), truth > 0) if consolidated else None
    return CaseResult(
        case_id=case_id,
        site=site,
        typical=typical,
        probability=probability,
        lung_dice=dice(pred > 0, truth > 0),
        lesion_dice=dice(pred >= GGO, truth >= GGO),
        ggo_dice=dice(pred == GGO, truth == GGO),
        consolidation_dice=dice(pred == CONSOLIDATION, truth == CONSOLIDATION),
        consolidated=consolidated,
        threshold_lung_dice=baseline,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), DECIMALS)


def summarise(results: Sequence[CaseResult], threshold: float) -> dict[str, Any]:
    """The metrics of a set of case results (without ``per_site``)."""
    known = [r for r in results if r.typical in (0, 1)]
    actual = [r.typical for r in known]
    scores = [r.probability for r in known]
    counts = binary_counts(actual, [int(s >= threshold) for s in scores])
    consolidated = [r for r in results if r.consolidated]
    out: dict[str, Any] = {
        "n_test": len(results),
        "n_typicality": len(known),
        "n_consolidated": len(consolidated),
        "lung_dice": mean_defined(r.lung_dice for r in results),
        "lesion_dice": mean_defined(r.lesion_dice for r in results),
        "ggo_dice": mean_defined(r.ggo_dice for r in results),
        "consolidation_dice": mean_defined(r.consolidation_dice for r in results),
        "typicality_accuracy": accuracy(counts),
        "typicality_balanced_accuracy": balanced_accuracy(counts),
        "typicality_auc": roc_auc(actual, scores),
        "sensitivity": sensitivity(counts),
        "specificity": specificity(counts),
        "lung_dice_consolidated": mean_defined(r.lung_dice for r in consolidated),
        "threshold_lung_dice_consolidated": mean_defined(
            r.threshold_lung_dice for r in consolidated
        ),
    }
    return {k: _round(v) if isinstance(v, float) else v for k, v in out.items()}


def eval_metrics(
    results: Sequence[CaseResult], threshold: float, release_id: str | None
) -> dict[str, Any]:
    """The content of ``metrics/eval.json``: overall, per site, and provenance."""
    ordered = sorted(results, key=lambda r: r.case_id)
    sites = sorted({r.site for r in ordered})
    return {
        **summarise(ordered, threshold),
        "threshold": threshold,
        "release_id": release_id,
        "per_site": {s: summarise([r for r in ordered if r.site == s], threshold) for s in sites},
    }


def roc_plot(results: Sequence[CaseResult]) -> dict[str, Any]:
    """``plots/roc.json``: ROC points over the cases with a known label."""
    known = sorted((r for r in results if r.typical in (0, 1)), key=lambda r: r.case_id)
    points = roc_curve([r.typical for r in known], [r.probability for r in known])
    return {"roc": [{k: _round(v) for k, v in p.items()} for p in points]}


def confusion_plot(results: Sequence[CaseResult], threshold: float) -> dict[str, Any]:
    """``plots/confusion.json``: actual and predicted class per case with a known label."""
    rows = []
    for r in sorted(results, key=lambda r: r.case_id):
        if r.typical not in (0, 1):
            continue
        rows.append(
            {
                "case_id": r.case_id,
                "actual": TYPICAL if r.typical == 1 else OTHER,
                "predicted": TYPICAL if r.probability >= threshold else OTHER,
            }
        )
    return {"confusion": rows}


def overlay_slice(truth: npt.NDArray[np.uint8]) -> int:
    """The axial slice shown: most reference lesion voxels, else most lung, lowest index."""
    lesion = (truth >= GGO).sum(axis=(1, 2))
    counts = lesion if lesion.any() else (truth > 0).sum(axis=(1, 2))
    return int(np.argmax(counts))


def _rgba(label: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    out = np.zeros((*label.shape, 4), dtype=np.float64)
    for value, colour in OVERLAY_COLOURS.items():
        out[label == value] = colour
    return out


def overlay_panels_png(
    panels: Sequence[tuple[npt.NDArray[Any], npt.NDArray[np.uint8], str]],
    title: str,
    width_in: float = 6.4,
) -> bytes:
    """PNG bytes: labels over axial slices, one panel per (HU slice, label slice, name).

    Deterministic: Agg canvas, fixed size and dpi, no ``Software`` metadata.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(width_in, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    lo, hi = OVERLAY_WINDOW
    for ax, (hu, label, name) in zip(axes, panels, strict=True):
        ax.imshow(hu, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.imshow(_rgba(label), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [
        Patch(color=OVERLAY_COLOURS[v][:3], label=n)
        for v, n in ((1, "normal lung"), (2, "GGO"), (3, "consolidation"))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def overlay_png(
    image_hu: npt.NDArray[np.floating[Any]],
    truth: npt.NDArray[np.uint8],
    pred: npt.NDArray[np.uint8],
    title: str,
) -> bytes:
    """PNG bytes: reference and predicted labels over one axial slice, side by side."""
    k = overlay_slice(truth)
    panels = [(image_hu[k], truth[k], "reference"), (image_hu[k], pred[k], "predicted")]
    return overlay_panels_png(panels, f"{title} (slice {k})")


def lesion_cut_mm3(card: Mapping[str, Any]) -> float:
    """The lesion size cut (mm^3) that train chose, from ``model.json`` (0 when absent)."""
    return float(card.get("postprocess", {}).get("min_lesion_mm3", 0.0))


def predict_case(
    net: torch.nn.Module,
    classifier: LogisticModel,
    image_hu: torch.Tensor,
    roi: Sequence[int],
    device: torch.device,
    min_lesion_mm3: float,
    spacing_mm: tuple[float, float, float],
) -> tuple[npt.NDArray[np.uint8], float]:
    """One case's post-processed label volume (z, y, x) and typicality probability from its
    HU image (1, z, y, x) on the release grid: what evaluate scores."""
    pred = predict_labels(net, image_hu[None], roi, device)[0]
    pred = remove_small_lesions(pred, min_lesion_mm3, spacing_mm)
    feats = typicality_features(pred, spacing_mm)
    return pred, float(classifier.predict_proba(feats[None])[0])


def run(release: Path, models: Path, metrics: Path, plots: Path, params: EvaluateParams) -> None:
    """Evaluate ``models`` on the test split of ``release``; write metrics and plots."""
    release, models, metrics, plots = Path(release), Path(models), Path(metrics), Path(plots)
    inputs = [release, models]
    check_output_file(metrics, inputs)
    check_output_dir(plots, STAGE, inputs, PLOT_FILES)
    device = resolve_device(params.device, section="evaluate")
    torch.set_num_threads(params.threads)
    net, classifier, card = load_models(models)
    net = net.to(device)
    roi = [int(s) for s in card["input"]["shape"]]
    min_lesion_mm3 = lesion_cut_mm3(card)
    test_set = ctcurate.release.open(release, split="test")
    release_id = test_set.manifest.get("release_id")
    if card.get("release_id") != release_id:
        log.warning("the models were trained on another release than the one evaluated")
    results: list[CaseResult] = []
    overlays: dict[str, bytes] = {}
    for i in progress(range(len(test_set)), len(test_set), "evaluate", log, unit="cases"):
        sample = test_set[i]
        image = sample["image"]
        meta: Mapping[str, Any] = sample["meta"]
        pred, prob = predict_case(
            net, classifier, image, roi, device, min_lesion_mm3, spacing_of(meta)
        )
        truth = sample["label"][0].numpy().astype(np.uint8)
        hu = image[0].numpy()
        result = evaluate_case(
            sample["case_id"],
            str(meta.get("site") or "unknown"),
            int(sample["typical"]),
            hu,
            truth,
            pred,
            prob,
            params.hu_lung_max,
        )
        results.append(result)
        if len(overlays) < params.max_overlays:
            overlays[result.case_id] = overlay_png(hu, truth, pred, result.case_id)
    test_set.close()
    report = eval_metrics(results, params.threshold, release_id)
    with publish_dir(plots, STAGE, inputs=inputs, own=PLOT_FILES) as tmp:
        (tmp / "roc.json").write_text(dumps_json(roc_plot(results)), encoding="utf-8")
        (tmp / "confusion.json").write_text(
            dumps_json(confusion_plot(results, params.threshold)), encoding="utf-8"
        )
        (tmp / "overlays").mkdir()
        for case_id in sorted(overlays):
            (tmp / "overlays" / f"{case_id}.png").write_bytes(overlays[case_id])
    with publish_file(metrics, inputs=inputs) as tmp:
        tmp.write_text(dumps_json(report), encoding="utf-8")
    log.info(
        "evaluated %d test cases (%d with typicality, %d consolidated, %d overlays): "
        "lung dice %s, lesion dice %s, typicality accuracy %s",
        report["n_test"],
        report["n_typicality"],
        report["n_consolidated"],
        len(overlays),
        report["lung_dice"],
        report["lesion_dice"],
        report["typicality_accuracy"],
    )
