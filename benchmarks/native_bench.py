"""predict's native labels at clinical size: the lesions redrawn at the series' resolution
against the labels without the redraw (the baseline), side by side in one run.

Writes one phantom chest series of ``tests/phantom`` (pneumonia, ``--matrix`` pixels,
``--slices`` slices over 300 mm, with its truth SEG) to a temporary folder, assembles it as
``predict`` does, centres the release grid (``--spacing`` mm × ``--shape``) on the lung
estimate, and takes as the network's labels either the prediction of ``--models`` or,
without it, the truth resampled onto the grid (a network exactly right on its grid). Then
``inference.native_labels`` with the lung's outline from HU is timed (best of three) and
its ``tracemalloc`` peak taken, without the lesion redraw (``grow_mm`` 0, the baseline) and
with it (``--grow`` mm), with the lesion Dice of each against the truth on the series'
own voxels. Results: ``benchmarks/out/native_bench.json`` and ``.md``.

    PYTHONPATH=src .venv/bin/python benchmarks/native_bench.py [--slices 400] [--matrix 512]
        [--models DIR] [--grow 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT / "tests"))

from phantom import PhantomParams, build_archive  # noqa: E402

from ctcurate.dicom.seg import read_seg_labels  # noqa: E402
from ctcurate.dicom.series_dir import read_series_dir  # noqa: E402
from ctcurate.imaging.volume import assemble_series, centred_grid, resample_label  # noqa: E402
from ctcurate.models import inference  # noqa: E402
from ctcurate.models.metrics import dice  # noqa: E402
from ctcurate.params import PackParams  # noqa: E402


def _measure(fn: Any) -> tuple[float, float, Any]:
    """Best of three wall times (s), the tracemalloc peak (MB) of one more call, the result."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return min(times), peak / 1e6, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--spacing", type=float, default=4.0)
    ap.add_argument("--shape", type=int, default=80)
    ap.add_argument("--grow", type=float, default=8.0)
    ap.add_argument("--models", type=Path, default=None)
    args = ap.parse_args()
    pack = PackParams(spacing_mm=(args.spacing,) * 3, shape=(args.shape,) * 3)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        truth_rows = build_archive(
            work,
            PhantomParams(
                seed=5,
                patients=1,
                pneumonia_share=1.0,
                matrix=(args.matrix, args.matrix),
                slices=(args.slices, args.slices),
                z_extent_mm=(300.0, 300.0),
                patient_name="empty",
                write_seg=True,
            ),
        ).to_pylist()
        row = next(r for r in truth_rows if r["kind"] == "chest_ct")
        built = time.perf_counter() - t0
        datasets = read_series_dir(work / "archive" / str(row["path"]))
        stack = assemble_series(datasets)
        sops = [str(ds.SOPInstanceUID) for ds in datasets]
        seg = work / "annotations" / "seg" / f"{row['series_instance_uid']}.dcm"
        truth = stack.orient(read_seg_labels(seg, sops))
        grid = centred_grid(stack, inference.lung_centre(stack, pack), pack)
        if args.models is not None:
            import torch

            from ctcurate.pipeline import predict

            models = predict.load(args.models, pack.spacing_mm, torch.device("cpu"))
            label = predict.predict_series(datasets, models, pack).grid_label
            source = f"the prediction of {args.models}"
        else:
            label = resample_label(stack, grid, truth)
            source = "the truth resampled onto the grid"
        rows = []
        for grow in (0.0, args.grow):
            seconds, peak_mb, native = _measure(
                lambda g=grow: inference.native_labels(stack, grid, label, "hu", g)
            )
            rows.append(
                {
                    "grow_mm": grow,
                    "seconds": round(seconds, 2),
                    "traced_peak_mb": round(peak_mb),
                    "lesion_dice": round(float(dice(native >= 2, truth >= 2) or 0.0), 3),
                    "lesion_ml": round(
                        int((native >= 2).sum()) * float(np.prod(stack.spacing_mm)) / 1000.0, 1
                    ),
                }
            )
    base, redraw = rows
    result = {
        "series": {
            "shape": list(stack.image.shape),
            "spacing_mm": [round(float(v), 3) for v in stack.spacing_mm],
            "truth_lesion_ml": row["lesion_volume_ml"],
            "write_seconds": round(built, 1),
        },
        "grid": {"spacing_mm": list(pack.spacing_mm), "shape": list(pack.shape)},
        "labels": source,
        "rows": rows,
        "time_ratio": round(redraw["seconds"] / max(base["seconds"], 1e-9), 2),
        "memory_ratio": round(redraw["traced_peak_mb"] / max(base["traced_peak_mb"], 1), 2),
    }
    shape = "×".join(str(v) for v in stack.image.shape)
    lines = [
        f"Native labels of a {shape} phantom series (labels: {source}):",
        "",
        "| lesion redraw | s (best of 3) | traced peak MB | lesion Dice vs truth | lesion mL |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        name = "none (baseline)" if r["grow_mm"] == 0 else f"within {r['grow_mm']:g} mm"
        lines.append(
            f"| {name} | {r['seconds']} | {r['traced_peak_mb']} | {r['lesion_dice']} "
            f"| {r['lesion_ml']} |"
        )
    lines += ["", f"time ratio {result['time_ratio']}, memory ratio {result['memory_ratio']}"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "native_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "native_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
