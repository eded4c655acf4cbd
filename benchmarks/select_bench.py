"""Pneumonia scorer throughput (series/s): one worker (baseline) against the process pool.

Writes N chest-like CT series (analytic phantom with ground-glass balls, int16 DICOM) to a
temporary folder, then scores them with ``ctcurate.pneumonia.score_all`` at 1 and at
``--workers`` processes, and times the steps of one series (read + volume, lung masks,
features). Results: ``benchmarks/out/select_bench.json`` and ``.md``.

    .venv/bin/python benchmarks/select_bench.py [--small] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ctcurate.lungmask import lung_masks
from ctcurate.pneumonia import ScoreTask, opacity_features, score_all, series_volume

OUT = Path(__file__).resolve().parent / "out"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def phantom(nz: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A chest (z, y, x) in HU: body, two lungs with noise, a few ground-glass balls."""
    z, y, x = np.mgrid[0:nz, 0:n, 0:n].astype(np.float32)
    c = (n - 1) / 2.0
    body = ((y - c) / (0.42 * n)) ** 2 + ((x - c) / (0.46 * n)) ** 2 <= 1.0
    lung = np.zeros(body.shape, dtype=bool)
    for side in (-1, 1):
        lung |= ((y - c) / (0.3 * n)) ** 2 + ((x - c - side * 0.2 * n) / (0.13 * n)) ** 2 <= 1
    hu = np.full(body.shape, -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[lung] = -860.0
    for _ in range(4):
        kz, ky, kx = rng.integers(0, nz), rng.integers(0, n), rng.integers(0, n)
        hu[((z - kz) ** 2 + (y - ky) ** 2 + (x - kx) ** 2 <= 16.0) & lung] = -600.0
    return hu + rng.normal(0.0, 20.0, hu.shape).astype(np.float32)


def write_series(folder: Path, hu: np.ndarray) -> tuple[str, ...]:
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    paths = []
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series_uid, "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.PixelSpacing = [3.6, 3.6]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (np.rint(hu[k]) + 1024).astype(np.int16).tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return tuple(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="few small series (CI smoke run)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    n_series, nz, n = (4, 24, 48) if args.small else (12, 100, 96)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = [
            ScoreTask("H01", f"s{i}", write_series(Path(tmp) / f"s{i}", phantom(nz, n, rng)), None)
            for i in range(n_series)
        ]
        # steps of one series
        t0 = time.perf_counter()
        volume, _ = series_volume([pydicom.dcmread(p) for p in tasks[0].paths])
        t1 = time.perf_counter()
        thr, robust = lung_masks(volume.hu)
        t2 = time.perf_counter()
        opacity_features(volume.hu, volume.spacing_mm, thr, robust)
        t3 = time.perf_counter()
        steps = {"read_volume_s": t1 - t0, "lung_masks_s": t2 - t1, "features_s": t3 - t2}
        for workers in (1, args.workers):
            start = time.perf_counter()
            results = score_all(tasks, workers)
            elapsed = time.perf_counter() - start
            assert all(r.error is None for r in results)
            rows.append(
                {"workers": workers, "seconds": elapsed, "series_per_s": n_series / elapsed}
            )
    base = rows[0]["series_per_s"]
    for row in rows:
        row["ratio_to_1_worker"] = row["series_per_s"] / base
    result = {
        "series": n_series,
        "shape": [nz, n, n],
        "steps_one_series": {k: round(v, 4) for k, v in steps.items()},
        "runs": rows,
    }
    table = ["| workers | seconds | series/s | ratio to 1 worker |", "|---|---|---|---|"]
    table += [
        f"| {r['workers']} | {r['seconds']:.2f} | {r['series_per_s']:.3f} | "
        f"{r['ratio_to_1_worker']:.2f} |"
        for r in rows
    ]
    steps_line = ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
    text = (
        f"Scorer on {n_series} series of {nz}x{n}x{n}\n\n"
        + "\n".join(table)
        + f"\n\nOne series: {steps_line}\n"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "select_bench.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (OUT / "select_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
