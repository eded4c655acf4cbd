"""The models of train / evaluate: the segmentation network, its I/O contract and the
typicality classifier on segmentation features.

Segmentation I/O contract (saved in ``models/model.json``):

- input: one channel float32 (B, 1, z, y, x) in the release's axis order and spacing, made
  from Hounsfield units by :func:`normalise_hu`: clip to :data:`HU_WINDOW` then scale to
  [0, 1] (``(hu - lo) / (hi - lo)``);
- output: logits (B, 4, z, y, x) over the labels of the release (0 background, 1 normal
  lung, 2 ground-glass opacity, 3 consolidation); the lung is ``argmax > 0``.

Typicality: seven features measured on a label volume (:data:`FEATURES`, see
:func:`typicality_features`), standardised and fed to an L2-regularised logistic
regression fitted by Newton's method (:func:`fit_logistic`): no randomness, so the same
features give the same model, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from ctcurate.labels import BACKGROUND, CONSOLIDATION, GGO, N_CLASSES, NORMAL
from ctcurate.models.logistic import StandardisedLogistic, fit_newton, predict_standardised

#: Hounsfield window of the network input: clipped, then scaled to [0, 1].
HU_WINDOW: tuple[float, float] = (-1024.0, 600.0)
#: Names of the typicality features, in the order of :func:`typicality_features`.
FEATURES: tuple[str, ...] = (
    "lesion_fraction",
    "ggo_share",
    "consolidation_fraction",
    "bilateral_share",
    "peripheral_share",
    "lower_zone_share",
    "log_lesion_ml",
)
#: Relative depth inside a lung (0 at its surface, 1 at its deepest voxel) below which a
#: lesion voxel counts as peripheral.
PERIPHERAL_DEPTH = 0.5


def normalise_hu(image: torch.Tensor) -> torch.Tensor:
    """Network input from HU: clip to :data:`HU_WINDOW`, scale to [0, 1]."""
    lo, hi = HU_WINDOW
    return (image.clamp(lo, hi) - lo) / (hi - lo)


def unet_config(channels: Sequence[int], num_res_units: int) -> dict[str, Any]:
    """Constructor arguments of the MONAI 3-D U-Net (saved in ``model.json``)."""
    if len(channels) < 2:
        msg = f"channels needs at least two levels, got {list(channels)}"
        raise ValueError(msg)
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": N_CLASSES,
        "channels": [int(c) for c in channels],
        "strides": [2] * (len(channels) - 1),
        "num_res_units": int(num_res_units),
    }


def build_unet(config: Mapping[str, Any]) -> torch.nn.Module:
    """The segmentation network from :func:`unet_config` arguments."""
    from monai.networks.nets.unet import UNet

    net: torch.nn.Module = UNet(**dict(config))
    return net


def shape_multiple(config: Mapping[str, Any]) -> int:
    """Every input side must be a multiple of this (the product of the strides)."""
    return int(np.prod(config["strides"]))


@torch.no_grad()
def predict_labels(
    net: torch.nn.Module,
    image_hu: torch.Tensor,
    roi: Sequence[int],
    device: torch.device,
    amp: bool = False,
) -> npt.NDArray[np.uint8]:
    """Label volumes (B, z, y, x) predicted for HU images (B, 1, z, y, x).

    An image of the training shape ``roi`` is inferred whole; another shape by a sliding
    window of ``roi`` (overlap 0.25, Gaussian blending).
    """
    from monai.inferers.utils import sliding_window_inference

    net.eval()
    x = normalise_hu(image_hu.to(device=device, dtype=torch.float32))
    with torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
        if tuple(x.shape[2:]) == tuple(roi):
            logits = net(x)
        else:
            logits = sliding_window_inference(
                x,
                roi_size=tuple(roi),
                sw_batch_size=1,
                predictor=net,
                overlap=0.25,
                mode="gaussian",
            )
    labels = torch.argmax(logits.float(), dim=1)
    return labels.to(device="cpu", dtype=torch.uint8).numpy()


def remove_small_lesions(
    label: npt.NDArray[np.integer[Any]],
    min_mm3: float,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> npt.NDArray[np.uint8]:
    """``label`` with every lesion component smaller than ``min_mm3`` relabelled normal lung.

    A lesion component is a 26-connected region of GGO or consolidation voxels; its
    volume is its voxel count times the voxel volume of ``spacing_mm`` (z, y, x). The
    lung (label > 0) is unchanged: a dropped lesion stays lung. ``min_mm3 <= 0`` returns
    an unchanged copy.
    """
    lab = np.asarray(label).astype(np.uint8, copy=True)
    if min_mm3 <= 0:
        return lab
    lesion = lab >= GGO
    components, n = ndimage.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return lab
    voxel_mm3 = float(np.prod(np.asarray(spacing_mm, dtype=np.float64)))
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:] * voxel_mm3
    small = np.flatnonzero(sizes < min_mm3) + 1
    if small.size:
        lab[np.isin(components, small)] = NORMAL
    return lab


def drop_detached_lesions(label: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.uint8]:
    """``label`` without the lesion components that touch no normal lung.

    A lesion component (26-connected GGO and consolidation) none of whose voxels has a
    normal-lung voxel among its 26 neighbours lies in the chest wall, the mediastinum or
    below the diaphragm, not in a lung: it becomes background. Pneumonia, even a lobe
    consolidated to the pleura, borders aerated lung somewhere. No lesion or no normal lung
    returns an unchanged copy.
    """
    lab = np.asarray(label).astype(np.uint8, copy=True)
    lesion = lab >= GGO
    normal = lab == NORMAL
    if not lesion.any() or not normal.any():
        return lab
    box = np.ones((3, 3, 3), dtype=bool)
    components, n = ndimage.label(lesion, structure=box)
    touching = np.unique(components[ndimage.binary_dilation(normal, structure=box) & lesion])
    detached = np.setdiff1d(np.arange(1, n + 1), touching)
    if detached.size:
        lab[np.isin(components, detached)] = BACKGROUND
    return lab


#: Where the post-processed lung comes from: the network's labels, or the HU lung mask
#: with the network's lesions (:func:`lung_from_hu`).
LUNG_SOURCES = ("network", "hu")
#: A piece of the network's lung (an in-plane connected region of one slice) of which the
#: HU lung mask holds less than this share, and at least this share lies on air that
#: reaches the volume's side, stays the network's: there the release grid cuts the chest
#: at its sides, and the HU mask takes a lung that reaches the grid's edge for air outside
#: the body.
HU_LUNG_MIN_SHARE = 0.5


def lung_from_hu(
    label: npt.NDArray[np.integer[Any]], image_hu: npt.NDArray[np.floating[Any]]
) -> npt.NDArray[np.uint8]:
    """``label`` with its lung outline taken from HU, its lesions kept where they touch it.

    The normal lung becomes the plain threshold lung mask of ``image_hu``
    (:func:`ctcurate.imaging.lungmask.threshold_lung_mask`: aerated voxels inside the body,
    vessels filled); every GGO and consolidation voxel of ``label`` stays as it is, so
    consolidation the threshold mask loses at the pleura is still lung, except a lesion
    component that touches no normal lung at all (:func:`drop_detached_lesions`: one in the
    chest wall or the mediastinum). A piece of the
    network's lung (in-plane connected, one slice) of which the mask holds less than
    :data:`HU_LUNG_MIN_SHARE`, while as much of it lies on air reaching the volume's side
    (a lung the grid cuts open), stays the network's. Same shape, (z, y, x).
    """
    from ctcurate.imaging.lungmask import air_at_side, label_in_plane, threshold_lung_mask

    lab = np.asarray(label).astype(np.uint8)
    hu = np.asarray(image_hu, dtype=np.float32)
    hu_lung = threshold_lung_mask(hu)
    pieces, n = label_in_plane(lab > 0)
    size = np.bincount(pieces.ravel(), minlength=n + 1)
    held = np.bincount(pieces[hu_lung], minlength=n + 1)
    side_air = np.bincount(pieces[air_at_side(hu)], minlength=n + 1)
    lost = (held < HU_LUNG_MIN_SHARE * size) & (side_air >= HU_LUNG_MIN_SHARE * size)
    lost[0] = False
    return drop_detached_lesions(_lesions_over_lung(lab, hu_lung | lost[pieces]))


def _lesions_over_lung(
    label: npt.NDArray[np.uint8], lung: npt.NDArray[np.bool_]
) -> npt.NDArray[np.uint8]:
    """``label``'s GGO and consolidation as they are, normal lung where ``lung``, else 0."""
    out: npt.NDArray[np.uint8] = np.where(label >= GGO, label, np.where(lung, NORMAL, 0)).astype(
        np.uint8
    )
    return out


