"""Lung masks of a CT volume in Hounsfield units: a plain threshold and a consolidation-robust one.

Axis order is (z, y, x) with axial slices along z. Every size is in millimetres and turned
into voxels with the volume's spacing, so sites with other pixel spacings or slice
thicknesses get the same anatomy. Two masks:

* :func:`threshold_lung_mask` — the baseline: air-like voxels (``< hu_max``) inside the
  body, the large components, each slice's holes (vessels) filled. Dense consolidation at
  the lung's border is not a hole, so it is lost.
* :func:`robust_lung_mask` — the threshold mask plus two recoveries, per slice and lung:

  1. *bays*: the convex hull of the lung's aerated pixels, except medial of the innermost
     aerated pixel of each row (the heart, the great vessels and the spine bulge into the
     lung from the middle; consolidation fills it from the chest wall) and farther than
     :data:`BAY_REACH_MM` from the aerated pixels (the diaphragm's dome under a basal
     crescent of lung), and only where aerated lung lies between it and the middle of
     the body (:func:`_outward`);
  2. *chest wall*: dense soft tissue between the lung and the chest wall. The chest wall
     is the bony cage — the convex hull of the bone (ribs, spine) within
     :data:`CAGE_RIB_MM` of the aerated lung (not the scapulae or arms outside the
     chest-wall muscles) and within :data:`CAGE_WINDOW_MM` above and below the slice,
     pulled in by :data:`CAGE_WALL_MM` (the ribs' own thickness). Inside it, non-bone tissue denser
     than air that touches the lung, lies lateral of the lung's medial limit and within
     :data:`WALL_REACH_MM` of the aerated lung's rows becomes lung: consolidation against
     the pleura that the hull of the aerated lung cannot reach — again only a fill of
     which at least half lies outward of the aerated lung (seen from the middle of the
     body): consolidation fills the lung from the chest wall, while the liver, spleen or
     stomach under a basal crescent of lung lie between the crescent and the middle.



"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: Voxels below this (HU) are air-like: aerated lung, airways, air outside the body.
LUNG_HU_MAX = -400.0
#: A lung component must hold at least this fraction of the largest one (drops the trachea
#: stump, bowel gas and noise specks).
MIN_COMPONENT_FRACTION = 0.05
#: A lung needs at least this area (mm², and 3 pixels) in a slice before its hull is taken.
MIN_HULL_MM2 = 32.0
#: Bone (ribs, spine) is at least this dense (HU); the chest wall's cage is built from it.
BONE_HU_MIN = 200.0
#: Tissue below this (HU) can be consolidated lung (bone and contrast are denser).
DENSE_HU_MAX = 150.0
#: Bone within this distance (mm) above and below a slice makes its cage (ribs run obliquely,
#: so one slice cuts only a few of them).
CAGE_WINDOW_MM = 15.0
#: Only bone within this distance (mm) of the aerated lung builds the cage: ribs and
#: vertebrae lie against the pleura, the scapulae and arms outside the chest-wall muscles.
CAGE_RIB_MM = 15.0
#: The cage's hull is pulled in by this much (mm): the ribs' thickness.
CAGE_WALL_MM = 6.0
#: A chest-wall fill is at most this fraction of the lung's aerated pixels in the slice (a
#: lung apex or base surrounded by soft tissue is not consolidated).
WALL_MAX_FRACTION = 0.5
#: Chest-wall fill thinner than this (mm) is a rim of the wall itself, not consolidation.
WALL_MIN_THICKNESS_MM = 8.0
#: No chest-wall fill where a lung's aerated slice is below this fraction of the largest
#: slice's (per lung: half the slice total).
WALL_MIN_AREA_FRACTION = 0.3
#: A chest-wall fill touching more than this fraction of the lung's outline wraps around it:
#: soft tissue between a narrow lung and the cage (the upper chest), not consolidation.
WALL_MAX_CONTACT = 0.4
#: Rows without aerated lung get chest-wall fill only this close (mm) to rows with some.
WALL_REACH_MM = 20.0
#: A bay is closed only this close (mm) to the lung's aerated pixels: at the bases the hull
#: of the lung's crescent round the diaphragm would span the liver, spleen or stomach;
#: consolidation deeper than this against the chest wall is the chest-wall fill's.
BAY_REACH_MM = 15.0

BoolArray = npt.NDArray[np.bool_]


#: Background connectivity of a slice's holes: 4-neighbours in-plane, never across slices.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def label_in_plane(mask: BoolArray) -> tuple[npt.NDArray[np.int32], int]:
    """Each slice's 4-connected components of a (z, y, x) mask, in one labelling."""
    labels, n = ndimage.label(mask, structure=_IN_PLANE)
    return labels, int(n)


