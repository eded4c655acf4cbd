"""HDF5 compression for release shards: write MB/s, read MB/s and size ratio per codec.

Runs every codec on the same CT-like volumes, with the release's chunk layout (slabs of
``CHUNK_Z`` slices, whole in-plane): the int16 HU images and uint8 label volumes of the
demo release (``data/release``) when it exists, else synthetic volumes (a body cylinder
of soft tissue around two air-filled lungs with noise). Results are ratios to gzip-4 +
shuffle, the codec releases used before.

    .venv/bin/python benchmarks/h5_bench.py [--small] [--release data/release]

Writes ``benchmarks/out/h5_bench.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt

from ctcurate.release.format import CASES_GROUP, CHUNK_Z, IMAGE, LABEL, SHARD_DIR

OUT = Path(__file__).resolve().parent / "out"
BASELINE = "gzip-4+shuffle"

Volumes = list[tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]]


def codecs() -> dict[str, Mapping[str, Any]]:
    """create_dataset keyword arguments of every codec compared."""
    return {
        "none": {},
        "gzip-1+shuffle": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
        "gzip-4+shuffle": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
        "lz4": {**hdf5plugin.LZ4()},
        "blosc-lz4+shuffle": {
            **hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
        },
        "blosc-lz4hc-5+shuffle": {
            **hdf5plugin.Blosc(cname="lz4hc", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
        },
        "blosc-zstd-1+shuffle": {
            **hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)
        },
        "blosc-zstd-3+shuffle": {
            **hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE)
        },
        "blosc-zstd-5+shuffle": {
            **hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
        },
        "blosc-zstd-5+bitshuffle": {
            **hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE)
        },
    }


def release_volumes(release: Path, limit: int) -> Volumes:
    """Image and label volumes of the first ``limit`` cases of a release."""
    volumes: Volumes = []
    for shard in sorted((release / SHARD_DIR).glob("*.h5")):
        with h5py.File(shard, "r") as h5:
            for case_id in sorted(h5[CASES_GROUP]):
                grp = h5[CASES_GROUP][case_id]
                volumes.append((grp[IMAGE][()], grp[LABEL][()]))
                if len(volumes) >= limit:
                    return volumes
    return volumes


def synthetic_volumes(n: int, shape: tuple[int, int, int], seed: int = 0) -> Volumes:
    """CT-like volumes: air outside a soft-tissue body, two air-filled lungs, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    body = (y / 0.8) ** 2 + (x / 0.95) ** 2 < 1
    lungs = (((x - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 0.9) ** 2 < 1) | (
        ((x + 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 0.9) ** 2 < 1
    )
    volumes: Volumes = []
    for _ in range(n):
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape)
        hu[lungs] = -850 + rng.normal(0, 30, int(lungs.sum()))
        label = lungs.astype(np.uint8)
        volumes.append((np.clip(hu, -1024, 3071).astype(np.int16), label))
    return volumes


def _write(path: Path, volumes: Volumes, kwargs: Mapping[str, Any]) -> None:
    with h5py.File(path, "w") as h5:
        for i, (image, label) in enumerate(volumes):
            grp = h5.create_group(f"{i:05d}")
            chunks = (min(CHUNK_Z, image.shape[0]), *image.shape[1:])
            for name, arr in ((IMAGE, image), (LABEL, label)):
                grp.create_dataset(name, data=arr, chunks=chunks, track_times=False, **kwargs)


def _read(path: Path) -> int:
    total = 0
    with h5py.File(path, "r") as h5:
        for key in sorted(h5):
            total += int(h5[key][IMAGE][()].nbytes + h5[key][LABEL][()].nbytes)
    return total


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(volumes: Volumes, repeats: int, workdir: Path) -> list[dict[str, Any]]:
    """One row per codec: MB/s written and read, bytes on disk, ratio to raw."""
    raw = sum(int(i.nbytes + lab.nbytes) for i, lab in volumes)
    rows = []
    for name, kwargs in codecs().items():
        path = workdir / f"{name}.h5"
        write_s = _best(lambda p=path, k=kwargs: _write(p, volumes, k), repeats)  # type: ignore[misc]
        again = workdir / f"{name}.again.h5"
        _write(again, volumes, kwargs)
        read_s = _best(lambda p=path: _read(p), repeats)  # type: ignore[misc]
        size = path.stat().st_size
        rows.append(
            {
                "codec": name,
                "write_mb_s": raw / write_s / 1e6,
                "read_mb_s": raw / read_s / 1e6,
                "bytes": size,
                "ratio": raw / size,
                "deterministic": path.read_bytes() == again.read_bytes(),
            }
        )
    base = next(r for r in rows if r["codec"] == BASELINE)
    for row in rows:
        row["read_vs_base"] = row["read_mb_s"] / base["read_mb_s"]
        row["write_vs_base"] = row["write_mb_s"] / base["write_mb_s"]
        row["size_vs_base"] = row["bytes"] / base["bytes"]
    return rows


def table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| codec | write MB/s | read MB/s | ratio (raw/disk) | read × base | size × base "
        "| byte-identical rerun |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['codec']} | {r['write_mb_s']:.0f} | {r['read_mb_s']:.0f} | {r['ratio']:.2f} "
        f"| {r['read_vs_base']:.2f} | {r['size_vs_base']:.2f} | {r['deterministic']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="few volumes, one repeat")
    parser.add_argument("--release", type=Path, default=Path("data/release"))
    args = parser.parse_args(argv)
    limit, repeats = (8, 1) if args.small else (64, 3)
    if (args.release / SHARD_DIR).is_dir():
        volumes = release_volumes(args.release, limit)
        source = f"{len(volumes)} cases of {args.release}"
    else:
        volumes = synthetic_volumes(limit, (48, 64, 64))
        source = f"{len(volumes)} synthetic volumes"
    shape = "x".join(map(str, volumes[0][0].shape))
    raw_mb = sum(i.nbytes + lab.nbytes for i, lab in volumes) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(volumes, repeats, Path(tmp))
    header = (
        f"HDF5 codecs on {source} (int16 image + uint8 label, {shape}, {raw_mb:.1f} MB raw, "
        f"chunks of {CHUNK_Z} slices, best of {repeats}); baseline {BASELINE}"
    )
    text = table(rows, header)
    OUT.mkdir(exist_ok=True)
    (OUT / "h5_bench.json").write_text(
        json.dumps({"source": source, "repeats": repeats, "rows": rows}, indent=2) + "\n"
    )
    (OUT / "h5_bench.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
