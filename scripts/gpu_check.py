"""A few AMP training steps of the segmentation network on CUDA.

Prints one JSON object on stdout: samples/s over the timed steps, peak GPU memory, the
device name and the settings. Exits with status 2 and a one-line message when CUDA is not
available.

    python scripts/gpu_check.py [--steps 20] [--batch 4] [--shape 48 64 64]
        [--channels 8 16 32 64] [--no-amp]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    """Run the check; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 64, 64), metavar=("Z", "Y", "X"))
    parser.add_argument("--channels", type=int, nargs="+", default=(8, 16, 32, 64))
    parser.add_argument("--res-units", type=int, default=0)
    parser.add_argument("--no-amp", action="store_true", help="train in float32")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.stderr.write("gpu_check: CUDA is not available on this machine; nothing to check\n")
        return 2
    from monai.losses.dice import DiceCELoss

    from ctcurate.labels import N_CLASSES
    from ctcurate.models.nets import build_unet, normalise_hu, unet_config

    device = torch.device("cuda")
    torch.manual_seed(0)
    config = unet_config(args.channels, args.res_units)
    net = build_unet(config).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    amp = not args.no_amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, 1, *args.shape)
    image = torch.rand(shape, generator=gen, device=device) * 1624.0 - 1024.0
    label = torch.randint(0, N_CLASSES, shape, generator=gen, device=device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", enabled=amp):
            loss = loss_fn(net(normalise_hu(image)), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "amp": amp,
        "batch": args.batch,
        "shape": list(args.shape),
        "channels": list(args.channels),
        "steps": args.steps,
        "seconds": round(elapsed, 4),
        "samples_per_s": round(args.steps * args.batch / elapsed, 2),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
    }
    sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