def lung_outline_in_plane(
    label: npt.NDArray[np.integer[Any]],
    image_hu: npt.NDArray[np.floating[Any]],
    covered: npt.NDArray[np.bool_],
) -> npt.NDArray[np.uint8]:
    """``label`` (brought from a coarser grid onto ``image_hu``'s voxels) with its lung
    outline redrawn from HU, slice by slice, at ``image_hu``'s resolution; lesions kept.

    Each slice's air-like components (``< LUNG_HU_MAX``, 4-connected) of which
    :data:`HU_LUNG_MIN_SHARE` or more of the part in ``covered`` is ``label``'s lung are
    lung, their holes (vessels) filled; air outside the body is not (the label's lung is a
    sliver of it). Where the label's lung lies on air reaching the slice's side (a lung
    the field of view cuts open) it stays as it is. Voxels outside ``covered`` are 0. Every
    step is within one slice, so a caller may hand over any run of slices at a time.
    """
    from ctcurate.imaging.lungmask import (
        LUNG_HU_MAX,
        fill_slices,
        label_in_plane,
        reaching_side,
    )

    lab = np.asarray(label).astype(np.uint8)
    cover = np.asarray(covered, dtype=bool)
    air, n = label_in_plane(np.asarray(image_hu) < LUNG_HU_MAX)
    size = np.bincount(air[cover], minlength=n + 1)
    held = np.bincount(air[cover & (lab > 0)], minlength=n + 1)
    keep = held >= HU_LUNG_MIN_SHARE * size
    keep[0] = False
    side = reaching_side(air, n)
    lung = fill_slices(keep[air]) | ((lab > 0) & side[air])
    out: npt.NDArray[np.uint8] = np.where(cover, _lesions_over_lung(lab, lung), 0).astype(np.uint8)
    return out


