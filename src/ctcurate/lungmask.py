"""Lung masks of a CT volume in Hounsfield units: a plain threshold and a consolidation-robust one.

Axis order is (z, y, x) with axial slices along z; pixel size does not matter (both masks
work in voxels). Two masks:

* :func:`threshold_lung_mask` — the baseline: air-like voxels (``< hu_max``) inside the
  body, the large components, each slice's holes (vessels) filled. Dense consolidation at
  the lung's border is not a hole, so it is lost.
* :func:`robust_lung_mask` — the threshold mask with each lung's concave bays closed per
  slice: the convex hull of each lung's pixels in a slice is added, except medial of the
  lung's innermost air pixel of each row (the heart, the great vessels and the spine bulge
  into the lung from the middle, consolidation fills it from the chest wall). Consolidation
  against the chest wall or inside the lung becomes lung again.

:func:`dice` compares a mask with the true lung.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: Voxels below this (HU) are air-like: aerated lung, airways, air outside the body.
LUNG_HU_MAX = -400.0
#: A lung component must hold at least this fraction of the largest one (drops the trachea
#: stump, bowel gas and noise specks).
MIN_COMPONENT_FRACTION = 0.05
#: A lung needs at least this many pixels in a slice before its hull is taken.
MIN_HULL_PIXELS = 8
#: Pixel centres this close to a hull edge (pixels) count as inside.
_EDGE_TOL = 1e-6

BoolArray = npt.NDArray[np.bool_]


def _fill_slices(mask: BoolArray) -> BoolArray:
    return np.stack([ndimage.binary_fill_holes(s) for s in mask]).astype(bool)


def body_mask(image_hu: npt.NDArray[np.floating[Any]], hu_max: float = LUNG_HU_MAX) -> BoolArray:
    """The body: the largest 3D component at or above ``hu_max``, each slice's holes filled."""
    img = np.asarray(image_hu)
    tissue, n = ndimage.label(img >= hu_max)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(tissue.ravel())[1:]
    return _fill_slices(tissue == int(np.argmax(sizes)) + 1)


def _threshold_in_body(img: npt.NDArray[np.float32], body: BoolArray, hu_max: float) -> BoolArray:
    labels, n = ndimage.label((img < hu_max) & body)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= MIN_COMPONENT_FRACTION * sizes.max()) + 1
    return _fill_slices(np.isin(labels, keep))


def threshold_lung_mask(
    image_hu: npt.NDArray[np.floating[Any]], hu_max: float = LUNG_HU_MAX
) -> BoolArray:
    """Plain HU-threshold lung mask (the baseline).

    Air-like voxels inside the body, the 3D components holding at least
    :data:`MIN_COMPONENT_FRACTION` of the largest one, each slice's holes filled.
    """
    img = np.asarray(image_hu, dtype=np.float32)
    if img.ndim != 3:
        msg = f"expected a (z, y, x) volume, got shape {img.shape}"
        raise ValueError(msg)
    return _threshold_in_body(img, body_mask(img, hu_max), hu_max)


def _hull_2d(mask: BoolArray) -> BoolArray:
    """Filled convex hull of the pixels of a 2D mask (pixel centres, edges included)."""
    pts = np.argwhere(mask).astype(np.float64)
    if len(pts) < 3:
        return mask.copy()
    # Andrew's monotone chain on the pixel centres
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    pts = pts[order]

    def half(points: npt.NDArray[np.float64]) -> list[npt.NDArray[np.float64]]:
        chain: list[npt.NDArray[np.float64]] = []
        for p in points:
            while len(chain) >= 2:
                a, b = chain[-2], chain[-1]
                if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    hull = np.asarray(lower[:-1] + upper[:-1])
    if len(hull) < 3:
        return mask.copy()
    # a convex polygon covers one span of columns per row: intersect each row with the edges
    a, b = hull, np.roll(hull, -1, axis=0)
    rows = np.arange(int(hull[:, 0].min()), int(hull[:, 0].max()) + 1, dtype=np.float64)
    r = rows[:, None]
    lo_r, hi_r = np.minimum(a[:, 0], b[:, 0])[None, :], np.maximum(a[:, 0], b[:, 0])[None, :]
    crosses = (r >= lo_r) & (r <= hi_r)
    dr = (b[:, 0] - a[:, 0])[None, :]
    t = np.where(dr != 0, (r - a[:, 0][None, :]) / np.where(dr != 0, dr, 1.0), 0.0)
    col_a = a[:, 1][None, :] + t * (b[:, 1] - a[:, 1])[None, :]
    flat = dr == 0  # a horizontal edge covers its whole column range
    left = np.where(crosses, np.where(flat, np.minimum(a[:, 1], b[:, 1])[None, :], col_a), np.inf)
    right = np.where(crosses, np.where(flat, np.maximum(a[:, 1], b[:, 1])[None, :], col_a), -np.inf)
    first = np.ceil(left.min(axis=1) - _EDGE_TOL).astype(np.int64)
    last = np.floor(right.max(axis=1) + _EDGE_TOL).astype(np.int64)
    out = mask.copy()
    cols = np.arange(mask.shape[1])[None, :]
    span = (cols >= first[:, None]) & (cols <= last[:, None])
    out[rows.astype(np.int64)] |= span
    return out


