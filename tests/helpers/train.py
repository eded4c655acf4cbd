"""Tiny synthetic releases (chest-like volumes with lesions) and small training params."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctcurate.io.atomic import write_json
from ctcurate.params import TrainParams
from ctcurate.release.format import CaseRecord, build_manifest, write_shard

PATTERNS = ("typical", "atypical", "negative")


def _ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, ...]
) -> npt.NDArray[np.bool_]:
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    return bool_(
        ((zz - centre[0]) / radii[0]) ** 2
        + ((yy - centre[1]) / radii[1]) ** 2
        + ((xx - centre[2]) / radii[2]) ** 2
        <= 1.0
    )


def bool_(arr: Any) -> npt.NDArray[np.bool_]:
    return np.asarray(arr, dtype=bool)


def make_case(
    rng: np.random.Generator, shape: tuple[int, int, int], pattern: str
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    """A chest-like volume: body, two lungs, lesions after the pattern (RSNA-like)."""
    z, y, x = shape
    image = np.full(shape, -1000.0)
    body = _ellipsoid(shape, (z / 2, y / 2, x / 2), (z * 0.7, y * 0.42, x * 0.46))
    image[body] = 40.0
    label = np.zeros(shape, dtype=np.uint8)
    jitter = rng.uniform(-0.04, 0.04, size=3)
    for side in (0.3, 0.7):
        lung = _ellipsoid(
            shape,
            (z * (0.5 + jitter[0]), y * (0.5 + jitter[1]), x * (side + jitter[2] / 2)),
            (z * 0.42, y * 0.3, x * 0.15),
        )
        label[lung & body] = 1
    lung = label > 0
    image[lung] = -850.0
    if pattern == "typical":
        # bilateral, peripheral, lower-zone ground glass with a little consolidation
        for side in (0.17, 0.83):
            blob = _ellipsoid(shape, (z * 0.3, y * 0.5, x * side), (z * 0.16, y * 0.2, x * 0.08))
            label[blob & lung] = 2
        core = _ellipsoid(shape, (z * 0.3, y * 0.5, x * 0.17), (z * 0.06, y * 0.08, x * 0.04))
        label[core & lung] = 3
    elif pattern == "atypical":
        # unilateral, central, upper lobar consolidation
        side = 0.3 if rng.random() < 0.5 else 0.7
        blob = _ellipsoid(shape, (z * 0.65, y * 0.5, x * side), (z * 0.17, y * 0.17, x * 0.1))
        label[blob & lung] = 3
    image[label == 2] = -450.0
    image[label == 3] = 30.0
    image += rng.normal(0.0, 20.0, size=shape)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


def make_release(
    root: Path,
    n_cases: int = 6,
    shape: tuple[int, int, int] = (16, 16, 16),
    splits: tuple[str, ...] = ("train", "train", "val", "test"),
    seed: int = 0,
) -> Path:
    """Write a tiny release the way pack does; cases cycle through patterns and splits."""
    rng = np.random.default_rng(seed)
    records: list[CaseRecord] = []
    for i in range(n_cases):
        pattern = PATTERNS[i % len(PATTERNS)]
        image, label = make_case(rng, shape, pattern)
        typical = 1 if pattern == "typical" else 0
        if i % 11 == 10:
            typical = -1
        records.append(
            CaseRecord(
                case_id=f"case{i:03d}",
                image=image,
                label=label,
                meta={
                    "case_id": f"case{i:03d}",
                    "split": splits[i % len(splits)],
                    "site": f"H0{(i // 4) % 2 + 1}",
                    "typical": typical,
                    "consensus_grade": {1: 1, 0: 3, -1: 0}[typical],
                    "spacing_mm": [4.0, 4.0, 4.0],
                },
            )
        )
    entries = write_shard(root / "shards" / "shard-00000.h5", records)
    manifest = build_manifest(
        root, entries, params={"spacing_mm": [4.0, 4.0, 4.0]}, code_version="test"
    )
    write_json(root / "manifest.json", manifest)
    return root


def tiny_params(**overrides: Any) -> TrainParams:
    base: dict[str, Any] = {
        "epochs": 2,
        "batch_size": 2,
        "channels": (4, 8),
        "lr": 0.01,
        "device": "cpu",
        "threads": 1,
    }
    return TrainParams.model_validate(base | overrides)


def sha256_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
