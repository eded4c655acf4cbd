"""Training-time augmentation of the segmentation network: seeded MONAI dict transforms.

Samples are the release's dicts (``image`` float32 HU (1, z, y, x), ``label`` int64
(1, z, y, x)). :func:`train_transform` returns a MONAI ``Compose`` that

1. crops a random patch (:class:`RandLesionCropd`): with probability ``lesion_fraction``
   centred on a random lesion voxel (GGO or consolidation) of the case, otherwise at a
   uniformly random position, so the small lesion classes are seen far more often than
   their share of the voxels (about 1 %) would give;
2. flips left-right with probability 0.5 (``RandFlipd`` on the x axis; the lungs are
   mirror images closely enough, and the typicality features are symmetric in the sides);
3. returns plain tensors of ``image`` and ``label`` only (the meta dict does not collate).

Every random draw goes through the transforms' own ``numpy.random.RandomState``, seeded by
``Compose.set_random_state``: the same seed gives the same patches and flips, whatever the
global generators do. In DataLoader worker processes MONAI's ``worker_init_fn`` reseeds
each worker from the loader's generator.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms.compose import Compose
from monai.transforms.spatial.dictionary import RandFlipd
from monai.transforms.transform import MapTransform, Randomizable

from ctcurate.labels import GGO

KEYS = ("image", "label")
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


def _plain_tensors(sample: Mapping[Hashable, Any]) -> dict[str, Any]:
    """``image`` and ``label`` as plain contiguous tensors (no MONAI meta)."""
    out: dict[str, Any] = {}
    for key in KEYS:
        value = sample[key]
        tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
        out[key] = tensor.contiguous()
    return out


def train_transform(
    patch: Sequence[int] | None, lesion_fraction: float, flip: bool, seed: int
) -> Compose:
    """The seeded training transform: lesion-biased patch crop, left-right flip, tensors."""
    steps: list[Any] = []
    if patch is not None:
        steps.append(RandLesionCropd(KEYS, patch, lesion_fraction))
    if flip:
        steps.append(RandFlipd(KEYS, prob=FLIP_PROB, spatial_axis=2))
    steps.append(_plain_tensors)
    compose = Compose(steps)
    compose.set_random_state(seed=seed)
    return compose
