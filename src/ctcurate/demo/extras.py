"""Small non-chest images that a real archive mixes in: head CT, head MR, chest radiograph."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctcurate.demo.anatomy import Chest

HEAD_SLICES = 16
MR_SLICES = 10
ABDOMEN_SLICES = 24


def head_hu(rng: np.random.Generator, matrix: int, pixel: float, n: int) -> np.ndarray:
    """Axial head CT (z, y, x) in HU: scalp, skull, brain, ventricles."""
    c = (np.arange(matrix) - (matrix - 1) / 2.0) * pixel
    y, x = c[:, None], c[None, :]
    out = np.empty((n, matrix, matrix), np.float32)
    for k in range(n):
        shrink = 1.0 - 0.5 * (k / max(n - 1, 1)) ** 2  # narrower towards the vertex
        a, b = 72.0 * shrink, 92.0 * shrink
        r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        img = np.full((matrix, matrix), -1000.0, np.float32)
        img[r < 1.0] = 20.0  # scalp
        img[r < 0.95] = 1100.0  # skull
        img[r < 0.88] = 35.0  # brain
        vent = ((np.abs(x) - 8.0) / 6.0) ** 2 + (y / 22.0) ** 2 < 1.0
        img[vent & (r < 0.6) & (k > n // 4) & (k < 3 * n // 4)] = 5.0
        out[k] = img
    noise = rng.standard_normal(out.shape).astype(np.float32) * 4.0
    return np.asarray(ndimage.gaussian_filter(out, (0, 0.6, 0.6)) + noise, dtype=np.float32)


def head_mr(rng: np.random.Generator, matrix: int, n: int) -> np.ndarray:
    """Axial T1-like head MR (z, y, x) as uint16 signal."""
    hu = head_hu(rng, matrix, 240.0 / matrix, n)
    signal = np.zeros_like(hu)
    signal[hu > -500] = 900.0  # scalp fat
    signal[hu > 500] = 60.0  # cortical bone: no signal
    signal[(hu > 25) & (hu < 100)] = 620.0  # brain
    signal[(hu > -10) & (hu < 15)] = 180.0  # CSF
    signal = ndimage.gaussian_filter(signal, (0, 0.8, 0.8))
    signal += np.abs(rng.standard_normal(signal.shape)) * 15.0
    return np.asarray(np.clip(signal, 0, 4095), dtype=np.uint16)


def radiograph(chest: Chest, size: int) -> np.ndarray:
    """A PA chest radiograph (rows head → feet) from a coarse chest volume, uint16."""
    mu = np.clip((chest.hu + 1000.0) / 1000.0, 0.0, None) * 0.02 * chest.grid.pixel
    path = mu.sum(axis=1)  # (z, x)
    transmitted = np.exp(-path)
    image = (1.0 - transmitted) * 3800.0
    zi = np.linspace(0, image.shape[0] - 1, size)
    xi = np.linspace(0, image.shape[1] - 1, size)
    rows = np.stack([np.interp(xi, np.arange(image.shape[1]), row) for row in image])
    full = np.stack([np.interp(zi, np.arange(image.shape[0]), rows[:, j]) for j in range(size)], 1)
    return np.asarray(np.clip(full, 0, 4095), dtype=np.uint16)
