"""``ctcurate predict`` on one clinical-size series: wall time and peak resident memory,
this checkout against a baseline checkout, side by side in one run.

Writes one pneumonia series of the ``tests/phantom`` generator (``--matrix`` pixels,
``--slices`` slices over 300 mm) unless ``--series`` names a folder, then runs
``python -m ctcurate predict --series S --models M`` once per source tree, each under
``/usr/bin/time -v`` (peak RSS of the whole command, torch's start included), alternating
``--repeat`` times, and compares the three output files byte for byte.

    PYTHONPATH=src .venv/bin/python benchmarks/predict_memory.py --models models \\
        [--baseline-src /path/to/other/checkout/src] [--slices 400] [--matrix 512]

Results: ``benchmarks/out/predict_memory.json`` (also printed).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from side_by_side import summarise, write  # noqa: E402

OUTPUTS = ("seg.dcm", "prediction.json", "overlay.png")


def write_series(folder: Path, matrix: int, slices: int, seed: int) -> Path:
    """One phantom pneumonia series; returns its instance folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from phantom import PhantomParams, build_archive

    params = PhantomParams(
        seed=seed,
        patients=1,
        matrix=(matrix, matrix),
        slices=(slices, slices),
        patient_name="empty",
        pneumonia_share=1.0,
    )
    build_archive(folder, params)
    files = sorted(p for p in (folder / "archive").rglob("*") if p.is_file())
    return files[0].parent


def run_predict(src: Path, series: Path, models: Path, out: Path) -> dict[str, float]:
    """One ``predict`` under ``/usr/bin/time -v``: seconds and peak RSS (MB)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "ctcurate", "predict"]
    cmd += ["--series", str(series), "--models", str(models), "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        msg = f"predict failed with {src}: {done.stderr.strip().splitlines()[-1]}"
        raise SystemExit(msg)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if peak is None:
        msg = "/usr/bin/time -v gave no peak memory"
        raise SystemExit(msg)
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(int(peak.group(1)) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--baseline-src", type=Path, help="the src folder of another checkout")
    ap.add_argument("--series", type=Path, help="a series folder (default: write a phantom)")
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    trees = {"current": ROOT / "src"}
    if args.baseline_src:
        trees["baseline"] = args.baseline_src.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        series = args.series or write_series(work / "phantom", args.matrix, args.slices, args.seed)
        n = sum(1 for p in series.iterdir() if p.is_file())
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for k in range(args.repeat):
            for name, src in trees.items():
                runs[name].append(run_predict(src, series, args.models, work / f"{name}{k}"))
        same = all(
            (work / f"{name}0" / f).read_bytes() == (work / "current0" / f).read_bytes()
            for name in trees
            for f in OUTPUTS
        )
    result: dict[str, Any] = {"instances": n, "runs": runs, "outputs_identical": same}
    summarise(
        result,
        runs,
        {"peak_rss_mb": lambda r: r["peak_rss_mb"], "seconds": lambda r: r["seconds"]},
    )
    write("predict_memory", result)


if __name__ == "__main__":
    main()
