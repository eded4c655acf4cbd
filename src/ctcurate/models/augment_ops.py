"""Image-only training augmentation: what another scanner, reconstruction or rendering of
the same lesions changes.

Each transform takes the sample dict of :mod:`ctcurate.models.augment` (``image`` float HU
(1, z, y, x)), runs with probability ``prob`` and leaves every other key (the labels) as
it is: the anatomy does not change with the scanner. :class:`RandLesionLookd` reads the
labels to find the lesions, and changes only the image too. All random draws go through the
transform's own ``numpy.random.RandomState`` (seeded by ``Compose.set_random_state``),
with a fixed number of parameter draws per call, so a seed gives the same patches
whatever the global generators do. The torch operations are deterministic on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.transform import Randomizable

from ctcurate.labels import GGO

IMAGE = "image"


def _image(sample: Mapping[Hashable, Any]) -> torch.Tensor:
    value = sample[IMAGE]
    tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return tensor.to(torch.float32)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (1, z, y, x) volume blurred by a separable Gaussian of ``sigma`` voxels on every
    axis (kernel radius ceil(3 sigma), the border repeated)."""
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = image[None]  # (1, 1, z, y, x)
    for axis in range(3):
        size = [1, 1, 1]
        size[axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]  # x, y, z pairs
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(1, 1, *size))
    return out[0]


class _RandImage(Randomizable):
    """Base of the image-only transforms: a probability and a uniform range helper."""

    def __init__(self, prob: float) -> None:
        if not 0.0 <= prob <= 1.0:
            msg = f"prob must be within 0..1, got {prob}"
            raise ValueError(msg)
        self.prob = float(prob)
        self._apply = False

    def _uniform(self, bounds: tuple[float, float]) -> float:
        return float(self.R.uniform(bounds[0], bounds[1]))

    def randomize(self, data: Any = None) -> None:
        self._apply = bool(self.R.random_sample() < self.prob)

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(d[IMAGE])
        if self._apply:
            d[IMAGE] = self.transform(_image(d))
        return d


class RandHuIntensityd(_RandImage):
    """HU scaled about water (0 HU) by a factor drawn from ``scale`` and shifted by an
    offset drawn from ``offset``: another calibration, another depth of inspiration."""

    def __init__(self, prob: float, scale: tuple[float, float], offset: tuple[float, float]):
        super().__init__(prob)
        self.scale, self.offset = scale, offset
        self._a, self._b = 1.0, 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        self._a, self._b = self._uniform(self.scale), self._uniform(self.offset)

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        return image * self._a + self._b


class RandCtNoised(_RandImage):
    """White Gaussian noise of a standard deviation (HU) drawn from ``sd_hu``."""

    def __init__(self, prob: float, sd_hu: tuple[float, float]) -> None:
        super().__init__(prob)
        self.sd_hu = sd_hu
        self._sd = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        self._sd = self._uniform(self.sd_hu)

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        noise = self.R.standard_normal(tuple(image.shape)).astype(np.float32)
        return image + self._sd * torch.from_numpy(noise)


class RandKerneld(_RandImage):
    """A reconstruction kernel: half the time a Gaussian blur of ``sigma`` voxels (a soft
    kernel, partial volume), half the time an unsharp mask ``image + amount * (image -
    blur(image, 1 voxel))`` (an edge-enhancing lung kernel)."""

    def __init__(
        self, prob: float, sigma_vox: tuple[float, float], amount: tuple[float, float]
    ) -> None:
        super().__init__(prob)
        self.sigma_vox, self.amount = sigma_vox, amount
        self._sharpen, self._sigma, self._amount = False, 1.0, 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        self._sharpen = bool(self.R.random_sample() < 0.5)
        self._sigma, self._amount = self._uniform(self.sigma_vox), self._uniform(self.amount)

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        if self._sharpen:
            return image + self._amount * (image - gaussian_blur(image, 1.0))
        return gaussian_blur(image, self._sigma)


class RandResolutiond(_RandImage):
    """A coarser acquisition: the image averaged down by factors drawn from ``factor_z``
    (thicker slices) and ``factor_xy`` (larger pixels), then trilinearly back up."""

    def __init__(
        self, prob: float, factor_z: tuple[float, float], factor_xy: tuple[float, float]
    ) -> None:
        super().__init__(prob)
        self.factor_z, self.factor_xy = factor_z, factor_xy
        self._fz, self._fxy = 1.0, 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        self._fz, self._fxy = self._uniform(self.factor_z), self._uniform(self.factor_xy)

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        z, y, x = (int(s) for s in image.shape[1:])
        small = (
            max(1, round(z / self._fz)),
            max(1, round(y / self._fxy)),
            max(1, round(x / self._fxy)),
        )
        if small == (z, y, x):
            return image
        down = F.adaptive_avg_pool3d(image[None], small)
        up = F.interpolate(down, size=(z, y, x), mode="trilinear", align_corners=False)
        return up[0]


LABEL = "label"


def smooth_noise(shape: tuple[int, ...], rng: np.random.RandomState, sigma: float) -> torch.Tensor:
    """White noise of ``shape`` (1, z, y, x) blurred by ``sigma`` voxels, scaled to unit
    standard deviation."""
    white = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    field = gaussian_blur(white, sigma)
    sd = float(field.std())
    return field / sd if sd > 0 else field


class RandLesionLookd(_RandImage):
    """Another rendering of the same lesions: their density, margin and texture.

    The one transform that reads the labels (it never changes them). Within the lung
    (label 1–3) the lesions' excess over the normal lung's median HU is taken out, its
    ground-glass part scaled by a factor drawn from ``contrast`` (fainter or denser ground
    glass), given a texture of a standard deviation drawn from ``texture_hu`` (smooth noise
    of one voxel), blurred by a Gaussian of ``edge_vox`` voxels (an ill-defined margin: the
    label's border lies where the blurred step is at half height) and put back, inside the
    lung only. A patch without lesion or normal lung is left as it is.
    """

    def __init__(
        self,
        prob: float,
        contrast: tuple[float, float],
        edge_vox: tuple[float, float],
        texture_hu: tuple[float, float],
    ) -> None:
        super().__init__(prob)
        self.contrast, self.edge_vox, self.texture_hu = contrast, edge_vox, texture_hu
        self._contrast, self._edge, self._texture = 1.0, 0.0, 0.0
        self._noise_seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        self._contrast = self._uniform(self.contrast)
        self._edge = self._uniform(self.edge_vox)
        self._texture = self._uniform(self.texture_hu)
        self._noise_seed = int(self.R.randint(0, 2**31 - 1))

    def look(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``image`` with the lesions of ``label`` rendered again (see the class)."""
        lung = label >= 1
        lesion = label >= GGO
        normal = lung & ~lesion
        if not lesion.any() or not normal.any():
            return image
        base = float(image[normal].median())
        excess = torch.where(lesion, image - base, torch.zeros_like(image))
        ggo = label == GGO
        excess = torch.where(ggo, excess * self._contrast, excess)
        if self._texture > 0:
            noise = smooth_noise(tuple(image.shape), np.random.RandomState(self._noise_seed), 1.0)
            excess = torch.where(lesion, excess + self._texture * noise, excess)
        if self._edge > 0:
            excess = gaussian_blur(excess, self._edge)
        flat = torch.where(lesion, torch.full_like(image, base), image)
        return torch.where(lung, flat + excess, image)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(d[IMAGE])
        if self._apply:
            value = d[LABEL]
            label = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            d[IMAGE] = self.look(_image(d), label)
        return d
