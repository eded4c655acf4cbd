"""Zero-shot segmentation and typicality of a models folder on a second synthetic generator.

The phantom archive of `tests/phantom` (another anatomy, lesion and noise model, never used
to choose a ctcurate constant) is written with its truth SEGs; every chest series is
predicted with `ctcurate.pipeline.predict` (the grid of the `pack` section of `--params`, centred on
the lung estimate as `predict --series` does) and compared with the truth on the series'
own grid, instance by instance (truth read by referenced SOPInstanceUID):

- lung Dice: predicted labels 1–3 vs truth labels 1–3;
- lesion Dice: predicted 2–3 vs truth 2–3, on series whose truth has lesion;
- typicality accuracy: predicted label (probability >= `evaluate.threshold`) vs the
  phantom's binary `covid_typicality` (1 typical or indeterminate, 0 atypical or negative).

    PYTHONPATH=src .venv/bin/python benchmarks/zero_shot.py --models models [--patients 20]

Results: `<work>/zero_shot.json` (per series and per pattern), and a Markdown table printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from phantom import PhantomParams, build_archive  # noqa: E402

from ctcurate.models.metrics import dice, mean_defined  # noqa: E402

PATTERNS = ("typical", "indeterminate", "atypical", "negative")
LESION = 2  # labels 2 (GGO) and 3 (consolidation)


def score_series(
    pred: npt.NDArray[np.integer[Any]],
    truth: npt.NDArray[np.integer[Any]],
    probability: float,
    threshold: float,
    typical: int | None,
) -> dict[str, Any]:
    """Lung and lesion Dice of one series (same grid) and whether its typicality is right.

    ``lesion_dice`` is ``None`` when the truth has no lesion; ``typicality_correct`` is
    ``None`` when ``typical`` is unknown.
    """
    if pred.shape != truth.shape:
        msg = f"score_series: shapes differ, {pred.shape} vs {truth.shape}"
        raise ValueError(msg)
    truth_lesion = truth >= LESION
    has_lesion = bool(truth_lesion.any())
    predicted = int(probability >= threshold)
    return {
        "lung_dice": dice(pred >= 1, truth >= 1),
        "lesion_dice": dice(pred >= LESION, truth_lesion) if has_lesion else None,
        "probability": round(float(probability), 4),
        "predicted_typical": predicted,
        "typical": typical,
        "typicality_correct": None if typical is None else int(predicted == typical),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    m = mean_defined(values)
    return None if m is None else round(m, 3)


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over ``rows`` (series without a value left out) and how many count."""
    lesion = [r["lesion_dice"] for r in rows if r["lesion_dice"] is not None]
    correct = [r["typicality_correct"] for r in rows if r["typicality_correct"] is not None]
    return {
        "n": len(rows),
        "lung_dice": _mean([r["lung_dice"] for r in rows]),
        "lung_in_grid": _mean([r.get("lung_in_grid") for r in rows]),
        "n_lesion": len(lesion),
        "lesion_dice": _mean(lesion),
        "n_typicality": len(correct),
        "typicality_accuracy": _mean([float(c) for c in correct]),
    }


