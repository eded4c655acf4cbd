"""Training-time augmentation of the segmentation network: seeded MONAI dict transforms.

Samples are the release's dicts (``image`` float32 HU (1, z, y, x), ``label`` int64
(1, z, y, x)). :func:`train_transform` returns a MONAI ``Compose`` that

1. crops a random patch (:class:`RandLesionCropd`): with probability ``lesion_fraction``
   centred on a random lesion voxel (GGO or consolidation) of the case, otherwise at a
   uniformly random position, so the small lesion classes are seen far more often than
   their share of the voxels (about 1 %) would give;
2. flips left-right with probability 0.5 (``RandFlipd`` on the x axis; the lungs are
   mirror images closely enough, and the typicality features are symmetric in the sides);
3. with ``train.augment`` (:class:`ctcurate.params.AugmentParams`), each with its own
   probability: a random scale / rotation about the patch centre, sampled from the whole
   volume together with the crop (:class:`RandAffineCropd`; labels nearest, image linear),
   then on the image only: the lesions rendered again, fainter or denser, with a soft
   margin and a texture (:class:`RandLesionLookd`, which reads the labels to find them),
   and in the order a scanner applies them: HU scale and offset
   (:class:`RandHuIntensityd`), white noise (:class:`RandCtNoised`), a reconstruction
   kernel, Gaussian blur or unsharp-mask sharpening, which colours that noise
   (:class:`RandKerneld`), and a coarser resolution, resampled down and up again
   (:class:`RandResolutiond`); the labels stay the anatomy's;
4. returns plain tensors of ``image`` and ``label`` only (the meta dict does not collate).

Every random draw goes through the transforms' own ``numpy.random.RandomState``, seeded by
``Compose.set_random_state``: the same seed gives the same patches and flips, whatever the
global generators do. In DataLoader worker processes MONAI's ``worker_init_fn`` reseeds
each worker from the loader's generator.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.transforms.compose import Compose
from monai.transforms.spatial.dictionary import RandFlipd
from monai.transforms.transform import MapTransform, Randomizable

from ctcurate.labels import GGO
from ctcurate.models.augment_ops import (
    RandCtNoised,
    RandHuIntensityd,
    RandKerneld,
    RandLesionLookd,
    RandResolutiond,
)
from ctcurate.params import AugmentParams

KEYS = ("image", "label")
#: No augmentation beyond the crop and the flip (every probability 0).
NO_AUGMENT = AugmentParams().model_copy(
    update={name: 0.0 for name in AugmentParams.model_fields if name.endswith("_prob")}
)
#: Probability of a left-right flip.
FLIP_PROB = 0.5


def patch_start(
    shape: Sequence[int], patch: Sequence[int], centre: Sequence[int]
) -> tuple[int, ...]:
    """Start corner of a ``patch`` centred on ``centre``, shifted to lie inside ``shape``."""
    if len(shape) != len(patch) or len(centre) != len(shape):
        msg = f"patch_start: dimensions differ ({list(shape)}, {list(patch)}, {list(centre)})"
        raise ValueError(msg)
    if any(p > s for p, s in zip(patch, shape, strict=True)):
        msg = f"patch {list(patch)} is larger than the volume {list(shape)}"
        raise ValueError(msg)
    return tuple(
        min(max(int(c) - p // 2, 0), s - p) for s, p, c in zip(shape, patch, centre, strict=True)
    )


class RandLesionCropd(Randomizable, MapTransform):
    """Crop ``keys`` to a random ``patch``, centred on a lesion voxel with a given probability.

    The lesion is ``label >= GGO`` of the ``label_key`` volume (channel first). A case
    without lesion, or a draw above ``lesion_fraction``, gets a uniformly random patch.
    """

    def __init__(
        self,
        keys: Sequence[Hashable],
        patch: Sequence[int],
        lesion_fraction: float,
        label_key: str = "label",
    ) -> None:
        MapTransform.__init__(self, keys)
        if not 0.0 <= lesion_fraction <= 1.0:
            msg = f"lesion_fraction must be within 0..1, got {lesion_fraction}"
            raise ValueError(msg)
        self.patch = tuple(int(p) for p in patch)
        self.lesion_fraction = float(lesion_fraction)
        self.label_key = label_key
        self._start: tuple[int, ...] = ()

    def randomize(self, data: Any = None) -> None:
        """Draw the patch's start corner for the label volume ``data`` (z, y, x)."""
        label = np.asarray(data)
        shape = label.shape
        lesion = np.flatnonzero(label >= GGO)
        if lesion.size and self.R.random_sample() < self.lesion_fraction:
            flat = int(lesion[self.R.randint(lesion.size)])
            centre = tuple(int(v) for v in np.unravel_index(flat, shape))
        else:
            centre = tuple(int(self.R.randint(s)) for s in shape)
        self._start = patch_start(shape, self.patch, centre)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        self.randomize(label[0].numpy() if isinstance(label, torch.Tensor) else label[0])
        region = tuple(slice(b, b + p) for b, p in zip(self._start, self.patch, strict=True))
        for key in self.key_iterator(d):
            d[key] = d[key][(slice(None), *region)]
        return d