#: Normal lung at least this dense (HU: ground glass and denser) within the chosen reach of
#: a predicted lesion joins it (:func:`grow_lesions`); chosen on val lesion Dice of the
#: demo and two large models (-850..-600 HU tried, docs/models.md).
GROW_HU_MIN = -750.0
#: A grown voxel this dense (HU) or denser is consolidation, a lighter one ground glass.
GROW_CONSOLIDATION_HU_MIN = -300.0


def grow_lesions(
    label: npt.NDArray[np.integer[Any]],
    image_hu: npt.NDArray[np.floating[Any]],
    spacing_mm: Sequence[float],
    reach_mm: float,
) -> npt.NDArray[np.uint8]:
    """``label`` with the normal lung next to its lesions taken into them where it is dense.

    A normal-lung voxel within ``reach_mm`` (Euclidean, in mm of ``spacing_mm``, z, y, x)
    of a GGO or consolidation voxel, at :data:`GROW_HU_MIN` or denser, becomes
    consolidation from :data:`GROW_CONSOLIDATION_HU_MIN` and GGO below it: the network's
    lesions are drawn too small on another scanner's CT, and the density around them says
    how far they reach. ``reach_mm <= 0`` or no lesion returns an unchanged copy.
    """
    return _by_density_near_lesions(label, image_hu, spacing_mm, reach_mm, lesions_too=False)


