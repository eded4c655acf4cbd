"""The ``train`` stage: lung / lesion segmentation and the typicality classifier.

Segmentation: a MONAI 3-D U-Net (:mod:`ctcurate.models.nets`) trained on the release's ``train``
split with Dice (over the batch) + class-weighted cross-entropy or focal loss, on seeded
lesion-biased random patches with left-right flips (:mod:`ctcurate.models.augment`), Adam with a
cosine learning-rate schedule; validated by lung and lesion Dice on whole ``val`` volumes
every ``val_every`` epochs; the best-by-val weights are kept. Typicality: a logistic
regression on features of a label volume, fitted on the ``train`` (and by default ``val``)
cases whose binary typicality is known; ``classifier_features: predicted`` (default)
measures the features on the network's own segmentation of those cases, so the classifier
is fitted on the distribution it will see at inference; ``truth`` measures them on the
reference labels.

Outputs (one folder, published atomically): ``seg.pt`` (the best-by-val ``state_dict``),
``seg_last.pt`` (the last epoch's), ``classifier.json`` and ``model.json`` (architecture,
the input / output contract, the params, the chosen checkpoint and the release id).
Training curves go to DVCLive (``--live``).

Determinism: ``monai.utils.set_determinism(seed)``, ``torch.use_deterministic_algorithms``,
explicit generators for the shuffling and the augmentation, no DataLoader workers and a
fixed thread count on CPU: two CPU runs with the same release, params and thread count give
identical bytes. On CUDA the run is seeded too, but AMP and GPU kernels make it
reproducible only up to floating-point order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset

import ctcurate.release
import ctcurate.release.format
from ctcurate.errors import InputError, ParamsError
from ctcurate.io.atomic import dumps_json
from ctcurate.io.outputs import check_output_dir, publish_dir
from ctcurate.labels import GGO
from ctcurate.log import get_logger
from ctcurate.models.augment import scanner_look, train_transform
from ctcurate.models.checkpoint import (
    CLASSIFIER_FILE,
    LAST_FILE,
    MODEL_FILE,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    SEG_FILE,
    resolve_device,
    seed_everything,
    spacing_of,
    state_dict_bytes,
)
from ctcurate.models.metrics import dice, mean_defined
from ctcurate.models.nets import (
    FEATURES,
    HU_WINDOW,
    LogisticModel,
    balanced_weights,
    build_unet,
    fit_logistic,
    grow_lesions,
    normalise_hu,
    postprocess_label,
    predict_labels,
    remove_small_lesions,
    shape_multiple,
    typicality_features,
    unet_config,
)
from ctcurate.params import TrainParams
from ctcurate.provenance import provenance

log = get_logger("train")

#: The stage name (its output folder's marker) and what it writes into that folder.
STAGE = "train"
OWN_FILES = (SEG_FILE, LAST_FILE, CLASSIFIER_FILE, MODEL_FILE)


@dataclass(frozen=True)
class EpochLog:
    """One epoch's numbers (the val Dice are ``None`` on epochs without validation)."""

    epoch: int
    lr: float
    train_loss: float
    val_lung_dice: float | None
    val_lesion_dice: float | None


@dataclass(frozen=True)
class SegmenterRun:
    """A trained segmenter: the final network, the best-by-val weights and the log.

    ``best_epoch`` is the validated epoch with the highest :func:`checkpoint_score` (the
    earliest on a tie); without validation it is the last epoch. ``best_state`` holds CPU
    copies of that epoch's ``state_dict``.
    """

    net: torch.nn.Module
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[EpochLog]

    def best_net(self) -> torch.nn.Module:
        """The network with the best-by-val weights loaded (in place)."""
        self.net.load_state_dict(self.best_state)
        return self.net


def segmentation_dice(
    pred: npt.NDArray[np.uint8], truth: npt.NDArray[np.uint8]
) -> tuple[float | None, float | None]:
    """Lung (label > 0) and lesion (label >= GGO) Dice of one predicted label volume."""
    return dice(pred > 0, truth > 0), dice(pred >= GGO, truth >= GGO)


