"""``ctcurate predict`` on CUDA against the CPU: one series, the same models, both outputs.

Runs :func:`ctcurate.pipeline.predict.run_series` on the series twice, with
``evaluate.device`` set to the device under test and to ``cpu``, and prints one JSON
object: the typicality probabilities, the volumes, the share of SEG pixels that agree and
the wall time of each run. Exits with status 1 when they disagree beyond the tolerances
(probability 0.001, volumes 0.1 % or 0.1 mL, SEG pixels 99.99 %), and with status 2 and a
one-line message when CUDA is not available (``--device cpu`` is a dry run: two CPU runs,
which must agree exactly).

    python scripts/gpu_predict_check.py --series DIR --models models [--params params.yaml]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROBABILITY_TOL = 1e-3
VOLUME_REL_TOL = 1e-3
VOLUME_ABS_TOL_ML = 0.1
SEG_AGREEMENT_MIN = 0.9999


def _run(series: Path, models: Path, params: Path, device: str, out: Path) -> dict[str, Any]:
    from ctcurate.params import EvaluateParams, PackParams, load_section
    from ctcurate.pipeline import predict

    pack = load_section(params, "pack", PackParams)
    evaluate = load_section(params, "evaluate", EvaluateParams).model_copy(
        update={"device": device}
    )
    start = time.perf_counter()
    content = predict.run_series(series, models, out, pack, evaluate)
    return {"seconds": round(time.perf_counter() - start, 2), "content": content}


def _seg_pixels(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(path).pixel_array


def compare(series: Path, models: Path, params: Path, device: str) -> dict[str, Any]:
    """Both runs and how far they agree; ``ok`` when within the tolerances."""
    from ctcurate.models.inference import SEG_FILE

    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            name: _run(series, models, params, dev, Path(tmp) / name)
            for name, dev in (("test", device), ("cpu", "cpu"))
        }
        a, b = (_seg_pixels(Path(tmp) / name / SEG_FILE) for name in ("test", "cpu"))
    p_test = runs["test"]["content"]["typicality"]["probability"]
    p_cpu = runs["cpu"]["content"]["typicality"]["probability"]
    vol_test = runs["test"]["content"]["volumes_ml"]
    vol_cpu = runs["cpu"]["content"]["volumes_ml"]
    agreement = float((a == b).mean()) if a.shape == b.shape else 0.0
    volumes_ok = all(
        abs(vol_test[k] - vol_cpu[k]) <= max(VOLUME_ABS_TOL_ML, VOLUME_REL_TOL * abs(vol_cpu[k]))
        for k in vol_cpu
    )
    return {
        "device": device,
        "probability": {"test": p_test, "cpu": p_cpu},
        "volumes_ml": {"test": vol_test, "cpu": vol_cpu},
        "seg_frames": list(b.shape),
        "seg_agreement": agreement,
        "seconds": {name: run["seconds"] for name, run in runs.items()},
        "ok": abs(p_test - p_cpu) <= PROBABILITY_TOL
        and volumes_ok
        and agreement >= SEG_AGREEMENT_MIN,
    }


def main() -> int:
    """Run the check; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, required=True, help="one CT series folder")
    parser.add_argument("--models", type=Path, required=True, help="train's models folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("gpu_predict_check: CUDA is not available on this machine\n")
        return 2
    result = compare(args.series, args.models, args.params, args.device)
    if args.device == "cuda":
        result["device_name"] = torch.cuda.get_device_name(0)
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
