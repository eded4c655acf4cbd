"""The real training path of ``ctcurate train`` on CUDA: AMP, pinned memory, loader workers.

Builds a tiny synthetic release in a temporary folder (blob-shaped lungs with GGO and
consolidation), trains the segmentation network through ``ctcurate.release.open`` and
``ctcurate.pipeline.train.train_segmenter`` with ``device=cuda`` and ``amp=true``, fits the
typicality classifier on the predicted segmentation and prints one JSON object: epochs,
seconds, samples/s, peak GPU memory, the loss curve and validation Dice. Exits with status
2 and a one-line message when CUDA is not available.

    python scripts/gpu_train_check.py [--cases 12] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _case(rng: np.random.Generator, shape: tuple[int, int, int], typical: int) -> tuple:
    z, y, x = np.indices(shape, dtype=np.float32)
    image = np.full(shape, 40.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    for cx in (shape[2] * 0.3, shape[2] * 0.7):
        lung = ((x - cx) / (shape[2] * 0.17)) ** 2 + ((y - shape[1] / 2) / (shape[1] * 0.3)) ** 2
        lung += ((z - shape[0] / 2) / (shape[0] * 0.45)) ** 2
        label[lung < 1.0] = 1
    lesion_at = rng.integers(0, shape[2])
    ggo = (label == 1) & ((x - lesion_at) ** 2 + (z - shape[0] / 2) ** 2 < 40)
    label[ggo] = 2 if typical else 3
    image[label == 1] = -850.0
    image[label == 2] = -500.0
    image[label == 3] = 20.0
    image += rng.normal(0.0, 20.0, shape).astype(np.float32)
    return image.astype(np.int16), label


def main() -> int:
    """Run the check; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a dry run of the same path without AMP",
    )
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("gpu_train_check: CUDA is not available on this machine\n")
        return 2
    from ctcurate.io.atomic import write_json
    from ctcurate.models.augment import train_transform
    from ctcurate.models.checkpoint import resolve_device, seed_everything
    from ctcurate.params import TrainParams
    from ctcurate.pipeline.train import case_features, train_segmenter
    from ctcurate.release import open
    from ctcurate.release.format import CaseRecord, build_manifest, write_shard

    shape = (32, 64, 64)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        release = Path(tmp) / "release"
        records = []
        for i in range(args.cases):
            typical = i % 2
            image, label = _case(rng, shape, typical)
            split = "train" if i < args.cases - 4 else ("val" if i < args.cases - 2 else "test")
            meta = {
                "case_id": f"c{i:03d}",
                "split": split,
                "site": f"H0{1 + i % 3}",
                "typical": typical,
                "spacing_mm": [4.0, 4.0, 4.0],
            }
            records.append(CaseRecord(f"c{i:03d}", image, label, meta))
        entries = write_shard(release / "shards" / "shard-00000.h5", records)
        write_json(release / "manifest.json", build_manifest(release, entries, {}, "gpu-check"))

        params = TrainParams(
            device=args.device,
            amp=True,
            epochs=args.epochs,
            batch_size=4,
            patch=(16, 64, 64),
            val_every=2,
        )
        device = resolve_device(params.device)
        seed_everything(params.seed, params.threads, device)
        augment = train_transform((16, 64, 64), params.lesion_crop_fraction, True, params.seed)
        train_set = open(release, split="train", transform=augment)
        val_set = open(release, split="val")
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run = train_segmenter(train_set, val_set, params, shape, device)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        x, y = case_features(run.best_net(), open(release, split="test"), shape, device, cuda)
        report = {
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "amp": params.amp and cuda,
            "pin_memory": cuda,
            "epochs": args.epochs,
            "train_cases": len(train_set),
            "seconds": round(seconds, 3),
            "samples_per_s": round(args.epochs * len(train_set) / seconds, 2),
            "peak_memory_mib": (
                round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None
            ),
            "loss": [round(e.train_loss, 4) for e in run.history],
            "val_lung_dice": [e.val_lung_dice for e in run.history if e.val_lung_dice is not None],
            "best_epoch": run.best_epoch,
            "test_features_shape": list(x.shape),
            "test_labels": y.tolist(),
        }
    sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    ok = report["loss"][-1] < report["loss"][0] and x.shape[0] == 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