def reaching_side(labels: npt.NDArray[np.int32], n: int) -> BoolArray:
    """Per label 0..n of an in-plane labelling: does it reach its slice's border (0: no)."""
    side = np.zeros(n + 1, dtype=bool)
    for border in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        side[border] = True
    side[0] = False
    return side


def air_at_side(image_hu: npt.NDArray[np.floating[Any]], hu_max: float = LUNG_HU_MAX) -> BoolArray:
    """Air-like voxels (``< hu_max``) of a (z, y, x) volume connected, within their slice, to
    the slice's border: air outside the body, or a lung that the volume's side cuts open."""
    air, n = label_in_plane(np.asarray(image_hu) < hu_max)
    found: BoolArray = reaching_side(air, n)[air]
    return found


def fill_slices(mask: BoolArray) -> BoolArray:
    """Each slice's holes filled (``binary_fill_holes`` per slice, in one labelling), in the
    mask's in-plane box grown by one pixel: the background outside the box reaches the
    slice's border, so a hole is background there that does not reach the grown box's."""
    filled = mask.copy()
    if not mask.any():
        return filled
    _, rows, cols = bounding_box(mask)
    box = (
        slice(None),
        slice(max(rows.start - 1, 0), rows.stop + 1),
        slice(max(cols.start - 1, 0), cols.stop + 1),
    )
    part = mask[box]
    background, n = label_in_plane(~part)
    if n == 0:
        return filled
    edge = reaching_side(background, n)
    filled[box] = part | ~edge[background]
    return filled


def body_mask(image_hu: npt.NDArray[np.floating[Any]], hu_max: float = LUNG_HU_MAX) -> BoolArray:
    """The body: the largest 3D component at or above ``hu_max``, each slice's holes filled."""
    img = np.asarray(image_hu)
    tissue, n = ndimage.label(img >= hu_max)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(tissue.ravel())[1:]
    return fill_slices(tissue == int(np.argmax(sizes)) + 1)


def _threshold_in_body(img: npt.NDArray[np.float32], body: BoolArray, hu_max: float) -> BoolArray:
    labels, n = ndimage.label((img < hu_max) & body)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes >= MIN_COMPONENT_FRACTION * sizes.max()
    return fill_slices(keep[labels])


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
    hull: BoolArray = _hulls(mask[None])[0]
    return hull