def _close_lung_slice(lung: BoolArray, midline: float) -> BoolArray:
    """One slice of one lung: its hull, minus what lies medial of each row's innermost pixel."""
    if int(lung.sum()) < MIN_HULL_PIXELS:
        return lung
    hull = _hull_2d(lung)
    cols = np.arange(lung.shape[1], dtype=np.float64)
    distance = np.abs(cols - midline)[None, :]
    big = np.float64(np.inf)
    innermost = np.where(lung, np.broadcast_to(distance, lung.shape), big).min(axis=1)
    # rows without lung pixels (a consolidated band across the whole lung) keep the hull
    allowed = (distance >= innermost[:, None]) | ~np.isfinite(innermost)[:, None]
    closed: BoolArray = lung | (hull & allowed)
    return closed


def lung_masks(
    image_hu: npt.NDArray[np.floating[Any]], hu_max: float = LUNG_HU_MAX
) -> tuple[BoolArray, BoolArray]:
    """(threshold mask, robust mask) of one volume, sharing the body and threshold steps.

    The robust mask: the threshold mask is split per slice at the body's midline column
    into the two lungs (components reaching the midline, the airways, are dropped first);
    each lung's convex hull is added except medial of the lung's innermost threshold pixel
    of each row; each slice's holes are filled.
    """
    img = np.asarray(image_hu, dtype=np.float32)
    if img.ndim != 3:
        msg = f"expected a (z, y, x) volume, got shape {img.shape}"
        raise ValueError(msg)
    body = body_mask(img, hu_max)
    base = _threshold_in_body(img, body, hu_max)
    out = base.copy()
    cols = np.arange(img.shape[2], dtype=np.float64)
    for k in range(img.shape[0]):
        if not base[k].any():
            continue
        in_body = body[k].any(axis=0)
        midline = float(cols[in_body].mean()) if in_body.any() else (img.shape[2] - 1) / 2.0
        # airways on the midline (trachea, main bronchi) are not lung: drop the slice's
        # components that reach the midline column before taking hulls
        parts, n = ndimage.label(base[k])
        centre = round(midline)
        on_midline = np.unique(parts[:, max(centre - 1, 0) : centre + 2])
        lungs = base[k] & ~np.isin(parts, on_midline[on_midline > 0]) if n else base[k]
        for side in (cols < midline, cols >= midline):
            lung = lungs & side[None, :]
            out[k] |= _close_lung_slice(lung, midline) & side[None, :] & body[k]
    return base, _fill_slices(out)


def robust_lung_mask(
    image_hu: npt.NDArray[np.floating[Any]], hu_max: float = LUNG_HU_MAX
) -> BoolArray:
    """A lung mask that keeps dense consolidation at the lung border (see :func:`lung_masks`)."""
    return lung_masks(image_hu, hu_max)[1]


def dice(mask: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float | None:
    """Dice overlap of two boolean masks; None when both are empty."""
    a, b = np.asarray(mask, dtype=bool), np.asarray(truth, dtype=bool)
    if a.shape != b.shape:
        msg = f"mask shapes differ: {a.shape} vs {b.shape}"
        raise ValueError(msg)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * int((a & b).sum()) / total
