"""Series → volume: one CT series' instances and label slices as a resampled int16 volume.

The pure core of ``pack``. Slices are ordered by their position projected on the slice
normal (the cross product of the ImageOrientationPatient direction cosines), never by
InstanceNumber or file name; the z spacing comes from those projected positions, never
from SliceThickness. A series whose geometry cannot be trusted (missing slices, varying
spacing, gantry tilt, mixed orientations, conflicting duplicates, too few slices) is
excluded with a reason code by raising :class:`ExcludedSeries`.

The output grid is axis-aligned with the DICOM patient frame (LPS): axis order (z, y, x),
voxel ``[k, j, i]`` at ``origin_mm + (i * sx, j * sy, k * sz)``, ``spacing_mm = (sz, sy, sx)``.

:func:`series_to_volume` is :func:`assemble_series` (checks, sort, de-duplication,
orientation), :func:`centred_grid` (the release grid around the labelled lung) and
:func:`resample_image` / :func:`resample_label`; ``predict`` runs the same steps on series
without labels and maps its labels back with :func:`label_to_stack` and
:meth:`SeriesStack.unorient`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ctcurate.params import PackParams

#: Direction cosines of two instances agree when every component differs by less than this.
ORIENTATION_TOL = 1e-4
#: A direction cosine counts as axis-aligned when its largest component is at least 1 - this
#: (≈ 2.6° off the axis).
AXIS_TOL = 1e-3
#: Two slices whose positions along the normal differ by less than this (mm) coincide.
DUPLICATE_TOL_MM = 0.01
#: A spacing larger than this multiple of the median spacing is a missing slice (gap).
GAP_FACTOR = 1.5
#: Spacings may deviate from the median by the larger of these (mm / fraction) ...
SPACING_ABS_TOL_MM = 0.05
SPACING_REL_TOL = 0.02
#: ... and the slice stack may lean off the normal by at most this angle (degrees).
TILT_TOL_DEG = 0.5
#: Fewer slices than this (after removing duplicates) are never packed.
MIN_SLICES = 3
#: Pixel spacings of two instances agree within this (mm).
PIXEL_SPACING_TOL_MM = 1e-3
#: Decimals (mm) kept for origins and spacings written to the release.
GEOMETRY_DECIMALS = 4

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: Every reason :func:`series_to_volume` may exclude a series for.
REASONS = (
    "too_few_slices",
    "not_ct_image",
    "localizer",
    "burned_in_annotation",
    "multiframe",
    "missing_geometry",
    "mixed_orientation",
    "mixed_geometry",
    "non_axial",
    "gantry_tilt",
    "duplicate_conflict",
    "gap",
    "nonuniform_spacing",
    "pixel_data",
    "label_mismatch",
)


class ExcludedSeries(ValueError):
    """A series that must not be packed; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, *, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VolumeGeometry:
    """Where a packed volume lies and what it was made from.

    ``spacing_mm`` is (z, y, x), ``origin_mm`` is the (x, y, z) LPS position of voxel
    ``[0, 0, 0]``; ``source_*`` describe the sorted, de-duplicated series.
    """

    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    source_spacing_mm: tuple[float, float, float]
    source_shape: tuple[int, int, int]
    duplicates_dropped: int


def _floats(ds: Any, keyword: str, count: int) -> npt.NDArray[np.float64]:
    value = ds.get(keyword)
    if value is None:
        raise ExcludedSeries(reason="missing_geometry", detail=f"an instance has no {keyword}")
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ExcludedSeries(
            reason="missing_geometry", detail=f"an instance has a bad {keyword}"
        ) from exc
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise ExcludedSeries(reason="missing_geometry", detail=f"an instance has a bad {keyword}")
    return arr


