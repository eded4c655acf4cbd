"""The pneumonia scorer of ``select``: opacity features of a CT series and a logistic model.

Pure core (arrays in, numbers out) plus :func:`score_series`, the per-series task a worker
process runs: read the instances slice by slice onto the working grid
(:mod:`ctcurate.imaging.workgrid`: isotropic ``select.working_spacing_mm``, axes (z feet → head,
y anterior → posterior, x)), measure the features there and, when a DICOM SEG of the
series is given, the Dice of both lung masks against its lung.

Features (:data:`FEATURES`, all dimensionless or per litre of lung), measured inside the
consolidation-robust lung mask (:func:`ctcurate.imaging.lungmask.lung_masks`). Every filter size is
in millimetres, turned into voxels with the volume's spacing (on the working grid, the same
number of voxels for every series), so sites with coarser matrices or thicker slices
measure the same anatomy:

* ``ggo_fraction`` / ``consolidation_fraction``: lung voxels at ground-glass
  (``GGO_HU_MIN``..``CONSOLIDATION_HU_MIN``) / consolidation (≥ ``CONSOLIDATION_HU_MIN``)
  density, on an in-plane median of ``MEDIAN_MM`` (none when the pixels are coarser), after
  an in-plane opening with a disk of ``OPENING_MM`` (never under 2 pixels: the
  reconstruction blurs any vessel over two) that removes vessels;
* ``blob_fraction``: lung voxels ≥ ``GGO_HU_MIN`` that survive a 3D opening with a ball of
  ``BLOB_RADIUS_MM`` (compact lesions, not vessels);
* ``border_fill_fraction``: share of the robust mask the threshold mask lost (dense
  opacity at the lung border);
* ``deep_opacity_fraction``: lung voxels of the opacity (ground glass or consolidation)
  deeper than ``DEEP_MM`` inside the robust mask — a lesion within aerated lung, not the
  dense rim every lung has at its border;
* ``posterior_basal_symmetry``: aerated lower-posterior lung, smaller side / larger side
  (lobar consolidation and effusions take the dependent lung of one side);
* ``small_opacity_density`` / ``nodule_density``: isolated small components of the
  unfiltered HU ≥ ``NODULE_HU_MIN`` (``SMALL_MIN_MM3`` and at least 2 voxels, at most
  ``SMALL_MAX_MM3``; all /
  those within ``NODULE_MAX_MM``) deeper than ``NODULE_MARGIN_MM`` in the lung, per litre of
  lung (a median would erase a nodule a few pixels wide);
* ``bilateral_share``, ``peripheral_share``, ``lower_zone_share``: of the opacity voxels,
  the share in the less affected lung ×2, within ``PERIPHERAL_MM`` of the lung surface,
  and in the lower half of the lung's height (0 without opacity).

Model: L2-regularised logistic regression fitted by Newton's method on standardised
:func:`model_inputs` (the fractions on a log scale, the densities as ``log1p``: a lesion
of 0.1 % of the lung differs from none as much as 10 % differs from 1 %). No randomness:
the same audit list gives the same model bytes. It shares its coefficients class with the
typicality classifier of ``train`` through :mod:`ctcurate.models.logistic` (pure numpy), so that
``select`` depends neither on torch nor on the training code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from ctcurate.imaging.lungmask import (
    bounding_box,
    lung_masks,
    median_in_plane,
    opening,
    within_reach,
)
from ctcurate.imaging.workgrid import WorkingVolume, working_volume
from ctcurate.models.logistic import StandardisedLogistic, fit_newton, predict_standardised
from ctcurate.models.metrics import dice

#: Names of the features, in the order of :func:`opacity_features`.
FEATURES: tuple[str, ...] = (
    "ggo_fraction",
    "consolidation_fraction",
    "blob_fraction",
    "border_fill_fraction",
    "deep_opacity_fraction",
    "posterior_basal_symmetry",
    "small_opacity_density",
    "nodule_density",
    "bilateral_share",
    "peripheral_share",
    "lower_zone_share",
)
#: Ground-glass density starts here (HU); consolidation at CONSOLIDATION_HU_MIN.
GGO_HU_MIN = -750.0
CONSOLIDATION_HU_MIN = -250.0
#: Small-opacity components are voxels at or above this density (HU) inside the lung.
NODULE_HU_MIN = -600.0
#: Radius (mm) of the ball a compact lesion must hold (vessels are thinner).
BLOB_RADIUS_MM = 7.0
#: Width (mm) of the in-plane median that quiets noise before the opacity thresholds.
MEDIAN_MM = 3.0
#: Radius (mm) of the in-plane disk that opens vessels away from the opacity; at least
#: OPENING_MIN_PX pixels.
OPENING_MM = 8.0
OPENING_MIN_PX = 2
#: Small components: SMALL_MIN_MM3 (and 2 voxels) .. SMALL_MAX_MM3; compact ones fit in
#: NODULE_MAX_MM; both counted only deeper than NODULE_MARGIN_MM inside the lung (not the
#: pleura's rim).
SMALL_MIN_MM3 = 16.0
SMALL_MAX_MM3 = 1500.0
NODULE_MAX_MM = 14.0
NODULE_MARGIN_MM = 6.0
#: Opacity deeper than this (mm) inside the robust lung mask is deep opacity.
DEEP_MM = 6.0
#: Fractions enter the model as log10(fraction + LOG_FRACTION_FLOOR).
LOG_FRACTION_FLOOR = 1e-3
#: Features the model takes on a log scale (fractions) and as log1p (densities per litre).
LOG_FEATURES = (
    "ggo_fraction",
    "consolidation_fraction",
    "blob_fraction",
    "border_fill_fraction",
    "deep_opacity_fraction",
)
LOG1P_FEATURES = ("small_opacity_density", "nodule_density")
#: Opacity within this distance (mm) of the lung surface is peripheral.
PERIPHERAL_MM = 15.0
#: Every model file says this (the version after the slash: how features become inputs).
MODEL_KIND = "pneumonia_logistic_regression/6"

FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- features


def _ball(radius_mm: float, spacing_mm: tuple[float, float, float]) -> npt.NDArray[np.bool_]:
    rz, ry, rx = (max(int(radius_mm / s), 0) for s in spacing_mm)
    ry, rx = max(ry, 1), max(rx, 1)
    z, y, x = np.mgrid[-rz : rz + 1, -ry : ry + 1, -rx : rx + 1]
    dz, dy, dx = spacing_mm
    return np.asarray(((z * dz) ** 2 + (y * dy) ** 2 + (x * dx) ** 2) <= radius_mm**2 + 1e-6)


def _disk(radius_mm: float, spacing_mm: tuple[float, float, float]) -> npt.NDArray[np.bool_]:
    """In-plane (1, y, x) elliptic disk of ``radius_mm``, at least OPENING_MIN_PX pixels."""
    ry, rx = (max(round(radius_mm / s), OPENING_MIN_PX) for s in spacing_mm[1:])
    y, x = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    return np.asarray(((y / ry) ** 2 + (x / rx) ** 2 <= 1.0 + 1e-9)[None])


def _median_size(spacing_mm: tuple[float, float, float]) -> tuple[int, int, int]:
    """Window (1, y, x) of an in-plane median about MEDIAN_MM wide (odd, ≥ 1)."""
    dy, dx = spacing_mm[1], spacing_mm[2]
    return (1, 2 * round(MEDIAN_MM / 2.0 / dy) + 1, 2 * round(MEDIAN_MM / 2.0 / dx) + 1)


def _share(part: int, whole: int) -> float:
    return float(part) / float(whole) if whole else 0.0


def opacity_features(
    hu: npt.NDArray[np.floating[Any]],
    spacing_mm: tuple[float, float, float],
    threshold_mask: npt.NDArray[np.bool_],
    lung: npt.NDArray[np.bool_],
) -> FloatArray:
    """The :data:`FEATURES` of one volume (z feet → head, y anterior → posterior, x).

    ``threshold_mask`` and ``lung`` are the plain and the robust lung masks of ``hu``.
    An empty lung gives all zeros.
    """
    img = np.asarray(hu, dtype=np.float32)
    lung = np.asarray(lung, dtype=bool)
    thr = np.asarray(threshold_mask, dtype=bool)
    n = int(lung.sum())
    if n == 0:
        return np.zeros(len(FEATURES), dtype=np.float64)
    # every feature is measured inside the lung (the threshold mask lies in the robust one):
    # the lung's bounding box gives the same numbers at a fraction of the cost
    box, shape = bounding_box(lung), img.shape
    img, lung, thr = img[box], lung[box], thr[box]
    size = _median_size(spacing_mm)
    smooth = median_in_plane(img, size)
    dense = lung & (smooth >= GGO_HU_MIN)
    opacity = opening(dense, _disk(OPENING_MM, spacing_mm))
    consolidation = opacity & (smooth >= CONSOLIDATION_HU_MIN)
    ggo = opacity & ~consolidation
    blob = opening(dense, _ball(BLOB_RADIUS_MM, spacing_mm))

    cols = np.arange(img.shape[2])
    in_lung_cols = lung.any(axis=(0, 1))
    midline = float(cols[in_lung_cols].mean()) if in_lung_cols.any() else img.shape[2] / 2.0
    left, right = cols < midline, cols >= midline

    # aerated lower-posterior lung per side
    z_has = np.flatnonzero(thr.any(axis=(1, 2)))
    if len(z_has):
        z_mid = int((z_has[0] + z_has[-1]) // 2)
        y_mid = int(np.argwhere(thr)[:, 1].mean())
        region = thr.copy()
        region[z_mid + 1 :] = False
        region[:, :y_mid] = False
        a, b = int(region[:, :, left].sum()), int(region[:, :, right].sum())
        symmetry = _share(min(a, b), max(a, b))
    else:
        symmetry = 0.0

    # isolated small dense components well inside the lung, on the unfiltered HU; depth is
    # the distance to the nearest voxel outside the lung (outside the box, unless the box
    # ends at the volume's edge: a lung cut by the scan's end has no surface there). Depth
    # is only compared with thresholds, so each comparison is made where a feature reads it
    # (lung voxels of the opacity or at NODULE_HU_MIN) by ``within_reach``, as a distance
    # transform of the padded box would answer it
    pads = [(int(b.start > 0), int(b.stop < full)) for b, full in zip(box, shape, strict=True)]
    outside = ~np.pad(lung, pads)
    needed = lung & ((img >= NODULE_HU_MIN) | opacity)
    at = np.nonzero(needed)
    at_padded = tuple(a + p[0] for a, p in zip(at, pads, strict=True))
    # per reach (the widest first), depth <= reach at the needed voxels
    shallow: dict[float, npt.NDArray[np.bool_]] = {}
    for reach in sorted({PERIPHERAL_MM, DEEP_MM, NODULE_MARGIN_MM}, reverse=True):
        near = np.zeros(len(at[0]), dtype=bool)
        wider = [shallow[r] for r in shallow if r > reach]  # within a wider reach
        ask = wider[-1] if wider else np.ones(len(at[0]), dtype=bool)
        near[ask] = within_reach(outside, reach, spacing_mm, tuple(a[ask] for a in at_padded))
        shallow[reach] = near

    def deeper(reach: float) -> npt.NDArray[np.bool_]:
        out = np.zeros(lung.shape, dtype=bool)
        out[at] = ~shallow[reach]
        return out

    def within(reach: float) -> npt.NDArray[np.bool_]:
        out = np.zeros(lung.shape, dtype=bool)
        out[at] = shallow[reach]
        return out

    labels, n_comp = ndimage.label(deeper(NODULE_MARGIN_MM) & (img >= NODULE_HU_MIN))
    small = nodules = 0
    voxel_mm3 = float(np.prod(spacing_mm))
    if n_comp:
        sizes = np.bincount(labels.ravel())[1:]
        for i, box in enumerate(ndimage.find_objects(labels)):
            mm3 = sizes[i] * voxel_mm3
            if box is None or not (sizes[i] >= 2 and SMALL_MIN_MM3 <= mm3 <= SMALL_MAX_MM3):
                continue
            small += 1
            extent = [(sl.stop - sl.start) * s for sl, s in zip(box, spacing_mm, strict=True)]
            if max(extent) <= NODULE_MAX_MM:
                nodules += 1

    n_opacity = int(opacity.sum())
    if n_opacity:
        a, b = int(opacity[:, :, left].sum()), int(opacity[:, :, right].sum())
        bilateral = 2.0 * _share(min(a, b), n_opacity)
        peripheral = _share(int((opacity & within(PERIPHERAL_MM)).sum()), n_opacity)
        z_lung = np.flatnonzero(lung.any(axis=(1, 2)))
        z_half = (z_lung[0] + z_lung[-1]) / 2.0
        lower = _share(int(opacity[: int(np.floor(z_half)) + 1].sum()), n_opacity)
    else:
        bilateral = peripheral = lower = 0.0

    litres = n * voxel_mm3 / 1e6
    values = (
        _share(int(ggo.sum()), n),
        _share(int(consolidation.sum()), n),
        _share(int(blob.sum()), n),
        _share(int((lung & ~thr).sum()), n),
        _share(int((opacity & deeper(DEEP_MM)).sum()), n),
        symmetry,
        small / litres,
        nodules / litres,
        bilateral,
        peripheral,
        lower,
    )
    return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------- model


def model_inputs(x: npt.ArrayLike) -> FloatArray:
    """Rows of :data:`FEATURES` as the model sees them: :data:`LOG_FEATURES` as
    log10(x + LOG_FRACTION_FLOOR), :data:`LOG1P_FEATURES` as log1p(x), the rest as is."""
    out = np.array(np.atleast_2d(np.asarray(x, dtype=np.float64)), dtype=np.float64)
    if out.shape[1] != len(FEATURES):
        msg = f"expected {len(FEATURES)} features, got {out.shape[1]}"
        raise ValueError(msg)
    logs = [FEATURES.index(f) for f in LOG_FEATURES]
    log1ps = [FEATURES.index(f) for f in LOG1P_FEATURES]
    out[:, logs] = np.log10(np.maximum(out[:, logs], 0.0) + LOG_FRACTION_FLOOR)
    out[:, log1ps] = np.log1p(np.maximum(out[:, log1ps], 0.0))
    return out


@dataclass(frozen=True)
class SelectorModel(StandardisedLogistic):
    """p(pneumonia) = σ(w·(x − mean)/scale + b); selected when p ≥ ``threshold``.

    ``working_spacing_mm`` is the working grid its features were measured on: features of
    another grid are other numbers (``select`` refuses the mismatch)."""

    threshold: float
    working_spacing_mm: float

    def predict_proba(self, x: npt.ArrayLike) -> FloatArray:
        """Pneumonia probability for rows of ``x`` (features in :attr:`features` order)."""
        return predict_standardised(model_inputs(x), self.mean, self.scale, self.weights, self.bias)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the model file)."""
        return {
            "kind": MODEL_KIND,
            **self.coefficients_json(),
            "threshold": self.threshold,
            "working_spacing_mm": self.working_spacing_mm,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SelectorModel:
        """Inverse of :meth:`to_json`; ``ValueError`` naming what is wrong."""
        if data.get("kind") != MODEL_KIND:
            msg = f"not a pneumonia selector model (kind is not {MODEL_KIND!r})"
            raise ValueError(msg)
        try:
            model = cls(
                **cls.fields_of_json(data),
                threshold=float(data["threshold"]),
                working_spacing_mm=float(data["working_spacing_mm"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"not a pneumonia selector model: bad or missing {exc}"
            raise ValueError(msg) from exc
        if model.features != FEATURES:
            msg = "selector model features differ from this version's features"
            raise ValueError(msg)
        if not model.lengths_match(len(FEATURES)):
            msg = "not a pneumonia selector model: feature vectors of different lengths"
            raise ValueError(msg)
        return model


def fit_selector(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    l2: float,
    threshold: float,
    working_spacing_mm: float = 2.0,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> SelectorModel:
    """Fit the L2-regularised logistic regression by Newton's method (deterministic).

    Features become :func:`model_inputs`, standardised with the fit set's mean and standard
    deviation (a constant one keeps scale 1); the penalty ``l2/2·|w|²`` spares the bias.
    With one class only the model is the smoothed prior: zero weights and bias
    ``log((n1 + 1) / (n0 + 1))``.
    """
    ya = np.asarray(y, dtype=np.float64).ravel()
    xa = np.asarray(x, dtype=np.float64).reshape(len(ya), len(FEATURES))
    if not np.isin(ya, (0.0, 1.0)).all():
        msg = "fit_selector: labels must be 0 or 1"
        raise ValueError(msg)
    if not np.isfinite(xa).all():
        msg = "fit_selector: features must be finite"
        raise ValueError(msg)
    fit = fit_newton(model_inputs(xa), ya, l2, max_iter=max_iter, tol=tol)
    return SelectorModel(
        **SelectorModel.fields_of_fit(fit, FEATURES, l2),
        threshold=float(threshold),
        working_spacing_mm=float(working_spacing_mm),
    )


def model_bytes(model: SelectorModel) -> bytes:
    """The model file's bytes: canonical JSON (sorted keys, 2-space indent, newline)."""
    return (json.dumps(model.to_json(), sort_keys=True, indent=2) + "\n").encode()


def model_version(data: bytes) -> str:
    """A model's version: ``sha256:`` + the first 16 hex digits of its file's sha256."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def read_model(path: Path) -> tuple[SelectorModel, str]:
    """(model, version) of a model file; ``ValueError`` naming the file when unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        msg = f"{path}: model file unreadable ({exc.__class__.__name__})"
        raise ValueError(msg) from exc
    try:
        model = SelectorModel.from_json(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        msg = f"{path}: not a JSON model file"
        raise ValueError(msg) from exc
    except ValueError as exc:
        msg = f"{path}: {exc}"
        raise ValueError(msg) from exc
    return model, model_version(data)


# --------------------------------------------------------------------------- worker task


@dataclass(frozen=True)
class ScoreTask:
    """What a worker needs to score one series (picklable)."""

    site: str
    series_instance_uid: str
    paths: tuple[str, ...]  # absolute instance paths
    seg_path: str | None  # the series' DICOM SEG, for the lung-mask audit
    _: KW_ONLY  # the rest by name: two floats side by side are easily swapped
    min_lung_ml: float = 0.0  # a smaller robust lung mask is `no_lung` (unknown body region)
    working_spacing_mm: float = 2.0  # the working grid (select.working_spacing_mm)


@dataclass(frozen=True)
class ScoreResult:
    """Features of one series, or the reason there are none; lung-mask Dice when audited."""

    site: str
    series_instance_uid: str
    features: tuple[float, ...] | None
    error: str | None
    dice_threshold: float | None = None
    dice_robust: float | None = None
    consolidation_kept_threshold: float | None = None
    consolidation_kept_robust: float | None = None


def _mask_audit(
    seg_path: str, volume: WorkingVolume, thr: npt.NDArray[np.bool_], robust: npt.NDArray[np.bool_]
) -> dict[str, float | None]:
    """Dice of both masks against the SEG lung (labels > 0, brought onto the working grid by
    nearest neighbour), on consolidated series only."""
    from ctcurate.dicom.seg import read_seg_labels
    from ctcurate.errors import InputError

    try:
        source = read_seg_labels(Path(seg_path), list(volume.source_uids))
        labels = volume.labels_onto(source)
    except (InputError, ValueError):
        return {}
    consolidated = labels == 3
    if not consolidated.any():
        return {}
    truth = labels > 0
    return {
        "dice_threshold": dice(thr, truth),
        "dice_robust": dice(robust, truth),
        "consolidation_kept_threshold": float(thr[consolidated].mean()),
        "consolidation_kept_robust": float(robust[consolidated].mean()),
    }


def lung_volume_ml(mask: npt.NDArray[np.bool_], spacing_mm: tuple[float, float, float]) -> float:
    """Volume of a (z, y, x) mask in millilitres."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing_mm)) / 1000.0


class _UnreadableError(Exception):
    """An instance of the series could not be read as DICOM."""


def _read_each(paths: Sequence[str]) -> Iterator[Any]:
    """``dcmread`` of each path in turn (one instance's pixels in memory at a time)."""
    from pydicom.errors import InvalidDicomError

    from ctcurate.dicom import archive_file

    for path in paths:
        try:  # never a FIFO, device or symlink; gzip-compressed instances decompressed
            ds = archive_file.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
            raise _UnreadableError from exc
        yield ds


def score_series(task: ScoreTask) -> ScoreResult:
    """Read one series onto the working grid and measure its features (runs in a worker).

    Never raises for a bad series: the result's ``error`` names the reason
    (``unreadable``, ``pixel_data``, ``geometry``, ``no_lung``: an empty robust lung mask,
    or one smaller than ``task.min_lung_ml``).
    """
    from ctcurate.imaging.volume import PIXEL_ERRORS, ExcludedSeries

    def failed(reason: str) -> ScoreResult:
        return ScoreResult(task.site, task.series_instance_uid, None, reason)

    try:
        volume = working_volume(_read_each(task.paths), task.working_spacing_mm)
    except _UnreadableError:
        return failed("unreadable")
    except ExcludedSeries as exc:
        return failed("pixel_data" if exc.reason == "pixel_data" else "geometry")
    except PIXEL_ERRORS:
        return failed("pixel_data")
    thr, robust = lung_masks(volume.hu, volume.spacing_mm)
    if not robust.any() or lung_volume_ml(robust, volume.spacing_mm) < task.min_lung_ml:
        return failed("no_lung")
    features = opacity_features(volume.hu, volume.spacing_mm, thr, robust)
    audit = _mask_audit(task.seg_path, volume, thr, robust) if task.seg_path else {}
    return ScoreResult(
        task.site,
        task.series_instance_uid,
        tuple(float(v) for v in features),
        None,
        dice_threshold=audit.get("dice_threshold"),
        dice_robust=audit.get("dice_robust"),
        consolidation_kept_threshold=audit.get("consolidation_kept_threshold"),
        consolidation_kept_robust=audit.get("consolidation_kept_robust"),
    )


def score_all(
    tasks: Sequence[ScoreTask],
    workers: int,
    scheduler: str | None = None,
    logger: logging.Logger | None = None,
) -> list[ScoreResult]:
    """:func:`score_series` over ``tasks``, results in task order, on the executor ``index``
    uses (:mod:`ctcurate.executor`): this process when ``workers`` is 1, a local process pool,
    or the Dask cluster at ``scheduler``. With ``logger``, progress is shown on it."""
    from ctcurate.executor import map_ordered

    return map_ordered(
        score_series,
        tasks,
        workers=workers,
        scheduler=scheduler,
        progress_to=None if logger is None else (logger, "score", "series"),
        on_died=died_series,
    )


def died_series(task: ScoreTask) -> ScoreResult:
    """The result of a series whose worker process died (OOM kill, crash): ``worker_died``."""
    return ScoreResult(task.site, task.series_instance_uid, None, "worker_died")
