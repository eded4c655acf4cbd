"""How the pneumonia selector holds when the scanner changes: perturbed copies and other archives.

Reads indexed `ctcurate synth` archives (each a folder holding `synth/` from `ctcurate synth`
and `index/` from `ctcurate index`, as `benchmarks/transfer.py` builds them); the first is
the training archive. Every original chest series (`chest_ct`, `chest_ct_soft`; no
duplicate, nothing expected in quarantine) is put on the working grid once and its
features measured as written and as other scanners would write it:

* `noise`: correlated Gaussian noise of NOISE_HU (a low-dose chest CT), grain NOISE_GRAIN_MM;
* `smooth`: a smooth kernel, in-plane Gaussian of SMOOTH_MM;
* `sharp`: a sharp kernel, unsharp mask of SHARP_MM and gain SHARP_GAIN;
* `coarse`: pixels COARSE_FACTOR times larger in-plane (anti-aliased), linear back.

The sizes are clinical chest CT's, not an evaluation archive's. The selector is fitted on
the training archive's audit list (`select-audit-list` draw, `select.l2`), on the series as
written (`orig`) and with their perturbed copies too (`all`; `--fit` picks one), and scored per
`chest_ct` series on every archive and variant (precision / recall at `select.threshold`).

    PYTHONPATH=src .venv/bin/python benchmarks/select_robustness.py \\
        --archives /tmp/transfer/demo /tmp/seed11 [--fit both] [--out robustness.json]

Deterministic: noise seeds derive from the series uid. Several minutes per 40-patient
archive on two cores (five variants of about 70 series).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from scipy import ndimage

from ctcurate.catalog.paths import series_paths
from ctcurate.imaging.lungmask import lung_masks
from ctcurate.imaging.workgrid import working_volume
from ctcurate.params import load_params
from ctcurate.pipeline.select_train import audit_list_from_truth
from ctcurate.selection.pneumonia import _read_each, fit_selector, opacity_features

VARIANTS = ("orig", "noise", "smooth", "sharp", "coarse")
NOISE_HU = 40.0
NOISE_GRAIN_MM = 1.0
SMOOTH_MM = 1.5
SHARP_MM = 2.0
SHARP_GAIN = 0.6
COARSE_FACTOR = 1.6


def perturb(hu: np.ndarray, spacing: tuple[float, float, float], kind: str, key: str) -> np.ndarray:
    """The volume as perturbation ``kind`` makes it (deterministic in ``key``)."""
    img = np.asarray(hu, dtype=np.float32)

    def sigma(mm: float) -> tuple[float, float, float]:
        return (0.0, mm / spacing[1], mm / spacing[2])

    if kind == "orig":
        return img
    if kind == "noise":
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1
        grain = ndimage.gaussian_filter(
            np.random.default_rng(seed).standard_normal(img.shape, dtype=np.float32),
            sigma(NOISE_GRAIN_MM),
        )
        return img + grain * np.float32(NOISE_HU / (float(grain.std()) or 1.0))
    if kind == "smooth":
        return np.asarray(ndimage.gaussian_filter(img, sigma(SMOOTH_MM)), dtype=np.float32)
    if kind == "sharp":
        blur = ndimage.gaussian_filter(img, sigma(SHARP_MM))
        return img + np.float32(SHARP_GAIN) * (img - blur)
    if kind == "coarse":
        s = float(np.sqrt(COARSE_FACTOR**2 - 1.0) / 2.0)
        small = ndimage.zoom(
            ndimage.gaussian_filter(img, (0.0, s, s)),
            (1.0, 1.0 / COARSE_FACTOR, 1.0 / COARSE_FACTOR),
            order=1,
        )
        back = ndimage.zoom(
            small, [a / b for a, b in zip(img.shape, small.shape, strict=True)], order=1
        )
        out = np.full(img.shape, -1000.0, dtype=np.float32)
        cut = tuple(slice(0, min(a, b)) for a, b in zip(img.shape, back.shape, strict=True))
        out[cut] = back[cut]
        return out
    msg = f"unknown variant {kind!r}"
    raise ValueError(msg)


def measure(job: tuple[str, tuple[str, ...], float, tuple[str, ...]]) -> dict[str, list[float]]:
    """Features of one series per variant (a worker task)."""
    uid, paths, spacing, variants = job
    volume = working_volume(_read_each(paths), spacing)
    out = {}
    for kind in variants:
        hu = perturb(volume.hu, volume.spacing_mm, kind, uid + kind)
        thr, robust = lung_masks(hu, volume.spacing_mm)
        out[kind] = [float(v) for v in opacity_features(hu, volume.spacing_mm, thr, robust)]
    return out


def chest_series(root: Path) -> Iterable[dict[str, Any]]:
    """Truth rows of the archive's original chest series that the index holds."""
    paths = series_paths(root / "index" / "instances")
    for r in pq.read_table(root / "synth" / "truth.parquet").to_pylist():
        key = (r["site"], r["series_instance_uid"])
        if r["kind"] not in ("chest_ct", "chest_ct_soft") or r["duplicate_of"] is not None:
            continue
        if r["expected_quarantine"] or key not in paths:
            continue
        yield {**r, "paths": tuple(str(root / "synth" / "archive" / p) for p in paths[key])}


