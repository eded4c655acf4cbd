"""Tests of the train stage on tiny synthetic releases (``helpers.train``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.train import PATTERNS, make_case, make_release, sha256_tree, tiny_params

import ctcurate.release
from ctcurate.errors import InputError, ParamsError
from ctcurate.io.outputs import MARKER
from ctcurate.models import checkpoint
from ctcurate.models.augment import RandLesionCropd, patch_start, scanner_look, train_transform
from ctcurate.models.nets import (
    FEATURES,
    balanced_weights,
    fit_logistic,
    remove_small_lesions,
    typicality_features,
)
from ctcurate.params import TrainParams
from ctcurate.pipeline import train


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_release(tmp_path_factory.mktemp("release"), n_cases=8)


@pytest.mark.slow
def test_overfits_two_cases(tmp_path: Path) -> None:
    root = make_release(tmp_path / "rel", n_cases=2, splits=("train",))
    params = tiny_params(epochs=30, batch_size=2, channels=(8, 16), lr=0.02)
    train.seed_everything(params.seed, params.threads, torch.device("cpu"))
    augment = train_transform(None, 0.0, flip=False, seed=0)
    data = ctcurate.release.open(root, split="train", transform=augment)
    trained = train.train_segmenter(data, None, params, (16, 16, 16), torch.device("cpu"))
    losses = [h.train_loss for h in trained.history]
    assert len(losses) == 30
    assert losses[-1] < 0.5 * losses[0], losses
    assert min(losses[-5:]) < min(losses[:5])


def test_run_writes_models_and_live(release: Path, tmp_path: Path) -> None:
    out, live = tmp_path / "models", tmp_path / "live"
    train.run(release, out, live, tiny_params())
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER,
        "classifier.json",
        "model.json",
        "seg.pt",
        "seg_last.pt",
    ]
    card = json.loads((out / "model.json").read_text())
    assert card["input"]["hu_window"] == [-1024.0, 600.0]
    assert card["input"]["shape"] == [16, 16, 16]
    assert card["architecture"]["channels"] == [4, 8]
    assert card["release_id"] == json.loads((release / "manifest.json").read_text())["release_id"]
    assert card["n_train"] == 4
    from ctcurate.provenance import provenance

    assert card["provenance"] == provenance("ctcurate.pipeline.train")
    assert card["n_val"] == 2
    assert card["training_patch"] == [16, 16, 16]  # train.patch clipped to the volume
    assert card["checkpoint"]["epoch"] in (1, 2)
    post = card["postprocess"]
    assert post["min_lesion_mm3"] in TrainParams().min_lesion_mm3
    assert post["lung_from"] == TrainParams().lung_from == "hu"
    assert sorted(post["val_lesion_dice"], key=float) == [
        f"{c:g}" for c in sorted(TrainParams().min_lesion_mm3)
    ]
    assert post["lesion_grow_mm"] in TrainParams().lesion_grow_mm
    assert sorted(post["val_lesion_dice_by_grow_mm"], key=float) == [
        f"{c:g}" for c in sorted(TrainParams().lesion_grow_mm)
    ]
    clf = json.loads((out / "classifier.json").read_text())
    assert clf["features"] == list(FEATURES)
    assert clf["n_fit"] == 6  # train + val cases with a known label
    metrics = json.loads((live / "metrics.json").read_text())
    assert metrics["step"] == 1
    assert {"train", "val"} <= set(metrics)
    assert (live / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    assert not (live / "dvc.yaml").exists()
    net, classifier, loaded = checkpoint.load_models(out)
    assert loaded == card
    assert classifier.n_fit == 6
    assert sum(p.numel() for p in net.parameters()) > 0


def test_training_is_deterministic(release: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        train.run(release, tmp_path / name / "models", tmp_path / name / "live", tiny_params())
    first = sha256_tree(tmp_path / "a")
    assert first == sha256_tree(tmp_path / "b")
    assert "models/seg.pt" in first


def test_seed_changes_weights(release: Path, tmp_path: Path) -> None:
    train.run(release, tmp_path / "a", tmp_path / "la", tiny_params(epochs=1))
    train.run(release, tmp_path / "b", tmp_path / "lb", tiny_params(epochs=1, seed=1))
    assert (tmp_path / "a" / "seg.pt").read_bytes() != (tmp_path / "b" / "seg.pt").read_bytes()


def test_cuda_requested_without_cuda(
    release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParamsError, match=r"train\.device is 'cuda' but CUDA is not available"):
        train.run(release, tmp_path / "m", tmp_path / "l", tiny_params(device="cuda"))
    assert train.resolve_device("auto").type == "cpu"
    assert not (tmp_path / "m").exists()


def test_missing_release(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no manifest"):
        train.run(tmp_path / "nope", tmp_path / "m", tmp_path / "l", tiny_params())


def test_no_train_split(tmp_path: Path) -> None:
    root = make_release(tmp_path / "rel", n_cases=2, splits=("test",))
    with pytest.raises(InputError, match=r"no split 'train'"):
        train.run(root, tmp_path / "m", tmp_path / "l", tiny_params())


def test_shape_not_multiple(tmp_path: Path) -> None:
    root = make_release(tmp_path / "rel", n_cases=2, shape=(10, 16, 16), splits=("train",))
    with pytest.raises(ParamsError, match=r"shape \[10, 16, 16\] is not a multiple of 4"):
        train.run(root, tmp_path / "m", tmp_path / "l", tiny_params(channels=(4, 8, 16)))


def test_load_models_errors(release: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"model\.json: missing"):
        checkpoint.load_models(tmp_path)
    out = tmp_path / "models"
    train.run(release, out, tmp_path / "live", tiny_params(epochs=1))
    (out / "classifier.json").write_text("{}")
    with pytest.raises(InputError, match=r"classifier\.json: not a valid classifier"):
        checkpoint.load_models(out)
    (out / "seg.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"seg\.pt: cannot load"):
        checkpoint.load_models(out)


def test_features_of_patterns() -> None:
    rng = np.random.default_rng(0)
    feats = {p: typicality_features(make_case(rng, (24, 32, 32), p)[1]) for p in PATTERNS}
    idx = {name: i for i, name in enumerate(FEATURES)}
    assert np.all(feats["negative"] == 0.0)
    assert feats["typical"][idx["bilateral_share"]] > 0.3
    assert feats["atypical"][idx["bilateral_share"]] == 0.0
    assert feats["typical"][idx["lower_zone_share"]] > 0.9
    assert feats["atypical"][idx["lower_zone_share"]] < 0.2
    assert feats["typical"][idx["peripheral_share"]] > feats["atypical"][idx["peripheral_share"]]
    assert feats["atypical"][idx["ggo_share"]] == 0.0
    assert np.all(typicality_features(np.zeros((4, 4, 4), dtype=np.uint8)) == 0.0)
    with pytest.raises(ValueError, match=r"expected a \(z, y, x\) volume"):
        typicality_features(np.zeros((4, 4), dtype=np.uint8))


def test_fit_logistic() -> None:
    x = np.array([[0.0], [1.0], [2.0], [3.0], [1.5], [1.6]])
    y = np.array([0, 0, 1, 1, 0, 1])
    model = fit_logistic(x, y, features=("f",), l2=0.1)
    proba = model.predict_proba(x)
    assert proba[3] > 0.5 > proba[0]
    assert np.all(np.diff(model.predict_proba(np.linspace(0, 3, 7)[:, None])) > 0)
    again = fit_logistic(x, y, features=("f",), l2=0.1)
    assert again == model
    assert type(model).from_json(model.to_json()) == model
    prior = fit_logistic(x[:2], y[:2], features=("f",))
    assert prior.weights == (0.0,)
    # Laplace-smoothed prevalence (0 + 1) / (2 + 2)
    assert prior.predict_proba(np.array([[5.0]]))[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"labels must be 0 or 1"):
        fit_logistic(x, np.array([0, 1, 2, 0, 1, 0]), features=("f",))
    with pytest.raises(ValueError, match=r"expected 1 features"):
        model.predict_proba(np.zeros((1, 2)))


def test_best_checkpoint_is_kept(release: Path, tmp_path: Path) -> None:
    params = tiny_params(epochs=4, lr=0.05, lr_schedule="constant", val_every=1)
    train.seed_everything(params.seed, params.threads, torch.device("cpu"))
    data = ctcurate.release.open(
        release, split="train", transform=train_transform(None, 0, True, 0)
    )
    val = ctcurate.release.open(release, split="val")
    run = train.train_segmenter(data, val, params, (16, 16, 16), torch.device("cpu"))
    scores = [train.checkpoint_score(h.val_lung_dice, h.val_lesion_dice) for h in run.history]
    assert all(s is not None for s in scores)
    best = max(range(4), key=lambda i: (scores[i], -i))  # earliest of the highest
    assert run.best_epoch == best + 1
    last = train.state_dict_bytes(run.net)
    net = run.best_net()
    assert train.validate(net, val, (16, 16, 16), torch.device("cpu"), False) == (
        run.history[best].val_lung_dice,
        run.history[best].val_lesion_dice,
    )
    assert (train.state_dict_bytes(net) == last) == (run.best_epoch == 4)


def test_cosine_schedule_and_val_every(release: Path) -> None:
    params = tiny_params(epochs=4, val_every=3, lr=0.01)
    train.seed_everything(params.seed, params.threads, torch.device("cpu"))
    data = ctcurate.release.open(
        release, split="train", transform=train_transform(None, 0, True, 0)
    )
    val = ctcurate.release.open(release, split="val")
    run = train.train_segmenter(data, val, params, (16, 16, 16), torch.device("cpu"))
    lrs = [h.lr for h in run.history]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(0.01 * (1 + np.cos(np.pi * 3 / 4)) / 2)
    validated = [h.epoch for h in run.history if h.val_lung_dice is not None]
    assert validated == [3, 4]  # every 3rd epoch and the last
    assert run.best_epoch in validated


@pytest.mark.parametrize("loss", ["dice_ce", "dice_focal"])
def test_losses_fall_with_class_weights(loss: str, tmp_path: Path) -> None:
    root = make_release(tmp_path / "rel", n_cases=2, splits=("train",))
    params = tiny_params(
        epochs=12,
        channels=(8, 16),
        lr=0.02,
        lr_schedule="constant",
        loss=loss,
        class_weights=(1, 1, 3, 3),
    )
    train.seed_everything(params.seed, params.threads, torch.device("cpu"))
    data = ctcurate.release.open(root, split="train", transform=train_transform(None, 0, False, 0))
    run = train.train_segmenter(data, None, params, (16, 16, 16), torch.device("cpu"))
    losses = [h.train_loss for h in run.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert run.best_epoch == 12  # without val: the last epoch


def test_patch_crops_are_seeded_and_lesion_centred() -> None:
    rng = np.random.default_rng(0)
    image, label = make_case(rng, (16, 24, 24), "typical")
    sample = {
        "image": torch.from_numpy(image.astype(np.float32)[None]),
        "label": torch.from_numpy(label.astype(np.int64)[None]),
    }

    def crops(seed: int, fraction: float) -> list[dict[str, Any]]:
        t = train_transform((8, 8, 8), fraction, flip=True, seed=seed)
        return [t(dict(sample)) for _ in range(6)]

    a, b, c = crops(0, 1.0), crops(0, 1.0), crops(1, 1.0)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"])
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))
    for crop in a:
        assert set(crop) == {"image", "label"}
        assert type(crop["image"]) is torch.Tensor  # plain tensors, no MONAI meta
        assert crop["image"].shape == crop["label"].shape == (1, 8, 8, 8)
        assert bool((crop["label"] >= 2).any())  # centred on a lesion voxel
    negative = make_case(rng, (16, 24, 24), "negative")[1]
    crop = train_transform((8, 8, 8), 1.0, flip=False, seed=0)(
        {"image": torch.zeros(1, 16, 24, 24), "label": torch.from_numpy(negative[None])}
    )
    assert crop["label"].shape == (1, 8, 8, 8)  # no lesion: a uniform random patch


def test_patch_start_and_training_patch(tmp_path: Path) -> None:
    assert patch_start((16, 24, 24), (8, 8, 8), (0, 23, 12)) == (0, 16, 8)
    with pytest.raises(ValueError, match=r"patch \[8, 8, 32\] is larger than the volume"):
        patch_start((16, 24, 24), (8, 8, 32), (0, 0, 0))
    with pytest.raises(ValueError, match=r"lesion_fraction must be within 0\.\.1"):
        RandLesionCropd(("image",), (8, 8, 8), 1.5)
    params = tiny_params(channels=(4, 8, 16), patch=(12, 64, 64))
    assert train.training_patch(params, (16, 16, 16), 4, tmp_path) == (12, 16, 16)
    with pytest.raises(ParamsError, match=r"training patch \[10, 16, 16\].*multiple of 4"):
        train.training_patch(tiny_params(patch=(10, 16, 16)), (16, 16, 16), 4, tmp_path)


def test_weighted_and_balanced_logistic() -> None:
    x = np.array([[0.0], [1.0], [2.0], [3.0], [1.8], [1.6], [0.5]])  # not separable
    y = np.array([0, 0, 1, 1, 0, 1, 0])
    w = np.array([1.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0])
    weighted = fit_logistic(x, y, features=("f",), l2=0.0, sample_weight=w)
    # a weight of 2 is the same as the row twice (mean and scale aside: use l2 = 0 and
    # compare decisions, which standardisation does not change)
    dup = fit_logistic(np.vstack([x, x[[1, 5]]]), np.concatenate([y, y[[1, 5]]]), ("f",), 0.0)
    grid = np.linspace(-1, 4, 11)[:, None]
    assert np.allclose(weighted.predict_proba(grid), dup.predict_proba(grid), atol=1e-8)
    bw = balanced_weights(y)
    assert bw.tolist() == pytest.approx([7 / 8, 7 / 8, 7 / 6, 7 / 6, 7 / 8, 7 / 6, 7 / 8])
    assert float(bw[y == 1].sum()) == pytest.approx(float(bw[y == 0].sum()))
    assert balanced_weights(np.array([1, 1])).tolist() == [1.0, 1.0]
    balanced = fit_logistic(x, y, features=("f",), l2=0.1, sample_weight=bw)
    plain = fit_logistic(x, y, features=("f",), l2=0.1)
    assert balanced.bias > plain.bias  # the minority (typical) class gains weight
    with pytest.raises(ValueError, match=r"sample_weight must be 7 positive finite values"):
        fit_logistic(x, y, features=("f",), sample_weight=np.zeros(7))


def test_remove_small_lesions_by_volume() -> None:
    label = np.zeros((6, 10, 10), dtype=np.uint8)
    label[:, 1:9, 1:9] = 1
    label[1:4, 2:5, 2:5] = 2  # 27 voxels of GGO
    label[2, 6, 6] = 3  # one voxel of consolidation, apart
    label[3, 7, 7] = 2  # a diagonal neighbour of it: one 26-connected component of 2 voxels
    # 1 x 1 x 1 mm voxels: cut at 10 mm^3 drops the 2-voxel component only
    out = remove_small_lesions(label, 10.0)
    assert out[2, 6, 6] == 1
    assert out[3, 7, 7] == 1
    assert (out[1:4, 2:5, 2:5] == 2).all()
    assert ((out > 0) == (label > 0)).all()  # the lung is untouched
    # 2 x 2 x 2 mm voxels: the 27-voxel component is 216 mm^3, below a 300 mm^3 cut
    assert (remove_small_lesions(label, 300.0, (2.0, 2.0, 2.0)) <= 1).all()
    assert (remove_small_lesions(label, 200.0, (2.0, 2.0, 2.0))[1:4, 2:5, 2:5] == 2).all()
    unchanged = remove_small_lesions(label, 0.0)
    assert (unchanged == label).all()
    assert unchanged is not label


def test_choose_lesion_filter_on_val() -> None:
    truth = np.zeros((4, 8, 8), dtype=np.uint8)
    truth[:, 1:7, 1:7] = 1
    truth[1:3, 2:5, 2:5] = 2  # an 18-voxel lesion
    pred = truth.copy()
    pred[3, 6, 6] = 2  # a 1-voxel false positive
    clean = truth.copy()
    clean[1:3, 2:5, 2:5] = 1
    fp_only = clean.copy()
    fp_only[0, 1, 1] = 3  # a lesion-free case with a 1-voxel false positive
    one = (1.0, 1.0, 1.0)
    chosen = train.choose_lesion_filter([0, 5, 50], [(pred, truth, one), (fp_only, clean, one)])
    # cut 0: Dice 36/37 and 0 -> 0.486; cut 5: 1.0 (the lesion-free case drops out of the mean);
    # cut 50 removes the true lesion as well: 0.0
    assert chosen.min_lesion_mm3 == 5.0
    assert chosen.val_lesion_dice["0"] == pytest.approx((36 / 37) / 2)
    assert chosen.val_lesion_dice["5"] == 1.0
    assert chosen.val_lesion_dice["50"] == 0.0
    tie = train.choose_lesion_filter([8, 2], [(pred, truth, one)])
    assert tie.min_lesion_mm3 == 2.0  # equal Dice: the smallest cut
    assert train.choose_lesion_filter([3, 1], []).min_lesion_mm3 == 1.0


def test_grow_lesions_takes_dense_lung_within_reach() -> None:
    from ctcurate.models.nets import GROW_HU_MIN, grow_lesions

    label = np.ones((1, 1, 12), dtype=np.uint8)
    label[0, 0, 0] = 2  # a lesion voxel at x = 0; voxels are 2 mm along x
    hu = np.full(label.shape, -850.0)
    hu[0, 0, 1:6] = GROW_HU_MIN + 50  # ground glass at 2-10 mm
    hu[0, 0, 3] = -100.0  # consolidation at 6 mm
    hu[0, 0, 7] = -500.0  # dense, but beyond aerated lung at 12 and 14 mm
    spacing = (1.0, 1.0, 2.0)
    grown = grow_lesions(label, hu, spacing, 6.0)
    assert grown[0, 0].tolist() == [2, 2, 2, 3, 1, 1, 1, 1, 1, 1, 1, 1]  # up to 6 mm
    assert grow_lesions(label, hu, spacing, 10.0)[0, 0, :6].tolist() == [2, 2, 2, 3, 2, 2]
    np.testing.assert_array_equal(grow_lesions(label, hu, spacing, 0.0), label)
    background = label.copy()
    background[0, 0, 1] = 0  # not lung: never grown into
    assert grow_lesions(background, hu, spacing, 6.0)[0, 0, 1] == 0
    no_lesion = np.ones_like(label)
    np.testing.assert_array_equal(grow_lesions(no_lesion, hu, spacing, 6.0), no_lesion)


def test_redraw_lesions_follows_hu_within_reach() -> None:
    """Within the reach of the lesions, dense lung is lesion and light lung normal (the
    lesion's own light voxels too); lung beyond the reach and non-lung stay as they were."""
    from ctcurate.models.nets import GROW_HU_MIN, redraw_lesions

    label = np.ones((1, 1, 12), dtype=np.uint8)
    label[0, 0, 0:3] = 2  # a coarse lesion at 0-4 mm; voxels are 2 mm along x
    label[0, 0, 11] = 0  # not lung
    hu = np.full(label.shape, -850.0)
    hu[0, 0, 0] = -100.0  # consolidation, labelled GGO by the coarse grid
    hu[0, 0, 1] = GROW_HU_MIN + 50  # ground glass
    hu[0, 0, 3] = GROW_HU_MIN + 50  # ground glass next to it, outside the coarse lesion
    hu[0, 0, 9] = -500.0  # dense lung 14 mm beyond the lesion
    hu[0, 0, 11] = 40.0  # dense, not lung
    spacing = (1.0, 1.0, 2.0)
    # voxel 2 (light, inside the coarse lesion) becomes normal lung
    assert redraw_lesions(label, hu, spacing, 6.0)[0, 0].tolist() == [3, 2, 1, 2] + [1] * 7 + [0]
    np.testing.assert_array_equal(redraw_lesions(label, hu, spacing, 0.0), label)
    no_lesion = np.ones_like(label)
    np.testing.assert_array_equal(redraw_lesions(no_lesion, hu, spacing, 6.0), no_lesion)
    assert label[0, 0, 2] == 2  # the input is not changed


def test_choose_lesion_growth_on_val() -> None:
    truth = np.zeros((4, 8, 8), dtype=np.uint8)
    truth[:, 1:7, 1:7] = 1
    truth[1:3, 2:6, 2:6] = 2  # the true lesion: 2 x 4 x 4
    pred = truth.copy()
    pred[1:3, 2:6, 4:6] = 1  # the network drew half of it
    hu = np.where(truth == 2, -600.0, -850.0)
    one = (1.0, 1.0, 1.0)
    start = train.LesionFilter(min_lesion_mm3=0.0, val_lesion_dice={"0": None})
    chosen = train.choose_lesion_growth(start, [0, 2, 4], [(pred, truth, one)], [hu], "network")
    assert chosen.val_lesion_dice_by_grow_mm["0"] == pytest.approx(2 * 16 / 48)
    assert chosen.val_lesion_dice_by_grow_mm["2"] == 1.0
    assert chosen.val_lesion_dice_by_grow_mm["4"] == 1.0
    assert chosen.lesion_grow_mm == 2.0  # 2 and 4 tie: the smallest
    assert chosen.min_lesion_mm3 == 0.0
    assert chosen.to_json()["lesion_grow_mm"] == 2.0
    none = train.choose_lesion_growth(start, [4, 2], [], [], "network")
    assert none.lesion_grow_mm == 2.0


@pytest.mark.parametrize("loss", ["dice_ce", "dice_focal"])
def test_dice_over_case_weighs_a_small_lesion_like_a_large_one(loss: str) -> None:
    """Per-case Dice averages the two patches; batch Dice lets the large lesion dominate."""
    labels = torch.ones((2, 1, 4, 8, 8), dtype=torch.long)  # normal lung
    labels[0, :, :, :, :6] = 2  # a large GGO lesion in case 0
    labels[1, :, 0, 0, 0] = 2  # one GGO voxel in case 1
    logits = torch.zeros((2, 4, 4, 8, 8))
    logits[:, 1] = 4.0
    logits[0, 2, :, :, :6] = 8.0  # case 0 right, case 1's single voxel missed
    by_batch = train.make_loss(TrainParams(loss=loss, dice_over="batch"))(logits, labels)
    by_case = train.make_loss(TrainParams(loss=loss, dice_over="case"))(logits, labels)
    assert float(by_case) > float(by_batch) + 0.05


class _DensityNet(torch.nn.Module):
    """A stand-in for the network whose labels follow the image's HU: ground glass denser
    than -600 HU, normal lung below (so other noise or another kernel gives other labels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (-600.0 + 1024.0) / 1624.0  # -600 HU after normalise_hu
        lesion = (x - level) * 100.0
        return torch.cat([torch.zeros_like(x), -lesion, lesion, torch.full_like(x, -1e3)], 1)


def test_scanner_look_changes_every_image_and_is_seeded() -> None:
    image = torch.from_numpy(
        np.random.default_rng(0).normal(-800.0, 100.0, (1, 16, 16, 16)).astype(np.float32)
    )
    looks = [scanner_look(TrainParams().augment, seed) for seed in (0, 0, 1)]
    out = [look({"image": image.clone()})["image"] for look in looks]
    assert all(o.shape == image.shape for o in out)
    assert not torch.equal(out[0], image)
    assert torch.equal(out[0], out[1])  # the same seed, the same scanner
    assert not torch.equal(out[0], out[2])


def test_classifier_copies_add_predictions_as_other_scanners_give_them(
    release: Path, tmp_path: Path
) -> None:
    data = ctcurate.release.open(release, split="train")
    cpu, roi, net = torch.device("cpu"), (16, 16, 16), _DensityNet()
    params = tiny_params(classifier_copies=2)
    x0, y0 = train.case_features(net, data, roi, cpu, False)
    look = scanner_look(params.augment, params.seed)
    x2, y2 = train.case_features(net, data, roi, cpu, False, copies=2, look=look)
    assert len(y0) > 0
    assert len(y2) == 3 * len(y0)
    np.testing.assert_array_equal(x2[::3], x0)  # each case's own prediction first
    np.testing.assert_array_equal(y2, np.repeat(y0, 3))
    assert not np.array_equal(x2[1::3], x0)
    assert not np.array_equal(x2[2::3], x2[1::3])
    again, _ = train.case_features(
        net, data, roi, cpu, False, copies=2, look=scanner_look(params.augment, params.seed)
    )
    np.testing.assert_array_equal(again, x2)
    # the reference labels do not change with the scanner: no copies of them
    xt, _ = train.case_features(None, data, roi, cpu, False, copies=2, look=look)
    assert len(xt) == len(y0)

    out = tmp_path / "models"
    train.run(release, out, tmp_path / "live", params)
    card = json.loads((out / "model.json").read_text())
    assert card["classifier"]["scanner_copies"] == 2
    assert json.loads((out / "classifier.json").read_text())["n_fit"] == 18  # 6 cases x 3
