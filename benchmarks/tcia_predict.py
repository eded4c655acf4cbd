"""Zero-shot check of ``ctcurate predict`` on real chest CT series (e.g. TCIA Lung-PET-CT-Dx).

For each pair SERIES_DIR=PRED_DIR (a CT series folder and the ``--out`` folder that
``ctcurate predict --series SERIES_DIR`` wrote), this reads ``prediction.json`` (lung and
lesion volumes, typicality probability) and the SEG back with ``highdicom.seg.segread``,
rebuilds the series as predict does (``volume.assemble_series``), and compares the
predicted lung (normal + GGO + consolidation) with the project's HU-threshold lung mask
(``lungmask.lung_masks``, first output) on the native grid: Dice over all slices without
the tumour, and over those of them that the release grid reaches. Tumour slices come from
``--annotations`` (Pascal-VOC XMLs named by SOPInstanceUID, as in Lung-PET-CT-Dx): the
z range of a series' annotated instances, widened by one slice each side, is left out.

    python benchmarks/tcia_predict.py --annotations ANN [--montage PNG] [--json OUT.json] \
        SERIES_DIR=PRED_DIR [SERIES_DIR=PRED_DIR ...]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np

from ctcurate.dicom.series_dir import read_series_dir
from ctcurate.imaging import lungmask, volume

SEGMENTS = (1, 2, 3)
LUNG_WINDOW = (-1350.0, 150.0)
COLOURS = ((0.23, 0.51, 0.96), (0.96, 0.62, 0.04), (0.86, 0.15, 0.15))


def annotated_uids(folder: Path) -> set[str]:
    return {p.stem for p in folder.rglob("*.xml")}


def native_label(seg_path: Path, datasets: list[Any], stack: volume.SeriesStack) -> np.ndarray:
    """The SEG's labels (0..3) on the stack's (z, y, x) voxels."""
    seg = hd.seg.segread(seg_path)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    per_instance = np.zeros((len(datasets), rows, cols), dtype=np.uint8)
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    uids = sorted(referenced & index.keys())
    if uids:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=list(SEGMENTS),
            combine_segments=True,
            skip_overlap_checks=True,
        )
        for k, uid in enumerate(uids):
            per_instance[index[uid]] = pixels[k]
    # a dropped duplicate shares its twin's slot; orient keeps the twin itself
    return np.asarray(stack.orient(per_instance), dtype=np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else float("nan")


def measure(series: Path, pred: Path, tumour_uids: set[str]) -> dict[str, Any]:
    report = json.loads((pred / "prediction.json").read_text())
    datasets = read_series_dir(series)
    stack = volume.assemble_series(datasets)
    label = native_label(pred / "seg.dcm", datasets, stack)
    spacing = tuple(float(s) for s in stack.spacing_mm)
    threshold, _robust = lungmask.lung_masks(stack.image, spacing)  # type: ignore[arg-type]
    predicted = label > 0
    nz = stack.image.shape[0]
    tumour = [
        stack.kept.index(i)
        for i, ds in enumerate(datasets)
        if str(ds.SOPInstanceUID) in tumour_uids and i in stack.kept
    ]
    keep = np.ones(nz, dtype=bool)
    if tumour:
        keep[max(min(tumour) - 1, 0) : min(max(tumour) + 2, nz)] = False
    # slices the release grid reaches (its z extent, voxel edges, in the stack's z)
    grid = report["grid"]
    z0 = float(grid["origin_mm"][2]) - float(grid["spacing_mm"][0]) / 2
    z1 = z0 + float(grid["spacing_mm"][0]) * int(grid["shape"][0])
    z = float(stack.origin_mm[0]) + float(stack.spacing_mm[0]) * np.arange(nz)
    reached = keep & (z >= z0) & (z <= z1)
    vox_ml = float(np.prod(stack.spacing_mm)) / 1000.0
    volumes = report["volumes_ml"]
    return {
        "series": pred.name,
        "slices": nz,
        "spacing_mm": [round(s, 3) for s in spacing],
        "tumour_slices_excluded": int((~keep).sum()),
        "slices_in_grid": int(reached.sum()),
        "lung_ml": volumes["lung"],
        "lesion_ml": volumes["lesion"],
        "ggo_ml": volumes["ground_glass_opacity"],
        "consolidation_ml": volumes["consolidation"],
        "lesion_ml_off_tumour": round(float((label[keep] >= 2).sum()) * vox_ml, 1),
        "threshold_lung_ml": round(float(threshold.sum()) * vox_ml, 1),
        "probability": report["typicality"]["probability"],
        "dice_lung": round(dice(predicted[keep], threshold[keep]), 3),
        "dice_lung_in_grid": round(dice(predicted[reached], threshold[reached]), 3),
        "_image": stack.image,
        "_label": label,
        "_keep": keep,
    }


def montage(rows: list[dict[str, Any]], path: Path, per_row: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), per_row, figsize=(2.4 * per_row, 2.5 * len(rows)))
    axes = np.atleast_2d(axes)
    for r, row in enumerate(rows):
        image, label = row["_image"], row["_label"]
        lung = (label > 0).sum(axis=(1, 2))
        picks = np.linspace(0, len(lung) - 1, per_row + 2)[1:-1].round().astype(int)
        has = np.flatnonzero(lung)
        if has.size:
            picks = np.linspace(has[0], has[-1], per_row + 2)[1:-1].round().astype(int)
        for c, k in enumerate(picks):
            ax = axes[r, c]
            lo, hi = LUNG_WINDOW
            grey = np.clip((image[k] - lo) / (hi - lo), 0, 1)
            rgb = np.repeat(grey[..., None], 3, axis=2)
            for value, colour in zip(SEGMENTS, COLOURS, strict=True):
                m = label[k] == value
                rgb[m] = 0.55 * rgb[m] + 0.45 * np.asarray(colour)
            ax.imshow(rgb[::2, ::2], interpolation="nearest")
            ax.set_axis_off()
            tag = "" if row["_keep"][k] else " tumour"
            ax.set_title(f"{row['series'][:28]} z{k}{tag}", fontsize=6)
    fig.suptitle("predicted: normal (blue), GGO (orange), consolidation (red)", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=72)
    plt.close(fig)
    from PIL import Image

    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=200).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="SERIES_DIR=PRED_DIR")
    parser.add_argument("--annotations", type=Path, required=True)
    parser.add_argument("--montage", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    tumour = annotated_uids(args.annotations)
    rows = []
    for pair in args.pairs:
        series, _, pred = pair.partition("=")
        rows.append(measure(Path(series), Path(pred), tumour))
    cols = [k for k in rows[0] if not k.startswith("_")]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.json:
        clean = [{c: row[c] for c in cols} for row in rows]
        args.json.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    if args.montage:
        montage(rows, args.montage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
