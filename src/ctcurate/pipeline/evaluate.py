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
  AUC, see :mod:`ctcurate.models.metrics`) is ``null``.

``plots/`` (published atomically): ``roc.json``, ``confusion.json`` (one row per case with
a known label) and ``overlays/<case_id>.png``: the reference and predicted labels on one
axial slice (the one with most reference lesion, else most lung), normal lung green, GGO
yellow, consolidation red.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

import ctcurate.release
from ctcurate.imaging.lungmask import threshold_lung_mask
from ctcurate.imaging.overlay import overlay_png
from ctcurate.io.atomic import dumps_json
from ctcurate.io.outputs import check_output_dir, check_output_file, publish_dir, publish_file
from ctcurate.labels import CONSOLIDATION, GGO
from ctcurate.log import get_logger, progress
from ctcurate.models.checkpoint import load_models, resolve_device, spacing_of
from ctcurate.models.inference import (
    OTHER,
    TYPICAL,
    lesion_cut_mm3,
    lesion_grow_mm,
    lung_source,
    predict_case,
)
from ctcurate.models.metrics import (
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
from ctcurate.params import EvaluateParams

log = get_logger("evaluate")

#: The stage name (the plots folder's marker) and what it writes into that folder.
STAGE = "evaluate"
PLOT_FILES = ("roc.json", "confusion.json", "overlays")

DECIMALS = 6


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
    lung_from = lung_source(card)
    grow_mm = lesion_grow_mm(card)
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
            net,
            classifier,
            image,
            roi,
            device,
            min_lesion_mm3,
            spacing_of(meta),
            lung_from,
            grow_mm,
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