def checkpoint_score(lung_dice: float | None, lesion_dice: float | None) -> float | None:
    """What picks the best checkpoint: the mean of the val lung and lesion Dice defined."""
    return mean_defined([lung_dice, lesion_dice])


def validate(
    net: torch.nn.Module,
    dataset: Dataset[dict[str, Any]],
    roi: Sequence[int],
    device: torch.device,
    amp: bool,
) -> tuple[float | None, float | None]:
    """Mean lung and lesion Dice of the network over a dataset (``None`` when empty)."""
    scores = [
        segmentation_dice(pred, truth)
        for pred, truth, _ in predict_dataset(net, dataset, roi, device, amp)
    ]
    return mean_defined(s[0] for s in scores), mean_defined(s[1] for s in scores)


def make_loss(params: TrainParams) -> torch.nn.Module:
    """The segmentation loss of ``params.loss``, with the class weights of the CE / focal term.

    ``dice_over: batch`` (the default) computes Dice over the whole batch: a patch without
    lesion then adds no spurious "empty class" Dice term, the usual cure for tiny foreground
    classes. ``case`` computes it per patch and averages, as evaluate averages per case, so
    a small lesion weighs as much as a large one.
    """
    weight = torch.tensor(params.class_weights, dtype=torch.float32)
    batch = params.dice_over == "batch"
    if params.loss == "dice_focal":
        from monai.losses.dice import DiceFocalLoss

        focal: torch.nn.Module = DiceFocalLoss(
            to_onehot_y=True, softmax=True, batch=batch, weight=weight, gamma=2.0
        )
        return focal
    from monai.losses.dice import DiceCELoss

    dice_ce: torch.nn.Module = DiceCELoss(
        to_onehot_y=True, softmax=True, batch=batch, weight=weight
    )
    return dice_ce


def _cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}


def train_segmenter(
    train_set: Dataset[dict[str, Any]],
    val_set: Dataset[dict[str, Any]] | None,
    params: TrainParams,
    roi: Sequence[int],
    device: torch.device,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> SegmenterRun:
    """Train the U-Net on ``train_set`` (samples already cropped / augmented to one shape).

    Adam, learning rate ``params.lr`` held constant or annealed to 0 by a cosine over the
    epochs; validation on whole ``val_set`` volumes (of shape ``roi``) every
    ``params.val_every`` epochs and after the last; the best-by-val weights are kept.
    Call :func:`seed_everything` first: the weights' initialisation uses torch's global
    generator; the shuffling uses its own generator seeded with ``params.seed``.
    """
    config = unet_config(params.channels, params.num_res_units)
    net = build_unet(config).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=params.lr)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if params.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
    loss_fn = make_loss(params).to(device)
    use_amp = params.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    shuffle = torch.Generator().manual_seed(params.seed)
    cuda = device.type == "cuda"
    loader_kw: dict[str, Any] = {}
    if cuda:
        from monai.data.utils import worker_init_fn

        loader_kw = {
            "num_workers": 2,
            "pin_memory": True,
            "persistent_workers": True,
            "worker_init_fn": worker_init_fn,
        }
    loader = DataLoader(
        train_set, batch_size=params.batch_size, shuffle=True, generator=shuffle, **loader_kw
    )
    val = val_set if val_set is not None and len(val_set) > 0 else None  # type: ignore[arg-type]
    history: list[EpochLog] = []
    best_state = _cpu_state(net)
    best_epoch, best_score = 0, -math.inf
    for epoch in range(1, params.epochs + 1):
        net.train()
        lr = float(optimizer.param_groups[0]["lr"])
        total, count = 0.0, 0
        for batch in loader:
            image = batch["image"].to(device, non_blocking=cuda)
            label = batch["label"].to(device, non_blocking=cuda)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss = loss_fn(net(normalise_hu(image)), label)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach()) * image.shape[0]
            count += image.shape[0]
        if scheduler is not None:
            scheduler.step()
        lung_d, lesion_d = (None, None)
        if val is not None and (epoch % params.val_every == 0 or epoch == params.epochs):
            lung_d, lesion_d = validate(net, val, roi, device, use_amp)
            score = checkpoint_score(lung_d, lesion_d)
            if score is not None and score > best_score:
                best_score, best_epoch, best_state = score, epoch, _cpu_state(net)
        elif val is None:
            best_epoch, best_state = epoch, _cpu_state(net)
        entry = EpochLog(epoch, lr, total / max(count, 1), lung_d, lesion_d)
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
    if best_epoch == 0:  # validated, but no defined score: keep the last weights
        best_epoch, best_state = params.epochs, _cpu_state(net)
    return SegmenterRun(net=net, best_state=best_state, best_epoch=best_epoch, history=history)