class RandAffineCropd(RandLesionCropd):
    """:class:`RandLesionCropd` with, with probability ``prob``, a random affine of the patch.

    The patch is sampled from the whole volume around its centre through ``rotation @
    diag(1 / scale)``: a scale per axis drawn from ``scale`` (above 1 the anatomy looks
    larger), rotations drawn within +-``rotate_deg[0]`` degrees in the axial plane and
    +-``rotate_deg[1]`` about the two in-plane axes. The image is sampled trilinearly, the
    labels by nearest neighbour, on the same grid, both repeating the volume's border
    outside it; without the affine the crop is the plain slice of the parent class.
    ``patch=None`` transforms the whole volume.
    """

    def __init__(
        self,
        keys: Sequence[Hashable],
        patch: Sequence[int] | None,
        lesion_fraction: float,
        prob: float,
        scale: tuple[float, float],
        rotate_deg: tuple[float, float],
        label_key: str = "label",
    ) -> None:
        super().__init__(keys, patch if patch is not None else (), lesion_fraction, label_key)
        self.whole = patch is None
        self.prob = float(prob)
        self.scale = (float(scale[0]), float(scale[1]))
        self.rotate_deg = (float(rotate_deg[0]), float(rotate_deg[1]))
        self._matrix: npt.NDArray[np.float64] | None = None

    def randomize(self, data: Any = None) -> None:
        """Draw the patch start, then whether and which affine (a fixed number of draws)."""
        if self.whole:
            self.patch = tuple(int(s) for s in np.asarray(data).shape)
        super().randomize(data)
        apply = self.R.random_sample() < self.prob
        scales = self.R.uniform(self.scale[0], self.scale[1], size=3)
        limits = np.radians([self.rotate_deg[0], self.rotate_deg[1], self.rotate_deg[1]])
        angles = self.R.uniform(-1.0, 1.0, size=3) * limits
        self._matrix = rotation_zyx(*angles) @ np.diag(1.0 / scales) if apply else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        self.randomize(label[0].numpy() if isinstance(label, torch.Tensor) else label[0])
        if self._matrix is None:
            region = tuple(slice(b, b + p) for b, p in zip(self._start, self.patch, strict=True))
            for key in self.key_iterator(d):
                d[key] = d[key][(slice(None), *region)]
            return d
        shape = tuple(int(s) for s in np.asarray(label).shape[1:])
        centre = np.asarray(self._start, dtype=np.float64) + (np.asarray(self.patch) - 1) / 2
        grid = affine_grid(shape, self.patch, centre, self._matrix)
        for key in self.key_iterator(d):
            value = d[key]
            tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            is_label = key == self.label_key
            sampled = torch.nn.functional.grid_sample(
                tensor[None].to(torch.float32),
                grid,
                mode="nearest" if is_label else "bilinear",
                padding_mode="border",
                align_corners=True,
            )[0]
            d[key] = sampled.to(tensor.dtype) if is_label else sampled
        return d


def rotation_zyx(about_z: float, about_y: float, about_x: float) -> npt.NDArray[np.float64]:
    """A rotation of (z, y, x) index vectors: ``about_z`` turns the axial (y, x) plane,
    ``about_y`` the (z, x) plane, ``about_x`` the (z, y) plane (radians)."""
    cz, sz = math.cos(about_z), math.sin(about_z)
    cy, sy = math.cos(about_y), math.sin(about_y)
    cx, sx = math.cos(about_x), math.sin(about_x)
    axial = np.array([[1.0, 0.0, 0.0], [0.0, cz, -sz], [0.0, sz, cz]])
    coronal = np.array([[cy, 0.0, -sy], [0.0, 1.0, 0.0], [sy, 0.0, cy]])
    sagittal = np.array([[cx, -sx, 0.0], [sx, cx, 0.0], [0.0, 0.0, 1.0]])
    rotation: npt.NDArray[np.float64] = axial @ coronal @ sagittal
    return rotation


