"""SEG reading: the shortcut for ctcurate's own SEGs against the highdicom path.

``ctcurate.dicom.seg.read_seg_labels`` reads any SEG through highdicom, except SEGs that
``write_seg`` wrote, whose frame references it scans from the raw bytes. This times both
on the same files (the demo archive's SEGs, ``dvc repro synth`` builds them; or any folder
of SEGs written by ``write_seg``), checks they give the same label volume (slices asked in
shuffled order), and reports ms per SEG (the best of three passes).

    .venv/bin/python benchmarks/seg_bench.py [--small] [--seg data/synth/annotations/seg]

Writes ``benchmarks/out/seg_bench.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

from ctcurate.dicom import seg

OUT = Path(__file__).resolve().parent / "out"
Reader = Callable[[Path, list[str]], np.ndarray]


def _referenced(path: Path) -> list[str]:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return [
        str(item.ReferencedSOPInstanceUID)
        for series in header.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    ]


def _through_highdicom(path: Path, uids: list[str]) -> np.ndarray:
    """read_seg_labels with the shortcut turned off."""
    own = seg._read_own
    seg._read_own = lambda *args: None  # type: ignore[assignment]
    try:
        return seg.read_seg_labels(path, uids)
    finally:
        seg._read_own = own


def _best_ms(reader: Reader, work: dict[Path, list[str]]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for path, uids in work.items():
            reader(path, uids)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seg", type=Path, default=Path("data/synth/annotations/seg"))
    parser.add_argument("--small", action="store_true", help="the first 3 SEGs only")
    args = parser.parse_args()
    paths = sorted(args.seg.glob("*.dcm"))[: 3 if args.small else None]
    if not paths:
        print(f"no SEG under {args.seg} (dvc repro synth builds the demo's)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    work = {p: [u[i] for i in rng.permutation(len(u))] for p in paths for u in [_referenced(p)]}
    for path, uids in work.items():
        if not np.array_equal(seg.read_seg_labels(path, uids), _through_highdicom(path, uids)):
            print(f"{path.name}: the two paths differ", file=sys.stderr)
            return 1
    frames = [int(pydicom.dcmread(p, stop_before_pixels=True).NumberOfFrames) for p in paths]
    shortcut = _best_ms(seg.read_seg_labels, work)
    highdicom = _best_ms(_through_highdicom, work)
    result = {
        "segs": len(paths),
        "frames_mean": sum(frames) / len(frames),
        "shortcut_ms_per_seg": round(shortcut, 2),
        "highdicom_ms_per_seg": round(highdicom, 2),
        "highdicom_over_shortcut": round(highdicom / shortcut, 1),
    }
    table = "\n".join(
        [
            "| reader | ms per SEG |",
            "|---|---|",
            f"| shortcut (write_seg's own SEGs) | {shortcut:.1f} |",
            f"| highdicom | {highdicom:.1f} ({highdicom / shortcut:.0f}x) |",
        ]
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "seg_bench.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (OUT / "seg_bench.md").write_text(table + "\n")
    print(f"{len(paths)} SEGs, {result['frames_mean']:.0f} frames each on average; same labels")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