def _by_density_near_lesions(
    label: npt.NDArray[np.integer[Any]],
    image_hu: npt.NDArray[np.floating[Any]],
    spacing_mm: Sequence[float],
    reach_mm: float,
    lesions_too: bool,
) -> npt.NDArray[np.uint8]:
    """The rule of :func:`grow_lesions` and :func:`redraw_lesions`: within ``reach_mm`` of
    the lesions, normal lung (with ``lesions_too`` the lesions as well) at
    :data:`GROW_HU_MIN` or denser becomes consolidation from
    :data:`GROW_CONSOLIDATION_HU_MIN` and ground glass below it, lighter lung normal. The
    distance is taken only in the lesions' bounding box grown by the reach, since nothing
    farther can be within it."""
    lab = np.asarray(label).astype(np.uint8, copy=True)
    lesion = lab >= GGO
    if reach_mm <= 0 or not lesion.any():
        return lab
    spacing = np.asarray([float(v) for v in spacing_mm], dtype=np.float64)
    pad = np.ceil(reach_mm / spacing).astype(np.int64) + 1
    where = np.argwhere(lesion)
    lo = np.maximum(where.min(axis=0) - pad, 0)
    hi = np.minimum(where.max(axis=0) + pad + 1, lab.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    sub = lab[box]  # a view: writing it writes lab
    hu = np.asarray(image_hu)[box]
    near = ndimage.distance_transform_edt(~lesion[box], sampling=spacing) <= reach_mm
    near &= (sub >= NORMAL) if lesions_too else (sub == NORMAL)
    dense = hu >= GROW_HU_MIN
    sub[near & ~dense] = NORMAL
    drawn = near & dense
    sub[drawn] = np.where(hu[drawn] >= GROW_CONSOLIDATION_HU_MIN, CONSOLIDATION, GGO)
    return lab


def redraw_lesions(
    label: npt.NDArray[np.integer[Any]],
    image_hu: npt.NDArray[np.floating[Any]],
    spacing_mm: Sequence[float],
    reach_mm: float,
) -> npt.NDArray[np.uint8]:
    """``label`` with its lesions drawn again from HU within ``reach_mm`` of them.

    For labels brought from the network's coarser grid onto a series' own voxels
    (``predict``'s SEG): in the lung (label 1–3) within ``reach_mm`` (Euclidean, in mm of
    ``spacing_mm``, z, y, x) of a GGO or consolidation voxel, a voxel at :data:`GROW_HU_MIN`
    or denser is lesion (consolidation from :data:`GROW_CONSOLIDATION_HU_MIN`, ground glass
    below it) and a lighter one normal lung, so the lesions' borders follow the series'
    pixels instead of the grid's steps. The same rule and reach as :func:`grow_lesions`, which
    only adds. Lung away from the lesions and everything outside the lung are unchanged;
    ``reach_mm <= 0`` or no lesion returns an unchanged copy.
    """
    return _by_density_near_lesions(label, image_hu, spacing_mm, reach_mm, lesions_too=True)


def postprocess_label(
    label: npt.NDArray[np.integer[Any]],
    image_hu: npt.NDArray[np.floating[Any]],
    spacing_mm: Sequence[float],
    min_lesion_mm3: float,
    lung_from: str,
    grow_mm: float = 0.0,
) -> npt.NDArray[np.uint8]:
    """The network's label volume as ``evaluate``, ``predict`` and the typicality fit see it:
    lesions below ``min_lesion_mm3`` become normal lung (:func:`remove_small_lesions`), then
    with ``lung_from`` ``"hu"`` the lung outline comes from HU (:func:`lung_from_hu`), then
    the lesions grow by up to ``grow_mm`` into dense lung (:func:`grow_lesions`)."""
    if lung_from not in LUNG_SOURCES:
        msg = f"unknown lung source {lung_from!r} (expected one of {', '.join(LUNG_SOURCES)})"
        raise ValueError(msg)
    lab = remove_small_lesions(label, min_lesion_mm3, spacing_mm)
    if lung_from == "hu":
        lab = lung_from_hu(lab, image_hu)
    return grow_lesions(lab, image_hu, spacing_mm, grow_mm)


def typicality_features(
    label: npt.NDArray[np.integer[Any]], spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)
) -> npt.NDArray[np.float64]:
    """The :data:`FEATURES` of one (z, y, x) label volume.

    - ``lesion_fraction``: GGO + consolidation voxels / lung voxels;
    - ``ggo_share``: GGO / lesion voxels;
    - ``consolidation_fraction``: consolidation / lung voxels;
    - ``bilateral_share``: lesion voxels on the less involved side / all lesion voxels (0 to
      0.5; sides split at the middle of the lung's x extent);
    - ``peripheral_share``: lesion voxels at relative depth < :data:`PERIPHERAL_DEPTH` in
      their lung / lesion voxels (depth = distance to the lung surface in mm, divided by
      the deepest distance on that side);
    - ``lower_zone_share``: lesion voxels in the inferior half of the lung's z extent /
      lesion voxels;
    - ``log_lesion_ml``: ``log1p`` of the lesion volume in mL.

    Shares are 0 without lesion; every feature is 0 without lung.
    """
    lab = np.asarray(label)
    if lab.ndim != 3:
        msg = f"typicality_features: expected a (z, y, x) volume, got shape {lab.shape}"
        raise ValueError(msg)
    lung = lab > 0
    n_lung = int(lung.sum())
    out = np.zeros(len(FEATURES), dtype=np.float64)
    if n_lung == 0:
        return out
    lesion = lab >= GGO
    n_lesion = int(lesion.sum())
    n_cons = int((lab == CONSOLIDATION).sum())
    out[0] = n_lesion / n_lung
    out[2] = n_cons / n_lung
    if n_lesion == 0:
        return out
    out[1] = int((lab == GGO).sum()) / n_lesion
    xs = np.nonzero(lung.any(axis=(0, 1)))[0]
    mid = (int(xs[0]) + int(xs[-1]) + 1) / 2.0
    side = np.arange(lab.shape[2])[None, None, :] >= mid
    right = int((lesion & ~side).sum())
    out[3] = min(right, n_lesion - right) / n_lesion
    depth = np.zeros(lab.shape, dtype=np.float64)
    for half in (~side, side):
        part = lung & half
        if not part.any():
            continue
        dist = ndimage.distance_transform_edt(part, sampling=tuple(spacing_mm))
        depth[part] = dist[part] / float(dist.max())
    out[4] = int((lesion & (depth < PERIPHERAL_DEPTH)).sum()) / n_lesion
    zs = np.nonzero(lung.any(axis=(1, 2)))[0]
    z_mid = (int(zs[0]) + int(zs[-1]) + 1) / 2.0
    lower = np.arange(lab.shape[0])[:, None, None] < z_mid
    out[5] = int((lesion & lower).sum()) / n_lesion
    voxel_ml = float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0
    out[6] = float(np.log1p(n_lesion * voxel_ml))
    return out