def affine_grid(
    shape: Sequence[int],
    patch: Sequence[int],
    centre: npt.NDArray[np.float64],
    matrix: npt.NDArray[np.float64],
) -> torch.Tensor:
    """The ``grid_sample`` grid (1, *patch, 3) that samples a volume of ``shape`` at
    ``centre + matrix @ (o - patch centre)`` for every patch voxel ``o`` (z, y, x).

    Built by ``torch.nn.functional.affine_grid`` (``align_corners=True``) from the map of
    normalised patch to normalised volume coordinates, in torch's (x, y, z) order.
    """
    half_out = (np.asarray(patch, dtype=np.float64) - 1) / 2
    to_norm = 2.0 / np.maximum(np.asarray(shape, dtype=np.float64) - 1, 1.0)
    linear = to_norm[:, None] * matrix * half_out[None, :]  # (z, y, x) rows and columns
    shift = to_norm * centre - 1.0
    theta = np.concatenate([linear[::-1, ::-1], shift[::-1, None]], axis=1)
    size = [1, 1, *(int(p) for p in patch)]
    return torch.nn.functional.affine_grid(
        torch.from_numpy(theta.astype(np.float32)[None]), size, align_corners=True
    )


def _plain_tensors(sample: Mapping[Hashable, Any]) -> dict[str, Any]:
    """``image`` and ``label`` as plain contiguous tensors (no MONAI meta)."""
    out: dict[str, Any] = {}
    for key in KEYS:
        value = sample[key]
        tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
        out[key] = tensor.contiguous()
    return out


def train_transform(
    patch: Sequence[int] | None,
    lesion_fraction: float,
    flip: bool,
    seed: int,
    augment: AugmentParams | None = None,
) -> Compose:
    """The seeded training transform: lesion-biased patch crop (with a random affine),
    left-right flip, the image-only scanner transforms of ``augment``, tensors.

    A transform whose probability is 0 is left out, so ``augment=None`` (:data:`NO_AUGMENT`,
    every probability 0) gives the same patches as the crop and flip alone.
    """
    aug = augment if augment is not None else NO_AUGMENT
    steps: list[Any] = []
    if aug.affine_prob > 0:
        steps.append(
            RandAffineCropd(
                KEYS, patch, lesion_fraction, aug.affine_prob, aug.scale, aug.rotate_deg
            )
        )
    elif patch is not None:
        steps.append(RandLesionCropd(KEYS, patch, lesion_fraction))
    if flip:
        steps.append(RandFlipd(KEYS, prob=FLIP_PROB, spatial_axis=2))
    if aug.lesion_look_prob > 0:
        steps.append(
            RandLesionLookd(
                aug.lesion_look_prob,
                aug.lesion_contrast,
                aug.lesion_edge_vox,
                aug.lesion_texture_hu,
            )
        )
    steps.extend(_scanner_steps(aug, every=False))
    steps.append(_plain_tensors)
    compose = Compose(steps)
    compose.set_random_state(seed=seed)
    return compose


def scanner_look(augment: AugmentParams, seed: int) -> Compose:
    """Every image-only scanner transform of ``augment``, each applied (probability 1) with
    its ranges, in the order a scanner applies them: HU scale and offset, noise, kernel,
    resolution. For predictions "as another scanner would give them" (the typicality
    classifier's extra fit copies, ``train.classifier_copies``); the probabilities of
    ``augment`` are not used. Takes and returns a dict with ``image`` (1, z, y, x); seeded
    like :func:`train_transform`.
    """
    compose = Compose(_scanner_steps(augment, every=True))
    compose.set_random_state(seed=seed)
    return compose


def _scanner_steps(aug: AugmentParams, every: bool) -> list[Any]:
    """The image-only scanner transforms of ``aug`` in the order a scanner applies them (HU
    scale and offset, noise, kernel, resolution): with ``every`` each at probability 1,
    otherwise at its own probability, a transform of probability 0 left out."""

    def prob(own: float) -> float:
        return 1.0 if every else own

    steps = [
        RandHuIntensityd(prob(aug.intensity_prob), aug.hu_scale, aug.hu_offset),
        RandCtNoised(prob(aug.noise_prob), aug.noise_sd_hu),
        RandKerneld(prob(aug.kernel_prob), aug.blur_sigma_vox, aug.sharpen_amount),
        RandResolutiond(prob(aug.resolution_prob), aug.resolution_z, aug.resolution_xy),
    ]
    return [step for step in steps if step.prob > 0]