def evaluate(
    rows: dict[str, list[dict[str, Any]]],
    audited: set[str],
    train_root: str,
    fit: str,
    l2: float,
    threshold: float,
) -> dict[str, Any]:
    """Fit on the training archive's audited series (``fit``: ``orig`` or ``all``
    variants) and score every archive's ``chest_ct`` series per variant."""
    fit_variants = VARIANTS if fit == "all" else ("orig",)
    train = [r for r in rows[train_root] if r["series_instance_uid"] in audited]
    x = [r["features"][v] for r in train for v in fit_variants]
    y = [int(bool(r["pneumonia"])) for r in train for _ in fit_variants]
    model = fit_selector(x, y, l2=l2, threshold=threshold)
    result: dict[str, Any] = {"fit_series": len(x), "archives": {}}
    for root, series in rows.items():
        per: dict[str, Any] = {}
        chest = [r for r in series if r["kind"] == "chest_ct"]
        truth_y = [bool(r["pneumonia"]) for r in chest]
        for v in VARIANTS:
            scores = [float(model.predict_proba(r["features"][v])[0]) for r in chest]
            pick = [s >= model.threshold for s in scores]
            tp = sum(p and t for p, t in zip(pick, truth_y, strict=True))
            fp = sum(p and not t for p, t in zip(pick, truth_y, strict=True))
            fn = sum(t and not p for p, t in zip(pick, truth_y, strict=True))
            per[v] = {
                "precision": round(tp / (tp + fp), 3) if tp + fp else None,
                "recall": round(tp / (tp + fn), 3) if tp + fn else None,
                "tp_fp_fn": [tp, fp, fn],
            }
        result["archives"][root] = per
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--archives", type=Path, nargs="+", required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--fit", choices=("orig", "all", "both"), default="both")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    select = load_params(args.params).select
    rows: dict[str, list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for root in args.archives:
            series = list(chest_series(root))
            jobs = [
                (r["series_instance_uid"], r["paths"], select.working_spacing_mm, VARIANTS)
                for r in series
            ]
            for r, feats in zip(series, pool.map(measure, jobs), strict=True):
                r["features"] = feats
            rows[str(root)] = series
    train_root = args.archives[0]
    truth = pq.read_table(train_root / "synth" / "truth.parquet")
    audit_csv = audit_list_from_truth(
        truth, select.audit_fraction, np.random.default_rng(select.audit_seed)
    ).decode()
    audited = {r["series_instance_uid"] for r in csv.DictReader(io.StringIO(audit_csv))}
    result: dict[str, Any] = {}
    for fit in ("orig", "all") if args.fit == "both" else (args.fit,):
        result[fit] = evaluate(rows, audited, str(train_root), fit, select.l2, select.threshold)
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
