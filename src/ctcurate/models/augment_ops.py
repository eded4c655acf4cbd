"""Image-only training augmentation: what another scanner or reconstruction changes.

Each transform takes the sample dict of :mod:`ctcurate.models.augment` (``image`` float HU
(1, z, y, x)), runs with probability ``prob`` and leaves every other key (the labels) as
it is: the anatomy does not change with the scanner. All random draws go through the
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
