"""Tests of the training augmentation (ctcurate.models.augment, ctcurate.models.augment_ops)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from ctcurate.errors import ParamsError
from ctcurate.models.augment import (
    NO_AUGMENT,
    RandAffineCropd,
    affine_grid,
    rotation_zyx,
    train_transform,
)
from ctcurate.models.augment_ops import (
    RandCtNoised,
    RandHuIntensityd,
    RandKerneld,
    RandLesionLookd,
    RandResolutiond,
    gaussian_blur,
)
from ctcurate.params import AugmentParams, load_section

SHAPE = (24, 32, 32)
#: Every transform on every patch.
ALL_ON = NO_AUGMENT.model_copy(
    update={name: 1.0 for name in AugmentParams.model_fields if name.endswith("_prob")}
)


def _case() -> dict[str, torch.Tensor]:
    """A lung (label 1, -850 HU) with a lesion (label 2, -300 HU) in soft tissue (40 HU)."""
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    lung = ((zz - 12) / 9) ** 2 + ((yy - 16) / 12) ** 2 + ((xx - 12) / 8) ** 2 <= 1
    lesion = ((zz - 10) / 3) ** 2 + ((yy - 14) / 4) ** 2 + ((xx - 10) / 3) ** 2 <= 1
    label = np.where(lesion, 2, np.where(lung, 1, 0)).astype(np.int64)
    image = np.choose(label, [40.0, -850.0, -300.0]).astype(np.float32)
    return {"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label[None])}


def _image_matches_label(sample: dict[str, Any]) -> float:
    """Share of voxels whose label is what the (unmodified-intensity) image says."""
    image = sample["image"][0].numpy()
    label = sample["label"][0].numpy()
    from_image = np.where(image < -575, 1, np.where(image < -130, 2, 0))
    return float((from_image == label).mean())


def _only(**probs: float) -> AugmentParams:
    return NO_AUGMENT.model_copy(update=probs)


def test_all_transforms_seeded_and_label_consistent() -> None:
    def run(seed: int) -> list[dict[str, Any]]:
        t = train_transform((16, 32, 32), 0.5, flip=True, seed=seed, augment=ALL_ON)
        return [t(_case()) for _ in range(4)]

    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))
    for x in a:
        assert set(x) == {"image", "label"}
        assert type(x["image"]) is torch.Tensor
        assert type(x["label"]) is torch.Tensor
        assert x["image"].dtype == torch.float32
        assert x["label"].dtype == torch.int64
        assert x["image"].shape == x["label"].shape == (1, 16, 32, 32)
        assert set(np.unique(x["label"].numpy())) <= {0, 1, 2}


def test_no_augment_is_the_plain_crop() -> None:
    plain = train_transform((16, 32, 32), 0.5, flip=True, seed=3)
    off = train_transform((16, 32, 32), 0.5, flip=True, seed=3, augment=NO_AUGMENT)
    for _ in range(3):
        x, y = plain(_case()), off(_case())
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])
        assert _image_matches_label(x) == 1.0


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_affine_moves_image_and_labels_together() -> None:
    t = train_transform((16, 32, 32), 0.5, flip=False, seed=0, augment=_only(affine_prob=1.0))
    case = _case()
    case["image"] = case["label"].to(torch.float32) * 100.0  # the labels drawn as HU
    for _ in range(6):
        out = t(case)
        # image sampled linearly, labels by nearest: they disagree only on edge voxels
        drawn = np.rint(out["image"][0].numpy() / 100.0)
        label = out["label"][0].numpy()
        assert _dice(drawn >= 1, label >= 1) > 0.97
        assert _dice(drawn == 2, label == 2) > 0.9
        plain_crops = [case["label"][:, z : z + 16] for z in range(SHAPE[0] - 16 + 1)]
        assert not any(torch.equal(out["label"], crop) for crop in plain_crops)


def test_affine_grid_axes_and_scale() -> None:
    volume = torch.arange(float(np.prod(SHAPE))).reshape(1, 1, *SHAPE)
    centre = (np.asarray(SHAPE, dtype=np.float64) - 1) / 2
    identity = affine_grid(SHAPE, SHAPE, centre, np.eye(3))
    same = torch.nn.functional.grid_sample(volume, identity, mode="nearest", align_corners=True)
    assert torch.equal(same, volume)
    # sampling twice as densely along z only (anatomy looks twice as tall)
    zoom = affine_grid(SHAPE, SHAPE, centre, np.diag([0.5, 1.0, 1.0]))
    label = torch.zeros(1, 1, *SHAPE)
    label[:, :, 10:14] = 1.0  # a 4-slice slab at the centre
    out = torch.nn.functional.grid_sample(label, zoom, mode="nearest", align_corners=True)
    slices = out[0, 0].sum(dim=(1, 2)) > 0
    assert int(slices.sum()) in (7, 8, 9)  # twice as tall in z
    assert bool((out[0, 0][slices] == 1).all())  # whole slices: y and x unscaled
    quarter = rotation_zyx(np.pi / 2, 0.0, 0.0)
    assert np.allclose(quarter @ np.array([0.0, 1.0, 0.0]), [0.0, 0.0, 1.0])


def test_affine_whole_volume_and_prob_zero() -> None:
    whole = RandAffineCropd(("image", "label"), None, 0.5, 1.0, (0.9, 1.1), (10.0, 5.0))
    whole.set_random_state(seed=0)
    out = whole(_case())
    assert out["image"].shape == out["label"].shape == (1, *SHAPE)
    never = RandAffineCropd(("image", "label"), (8, 8, 8), 0.5, 0.0, (0.9, 1.1), (10.0, 5.0))
    never.set_random_state(seed=0)
    crop = never(_case())
    assert _image_matches_label(crop) == 1.0


def test_intensity_is_affine_in_hu_and_keeps_labels() -> None:
    t = RandHuIntensityd(1.0, (0.9, 1.1), (-20.0, 20.0))
    t.set_random_state(seed=0)
    case = _case()
    out = t(case)
    before, after = case["image"][0], out["image"][0]
    lung = case["label"][0] == 1
    tissue = case["label"][0] == 0
    scale = float((after[lung].mean() - after[tissue].mean()) / (-850.0 - 40.0))
    offset = float(after[tissue].mean() - scale * 40.0)
    assert 0.9 <= scale <= 1.1
    assert -20.0 <= offset <= 20.0
    assert abs(scale - 1.0) > 1e-4 or abs(offset) > 1e-3
    assert torch.allclose(after, before * scale + offset, atol=1e-3)
    assert torch.equal(out["label"], case["label"])


def test_lesion_look_renders_the_lesions_again_and_keeps_labels() -> None:
    from scipy import ndimage

    case = _case()
    case["label"][0, 10, 14, 10] = 3  # a consolidation voxel at the lesion's centre
    case["image"][0, 10, 14, 10] = 30.0
    before, label = case["image"][0].clone(), case["label"][0].clone()
    ggo, lung = label == 2, label >= 1
    faint = RandLesionLookd(1.0, (0.5, 0.5), (0.0, 0.0), (0.0, 0.0))
    faint.set_random_state(seed=0)
    out = faint(case)
    after = out["image"][0]
    # the ground glass's excess over the lung (550 HU) halved; all else as it was
    assert torch.allclose(after[ggo], torch.full_like(after[ggo], -850.0 + 275.0))
    assert torch.equal(after[~ggo], before[~ggo])
    assert torch.equal(out["label"][0], label)

    soft = RandLesionLookd(1.0, (1.0, 1.0), (1.5, 1.5), (30.0, 30.0))
    soft.set_random_state(seed=0)
    image = soft({"image": before[None].clone(), "label": label[None]})["image"][0]
    lesion = (label >= 2).numpy()
    outside = torch.from_numpy(ndimage.binary_dilation(lesion, iterations=1) & ~lesion)
    rim = torch.from_numpy(lesion & ~ndimage.binary_erosion(lesion))
    assert float(image[outside & lung].mean()) > -850.0 + 50.0  # the margin blurs outward
    assert float(image[rim].mean()) < -300.0 - 50.0  # and the lesion's edge falls
    assert torch.equal(image[~lung], before[~lung])  # nothing outside the lung changes
    no_lesion = {"image": before[None].clone(), "label": (label >= 1).to(torch.int64)[None]}
    assert torch.equal(soft(no_lesion)["image"], no_lesion["image"])


def test_noise_level_within_range() -> None:
    t = RandCtNoised(1.0, (30.0, 30.0))
    t.set_random_state(seed=0)
    case = _case()
    out = t(case)
    residual = (out["image"] - case["image"]).numpy()
    assert abs(float(residual.std()) - 30.0) < 1.0
    assert abs(float(residual.mean())) < 1.0
    assert torch.equal(out["label"], case["label"])
    off = RandCtNoised(0.0, (30.0, 30.0))
    off.set_random_state(seed=0)
    assert torch.equal(off(case)["image"], case["image"])


def _checker() -> torch.Tensor:
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return torch.from_numpy(((zz + yy + xx) % 2 * 200.0 - 100.0).astype(np.float32))[None]


def test_kernel_blurs_or_sharpens() -> None:
    image = _checker()
    sample = {"image": image, "label": torch.zeros(1, *SHAPE, dtype=torch.int64)}
    kinds: dict[bool, list[float]] = {True: [], False: []}
    t = RandKerneld(1.0, (0.5, 1.0), (0.5, 1.0))
    t.set_random_state(seed=0)
    for _ in range(12):
        out = t(sample)
        kinds[t._sharpen].append(float(out["image"].std() / image.std()))
        assert torch.equal(out["label"], sample["label"])
    assert kinds[True]
    assert kinds[False]
    assert all(r > 1.2 for r in kinds[True])  # high frequencies amplified
    assert all(r < 0.8 for r in kinds[False])  # high frequencies damped
    flat = torch.full((1, *SHAPE), -700.0)
    assert torch.allclose(gaussian_blur(flat, 0.7), flat)  # a blur keeps a constant


def test_resolution_averages_slices() -> None:
    zz = np.arange(SHAPE[0])[:, None, None] * np.ones(SHAPE)
    slabs = torch.from_numpy(((zz % 2) * 400.0 - 600.0).astype(np.float32))[None]
    t = RandResolutiond(1.0, (2.0, 2.0), (1.0, 1.0))
    t.set_random_state(seed=0)
    out = t({"image": slabs, "label": torch.zeros(1, *SHAPE, dtype=torch.int64)})["image"]
    assert out.shape == slabs.shape
    assert float(out.std()) < 0.3 * float(slabs.std())  # alternating slices averaged away
    assert abs(float(out.mean()) - float(slabs.mean())) < 1.0
    same = RandResolutiond(1.0, (1.0, 1.0), (1.0, 1.0))
    same.set_random_state(seed=0)
    assert torch.equal(same({"image": slabs})["image"], slabs)


def test_augment_params_validated(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  augment:\n    noise_sd_hu: [50, 10]\n", encoding="utf-8")
    from ctcurate.params import TrainParams

    with pytest.raises(ParamsError, match=r"noise_sd_hu: the low end \(50\) is above"):
        load_section(path, "train", TrainParams)
    path.write_text("train:\n  augment:\n    blur: 1\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"unknown key 'train\.augment\.blur'"):
        load_section(path, "train", TrainParams)
    path.write_text("train:\n  augment:\n    lesion_contrast: [1.2, 0.5]\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"lesion_contrast: the low end \(1\.2\) is above"):
        load_section(path, "train", TrainParams)
    path.write_text("train:\n  augment:\n    noise_prob: 1.5\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"train\.augment\.noise_prob"):
        load_section(path, "train", TrainParams)
