"""The lung masks' integer convex hulls against Qhull (the reference they replaced)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from ctcurate.imaging.lungmask import _hull_2d, _hulls


def reference_hull(mask: np.ndarray) -> np.ndarray:
    """Pixel centres inside or on the convex hull of the mask's pixel centres (Qhull)."""
    pts = np.argwhere(mask).astype(np.float64)
    if len(pts) < 3:
        return mask.copy()
    try:
        hull = ConvexHull(pts)
    except QhullError:  # all on one line: the mask is its own hull
        return mask.copy()
    grid = np.argwhere(np.ones(mask.shape, dtype=bool)).astype(np.float64)
    # inside every facet's half-plane (normal · p + offset <= 0), edges included
    inside = (grid @ hull.equations[:, :2].T + hull.equations[:, 2]).max(axis=1) <= 1e-9
    return inside.reshape(mask.shape) | mask


def random_masks(rng: np.random.Generator, n: int, shape: tuple[int, int]) -> np.ndarray:
    masks = np.zeros((n, *shape), dtype=bool)
    for k in range(n):
        kind = k % 4
        if kind == 0:  # smooth blobs
            field = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
            masks[k] = field > np.quantile(field, rng.uniform(0.6, 0.95))
        elif kind == 1:  # scattered pixels
            masks[k] = rng.random(shape) < rng.uniform(0.001, 0.05)
        elif kind == 2:  # a line (the mask is its own hull)
            r0, c0 = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            dr, dc = rng.integers(-2, 3), rng.integers(-2, 3)
            for t in range(rng.integers(1, 12)):
                r, c = r0 + t * dr, c0 + t * dc
                if 0 <= r < shape[0] and 0 <= c < shape[1]:
                    masks[k, r, c] = True
        # kind 3: empty
    return masks


@pytest.mark.parametrize("seed", range(4))
def test_stacked_hulls_equal_qhull_pixel_for_pixel(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 40, (23, 31))
    got = _hulls(masks)
    for k, mask in enumerate(masks):
        want = reference_hull(mask)
        assert np.array_equal(got[k], want), f"mask {k} (kind {k % 4})"
        assert np.array_equal(_hull_2d(mask), want)