def _check_kind(datasets: Sequence[Any]) -> None:
    """Refuse what is never packed: non-CT objects, localizers, screenshots, multi-frame."""
    for ds in datasets:
        if str(ds.get("SOPClassUID", "")) != CT_IMAGE_STORAGE:
            raise ExcludedSeries(
                reason="not_ct_image", detail="an instance is not a CT Image Storage object"
            )
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            raise ExcludedSeries(reason="localizer", detail="an instance has ImageType LOCALIZER")
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise ExcludedSeries(
                reason="burned_in_annotation", detail="an instance has BurnedInAnnotation YES"
            )
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ExcludedSeries(
                reason="multiframe", detail="multi-frame instances are not supported"
            )


def _axis_map(row: npt.NDArray[np.float64], col: npt.NDArray[np.float64]) -> tuple[bool, int, int]:
    """(transposed, sign along x, sign along y) of an axis-aligned axial orientation.

    ``transposed`` is True when the row direction runs along y (and columns along x).
    """
    row_axis, col_axis = int(np.argmax(np.abs(row))), int(np.argmax(np.abs(col)))
    if abs(row[row_axis]) < 1 - AXIS_TOL or abs(col[col_axis]) < 1 - AXIS_TOL:
        raise ExcludedSeries(reason="non_axial", detail="orientation is oblique")
    if {row_axis, col_axis} != {0, 1}:
        raise ExcludedSeries(reason="non_axial", detail="slices are not axial")
    transposed = row_axis == 1
    x_dir, y_dir = (col, row) if transposed else (row, col)
    return transposed, int(np.sign(x_dir[0])), int(np.sign(y_dir[1]))


#: What pydicom's ``pixel_array`` raises on pixel data it cannot decode (a missing or
#: broken element, an unsupported or corrupt encoding).
PIXEL_ERRORS: tuple[type[Exception], ...] = (
    AttributeError,
    KeyError,
    ValueError,
    TypeError,
    RuntimeError,
    NotImplementedError,
)


def _pixels(ds: Any) -> npt.NDArray[Any]:
    """The instance's stored pixel values (pydicom decodes once and keeps them)."""
    try:
        return np.asarray(ds.pixel_array)
    except PIXEL_ERRORS as e:
        raise ExcludedSeries(
            reason="pixel_data", detail=f"pixel data unreadable ({e.__class__.__name__})"
        ) from e


def _hu_slice(ds: Any) -> npt.NDArray[np.float64]:
    pixels = _pixels(ds)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float64) * slope + intercept