def by_pattern(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`aggregate` per phantom pattern (in :data:`PATTERNS` order) and over all."""
    out = {p: aggregate([r for r in rows if r["pattern"] == p]) for p in PATTERNS}
    out = {p: a for p, a in out.items() if a["n"]}
    out["all"] = aggregate(rows)
    return out


def predict_archive(
    out: Path, truth_rows: Sequence[dict[str, Any]], models_dir: Path, params: Path
) -> list[dict[str, Any]]:
    """Predict every chest series of a phantom archive at ``out``; one scored row each."""
    import torch

    from ctcurate.dicom.seg import read_seg_labels
    from ctcurate.imaging.volume import label_to_stack
    from ctcurate.params import EvaluateParams, PackParams, load_section
    from ctcurate.pipeline import predict

    pack = load_section(params, "pack", PackParams)
    evaluate = load_section(params, "evaluate", EvaluateParams)
    torch.set_num_threads(evaluate.threads)
    models = predict.load(models_dir, pack.spacing_mm, torch.device("cpu"))
    rows = []
    for t in truth_rows:
        if t["kind"] != "chest_ct" or t["duplicate_of"] is not None:
            continue
        uid = str(t["series_instance_uid"])
        datasets = predict.read_series_dir(out / "archive" / str(t["path"]))
        t0 = time.perf_counter()
        pred = predict.predict_series(datasets, models, pack)
        seconds = time.perf_counter() - t0
        sops = [str(ds.SOPInstanceUID) for ds in datasets]
        truth = read_seg_labels(out / "annotations" / "seg" / f"{uid}.dcm", sops)
        typical = t["covid_typicality"]
        # which voxels of the series the release grid covers: the best lung Dice possible
        inside = pred.stack.unorient(
            label_to_stack(pred.stack, pred.grid, np.ones(pred.grid.shape, dtype=np.uint8))
        ).astype(bool)
        voxel_ml = float(np.prod(pred.stack.spacing_mm)) / 1000.0
        row = score_series(
            pred.instance_labels,
            truth,
            pred.probability,
            evaluate.threshold,
            None if typical is None else int(typical),
        )
        rows.append(
            {
                "series": uid[-8:],
                "pattern": t["pattern"],
                "matrix": int(t["rows"]),
                "slices": int(t["slices"]),
                "lesion_ml": round(float(t["lesion_volume_ml"] or 0.0), 1),
                "predicted_lesion_ml": round(
                    int((pred.native_label >= LESION).sum()) * voxel_ml, 1
                ),
                "lung_in_grid": round(float(inside[truth >= 1].mean()), 3),
                **row,
                "seconds": round(seconds, 1),
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(rows: Sequence[dict[str, Any]], agg: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| pattern | series | lung in grid | lung Dice | lesion Dice (series) "
        "| typicality accuracy (series) |",
        "|---|---|---|---|---|---|",
    ]
    for p, a in agg.items():
        lines.append(
            f"| {p} | {a['n']} | {_fmt(a['lung_in_grid'])} | {_fmt(a['lung_dice'])} "
            f"| {_fmt(a['lesion_dice'])} "
            f"({a['n_lesion']}) | {_fmt(a['typicality_accuracy'])} ({a['n_typicality']}) |"
        )
    lines += [
        "",
        "| series | pattern | matrix × slices | lung in grid | lung Dice | lesion mL "
        "| predicted lesion mL | lesion Dice | p(typical) | truth typical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| …{r['series']} | {r['pattern']} | {r['matrix']} × {r['slices']} "
            f"| {r['lung_in_grid']:.3f} | {_fmt(r['lung_dice'])} | {r['lesion_ml']} "
            f"| {r['predicted_lesion_ml']} | {_fmt(r['lesion_dice'])} "
            f"| {r['probability']:.3f} | {r['typical']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", type=Path, required=True, help="models folder (train output)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks/out/zero_shot")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--pneumonia-share", type=float, default=0.75)
    ap.add_argument("--matrix", type=int, nargs=2, default=(128, 160))
    ap.add_argument("--slices", type=int, nargs=2, default=(30, 48))
    args = ap.parse_args()
    work: Path = args.work.resolve()
    ph = work / "phantom"
    t0 = time.perf_counter()
    if not (ph / "truth.parquet").is_file():
        params = PhantomParams(
            seed=args.seed,
            patients=args.patients,
            pneumonia_share=args.pneumonia_share,
            matrix=tuple(args.matrix),
            slices=tuple(args.slices),
            write_seg=True,
        )
        build_archive(ph, params)
    t_build = time.perf_counter() - t0
    truth_rows = pq.read_table(ph / "truth.parquet").to_pylist()
    rows = predict_archive(ph, truth_rows, args.models.resolve(), args.params)
    agg = by_pattern(rows)
    result = {
        "phantom": {
            "patients": args.patients,
            "seed": args.seed,
            "pneumonia_share": args.pneumonia_share,
            "matrix": list(args.matrix),
            "slices": list(args.slices),
        },
        "seconds": {
            "build": round(t_build, 1),
            "predict": round(time.perf_counter() - t0 - t_build, 1),
        },
        "by_pattern": agg,
        "series": rows,
    }
    (work / "zero_shot.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows, agg))
    print(json.dumps(result["seconds"]))


if __name__ == "__main__":
    main()
