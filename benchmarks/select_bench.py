"""Pneumonia scorer: cost per series at matrix 512 and 96 against reading the pixels, and the pool.

Writes chest-like CT series (an analytic phantom in millimetres, so the same anatomy at
every matrix, with ground-glass balls and a consolidation, int16 DICOM written slice by
slice) to a temporary folder and measures, each in a fresh child process so that its peak
RSS is its own:

* the baseline: ``pydicom.dcmread`` + ``pixel_array`` + rescale to HU (float32) of every
  slice, nothing else;
* the scorer of ``select`` (``ctcurate.imaging.workgrid.working_volume`` onto the working grid,
  lung masks, features) on the same files, as a ratio to the baseline of the same series.

Rows: 512×512×196 (0.74 mm pixels, 1.25 mm slices), the same anatomy at 96×96×196, and
512×512×500 (0.625 mm slices, the memory target). Then ``score_all`` throughput at 1 and
``--workers`` processes on a few matrix-96 series. Results: ``benchmarks/out/select_bench.json``
and ``.md``.

    .venv/bin/python benchmarks/select_bench.py [--small] [--workers 2] [--spacing 2.0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

OUT = Path(__file__).resolve().parent / "out"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
FOV_MM = 380.0
#: Each child times its job this many times and keeps the fastest run.
RUNS = 3
#: Ground-glass balls (z, y, x centre in mm from the scan's first slice / the centre, radius).
GGO_BALLS = ((60.0, 20.0, -70.0, 14.0), (150.0, -30.0, 60.0, 10.0), (200.0, 40.0, 75.0, 8.0))


def phantom_slice(z_mm: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """One axial slice (y, x) in HU at height ``z_mm``: body, ribs, two lungs, lesions."""
    c = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(FOV_MM / n)
    y, x = c[:, None], c[None, :]
    r_body = (x / 160.0) ** 2 + (y / 125.0) ** 2
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[r_body <= 1.0] = 40.0
    ribs = (r_body > 0.78) & (r_body < 0.86) & (np.cos(np.arctan2(y, x) * 9.0) > 0.2)
    hu[ribs] = 650.0
    taper = float(np.clip((z_mm - 10.0) / 60.0, 0.0, 1.0) * np.clip((250.0 - z_mm) / 40.0, 0, 1))
    if taper > 0:
        lung = np.zeros((n, n), dtype=bool)
        for side in (-1.0, 1.0):
            rx, ry = 52.0 * taper**0.5, 88.0 * taper**0.5
            lung |= ((x - side * 68.0) / rx) ** 2 + ((y - 5.0) / ry) ** 2 <= 1.0
        hu[lung] = -860.0
        for bz, by, bx, br in GGO_BALLS:
            d2 = (z_mm - bz) ** 2 + (y - by) ** 2 + (x - bx) ** 2
            hu[(d2 <= br * br) & lung] = -600.0
        if 120.0 <= z_mm <= 170.0:  # posterior consolidation of the right lung
            hu[lung & (y > 50.0) & (x < -60.0)] = 30.0
    return hu + rng.normal(0.0, 20.0, hu.shape).astype(np.float32)


def write_series(folder: Path, n: int, nz: int, dz: float, seed: int) -> tuple[str, ...]:
    """Write the phantom at matrix ``n``, ``nz`` slices ``dz`` mm apart, one slice at a time."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    series_uid = generate_uid()
    paths = []
    for k in range(nz):
        hu = phantom_slice(k * dz, n, rng)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series_uid, "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-FOV_MM / 2, -FOV_MM / 2, -k * dz]
        ds.PixelSpacing = [FOV_MM / n, FOV_MM / n]
        ds.Rows, ds.Columns = n, n
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (np.rint(hu) + 1024).astype(np.int16).tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return tuple(paths)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_read(paths: list[str]) -> dict[str, float]:
    """The baseline: dcmread + pixel_array + rescale (float32 HU) of every slice, kept.

    The fastest of RUNS runs in one process (warm, as a pool worker is; the minimum is the
    least disturbed by other work on the machine)."""
    seconds = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter()
        slices = []
        for path in paths:
            ds = pydicom.dcmread(path)
            slope = np.float32(float(ds.get("RescaleSlope", 1.0)))
            intercept = np.float32(float(ds.get("RescaleIntercept", 0.0)))
            slices.append(ds.pixel_array.astype(np.float32) * slope + intercept)
        seconds = min(seconds, time.perf_counter() - start)
        del slices
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def child_score(paths: list[str], spacing: float) -> dict[str, Any]:
    """The scorer's steps on one series, as ``score_series`` runs them.

    The fastest of RUNS runs in one process (warm, as a pool worker is)."""
    from ctcurate.imaging.lungmask import lung_masks
    from ctcurate.imaging.workgrid import working_volume
    from ctcurate.selection.pneumonia import FEATURES, opacity_features

    rss_start = _peak_rss_mb()
    runs = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        volume = working_volume((pydicom.dcmread(p) for p in paths), spacing)
        t1 = time.perf_counter()
        thr, robust = lung_masks(volume.hu, volume.spacing_mm)
        t2 = time.perf_counter()
        features = opacity_features(volume.hu, volume.spacing_mm, thr, robust)
        t3 = time.perf_counter()
        runs.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
    total, volume_s, masks_s, features_s = min(runs)
    return {
        "seconds": total,
        "volume_s": volume_s,
        "lung_masks_s": masks_s,
        "features_s": features_s,
        "working_shape": list(volume.hu.shape),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_imports_mb": rss_start,
        "features": dict(zip(FEATURES, (round(float(v), 5) for v in features), strict=True)),
    }


