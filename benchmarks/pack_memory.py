"""``pack``'s work on one clinical-size case (``series_to_volume``: assemble, orient,
centre, resample): time and peak resident memory, this checkout against a baseline
checkout, side by side in one run.

The series folder and its DICOM SEG (e.g. the ``seg.dcm`` that ``ctcurate predict`` wrote
for it, or a phantom's truth SEG) are read first; each source tree then runs
``series_to_volume`` in its own process, alternating ``--repeat`` times. Reported: the
peak RSS of that process (``getrusage``), what the loaded instances and labels held before
the call, the call's seconds, and a hash of the packed image and labels (equal hashes:
byte-identical volumes).

    PYTHONPATH=src .venv/bin/python benchmarks/pack_memory.py --series DIR --seg SEG.dcm \\
        [--baseline-src /path/to/other/checkout/src] [--repeat 2]

Results: ``benchmarks/out/pack_memory.json`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from side_by_side import summarise, write  # noqa: E402

CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
from ctcurate.dicom.series_dir import read_series_dir
from ctcurate.dicom.seg import read_seg_labels
from ctcurate.imaging.volume import series_to_volume
from ctcurate.params import PackParams

datasets = read_series_dir(Path(sys.argv[1]))
labels = read_seg_labels(Path(sys.argv[2]), [str(d.SOPInstanceUID) for d in datasets])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
image, label, _ = series_to_volume(datasets, labels, PackParams())
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
digest = hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest()[:16]
print(json.dumps({"seconds": round(seconds, 2), "loaded_rss_mb": round(before),
                  "peak_rss_mb": round(peak), "volumes_sha256_16": digest}))
"""


def run_child(src: Path, series: Path, seg: Path) -> dict[str, Any]:
    """``series_to_volume`` of ``series`` in a fresh process importing ctcurate from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", CHILD, str(series), str(seg)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"series_to_volume failed with {src}: {done.stderr.strip().splitlines()[-1]}"
        raise SystemExit(msg)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, required=True)
    ap.add_argument("--seg", type=Path, required=True)
    ap.add_argument("--baseline-src", type=Path, help="the src folder of another checkout")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    trees = {"current": ROOT / "src"}
    if args.baseline_src:
        trees["baseline"] = args.baseline_src.resolve()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.repeat):
        for name, src in trees.items():
            runs[name].append(run_child(src, args.series, args.seg))
    digests = {r["volumes_sha256_16"] for rs in runs.values() for r in rs}
    result: dict[str, Any] = {"runs": runs, "volumes_identical": len(digests) == 1}
    summarise(
        result,
        runs,
        {
            "peak_rss_mb": lambda r: r["peak_rss_mb"],
            "above_loaded_mb": lambda r: r["peak_rss_mb"] - r["loaded_rss_mb"],
            "seconds": lambda r: r["seconds"],
        },
    )
    write("pack_memory", result)


if __name__ == "__main__":
    main()