def _hulls(masks: BoolArray) -> BoolArray:
    """Each 2D mask of a (n, y, x) stack with its filled convex hull (pixel centres, edges
    included), all at once; a mask on one line (or of fewer than 3 pixels) is its own hull.

    The hull of a mask is the hull of each row's first and last pixel. A convex polygon
    covers one span of columns per row: from the lower convex envelope of the rows' first
    columns to the upper concave envelope of their last columns (both taken by dropping
    every point on or beyond the chord of its neighbours until none is), rounded inward in
    integer arithmetic.
    """
    out = masks.copy()
    units, rows = np.nonzero(masks.any(axis=2))  # sorted by mask, then row
    if not units.size:
        return out
    n_x = masks.shape[2]
    first = np.argmax(masks[units, rows], axis=1).astype(np.int64)
    last = n_x - 1 - np.argmax(masks[units, rows, ::-1], axis=1).astype(np.int64)
    rows = rows.astype(np.int64)
    start = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])  # each mask's first row
    stop = np.r_[start[1:], len(units)] - 1  # and last
    unit = np.repeat(np.arange(len(start)), np.diff(np.r_[start, len(units)]))
    # on one line: one row, or one pixel per row, all on the line of the first and last
    r0, c0 = rows[start][unit], first[start][unit]
    r1, c1 = rows[stop][unit], first[stop][unit]
    on_line = ((rows - r0) * (c1 - c0) - (first - c0) * (r1 - r0) == 0) & (first == last)
    flat = (start == stop) | np.logical_and.reduceat(on_line, start)

    def envelope(col: npt.NDArray[np.int64], sign: int) -> npt.NDArray[np.intp]:
        idx = np.arange(len(units))
        while len(idx) >= 3:
            a, b, c = idx[:-2], idx[1:-1], idx[2:]
            cross = (rows[b] - rows[a]) * (col[c] - col[a]) - (col[b] - col[a]) * (
                rows[c] - rows[a]
            )
            drop = (unit[a] == unit[c]) & (sign * cross <= 0)
            if not drop.any():
                break
            idx = idx[np.r_[True, ~drop, True]]
        return idx

    span_unit = np.repeat(np.arange(len(start)), rows[stop] - rows[start] + 1)
    span_row = rows[start][span_unit] + (
        np.arange(len(span_unit)) - np.searchsorted(span_unit, span_unit)
    )
    key = span_unit * (masks.shape[1] + 1) + span_row

    def bound(col: npt.NDArray[np.int64], sign: int) -> npt.NDArray[np.int64]:
        vertex = envelope(col, sign)
        j = np.searchsorted(unit[vertex] * (masks.shape[1] + 1) + rows[vertex], key, "right") - 1
        a, b = vertex[j], vertex[np.minimum(j + 1, len(vertex) - 1)]
        at_vertex = span_row == rows[a]
        num = np.where(at_vertex, 0, (span_row - rows[a]) * (col[b] - col[a]))
        den = np.where(at_vertex, 1, rows[b] - rows[a])
        # the left edge rounds up, the right edge down
        edge: npt.NDArray[np.int64] = col[a] + (-(-num // den) if sign > 0 else num // den)
        return edge

    left, right = bound(first, 1), bound(last, -1)
    fill = ~flat[span_unit]
    cols = np.arange(n_x)
    span = (cols >= left[fill, None]) & (cols <= right[fill, None])
    where = (units[start][span_unit[fill]], span_row[fill])
    out[where] |= span
    return out


def _innermost(lung: BoolArray, distance: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per row of a slice, the distance from the midline of the lung's innermost pixel.

    ``distance`` is each column's distance from the midline (a (1, x) row); rows without
    lung pixels get +inf.
    """
    big = np.float64(np.inf)
    innermost: npt.NDArray[np.float64] = np.where(
        lung, np.broadcast_to(distance, lung.shape), big
    ).min(axis=1)
    return innermost


def _close_lung_slice(
    lung: BoolArray,
    hull: BoolArray,
    distance: npt.NDArray[np.float64],
    innermost: npt.NDArray[np.float64],
) -> BoolArray:
    """One slice of one lung: its ``hull`` (:func:`_hulls`), minus what lies medial of each
    row's innermost pixel.

    ``distance`` is each column's distance from the midline (a (1, x) row), ``innermost``
    the lung's :func:`_innermost`.
    """
    # rows without lung pixels (a consolidated band across the whole lung) keep the hull
    allowed = (distance >= innermost[:, None]) | ~np.isfinite(innermost)[:, None]
    closed: BoolArray = lung | (hull & allowed)
    return closed


def _outward(
    pixels: tuple[npt.NDArray[np.intp], ...],
    lung_of: npt.NDArray[np.intp],
    centres: npt.NDArray[np.float64],
    lungs: BoolArray,
) -> BoolArray:
    """Which ``pixels`` ((slice, row, column) of the (z, y, x) ``lungs``), each of one lung
    (``lung_of``), the slice's aerated ``lungs`` hide from the body's centre of that lung's
    slice (``centres``: row, column per lung): a segment from the pixel to the centre
    crosses aerated lung. The segment is sampled at ceil(r) + 1 evenly spaced points (at
    least 2; r: the distance in pixels of the lung's farthest given pixel from the centre),
    the pixel itself left out.

    Consolidation fills the lung from the chest wall, so aerated lung lies between it and
    the middle of the body; the hull of a basal crescent of lung spans the diaphragm's dome
    (liver, spleen, stomach), which lies between the crescent and the middle of the body.
    """
    ks, ys, xs = pixels
    out = np.zeros(len(ys), dtype=bool)
    if not ys.size:
        return out
    cy, cx = centres[lung_of, 0], centres[lung_of, 1]
    reach = np.zeros(len(centres), dtype=np.float64)
    np.maximum.at(reach, lung_of, np.hypot(ys - cy, xs - cx))
    n_steps = np.maximum(np.ceil(reach).astype(np.int64) + 1, 2)[lung_of]
    for n in np.unique(n_steps):  # the lungs sampled at n points, together
        sel = np.flatnonzero(n_steps == n)
        y, x, ty, tx = ys[sel], xs[sel], cy[sel], cx[sel]
        steps = np.linspace(0.0, 1.0, int(n))[1:, None]
        ry = np.rint(y[None, :] + steps * (ty - y)[None, :]).astype(np.int64)
        rx = np.rint(x[None, :] + steps * (tx - x)[None, :]).astype(np.int64)
        ry = np.clip(ry, 0, lungs.shape[1] - 1)
        rx = np.clip(rx, 0, lungs.shape[2] - 1)
        out[sel] = lungs[ks[sel][None, :], ry, rx].any(axis=0)
    return out


def _within(
    mask: BoolArray, reach_mm: float, spacing: tuple[float, ...], where: BoolArray, grow: bool
) -> BoolArray:
    """The elements of ``where`` within ``reach_mm`` of an element of ``mask`` (non-empty).

    Taken in the mask's box — grown by ``reach_mm`` when ``grow`` (every element outside it
    is farther), else the box itself (for elements of ``where`` inside it: what a lung's
    hull can hold) — by :func:`within_reach`: what ``distance_transform_edt`` of the box
    compared with ``reach_mm`` gives, at the elements of ``where`` only."""
    out = np.zeros(mask.shape, dtype=bool)
    box = tuple(
        slice(max(b.start - math.ceil(reach_mm / s), 0), min(b.stop + math.ceil(reach_mm / s), n))
        if grow
        else b
        for b, s, n in zip(bounding_box(mask), spacing, mask.shape, strict=True)
    )
    at = np.nonzero(where[box])
    close = within_reach(mask[box], reach_mm, spacing, at)
    out[tuple(a[close] + b.start for a, b in zip(at, box, strict=True))] = True
    return out


@functools.lru_cache(maxsize=32)
def _reach_rows(
    reach_mm: float, spacing: tuple[float, ...]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The elements within ``reach_mm`` of the origin, row by row along the last axis.

    Distances as ``ndimage.distance_transform_edt`` computes them from its nearest-element
    offsets (float64 offsets times the spacing, squared, summed in axis order, square
    root), so an offset is in exactly when such a distance is ``<= reach_mm``; along the
    last axis that is a run ``-c..c`` (the distance grows with the offset). Returns each
    row's offsets along the leading axes (rows, ndim - 1) and its ``c``, nearest rows
    first (read-only arrays: the answer is kept for the next call)."""
    radii = [math.floor(reach_mm / s) + 1 for s in spacing]
    offsets = np.indices([2 * r + 1 for r in radii]).reshape(len(radii), -1)
    offsets -= np.asarray(radii)[:, None]
    dt = offsets.astype(np.float64)
    for i, s in enumerate(spacing):
        dt[i] *= np.float64(s)
    np.multiply(dt, dt, dt)
    inside = np.sqrt(np.add.reduce(dt, axis=0)) <= reach_mm
    lead = offsets[:-1, inside].T
    widths = np.abs(offsets[-1, inside])
    rows, where = np.unique(lead, axis=0, return_inverse=True)
    c = np.zeros(len(rows), dtype=np.intp)
    np.maximum.at(c, where.ravel(), widths)
    order = np.argsort(np.add.reduce((rows * np.asarray(spacing[:-1])) ** 2, axis=1), kind="stable")
    rows, c = rows[order].astype(np.intp), c[order]
    rows.setflags(write=False)
    c.setflags(write=False)
    return rows, c


def within_reach(
    targets: BoolArray,
    reach_mm: float,
    spacing: tuple[float, ...],
    at: tuple[npt.NDArray[np.intp], ...],
) -> BoolArray:
    """Whether each element ``at`` (as from ``np.nonzero``) has an element of ``targets``
    within ``reach_mm``: ``ndimage.distance_transform_edt(~targets, sampling=spacing)[at] <=
    reach_mm``, without a distance transform (whose cost grows with the whole array).

    The ball of :func:`_reach_rows` is scanned row by row: ``targets`` dilated along the last
    axis by each row's half-width ``c`` (runs of ``2c + 1``), read at each element shifted by
    the row's leading offsets; an element is settled at the first row that finds a target.
    The transform's nearest target lies in the ball exactly when some target does, so the
    answers are the same whenever the distances' floating-point products and sums are exact
    (spacings of a few significant bits, such as whole or half millimetres: the 2 mm working
    grid's); for other spacings they could differ only where two targets at equal distances
    (or within rounding of each other) fall on both sides of ``reach_mm`` by a rounding
    error."""
    n = len(at[0])
    out = np.zeros(n, dtype=bool)
    if not n or not targets.any():
        return out
    rows, widths = _reach_rows(float(reach_mm), tuple(float(s) for s in spacing))
    pads = [int(np.abs(rows[:, i]).max()) if len(rows) else 0 for i in range(targets.ndim - 1)]
    pads.append(int(widths.max()))
    padded = np.pad(targets, [(p, p) for p in pads])
    flat = padded.ravel()
    strides = np.asarray(padded.strides[:-1], dtype=np.intp) // padded.itemsize
    # the last axis' pad (>= every c) keeps a shifted run from reaching the next line
    runs = [flat]
    for c in range(1, pads[-1] + 1):
        run = runs[-1].copy()
        run[c:] |= flat[:-c]
        run[:-c] |= flat[c:]
        runs.append(run)
    index = np.ravel_multi_index(tuple(a + p for a, p in zip(at, pads, strict=True)), padded.shape)
    todo = np.arange(n)
    for lead, c in zip(rows, widths, strict=True):
        hit = runs[c][index + int(lead @ strides)]
        if hit.any():
            out[todo[hit]] = True
            todo, index = todo[~hit], index[~hit]
            if not todo.size:
                break
    return out


def _deeper(mask: BoolArray, depth_mm: float, spacing: tuple[float, float]) -> BoolArray:
    """Pixels of the 2D ``mask`` farther than ``depth_mm`` from every pixel outside it,
    computed in the mask's box grown by one pixel (exact: a pixel outside that box is
    never nearer than the ring of outside pixels the box ends with)."""
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    box = tuple(
        slice(max(b.start - 1, 0), min(b.stop + 1, n))
        for b, n in zip(bounding_box(mask), mask.shape, strict=True)
    )
    out[box] = ndimage.distance_transform_edt(mask[box], sampling=spacing) > depth_mm
    return out


def _deeper_all(masks: BoolArray, depth_mm: float, spacing: tuple[float, float]) -> BoolArray:
    """:func:`_deeper` of each 2D mask of a (n, y, x) stack, the same pixels.

    A mask each row of which is one run of pixels (a filled convex hull) is eroded by the
    disk of :func:`_reach_rows` (the pixels whose distance from the origin, as the
    distance transform computes it, is at most ``depth_mm``; nothing beyond the image's
    edge) row by row: a pixel is deeper when every row the disk reaches, inside the image,
    holds the disk's run around it; one run per row keeps that two bounds per row. Other
    masks go through :func:`_deeper`. The same pixels as the transform whenever its sums are
    exact (see :func:`within_reach`)."""
    _, ny, nx = masks.shape
    out = np.zeros(masks.shape, dtype=bool)
    has = np.asarray(masks.any(axis=2))
    first = np.argmax(masks, axis=2)
    last = nx - 1 - np.argmax(masks[:, :, ::-1], axis=2)
    runs = ~has | (masks.sum(axis=2) == last - first + 1)
    simple = np.asarray(runs.all(axis=1), dtype=bool)
    for k in np.flatnonzero(~simple):
        out[k] = _deeper(masks[k], depth_mm, spacing)
    if not simple.any():
        return out
    has, first, last = has[simple], first[simple], last[simple]
    rows, widths = _reach_rows(float(depth_mm), tuple(float(s) for s in spacing))
    lo = np.zeros(has.shape, dtype=np.intp)
    hi = np.full(has.shape, nx - 1, dtype=np.intp)
    alive = has.copy()
    for (j,), c in zip(rows, widths, strict=True):
        if abs(j) >= ny:
            continue
        dst = slice(max(-j, 0), ny - max(j, 0))  # rows y with y + j inside the image
        src = slice(max(j, 0), ny - max(-j, 0))
        alive[:, dst] &= has[:, src]
        np.maximum(lo[:, dst], np.where(first[:, src] > 0, first[:, src] + c, 0), out=lo[:, dst])
        np.minimum(
            hi[:, dst], np.where(last[:, src] < nx - 1, last[:, src] - c, nx - 1), out=hi[:, dst]
        )
    x = np.arange(nx)
    out[simple] = alive[:, :, None] & (x >= lo[:, :, None]) & (x <= hi[:, :, None])
    return out


def _mm_to_px(mm: float, spacing: float) -> int:
    return max(round(mm / spacing), 1)


def _medial_limit(innermost: npt.NDArray[np.float64], reach_px: int) -> Any:
    """Per row, the lung's :func:`_innermost` distance from the midline.

    Rows without lung pixels take the limit of the nearest row that has some, when it is
    at most ``reach_px`` rows away; farther rows get +inf (nothing allowed).
    """
    big = np.float64(np.inf)
    has = np.isfinite(innermost)
    if not has.any():
        return innermost
    gap, (nearest,) = ndimage.distance_transform_edt(~has, return_indices=True)
    out = innermost[nearest]
    out[gap > reach_px] = big
    return out


def _edge_contact(edge: BoolArray, labels: npt.NDArray[np.int32], n: int) -> Any:
    """Per label 0..n, the edge pixels that hold it or have an in-plane 4-neighbour holding
    it (what ``(edge & binary_dilation(labels == c)).sum()`` counts, slice by slice, for
    every c at once); a pixel's five values are counted once each."""
    at = np.nonzero(edge)
    ys, xs = at[-2], at[-1]
    ny, nx = labels.shape[-2:]
    seen = [labels[at]]
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        y, x = ys + dy, xs + dx
        ok = (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
        value = np.zeros_like(seen[0])
        value[ok] = labels[(*(a[ok] for a in at[:-2]), y[ok], x[ok])]
        seen.append(value)
    count = np.zeros(n + 1, dtype=np.int64)
    for i, value in enumerate(seen):
        new = np.ones(len(value), dtype=bool)
        for other in seen[:i]:
            new &= value != other
        count += np.bincount(value[new], minlength=n + 1)
    return count


def bounding_box(mask: npt.NDArray[np.bool_]) -> tuple[slice, ...]:
    """The smallest box holding every True element of a non-empty mask."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(spans)


def opening(mask: BoolArray, structure: BoolArray) -> BoolArray:
    """Binary opening of ``mask`` by ``structure`` (symmetric, odd-sized, any dimension).

    The same pixels as ``ndimage.binary_opening``, at a fraction of the cost: computed on
    the bounding box of the mask (the opening lies inside the mask, and the erosion treats
    the box's border as outside), the erosion only where the erosion by the structure's
    central 3×…×3 part (a subset) leaves a pixel, the dilation only inside the mask.
    """
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    box = bounding_box(mask)
    part = mask[box]
    centre = tuple(slice(max(n // 2 - 1, 0), n // 2 + 2) for n in structure.shape)
    core = ndimage.binary_erosion(part, structure=structure[centre])
    eroded = ndimage.binary_erosion(part, structure=structure, mask=core) & core
    out[box] = ndimage.binary_dilation(eroded, structure=structure, mask=part) & part
    return out


#: Compare-exchange pairs of a median-of-9 sorting network (the median ends at index 4).
_MEDIAN9 = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
    (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)  # fmt: skip


def median_in_plane(img: npt.NDArray[np.float32], size: tuple[int, int, int]) -> Any:
    """In-plane median of window ``size`` (1, y, x), edges mirrored as ``ndimage`` does;
    a 3×3 window by a sorting network (several times faster than ``median_filter``)."""
    if max(size) == 1:
        return img
    if size != (1, 3, 3):
        return ndimage.median_filter(img, size=size)
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="symmetric")
    ny, nx = img.shape[1], img.shape[2]
    v = [padded[:, i : i + ny, j : j + nx].copy() for i in range(3) for j in range(3)]
    for a, b in _MEDIAN9:
        low = np.minimum(v[a], v[b])
        np.maximum(v[a], v[b], out=v[b])
        v[a] = low
    return v[4]


def _boundary(mask: BoolArray) -> BoolArray:
    """Pixels of a 2D mask with a 4-neighbour outside it (the hull needs no others); of a
    3D mask, each slice's. The pixels ``mask & ~binary_erosion(mask)`` (in-plane
    4-neighbours, the border outside) gives, by shifted copies (several times faster)."""
    inner = mask.copy()
    inner[..., 1:, :] &= mask[..., :-1, :]
    inner[..., :-1, :] &= mask[..., 1:, :]
    inner[..., 1:] &= mask[..., :-1]
    inner[..., :-1] &= mask[..., 1:]
    for border in ((..., 0, slice(None)), (..., -1, slice(None)), (..., 0), (..., -1)):
        inner[border] = False
    edge: BoolArray = mask & ~inner
    return edge


def lung_masks(
    image_hu: npt.NDArray[np.floating[Any]],
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
    hu_max: float = LUNG_HU_MAX,
) -> tuple[BoolArray, BoolArray]:
    """(threshold mask, robust mask) of one volume, sharing the body and threshold steps.

    ``spacing_mm`` is the (z, y, x) voxel size. The robust mask: per slice, the threshold
    mask is split at the body's midline column into the two lungs (components reaching the
    midline, the airways, are dropped first); each lung gets its bays closed and the dense
    tissue between it and the bony chest wall (see the module text); each slice's holes
    are filled.
    """
    img = np.asarray(image_hu, dtype=np.float32)
    if img.ndim != 3:
        msg = f"expected a (z, y, x) volume, got shape {img.shape}"
        raise ValueError(msg)
    dz, dy, dx = (float(v) for v in spacing_mm)
    if not min(dz, dy, dx) > 0:
        msg = f"spacing must be positive, got {spacing_mm}"
        raise ValueError(msg)
    body = body_mask(img, hu_max)
    if not body.any():
        return body, body.copy()
    # everything below lies in the body: work on its in-plane bounding box (one pixel of
    # margin keeps the outside connected to the border), the same masks at less cost
    rows, cols_in = np.flatnonzero(body.any(axis=(0, 2))), np.flatnonzero(body.any(axis=(0, 1)))
    box = (
        slice(None),
        slice(max(int(rows[0]) - 1, 0), int(rows[-1]) + 2),
        slice(max(int(cols_in[0]) - 1, 0), int(cols_in[-1]) + 2),
    )
    base_box, robust_box = _lung_masks_in_box(img[box], body[box], (dz, dy, dx), hu_max)
    base, robust = np.zeros(img.shape, dtype=bool), np.zeros(img.shape, dtype=bool)
    base[box], robust[box] = base_box, robust_box
    return base, robust


def _lung_masks_in_box(
    img: npt.NDArray[np.float32],
    body: BoolArray,
    spacing_mm: tuple[float, float, float],
    hu_max: float,
) -> tuple[BoolArray, BoolArray]:
    """:func:`lung_masks` on a box holding the body."""
    dz, dy, dx = spacing_mm
    base = _threshold_in_body(img, body, hu_max)
    out = base.copy()
    if not base.any():
        return base, out
    bone = (img >= BONE_HU_MIN) & body
    # the cage is the ribs and spine against the pleura: bone within CAGE_RIB_MM of the
    # aerated lung (the scapulae, arms and spinous processes lie farther out, behind muscle)
    cage_bone = ndimage.maximum_filter1d(
        _within(base, CAGE_RIB_MM, (dz, dy, dx), bone, grow=True),
        size=2 * round(CAGE_WINDOW_MM / dz) + 1,
        axis=0,
        mode="nearest",
    )
    dense = (img >= hu_max) & (img < DENSE_HU_MAX) & ~bone & body
    reach_px = _mm_to_px(WALL_REACH_MM, dy)
    ry, rx = (_mm_to_px(WALL_MIN_THICKNESS_MM / 2.0, v) for v in (dy, dx))
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    rim = ((yy / ry) ** 2 + (xx / rx) ** 2) <= 1.0
    cols = np.arange(img.shape[2], dtype=np.float64)
    # the lung's tips (apex, costophrenic recesses) sit in soft tissue: no chest-wall fill
    # in a slice where the lung is smaller than WALL_MIN_AREA_FRACTION of its largest slice
    area = base.sum(axis=(1, 2))
    min_area = WALL_MIN_AREA_FRACTION * float(area.max()) / 2.0
    min_hull = max(3, round(MIN_HULL_MM2 / (dy * dx)))
    # per slice, the body's midline column and middle row: means of pixel indices (exact
    # integer sums, so the same numbers as the means of each slice's indices)
    body_cols = body.any(axis=1)
    n_cols = body_cols.sum(axis=1)
    col_sums = (body_cols * np.arange(img.shape[2])).sum(axis=1)
    body_rows = body.sum(axis=2)
    n_body = body_rows.sum(axis=1)
    row_sums = (body_rows * np.arange(img.shape[1])).sum(axis=1)
    slices = [k for k in np.flatnonzero(area) if n_cols[k]]  # the lung lies in the body
    midlines = {int(k): float(col_sums[k]) / float(n_cols[k]) for k in slices}
    # airways on the midline (trachea, main bronchi) are not lung: drop each slice's
    # components that reach its midline column before taking hulls (one labelling of every
    # slice's components: in-plane connectivity only)
    parts, _ = ndimage.label(base, structure=_IN_PLANE)
    airway = np.zeros(int(parts.max()) + 1, dtype=bool)
    for k, midline in midlines.items():
        centre = round(midline)
        airway[parts[k, :, max(centre - 1, 0) : centre + 2]] = True
    airway[0] = False
    lungs = base & ~airway[parts]
    del parts
    # the cage's points: the outlines of the cage's bone and of the lungs, every slice at once
    cage_pts = _boundary(cage_bone) | _boundary(lungs)
    # the hulls of every slice's cage and of every lung at once: the cage of the slices with
    # cage bone and 3 outline points; each lung on its own half of the slice (everything
    # below lies within its side), hulls of the lungs of at least min_hull pixels
    n_cage_pts = cage_pts.sum(axis=(1, 2))
    caged = [k for k in midlines if cage_bone[k].any() and int(n_cage_pts[k]) >= 3]
    # inside each cage: its hull pulled in by the ribs' thickness (every slice at once)
    inners = dict(
        zip(caged, _deeper_all(_hulls(cage_pts[caged]), CAGE_WALL_MM, (dy, dx)), strict=True)
    )
    halves = np.zeros(img.shape[0], dtype=np.intp)  # per slice, the columns left of the midline
    for k, midline in midlines.items():
        halves[k] = np.count_nonzero(cols < midline)
    sides = [  # (slice, side: 0 left, 1 right, its columns)
        (k, side, cs)
        for k in midlines
        for side, cs in enumerate((slice(0, halves[k]), slice(halves[k], img.shape[2])))
        if np.count_nonzero(lungs[k, :, cs]) >= min_hull  # (a smaller lung stays as it is)
    ]
    side_masks = np.zeros((len(sides), *img.shape[1:]), dtype=bool)
    for u, (k, _, cs) in enumerate(sides):
        side_masks[u, :, cs] = lungs[k, :, cs]
    hulls = _hulls(side_masks)
    del side_masks
    # the lungs side by side in one stack, the right one `gap` columns farther out: the
    # in-plane operations below (a rim's opening, labels, outlines) then treat each lung
    # as on its own half of the slice, the other half outside
    gap = rim.shape[1]
    lung_g = np.zeros((img.shape[0], img.shape[1], img.shape[2] + gap), dtype=bool)
    bay_g, allowed_g = np.zeros_like(lung_g), np.zeros_like(lung_g)
    centres = np.zeros((len(sides), 2), dtype=np.float64)
    n_lungs = np.zeros(len(sides), dtype=np.int64)
    lung_at = np.full((img.shape[0], 2), -1, dtype=np.intp)  # per slice and side
    no_cage = np.zeros(img.shape[1:], dtype=bool)
    for u, (k, side, cs) in enumerate(sides):
        gs = slice(cs.start + gap * side, cs.stop + gap * side)
        lung_at[k, side] = u
        lung = lungs[k, :, cs]
        n_lungs[u] = np.count_nonzero(lung)
        centres[u] = (float(row_sums[k]) / float(n_body[k]), midlines[k])  # the body's middle
        lung_g[k, :, gs] = lung
        dist = np.abs(cols - midlines[k])[None, cs]
        innermost = _innermost(lung, dist)
        bay = _close_lung_slice(lung, hulls[u, :, cs], dist, innermost) & body[k, :, cs] & ~lung
        bay_g[k, :, gs] = _within(lung, BAY_REACH_MM, (dy, dx), bay, grow=False)
        if n_lungs[u] < min_area:  # a lung tip: no chest-wall fill
            continue
        inner = inners.get(k, no_cage)
        limit = _medial_limit(innermost, reach_px)
        allowed_g[k, :, gs] = (dist >= limit[:, None]) & inner[:, cs] & dense[k, :, cs]
    del hulls

    def lung_of(at: tuple[npt.NDArray[np.intp], ...]) -> tuple[Any, Any]:
        """The lung of each pixel of the stack, and its column in the slice."""
        right = at[2] >= halves[at[0]]
        return lung_at[at[0], right.astype(np.intp)], at[2] - gap * right

    def hidden(at: tuple[npt.NDArray[np.intp], ...]) -> BoolArray:
        of, col = lung_of(at)
        return _outward((at[0], at[1], col), of, centres, lungs)

    # bays: hull pixels hidden from the body's middle by aerated lung
    at = np.nonzero(bay_g)
    del bay_g
    closed_g = lung_g
    closed_g[tuple(a[hidden(at)] for a in at)] = True
    # chest wall: dense tissue lateral of the lung inside the cage, a thin rim opened away
    allowed_g &= ~closed_g
    wall, n_wall = ndimage.label(opening(allowed_g, rim[None]), structure=_IN_PLANE)
    del allowed_g
    if n_wall:
        sizes = np.bincount(wall.ravel(), minlength=n_wall + 1)
        edge = _boundary(closed_g)
        contact = _edge_contact(edge, wall, n_wall)
        at = np.nonzero(wall)
        wall_lung = np.zeros(n_wall + 1, dtype=np.intp)
        wall_lung[wall[at]] = lung_of(at)[0]
        n_edge = np.maximum(np.bincount(lung_of(np.nonzero(edge))[0], minlength=len(sides)), 1)
        keep = (
            (contact > 0)
            & (np.arange(n_wall + 1) > 0)
            & (sizes <= WALL_MAX_FRACTION * n_lungs[wall_lung])
            & (contact <= WALL_MAX_CONTACT * n_edge[wall_lung])
        )
        if keep.any():
            # consolidation against the chest wall lies outward of the aerated lung
            at = np.nonzero(keep[wall])
            seen = np.bincount(wall[at][hidden(at)], minlength=n_wall + 1)
            keep &= 2 * seen >= sizes
            closed_g |= keep[wall]
    for k, side, cs in sides:
        out[k, :, cs] |= closed_g[k, :, cs.start + gap * side : cs.stop + gap * side]
    return base, fill_slices(out)


def robust_lung_mask(
    image_hu: npt.NDArray[np.floating[Any]],
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
    hu_max: float = LUNG_HU_MAX,
) -> BoolArray:
    """A lung mask that keeps dense consolidation at the lung border (see :func:`lung_masks`)."""
    return lung_masks(image_hu, spacing_mm, hu_max)[1]