def images_per_case(predicted: bool, copies: int) -> int:
    """Rows each labelled case gives the typicality fit: its own, and ``copies`` scanner
    looks of its image when its features come from a network's prediction."""
    return 1 + (copies if predicted else 0)


def case_features(
    net: torch.nn.Module | None,
    dataset: Dataset[dict[str, Any]],
    roi: Sequence[int],
    device: torch.device,
    amp: bool,
    min_lesion_mm3: float = 0.0,
    lung_from: str = "network",
    grow_mm: float = 0.0,
    copies: int = 0,
    look: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Typicality features and labels of the dataset's cases with a known label.

    With ``net`` the features are measured on its predicted segmentation post-processed
    as evaluate does it (lesions below ``min_lesion_mm3`` removed, the lung from
    ``lung_from``, lesions grown by ``grow_mm``), without it on the reference labels.
    With ``net``, ``copies`` > 0 and ``look`` (:func:`ctcurate.models.augment.scanner_look`),
    each case also gives ``copies`` more rows, each predicted on the case's image after
    ``look`` (the case's own row first, then its copies, case by case).
    """
    rows: list[npt.NDArray[np.float64]] = []
    ys: list[int] = []
    n_images = images_per_case(net is not None and look is not None, copies)
    for i in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[i]
        if sample["typical"] not in (0, 1):
            continue
        spacing = spacing_of(sample["meta"])
        for k in range(n_images):
            if net is None:
                label = sample["label"][0].numpy().astype(np.uint8)
            else:
                image = sample["image"]
                if k and look is not None:
                    image = look({"image": torch.as_tensor(image).clone()})["image"]
                label = predict_labels(net, image[None], roi, device, amp)[0]
                label = postprocess_label(
                    label,
                    np.asarray(image[0], dtype=np.float32),
                    spacing,
                    min_lesion_mm3,
                    lung_from,
                    grow_mm,
                )
            rows.append(typicality_features(label, spacing))
            ys.append(int(sample["typical"]))
    x = np.vstack(rows) if rows else np.zeros((0, len(FEATURES)))
    return x, np.asarray(ys, dtype=np.int64)


def model_card(
    params: TrainParams,
    roi: Sequence[int],
    patch: Sequence[int],
    manifest: Mapping[str, Any],
    trained: SegmenterRun,
    n_train: int,
    n_val: int,
) -> dict[str, Any]:
    """The content of ``model.json``: architecture, I/O contract, params, provenance."""
    pack_params = manifest.get("params", {})
    spacing = pack_params.get("spacing_mm") if isinstance(pack_params, Mapping) else None
    history = trained.history
    last = history[-1] if history else None
    best = next((h for h in history if h.epoch == trained.best_epoch), None)
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "architecture": {
            "name": "monai.networks.nets.UNet",
            **unet_config(params.channels, params.num_res_units),
        },
        "input": {
            "dtype": "float32",
            "layout": "(batch, 1, z, y, x)",
            "axis_order": "z, y, x as in the release (docs/release.md)",
            "hu_window": list(HU_WINDOW),
            "normalisation": "clip(hu, lo, hi); (hu - lo) / (hi - lo)",
            "spacing_mm": spacing,
            "shape": list(roi),
            "shape_multiple": shape_multiple(unet_config(params.channels, params.num_res_units)),
        },
        "output": {
            "layout": "(batch, 4, z, y, x) logits; label = argmax over channels",
            "labels": dict(ctcurate.release.format.LABELS),
            "lung": "label > 0",
        },
        "classifier": {
            "file": CLASSIFIER_FILE,
            "features": list(FEATURES),
            "features_from": params.classifier_features,
            "fitted_on": list(params.classifier_splits),
            "class_balanced": params.classifier_balanced,
            "scanner_copies": params.classifier_copies,
            "positive_class": "typical (RSNA 1-2)",
        },
        "params": params.model_dump(mode="json"),
        "release_id": manifest.get("release_id"),
        "n_train": n_train,
        "n_val": n_val,
        "training_patch": list(patch),
        "checkpoint": {
            "file": SEG_FILE,
            "chosen_by": "best mean of val lung and lesion Dice (last epoch without val)",
            "epoch": trained.best_epoch,
            "val_lung_dice": best.val_lung_dice if best else None,
            "val_lesion_dice": best.val_lesion_dice if best else None,
        },
        "final": {
            "file": LAST_FILE,
            "epoch": last.epoch if last else 0,
            "train_loss": _finite(last.train_loss) if last else None,
            "val_lung_dice": last.val_lung_dice if last else None,
            "val_lesion_dice": last.val_lesion_dice if last else None,
        },
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _training_shape(manifest: Mapping[str, Any], release: Path) -> tuple[int, int, int]:
    shapes = sorted(
        {tuple(int(s) for s in c["shape"]) for c in manifest["cases"] if c.get("split") == "train"}
    )
    if not shapes:
        msg = f"{release}: the release has no 'train' cases"
        raise InputError(msg)
    if len(shapes) > 1:
        msg = f"{release}: train cases have {len(shapes)} different shapes; train needs one"
        raise InputError(msg)
    z, y, x = shapes[0]
    return (z, y, x)


def open_live(live: Path) -> Any:
    """A DVCLive logger writing only under ``live`` (no dvc.yaml edits, no experiment).

    The stage's ``dvc.yaml`` entry declares the folder an out and the top-level ``metrics``
    / ``plots`` blocks name its files, so ``dvc exp run`` / ``dvc exp show`` / ``dvc plots``
    see the curves without DVCLive touching the repository. Its own repository probing
    (``_init_dvc``) is skipped because, with dvclive 3.49 / dvc 3.67, it (1) raises
    ``SCMError: Empty git repo`` in a git repository without commits (a fresh ``git init``
    project, as the end-to-end test builds) and (2) runs ``dvc init`` on an enclosing git
    repository that is not a DVC project (``ctcurate train`` run from a consumer's
    checkout). Lost by skipping it: only DVC Studio live updates.
    """
    from dvclive.live import Live

    class RepoFreeLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"

    return RepoFreeLive(dir=str(live), save_dvc_exp=False, dvcyaml=None, report=None)


def training_patch(
    params: TrainParams, roi: Sequence[int], multiple: int, release: Path
) -> tuple[int, int, int]:
    """The patch the network trains on: ``params.patch`` clipped to the volume ``roi``.

    ``None`` trains on whole volumes. Raises :class:`ParamsError` when a side is not a
    multiple of ``multiple`` (the U-Net's total stride).
    """
    wanted = tuple(roi) if params.patch is None else params.patch
    patch = (
        min(int(wanted[0]), int(roi[0])),
        min(int(wanted[1]), int(roi[1])),
        min(int(wanted[2]), int(roi[2])),
    )
    if any(side % multiple for side in patch):
        msg = (
            f"{release}: training patch {list(patch)} (train.patch within volume shape "
            f"{list(roi)}) is not a multiple of {multiple} on every side, as "
            f"{len(params.channels)} U-Net levels need (change train.patch or pack.shape, "
            "or lower train.channels levels)"
        )
        raise ParamsError(msg)
    return patch


@dataclass(frozen=True)
class LesionFilter:
    """The lesion post-processing chosen on val: the size cut and each candidate's Dice."""

    min_lesion_mm3: float
    val_lesion_dice: dict[str, float | None]
    lesion_grow_mm: float = 0.0
    val_lesion_dice_by_grow_mm: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``postprocess`` entry of ``model.json``."""
        return {
            "min_lesion_mm3": self.min_lesion_mm3,
            "chosen_by": "best mean val lesion Dice over train.min_lesion_mm3 (smallest on a tie)",
            "val_lesion_dice": self.val_lesion_dice,
            "lesion_grow_mm": self.lesion_grow_mm,
            "grow_chosen_by": (
                "best mean val lesion Dice over train.lesion_grow_mm after the size cut and "
                "the lung source (smallest on a tie)"
            ),
            "val_lesion_dice_by_grow_mm": self.val_lesion_dice_by_grow_mm,
        }


def _best_on_val(
    candidates: Sequence[float], score_of: Callable[[float], float | None]
) -> tuple[float, dict[str, float | None]]:
    """The candidate of the best score and every candidate's score (keyed ``f"{c:g}"``).

    Candidates are tried in increasing order and a later one must be strictly better, so
    a tie keeps the smallest; with no defined score the smallest is kept."""
    ordered = sorted({float(c) for c in candidates})
    scores: dict[str, float | None] = {}
    best, best_score = ordered[0], -math.inf
    for value in ordered:
        score = score_of(value)
        scores[f"{value:g}"] = score
        if score is not None and score > best_score:
            best, best_score = value, score
    return best, scores


def choose_lesion_filter(
    candidates: Sequence[float],
    cases: Sequence[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], Sequence[float]]],
) -> LesionFilter:
    """The size cut of :func:`remove_small_lesions` with the best mean lesion Dice.

    ``cases`` are (predicted, reference, spacing) of the val cases. Candidates are tried
    in increasing order and a later one must be strictly better, so a tie keeps the
    smallest. Without cases (or without a defined Dice) the smallest candidate is kept.
    """
    best, scores = _best_on_val(
        candidates,
        lambda cut: mean_defined(
            dice(remove_small_lesions(pred, cut, spacing) >= GGO, truth >= GGO)
            for pred, truth, spacing in cases
        ),
    )
    return LesionFilter(min_lesion_mm3=best, val_lesion_dice=scores)


def choose_lesion_growth(
    lesion_filter: LesionFilter,
    candidates: Sequence[float],
    cases: Sequence[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], Sequence[float]]],
    images: Sequence[npt.NDArray[Any]],
    lung_from: str,
) -> LesionFilter:
    """``lesion_filter`` with the reach of :func:`grow_lesions` of the best mean val lesion
    Dice, measured on the labels as evaluate post-processes them (the filter's size cut,
    ``lung_from``); ``images`` are the val cases' HU. Candidates in increasing order, a
    later one must be strictly better (a tie keeps the smallest); without cases the
    smallest is kept."""
    cut = lesion_filter.min_lesion_mm3
    # the size cut and the lung source once per case; only the growth differs per reach
    before = [
        (postprocess_label(pred, hu, spacing, cut, lung_from), hu, truth, spacing)
        for (pred, truth, spacing), hu in zip(cases, images, strict=True)
    ]
    best, scores = _best_on_val(
        candidates,
        lambda reach: mean_defined(
            dice(grow_lesions(label, hu, spacing, reach) >= GGO, truth >= GGO)
            for label, hu, truth, spacing in before
        ),
    )
    return replace(lesion_filter, lesion_grow_mm=best, val_lesion_dice_by_grow_mm=scores)


def predict_dataset(
    net: torch.nn.Module,
    dataset: Dataset[dict[str, Any]],
    roi: Sequence[int],
    device: torch.device,
    amp: bool,
) -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], tuple[float, float, float]]]:
    """(predicted, reference, spacing) of every case of ``dataset``."""
    out = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[i]
        pred = predict_labels(net, sample["image"][None], roi, device, amp)[0]
        truth = sample["label"][0].numpy().astype(np.uint8)
        out.append((pred, truth, spacing_of(sample["meta"])))
    return out


def fit_classifier(
    net: torch.nn.Module | None,
    datasets: Sequence[Dataset[dict[str, Any]]],
    params: TrainParams,
    roi: Sequence[int],
    device: torch.device,
    min_lesion_mm3: float = 0.0,
    grow_mm: float = 0.0,
) -> tuple[LogisticModel, int]:
    """The typicality classifier fitted on the cases of ``datasets`` with a known label.

    Features from ``net``'s predictions (``None``: from the reference labels); with
    ``params.classifier_balanced`` each class weighs half of the fit; with
    ``params.classifier_copies`` each case is also predicted that many times after
    :func:`ctcurate.models.augment.scanner_look` (seeded with ``params.seed``). Returns the
    model and the number of cases seen (with or without a label).
    """
    use_amp = params.amp and device.type == "cuda"
    look = scanner_look(params.augment, params.seed) if params.classifier_copies else None
    xs, ys, seen = [], [], 0
    for ds in datasets:
        x, y = case_features(
            net,
            ds,
            roi,
            device,
            use_amp,
            min_lesion_mm3,
            params.lung_from,
            grow_mm,
            params.classifier_copies,
            look,
        )
        xs.append(x)
        ys.append(y)
        seen += len(ds)  # type: ignore[arg-type]
    x_all = np.vstack(xs) if xs else np.zeros((0, len(FEATURES)))
    y_all = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
    weights = balanced_weights(y_all) if params.classifier_balanced else None
    model = fit_logistic(x_all, y_all, l2=params.classifier_l2, sample_weight=weights)
    return model, seen


def run(release: Path, out: Path, live: Path, params: TrainParams) -> None:
    """Train on ``release`` and publish the models folder ``out``; curves go to ``live``."""
    release, out, live = Path(release), Path(out), Path(live)
    check_output_dir(out, STAGE, [release], OWN_FILES)
    device = resolve_device(params.device)
    train_set = ctcurate.release.open(release, split="train", transform=None)
    manifest = train_set.manifest
    roi = _training_shape(manifest, release)
    config = unet_config(params.channels, params.num_res_units)
    multiple = shape_multiple(config)
    if any(side % multiple for side in roi):
        msg = (
            f"{release}: volume shape {list(roi)} is not a multiple of {multiple} on every "
            f"side, as {len(params.channels)} U-Net levels need (lower train.channels levels "
            "or change pack.shape)"
        )
        raise ParamsError(msg)
    patch = training_patch(params, roi, multiple, release)
    has_val = "val" in manifest.get("splits", {})
    val_set = ctcurate.release.open(release, split="val") if has_val else None
    n_val = len(val_set) if val_set is not None else 0
    log.info(
        "training on %d cases (%d val), shape %s, patch %s, device %s, %d epochs",
        len(train_set),
        n_val,
        list(roi),
        list(patch),
        device.type,
        params.epochs,
    )
    seed_everything(params.seed, params.threads, device)
    augment = train_transform(
        None if patch == roi else patch,
        params.lesion_crop_fraction,
        params.flip,
        params.seed,
        params.augment,
    )
    tensor_set = ctcurate.release.open(release, split="train", transform=augment)
    live.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open_live(live) as dvclive:
        dvclive.log_params(params.model_dump(mode="json"))

        def on_epoch(entry: EpochLog) -> None:
            dvclive.log_metric("train/loss", entry.train_loss)
            dvclive.log_metric("train/learning_rate", entry.lr)
            if entry.val_lung_dice is not None:
                dvclive.log_metric("val/lung_dice", entry.val_lung_dice)
            if entry.val_lesion_dice is not None:
                dvclive.log_metric("val/lesion_dice", entry.val_lesion_dice)
            dvclive.next_step()
            log.info(
                "epoch %d/%d: lr %.2e, loss %.4f, val lung dice %s, val lesion dice %s (%.0f s)",
                entry.epoch,
                params.epochs,
                entry.lr,
                entry.train_loss,
                _fmt(entry.val_lung_dice),
                _fmt(entry.val_lesion_dice),
                time.monotonic() - started,
            )

        trained = train_segmenter(tensor_set, val_set, params, roi, device, on_epoch)
        last_weights = state_dict_bytes(trained.net)
        net = trained.best_net()
        log.info("best checkpoint: epoch %d of %d", trained.best_epoch, len(trained.history))
        use_amp = params.amp and device.type == "cuda"
        val_cases = predict_dataset(net, val_set, roi, device, use_amp) if val_set else []
        lesion_filter = choose_lesion_filter(params.min_lesion_mm3, val_cases)
        val_images = (
            [  # HU as the release stores it (int16): half of float32's memory
                val_set[i]["image"][0].numpy().astype(np.int16) for i in range(len(val_set))
            ]
            if val_set
            else []
        )
        lesion_filter = choose_lesion_growth(
            lesion_filter, params.lesion_grow_mm, val_cases, val_images, params.lung_from
        )
        log.info(
            "lesion post-processing: components below %g mm^3 removed (val lesion dice %s), "
            "lesions grown by up to %g mm into dense lung (val lesion dice %s)",
            lesion_filter.min_lesion_mm3,
            _fmt(lesion_filter.val_lesion_dice[f"{lesion_filter.min_lesion_mm3:g}"]),
            lesion_filter.lesion_grow_mm,
            _fmt(lesion_filter.val_lesion_dice_by_grow_mm[f"{lesion_filter.lesion_grow_mm:g}"]),
        )
        feature_net = net if params.classifier_features == "predicted" else None
        fit_sets: list[Dataset[dict[str, Any]]] = [train_set]
        if "val" in params.classifier_splits and val_set is not None:
            fit_sets.append(val_set)
        if "train" not in params.classifier_splits:
            fit_sets = fit_sets[1:]
        classifier, seen = fit_classifier(
            feature_net,
            fit_sets,
            params,
            roi,
            device,
            lesion_filter.min_lesion_mm3,
            lesion_filter.lesion_grow_mm,
        )
        per_case = images_per_case(feature_net is not None, params.classifier_copies)
        log.info(
            "typicality classifier fitted on %d cases of %s (%d typical, %d other, %d unknown)"
            ", %d image(s) each",
            classifier.n_fit // per_case,
            "+".join(params.classifier_splits),
            classifier.n_positive // per_case,
            (classifier.n_fit - classifier.n_positive) // per_case,
            seen - classifier.n_fit // per_case,
            per_case,
        )
        if classifier.n_positive in (0, classifier.n_fit):
            log.warning("typicality: the fit cases lack a class; the classifier is a prior")
        dvclive.summary["best_epoch"] = trained.best_epoch
    card = model_card(params, roi, patch, manifest, trained, len(train_set), n_val)
    card["postprocess"] = {**lesion_filter.to_json(), "lung_from": params.lung_from}
    card["provenance"] = provenance("ctcurate.pipeline.train")
    weights = state_dict_bytes(net)
    with publish_dir(out, STAGE, inputs=[release], own=OWN_FILES) as tmp:
        (tmp / SEG_FILE).write_bytes(weights)
        (tmp / LAST_FILE).write_bytes(last_weights)
        (tmp / CLASSIFIER_FILE).write_text(dumps_json(classifier.to_json()), encoding="utf-8")
        (tmp / MODEL_FILE).write_text(dumps_json(card), encoding="utf-8")
    for ds in (train_set, tensor_set, val_set):
        if ds is not None:
            ds.close()
    log.info("models written to %s (%d epochs)", out, len(trained.history))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