@dataclass(frozen=True)
class LogisticModel(StandardisedLogistic):
    """Logistic regression on standardised features: p = σ(w·(x − mean)/scale + b)."""

    def predict_proba(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Probability of the positive class (typical) for rows of ``x``."""
        return predict_standardised(x, self.mean, self.scale, self.weights, self.bias)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (``classifier.json``)."""
        return {"kind": "logistic_regression", **self.coefficients_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LogisticModel:
        """Inverse of :meth:`to_json`; ``ValueError`` on a malformed mapping."""
        try:
            model = cls(**cls.fields_of_json(data))
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"not a logistic regression model: {exc}"
            raise ValueError(msg) from exc
        if data.get("kind") != "logistic_regression" or not model.lengths_match(
            len(model.features)
        ):
            msg = "not a logistic regression model: kind or lengths do not match"
            raise ValueError(msg)
        return model


def balanced_weights(y: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Sample weights giving each class present half the total weight (``n / (2 n_c)``).

    With one class only every weight is 1.
    """
    ya = np.asarray(y, dtype=np.int64)
    n = ya.size
    n1 = int((ya == 1).sum())
    if n1 in (0, n):
        return np.ones(n, dtype=np.float64)
    return np.where(ya == 1, n / (2.0 * n1), n / (2.0 * (n - n1)))


def fit_logistic(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    features: Sequence[str] = FEATURES,
    l2: float = 1.0,
    sample_weight: npt.NDArray[np.float64] | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> LogisticModel:
    """Fit an L2-regularised logistic regression by Newton's method (deterministic).

    Features are standardised with the fit set's mean and standard deviation (a constant
    feature keeps scale 1); the penalty ``l2/2·|w|²`` spares the bias; ``sample_weight``
    (e.g. :func:`balanced_weights`) weighs each case's log-loss. Without both classes the
    model is the smoothed prior: zero weights and bias ``log((n1 + 1) / (n0 + 1))``.
    """
    xa = np.asarray(x, dtype=np.float64).reshape(len(y), len(features))
    ya = np.asarray(y, dtype=np.float64)
    if not np.isin(ya, (0.0, 1.0)).all():
        msg = "fit_logistic: labels must be 0 or 1"
        raise ValueError(msg)
    n = xa.shape[0]
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if sw.shape != (n,) or not (np.isfinite(sw).all() and (sw > 0).all()):
        msg = f"fit_logistic: sample_weight must be {n} positive finite values"
        raise ValueError(msg)
    fit = fit_newton(xa, ya, l2, sample_weight=sw, max_iter=max_iter, tol=tol)
    return LogisticModel(**LogisticModel.fields_of_fit(fit, features, l2))
