"""The pneumonia scorer's working grid: a CT series read slice by slice onto a millimetre grid.

The scorer of ``select`` measures a series on a grid of ``working_spacing_mm`` (a
``select`` param) along every axis where the series is finer, and on the series' own
spacing where it is coarser (interpolation invents no detail: a 4 mm pixel upsampled to
2 mm loses the median's denoising and blurs lesion borders, and costs four times more).
So the cost per series follows the millimetres scanned, not the matrix: a 512 matrix of
0.7 mm pixels and 0.6 mm slices costs what a 2 mm series of the same chest costs. Every
filter of the scorer is sized in millimetres.

The series is never held at full resolution in floating point: each instance is read, its
pixels converted to HU (float32), resampled in-plane onto the working grid and dropped
(pixel data included) before the next is read; the slices are then ordered along the plane
normal (:func:`ctcurate.imaging.volume.sort_slices`) and resampled along it. Both steps are the
same anti-aliased linear resampling (:func:`resampling`): a Gaussian prefilter of
σ = √(r² − 1) / 2 input samples when the step grows by a factor r > 1 (so a fine and a
coarse matrix reach about the same resolution, σ ≈ half the working spacing), then linear
interpolation onto output samples centred on the input's extent; a coarser input is only
interpolated. Axes are then turned to (z feet → head, y anterior → posterior, x), so that
"lower zone" and "posterior" mean what they say whatever the series' orientation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

#: The Gaussian prefilter is cut at this many standard deviations.
TRUNCATE_SIGMA = 4.0

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Resampling:
    """Anti-aliased linear resampling along one axis, as band weights.

    Output sample ``j`` is ``sum(weights[j] * input[index[j]])``; ``nearest[j]`` is the input
    sample nearest to it (for label maps).
    """

    index: I64  # (n_out, width)
    weights: F32  # (n_out, width), rows sum to 1
    nearest: I64  # (n_out,)

    def matrix(self, n_in: int) -> npt.NDArray[np.float64]:
        """The dense (n_out, n_in) weight matrix (for checks)."""
        out = np.zeros((len(self.nearest), n_in), dtype=np.float64)
        rows = np.repeat(np.arange(len(self.nearest)), self.index.shape[1])
        np.add.at(out, (rows, self.index.ravel()), self.weights.ravel().astype(np.float64))
        return out

    def operator(self, n_in: int) -> Any:
        """The weights as a sparse (n_out, n_in) matrix: banded products on one thread."""
        from scipy import sparse

        rows = np.repeat(np.arange(len(self.nearest)), self.index.shape[1])
        return sparse.csr_array(
            (self.weights.ravel(), (rows, self.index.ravel())),
            shape=(len(self.nearest), n_in),
            dtype=np.float32,
        )


def resampling(n_in: int, step_in: float, step_out: float) -> Resampling:
    """Resample ``n_in`` samples ``step_in`` mm apart to samples ``step_out`` mm apart.

    The output holds ``max(1, round(n_in * step_in / step_out))`` samples, centred on the
    input's extent (so the grid is symmetric: flipping the input flips the output). When
    the step grows by r > 1, a Gaussian prefilter of σ = √(r² − 1) / 2 input samples (cut at
    :data:`TRUNCATE_SIGMA` σ, renormalised at the edges) comes first; then linear
    interpolation, edges clamped.
    """
    if n_in < 1 or not step_in > 0 or not step_out > 0:
        msg = f"resampling needs samples and positive steps, got {n_in}, {step_in}, {step_out}"
        raise ValueError(msg)
    n_out = max(1, round(n_in * step_in / step_out))
    ratio = step_out / step_in
    centres = (n_in - 1) / 2.0 + (np.arange(n_out, dtype=np.float64) - (n_out - 1) / 2.0) * ratio
    centres = np.clip(centres, 0.0, n_in - 1.0)
    low = np.minimum(np.floor(centres).astype(np.int64), max(n_in - 2, 0))
    frac = centres - low
    nearest = np.clip(np.floor(centres + 0.5), 0, n_in - 1).astype(np.int64)
    sigma = float(np.sqrt(ratio * ratio - 1.0)) / 2.0 if ratio > 1.0 else 0.0
    reach = int(np.ceil(TRUNCATE_SIGMA * sigma)) if sigma > 0 else 0
    offsets = np.arange(-reach, reach + 2)  # around ``low``: the prefilter of low and low + 1
    index = low[:, None] + offsets[None, :]
    valid = (index >= 0) & (index < n_in)
    weights = np.zeros(index.shape, dtype=np.float64)
    taps = np.arange(-reach, reach + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2) if sigma > 0 else np.ones(1)
    kernel[np.abs(taps) > TRUNCATE_SIGMA * sigma] = 0.0
    # per input sample m, the prefilter's sum over the samples that exist (edge renormalising)
    m = np.arange(n_in)
    norm = sum(kernel[t] * ((m + d >= 0) & (m + d < n_in)) for t, d in enumerate(taps))
    for base, share in ((low, 1.0 - frac), (np.minimum(low + 1, n_in - 1), frac)):
        for t, d in enumerate(taps):
            col = base + d - low + reach  # position of input ``base + d`` in ``offsets``
            ok = (base + d >= 0) & (base + d < n_in)
            rows = np.flatnonzero(ok)
            weights[rows, col[rows]] += share[rows] * kernel[t] / norm[base[rows]]
    weights[~valid] = 0.0
    return Resampling(
        index=np.clip(index, 0, n_in - 1),
        weights=weights.astype(np.float32),
        nearest=nearest,
    )


@dataclass(frozen=True)
class WorkingVolume:
    """One series on the working grid (z feet → head, y anterior → posterior, x).

    ``source_uids`` are the instances' SOPInstanceUIDs in slice order along the normal
    (before any flip), ``source_shape`` the (slices, rows, columns) read, ``nearest`` per
    source axis the source index nearest to each working sample (for label maps).
    """

    hu: F32
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    source_uids: tuple[str, ...]
    source_shape: tuple[int, int, int]
    nearest: tuple[I64, I64, I64]
    transposed: bool
    flip_z: bool
    flip_y: bool
    source_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (slice, row, column)

    def orient(self, volume: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Turn a (slice order, rows, columns) array to this volume's axes."""
        out = np.asarray(volume)
        if self.transposed:
            out = out.transpose(0, 2, 1)
        if self.flip_z:
            out = out[::-1]
        if self.flip_y:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)

    def labels_onto(self, labels: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A label map of the source (slice order, rows, columns) on the working grid."""
        lab = np.asarray(labels)
        if lab.shape != self.source_shape:
            msg = f"labels {lab.shape} do not match the series {self.source_shape}"
            raise ValueError(msg)
        z, r, c = self.nearest
        return self.orient(lab[z][:, r][:, :, c])

    def unorient(self, volume: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The inverse of :meth:`orient`: a working-grid array in (slice order, rows, columns)."""
        out = np.asarray(volume)
        if self.flip_y:
            out = out[:, ::-1]
        if self.flip_z:
            out = out[::-1]
        if self.transposed:
            out = out.transpose(0, 2, 1)
        return np.ascontiguousarray(out)

    def mask_onto_source(self, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """A boolean mask of the working grid on the source (slice order, rows, columns).

        Trilinear interpolation of the mask as 0/1 at every source voxel centre (the inverse
        of the working grid's sample positions, edges clamped), then ``>= 0.5``: the mask's
        half-way surface, smooth at the source's finer pixels where nearest neighbour would
        draw working-voxel steps, and about the same volume. Slice by slice: one source
        slice in floating point at a time.
        """
        work = self.unorient(np.asarray(mask, dtype=bool))
        if np.asarray(mask).shape != self.hu.shape:
            msg = f"mask {np.asarray(mask).shape} does not match the working grid {self.hu.shape}"
            raise ValueError(msg)
        steps = self.spacing_mm
        if self.transposed:
            steps = (steps[0], steps[2], steps[1])
        (z_low, z_frac), (r_low, r_frac), (c_low, c_frac) = (
            _upsampling(n_in, step_in, step_out, n_out)
            for n_in, step_in, step_out, n_out in zip(
                self.source_shape, self.source_spacing_mm, steps, work.shape, strict=True
            )
        )
        rows = _operator(r_low, r_frac, work.shape[1])
        cols = _operator(c_low, c_frac, work.shape[2])
        out = np.zeros(self.source_shape, dtype=bool)
        top = work.shape[0] - 1
        for k in range(self.source_shape[0]):
            lo = int(z_low[k])
            plane = (1.0 - z_frac[k]) * work[lo] + z_frac[k] * work[min(lo + 1, top)]
            if not plane.any():
                continue
            inplane = cols @ np.asarray(rows @ plane.astype(np.float32)).T
            out[k] = np.asarray(inplane).T >= 0.5
        return out


def _upsampling(
    n_in: int, step_in: float, step_out: float, n_out: int
) -> tuple[I64, npt.NDArray[np.float64]]:
    """Where each of ``n_in`` source samples falls between the ``n_out`` samples that
    :func:`resampling` made of them: (lower output index, fraction toward the next)."""
    ratio = step_out / step_in
    centres = (np.arange(n_in, dtype=np.float64) - (n_in - 1) / 2.0) / ratio + (n_out - 1) / 2.0
    centres = np.clip(centres, 0.0, n_out - 1.0)
    low = np.minimum(np.floor(centres).astype(np.int64), max(n_out - 2, 0))
    return low, np.clip(centres - low, 0.0, 1.0)


def _operator(low: I64, frac: npt.NDArray[np.float64], n_out: int) -> Any:
    """Linear interpolation weights (n_in, n_out) as a sparse matrix."""
    from scipy import sparse

    n_in = len(low)
    rows = np.concatenate([np.arange(n_in), np.arange(n_in)])
    cols = np.concatenate([low, np.minimum(low + 1, n_out - 1)])
    weights = np.concatenate([1.0 - frac, frac]).astype(np.float32)
    return sparse.csr_array((weights, (rows, cols)), shape=(n_in, n_out), dtype=np.float32)


def _hu_float32(ds: Any) -> F32:
    pixels = np.asarray(ds.pixel_array)
    slope = np.float32(float(ds.get("RescaleSlope", 1.0) or 1.0))
    intercept = np.float32(float(ds.get("RescaleIntercept", 0.0) or 0.0))
    hu: F32 = pixels.astype(np.float32) * slope + intercept
    return hu


def working_volume(datasets: Iterable[Any], spacing_mm: float) -> WorkingVolume:
    """Build a series' :class:`WorkingVolume` from its instances (pydicom datasets, any order).

    ``datasets`` is consumed one instance at a time (pass a generator of ``dcmread`` calls to
    hold one instance's pixels at a time); each instance's pixel data is dropped once
    resampled. The headers go through the checks of every series assembly
    (:func:`ctcurate.imaging.volume.check_series` and :func:`~ctcurate.imaging.volume.check_stack`,
    as pack's): :class:`ctcurate.imaging.volume.ExcludedSeries` names what is refused;
    ``ValueError`` for fewer than 3 instances or slices of other shapes; pydicom's pixel
    errors (:data:`ctcurate.imaging.volume.PIXEL_ERRORS`) pass through.
    """
    from ctcurate.imaging.volume import DUPLICATE_TOL_MM, check_series, check_stack

    if not spacing_mm > 0:
        msg = f"working spacing must be positive, got {spacing_mm}"
        raise ValueError(msg)
    headers: list[Any] = []
    planes: list[F32] = []
    sy = sx = row_mm = col_mm = spacing_mm
    by_row: Resampling | None = None
    by_col: Resampling | None = None
    on_rows: Any = None
    on_cols: Any = None
    shape: tuple[int, int] | None = None
    for ds in datasets:
        hu = _hu_float32(ds)
        if hu.ndim != 2 or (shape is not None and hu.shape != shape):
            msg = "slices differ in shape"
            raise ValueError(msg)
        if by_row is None or by_col is None:
            shape = (int(hu.shape[0]), int(hu.shape[1]))
            row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
            sy = max(spacing_mm, row_mm)
            sx = max(spacing_mm, col_mm)
            by_row = resampling(shape[0], row_mm, sy)
            by_col = resampling(shape[1], col_mm, sx)
            on_rows, on_cols = by_row.operator(shape[0]), by_col.operator(shape[1])
        plane = np.asarray(on_cols @ np.asarray(on_rows @ hu).T, dtype=np.float32).T
        planes.append(np.ascontiguousarray(plane))
        if "PixelData" in ds:
            del ds.PixelData
        headers.append(ds)
    if len(headers) < 3 or shape is None or by_row is None or by_col is None:
        msg = f"{len(headers)} instances: too few for a volume"
        raise ValueError(msg)
    geometry = check_series(headers)  # the header checks of every series assembly
    order, along, normal = geometry.order, geometry.along, geometry.normal
    distinct = [0]  # one slice per position, as assembly keeps them
    for k in range(1, len(order)):
        if along[k] - along[distinct[-1]] >= DUPLICATE_TOL_MM:
            distinct.append(k)
    check_stack(headers, [order[k] for k in distinct], along[distinct], normal)
    steps = np.diff(along)
    dz = abs(float(np.median(steps))) or 1.0
    sz = max(spacing_mm, dz)
    by_z = resampling(len(order), dz, sz)
    ny, nx = planes[0].shape
    stack = np.stack([planes[i] for i in order]).reshape(len(order), ny * nx)
    planes.clear()
    resampled = np.asarray(by_z.operator(len(order)) @ stack, dtype=np.float32)
    resampled = resampled.reshape(len(by_z.nearest), ny, nx)
    del stack
    iop = [float(v) for v in headers[order[0]].ImageOrientationPatient]
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    transposed = bool(abs(row[1]) > abs(row[0]))  # image rows run along x
    y_dir = row if transposed else col
    volume = WorkingVolume(
        hu=np.zeros((0, 0, 0), np.float32),
        spacing_mm=(sz, sy, sx) if not transposed else (sz, sx, sy),
        source_uids=tuple(str(headers[i].get("SOPInstanceUID", "")) for i in order),
        source_shape=(len(order), shape[0], shape[1]),
        nearest=(by_z.nearest, by_row.nearest, by_col.nearest),
        transposed=transposed,
        flip_z=bool(normal[2] < 0),
        flip_y=bool(y_dir[1] < 0),
        source_spacing_mm=(dz, row_mm, col_mm),
    )
    return replace(volume, hu=volume.orient(resampled))