def sort_slices(
    datasets: Sequence[Any],
) -> tuple[list[int], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Order instances along the slice normal.

    Returns the instance indices sorted by (position on the normal, SOPInstanceUID), the
    sorted positions on the normal (mm) and the unit normal. Raises :class:`ExcludedSeries`
    for missing geometry or mixed orientations.
    """
    orientations = [_floats(ds, "ImageOrientationPatient", 6) for ds in datasets]
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3) for ds in datasets])
    first = orientations[0]
    if any(np.max(np.abs(o - first)) > ORIENTATION_TOL for o in orientations[1:]):
        raise ExcludedSeries(
            reason="mixed_orientation", detail="instances differ in ImageOrientationPatient"
        )
    normal = np.cross(first[:3], first[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise ExcludedSeries(
            reason="missing_geometry", detail="ImageOrientationPatient is degenerate"
        )
    normal = normal / norm
    along = positions @ normal
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in datasets]
    order = sorted(range(len(datasets)), key=lambda i: (float(along[i]), uids[i]))
    return order, along[order], normal


def _check_plane(datasets: Sequence[Any]) -> tuple[int, int, float, float]:
    """(rows, columns, row spacing, column spacing), equal across instances."""
    shapes = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for ds in datasets}
    if len(shapes) != 1:
        raise ExcludedSeries(reason="mixed_geometry", detail="instances differ in Rows / Columns")
    rows, cols = next(iter(shapes))
    if rows < 1 or cols < 1:
        raise ExcludedSeries(reason="missing_geometry", detail="an instance has no Rows / Columns")
    spacings = np.stack([_floats(ds, "PixelSpacing", 2) for ds in datasets])
    if np.max(np.abs(spacings - spacings[0])) > PIXEL_SPACING_TOL_MM:
        raise ExcludedSeries(reason="mixed_geometry", detail="instances differ in PixelSpacing")
    if np.any(spacings[0] <= 0):
        raise ExcludedSeries(reason="missing_geometry", detail="PixelSpacing is not positive")
    return rows, cols, float(spacings[0][0]), float(spacings[0][1])


def _check_spacing(along: npt.NDArray[np.float64]) -> float:
    """The uniform slice spacing (mm) of sorted, distinct positions, or an exclusion."""
    steps = np.diff(along)
    median = float(np.median(steps))
    if float(np.max(steps)) > GAP_FACTOR * median:
        raise ExcludedSeries(
            reason="gap", detail=f"a step exceeds {GAP_FACTOR}x the median slice spacing"
        )
    tol = max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * median)
    if float(np.max(np.abs(steps - median))) > tol:
        raise ExcludedSeries(
            reason="nonuniform_spacing", detail="slice spacing varies along the series"
        )
    return float((along[-1] - along[0]) / (len(along) - 1))


def _check_tilt(positions: npt.NDArray[np.float64], normal: npt.NDArray[np.float64]) -> None:
    span = positions[-1] - positions[0]
    along = float(span @ normal)
    in_plane = float(np.linalg.norm(span - along * normal))
    angle = math.degrees(math.atan2(in_plane, abs(along)))
    if angle > TILT_TOL_DEG:
        raise ExcludedSeries(
            reason="gantry_tilt", detail=f"slice stack leans {angle:.1f} deg off the normal"
        )


def _dedupe(
    order: list[int],
    along: npt.NDArray[np.float64],
    hu: Callable[[int], npt.NDArray[np.float64]],
) -> tuple[list[int], npt.NDArray[np.float64]]:
    """Drop slices at an already seen position with identical HU (``hu(i)``, made only for
    slices that share a position); conflicts exclude."""
    kept: list[int] = [order[0]]
    kept_along: list[float] = [float(along[0])]
    for idx, pos in zip(order[1:], along[1:], strict=True):
        if float(pos) - kept_along[-1] < DUPLICATE_TOL_MM:
            if not np.array_equal(hu(idx), hu(kept[-1])):
                raise ExcludedSeries(
                    reason="duplicate_conflict", detail="two slices share a position"
                )
            continue
        kept.append(idx)
        kept_along.append(float(pos))
    return kept, np.asarray(kept_along, dtype=np.float64)


def _resample(
    volume: npt.NDArray[Any],
    scale: npt.NDArray[np.float64],
    offset: npt.NDArray[np.float64],
    shape: tuple[int, int, int],
    order: int,
    cval: float,
) -> npt.NDArray[Any]:
    from scipy import ndimage

    out: npt.NDArray[Any] = ndimage.affine_transform(
        volume,
        scale,
        offset=offset,
        output_shape=shape,
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )
    return out


def _orient(
    slices: npt.NDArray[Any] | Mapping[int, npt.NDArray[Any]],
    kept: Sequence[int],
    transposed: bool,
    flips: tuple[bool, bool, bool],
) -> npt.NDArray[Any]:
    first = slices[kept[0]]
    return _orient_slices(lambda i: slices[i], kept, transposed, flips, first.shape, first.dtype)


def _orient_slices(
    get: Callable[[int], npt.NDArray[Any]],
    kept: Sequence[int],
    transposed: bool,
    flips: tuple[bool, bool, bool],
    shape: tuple[int, ...],
    dtype: npt.DTypeLike,
) -> npt.NDArray[Any]:
    """The slices ``get(i)`` of ``kept`` (each of ``shape``) stacked, transposed and flipped
    onto the LPS axes, written slice by slice into the one output array (no stacked copy
    beside it: at 512 × 512 × 500 in float64 each copy is 1 GB)."""
    rows, cols = int(shape[0]), int(shape[1])
    ny, nx = (cols, rows) if transposed else (rows, cols)
    n = len(kept)
    volume = np.empty((n, ny, nx), dtype=dtype)
    for k, idx in enumerate(kept):
        piece = get(idx)
        if transposed:
            piece = piece.T
        if flips[1]:
            piece = piece[::-1, :]
        if flips[2]:
            piece = piece[:, ::-1]
        volume[n - 1 - k if flips[0] else k] = piece
    return volume


@dataclass(frozen=True)
class SeriesStack:
    """A sorted, de-duplicated CT series on the axis-aligned LPS axes, and how to map
    per-instance slices onto it and back.

    ``image`` is float64 HU (z, y, x); ``origin_mm`` and ``spacing_mm`` are (z, y, x).
    ``kept`` lists the instance indices of the distinct positions in normal order, and
    ``slot`` gives, per instance, the index in ``kept`` of its position (a dropped duplicate
    shares its twin's).
    """

    image: npt.NDArray[np.float64]
    origin_mm: npt.NDArray[np.float64]
    spacing_mm: npt.NDArray[np.float64]
    kept: tuple[int, ...]
    slot: tuple[int, ...]
    transposed: bool
    flips: tuple[bool, bool, bool]

    def orient(self, slices: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Per-instance slices (n_instances, rows, cols) as a (z, y, x) volume of the stack."""
        return _orient(slices, self.kept, self.transposed, self.flips)

    def unorient(self, volume: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The inverse of :meth:`orient`: per-instance slices (n_instances, rows, cols)."""
        for axis, flip in enumerate(self.flips):
            if flip:
                volume = np.flip(volume, axis=axis)
        if self.transposed:
            volume = volume.transpose(0, 2, 1)
        return np.ascontiguousarray(np.stack([volume[k] for k in self.slot]))


@dataclass(frozen=True)
class ReleaseGrid:
    """The grid of a packed volume: (z, y, x) origin of voxel [0, 0, 0], spacing and shape."""

    origin_mm: npt.NDArray[np.float64]
    spacing_mm: npt.NDArray[np.float64]
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class SeriesGeometry:
    """What the headers of a series say about its grid, checked (no pixel read)."""

    rows: int
    cols: int
    row_spacing: float
    col_spacing: float
    order: list[int]  # instance indices along the slice normal
    along: npt.NDArray[np.float64]  # their positions on the normal (mm), sorted
    normal: npt.NDArray[np.float64]
    transposed: bool
    x_sign: int
    y_sign: int


def check_series(datasets: Sequence[Any]) -> SeriesGeometry:
    """The header checks of every series assembly (pack, predict, lung-mask and the
    selector's working grid): CT images only, one plane geometry, sorted along one axial
    orientation. Raises :class:`ExcludedSeries` naming the reason."""
    _check_kind(datasets)
    rows, cols, row_spacing, col_spacing = _check_plane(datasets)
    order, along, normal = sort_slices(datasets)
    orientation = _floats(datasets[order[0]], "ImageOrientationPatient", 6)
    transposed, x_sign, y_sign = _axis_map(orientation[:3], orientation[3:])
    return SeriesGeometry(
        rows, cols, row_spacing, col_spacing, order, along, normal, transposed, x_sign, y_sign
    )


def check_stack(
    datasets: Sequence[Any],
    kept: Sequence[int],
    along_kept: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
) -> tuple[float, npt.NDArray[np.float64]]:
    """The stack checks on the distinct slices ``kept`` (sorted, positions ``along_kept``):
    no gantry tilt, one slice spacing without gaps; returns that spacing (mm) and the
    slices' ImagePositionPatient (one row each)."""
    positions = np.stack([_floats(datasets[i], "ImagePositionPatient", 3) for i in kept])
    _check_tilt(positions, normal)
    return _check_spacing(along_kept), positions


def assemble_series(datasets: Sequence[Any]) -> SeriesStack:
    """Check, sort, de-duplicate and orient one CT series: the first half of ``pack``.

    Raises
    ------
    ExcludedSeries
        When the series cannot be assembled; its ``reason`` says why.
    """
    if len(datasets) < MIN_SLICES:
        raise ExcludedSeries(reason="too_few_slices", detail=f"{len(datasets)} instances")
    geometry = check_series(datasets)
    rows, cols, order, along, normal = (
        geometry.rows,
        geometry.cols,
        geometry.order,
        geometry.along,
        geometry.normal,
    )
    row_spacing, col_spacing = geometry.row_spacing, geometry.col_spacing
    transposed, x_sign, y_sign = geometry.transposed, geometry.x_sign, geometry.y_sign
    # every instance's pixels are decoded and checked; HU are made one slice at a time
    # (a stack of float64 slices beside the volume would double the peak memory)
    if any(_pixels(datasets[i]).shape != (rows, cols) for i in order):
        raise ExcludedSeries(reason="pixel_data", detail="pixel data does not match Rows / Columns")
    kept, along_kept = _dedupe(order, along, lambda i: _hu_slice(datasets[i]))
    if len(kept) < MIN_SLICES:
        raise ExcludedSeries(reason="too_few_slices", detail=f"{len(kept)} distinct positions")
    sz, positions = check_stack(datasets, kept, along_kept, normal)
    # every instance's slot: the kept position nearest its own (its twin for a duplicate)
    all_along = np.empty(len(datasets), dtype=np.float64)
    all_along[order] = along
    slot = tuple(int(np.argmin(np.abs(along_kept - a))) for a in all_along)

    # Bring the stack onto the LPS axes: k along +z, j along +y, i along +x.
    sx, sy = col_spacing, row_spacing
    if transposed:
        sx, sy = row_spacing, col_spacing
    z_values = positions[:, 2]
    flips = (bool(z_values[-1] < z_values[0]), y_sign < 0, x_sign < 0)
    image = _orient_slices(
        lambda i: _hu_slice(datasets[i]), kept, transposed, flips, (rows, cols), np.float64
    )
    _, ny, nx = image.shape
    x0 = positions[0, 0] - (nx - 1) * sx if x_sign < 0 else positions[0, 0]
    y0 = positions[0, 1] - (ny - 1) * sy if y_sign < 0 else positions[0, 1]
    z0 = float(np.min(z_values))
    origin = np.array([z0, y0, x0], dtype=np.float64)  # (z, y, x)
    spacing = np.array([sz, sy, sx], dtype=np.float64)
    return SeriesStack(image, origin, spacing, tuple(kept), slot, transposed, flips)


def centred_grid(
    stack: SeriesStack, centre_idx: npt.NDArray[np.float64], params: PackParams
) -> ReleaseGrid:
    """The grid of ``params`` (spacing, shape) centred on the stack's voxel ``centre_idx``
    (fractional (z, y, x) index); the origin is rounded to :data:`GEOMETRY_DECIMALS`."""
    centre = stack.origin_mm + centre_idx * stack.spacing_mm
    out_spacing = np.asarray(params.spacing_mm, dtype=np.float64)
    out_shape = tuple(int(s) for s in params.shape)
    out_origin = centre - (np.asarray(out_shape, dtype=np.float64) - 1) / 2.0 * out_spacing
    out_origin = np.round(out_origin, GEOMETRY_DECIMALS)
    return ReleaseGrid(out_origin, out_spacing, (out_shape[0], out_shape[1], out_shape[2]))


def resample_image(
    stack: SeriesStack, grid: ReleaseGrid, params: PackParams
) -> npt.NDArray[np.int16]:
    """The stack's HU on ``grid``: trilinear, padded with ``hu_min``, clipped, int16."""
    scale = grid.spacing_mm / stack.spacing_mm
    offset = (grid.origin_mm - stack.origin_mm) / stack.spacing_mm
    resampled = _resample(
        stack.image, scale, offset, grid.shape, order=1, cval=float(params.hu_min)
    )
    packed: npt.NDArray[np.int16] = np.rint(
        np.clip(resampled, params.hu_min, params.hu_max)
    ).astype(np.int16)
    return packed


def resample_label(
    stack: SeriesStack, grid: ReleaseGrid, label: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """A label volume of the stack on ``grid``: nearest neighbour, padded with 0."""
    scale = grid.spacing_mm / stack.spacing_mm
    offset = (grid.origin_mm - stack.origin_mm) / stack.spacing_mm
    return _resample(label, scale, offset, grid.shape, order=0, cval=0.0).astype(np.uint8)


def label_to_stack(
    stack: SeriesStack, grid: ReleaseGrid, label: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """The inverse of :func:`resample_label`: a label volume on ``grid`` brought back onto
    the stack's own (z, y, x) grid, nearest neighbour, 0 outside ``grid``."""
    scale = stack.spacing_mm / grid.spacing_mm
    offset = (stack.origin_mm - grid.origin_mm) / grid.spacing_mm
    shape = (int(stack.image.shape[0]), int(stack.image.shape[1]), int(stack.image.shape[2]))
    return _resample(label, scale, offset, shape, order=0, cval=0.0).astype(np.uint8)


def box_centre(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64] | None:
    """The (fractional) index at the centre of the bounding box of ``mask``'s true voxels;
    ``None`` when there is none. Read off the per-axis projections: the voxels' coordinates
    (``np.argwhere``) of a lung at 512 × 512 × 400 would take 400 MB."""
    ends = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if not len(hit):
            return None
        ends.append((hit[0] + hit[-1]) / 2.0)
    return np.asarray(ends, dtype=np.float64)


def series_to_volume(
    datasets: Sequence[Any], labels: npt.NDArray[np.uint8], params: PackParams
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8], VolumeGeometry]:
    """Assemble one CT series and its label slices into a packed (image, label, geometry).

    Parameters
    ----------
    datasets
        The series' CT instances (pydicom datasets with pixel data), in any order.
    labels
        uint8 (n, rows, cols) label slices; ``labels[i]`` belongs to ``datasets[i]``.
    params
        ``pack`` params: target ``spacing_mm`` (z, y, x), ``shape`` (z, y, x), HU window.

    Returns
    -------
    image, label, geometry
        int16 HU and uint8 labels of shape ``params.shape`` on the axis-aligned LPS grid,
        trilinear (image) and nearest (labels) resampled, centred on the bounding box of
        ``labels > 0`` (the volume centre when it is empty), padded with ``hu_min`` / 0 and
        clipped to ``[hu_min, hu_max]``.

    Raises
    ------
    ExcludedSeries
        When the series must not be packed; its ``reason`` says why.
    """
    labels = np.asarray(labels)
    if len(datasets) < MIN_SLICES:
        raise ExcludedSeries(reason="too_few_slices", detail=f"{len(datasets)} instances")
    _check_kind(datasets)
    rows, cols, _, _ = _check_plane(datasets)
    if labels.shape != (len(datasets), rows, cols):
        raise ExcludedSeries(
            reason="label_mismatch",
            detail=f"labels {labels.shape} do not match {(len(datasets), rows, cols)}",
        )
    stack = assemble_series(datasets)
    label = stack.orient(labels.astype(np.uint8, copy=False))
    centre_idx = box_centre(label > 0)
    if centre_idx is None:
        centre_idx = (np.asarray(stack.image.shape, dtype=np.float64) - 1) / 2.0
    grid = centred_grid(stack, centre_idx, params)
    packed_image = resample_image(stack, grid, params)
    packed_label = resample_label(stack, grid, label)
    sz, sy, sx = (float(v) for v in stack.spacing_mm)
    nz, ny, nx = stack.image.shape
    geometry = VolumeGeometry(
        spacing_mm=(
            float(grid.spacing_mm[0]),
            float(grid.spacing_mm[1]),
            float(grid.spacing_mm[2]),
        ),
        origin_mm=(float(grid.origin_mm[2]), float(grid.origin_mm[1]), float(grid.origin_mm[0])),
        source_spacing_mm=(
            round(sz, GEOMETRY_DECIMALS),
            round(sy, GEOMETRY_DECIMALS),
            round(sx, GEOMETRY_DECIMALS),
        ),
        source_shape=(nz, ny, nx),
        duplicates_dropped=len(datasets) - len(stack.kept),
    )
    return packed_image, packed_label, geometry