def in_child(mode: str, paths: tuple[str, ...], spacing: float) -> dict[str, Any]:
    """Run ``child_<mode>`` in a fresh Python process (paths through a file)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"mode": mode, "paths": list(paths), "spacing": spacing}, fh)
    done = subprocess.run(
        [sys.executable, __file__, "--child", fh.name], capture_output=True, text=True, check=True
    )
    Path(fh.name).unlink()
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small series (CI smoke run)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=2.0, help="working grid (mm)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(Path(args.child).read_text())
        out = (
            child_read(job["paths"])
            if job["mode"] == "read"
            else child_score(job["paths"], job["spacing"])
        )
        print(json.dumps(out, sort_keys=True))
        return

    from ctcurate.selection.pneumonia import ScoreTask, score_all

    # (label, matrix, slices, slice spacing mm)
    if args.small:
        cases = [("matrix 128", 128, 60, 2.5), ("matrix 48", 48, 60, 2.5)]
        pool_series, pool_shape = 3, (40, 64)
    else:
        cases = [
            ("matrix 512", 512, 196, 1.25),
            ("matrix 96", 96, 196, 1.25),
            ("matrix 512, 500 slices", 512, 500, 0.625),
        ]
        pool_series, pool_shape = 6, (100, 96)
    rows, pool = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, n, nz, dz) in enumerate(cases):
            paths = write_series(Path(tmp) / f"m{i}", n, nz, dz, seed=i)
            read = in_child("read", paths, args.spacing)
            score = in_child("score", paths, args.spacing)
            rows.append(
                {
                    "case": label,
                    "shape": [nz, n, n],
                    "pixel_mm": round(FOV_MM / n, 3),
                    "slice_mm": dz,
                    "read_s": read["seconds"],
                    "read_peak_rss_mb": read["peak_rss_mb"],
                    "ratio_to_read": score["seconds"] / read["seconds"],
                    **{f"score_{k}": v for k, v in score.items()},
                }
            )
            for p in paths:
                Path(p).unlink()
        nz, n = pool_shape
        tasks = [
            ScoreTask(
                "H01",
                f"s{i}",
                write_series(Path(tmp) / f"p{i}", n, nz, 2.5, seed=100 + i),
                None,
                working_spacing_mm=args.spacing,
            )
            for i in range(pool_series)
        ]
        for workers in (1, args.workers):
            start = time.perf_counter()
            results = score_all(tasks, workers)
            elapsed = time.perf_counter() - start
            if any(r.error is not None for r in results):
                msg = "a benchmark series failed to score"
                raise SystemExit(msg)
            pool.append(
                {"workers": workers, "seconds": elapsed, "series_per_s": pool_series / elapsed}
            )
    for row in pool:
        row["ratio_to_1_worker"] = row["series_per_s"] / pool[0]["series_per_s"]
    result = {
        "working_spacing_mm": args.spacing,
        "series": rows,
        "pool": pool,
        "pool_shape": [nz, n, n],
        "pool_series": pool_series,
    }
    table = [
        "| series | read+convert s | scorer s (volume / masks / features) | ratio to read | "
        "working grid | peak RSS scorer / read (MB) |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['case']} ({r['shape'][0]}x{r['shape'][1]}x{r['shape'][2]}, {r['pixel_mm']} mm, "
        f"{r['slice_mm']} mm slices) | {r['read_s']:.2f} | {r['score_seconds']:.2f} "
        f"({r['score_volume_s']:.2f} / {r['score_lung_masks_s']:.2f} / "
        f"{r['score_features_s']:.2f}) | {r['ratio_to_read']:.2f} | "
        f"{'x'.join(str(v) for v in r['score_working_shape'])} | "
        f"{r['score_peak_rss_mb']:.0f} / {r['read_peak_rss_mb']:.0f} |"
        for r in rows
    ]
    table += ["", "| workers | seconds | series/s | ratio to 1 worker |", "|---|---|---|---|"]
    table += [
        f"| {r['workers']} | {r['seconds']:.2f} | {r['series_per_s']:.3f} | "
        f"{r['ratio_to_1_worker']:.2f} |"
        for r in pool
    ]
    text = (
        f"Scorer on a {args.spacing} mm working grid; pool: {pool_series} series of "
        f"{nz}x{n}x{n}\n\n" + "\n".join(table) + "\n"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "select_bench.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (OUT / "select_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
