"""pack throughput, release size, and the training read path against MONAI on DICOM.

One run, on the demo pipeline's inputs (``data/cases``, ``data/index``, ``data/synth``;
``dvc repro annotate_join`` builds them):

1. ``pack.run`` on the cases into a temporary release: cases/s, MB/s of DICOM read, and
   the release's size against the raw DICOM size of its series; once on one process (the
   baseline) and once on ``pack.workers`` (``ctcurate.executor``'s local pool). The cases
   are those whose series folder holds nothing but the series (MONAI reads a folder as one
   series; the demo archive plants stray and broken files in some), all of them or 8 with
   ``--small``.
2. Samples/s of one pass over the same cases, each a volume on the pack grid
   (``pack.spacing_mm``, ``pack.shape``):
   - the release through ``ctcurate.release.open`` (image and label);
   - MONAI ``LoadImaged`` (``PydicomReader``) on each case's DICOM series folder, then
     ``Spacingd`` to the pack spacing and ``ResizeWithPadOrCropd`` to the pack shape (the
     image only: the release sample carries its label too);
   - MONAI ``PersistentDataset`` of that pipeline: the pass that fills the cache and a
     cached pass, with the cache folder's size on disk.
   Passes interleave the three readers; each reader's best pass counts (wall time and
   CPU time of the process, the steadier number on a shared machine). Ratios are to the
   DICOM baseline and to PersistentDataset.

    .venv/bin/python benchmarks/pack_bench.py [--small]

Writes ``benchmarks/out/pack_bench.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import ctcurate.release
import ctcurate.release.format
from ctcurate.io.shards import read_shards, shard_name
from ctcurate.io.tables import write_parquet
from ctcurate.params import PackParams, load_section
from ctcurate.pipeline import pack

OUT = Path(__file__).resolve().parent / "out"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _timed_pass(get: Callable[[int], Any], n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one pass over ``n`` samples."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        get(i)
    return time.perf_counter() - start, time.process_time() - cpu


def read_instances(data: Path, columns: list[str]) -> list[dict[str, Any]]:
    """Index rows, from the sharded table (``index/instances/``) or a single file."""
    sharded = data / "index" / "instances"
    if sharded.is_dir():
        rows: list[dict[str, Any]] = read_shards(sharded, columns=columns).to_pylist()
    else:
        rows = pq.read_table(data / "index" / "instances.parquet", columns=columns).to_pylist()
    return rows


def series_folders(data: Path, case_ids: Sequence[str]) -> dict[str, Path]:
    """Each case's DICOM series folder, for the cases whose folder holds only their series."""
    cases = pq.read_table(data / "cases" / "cases.parquet").to_pylist()
    instances = read_instances(data, ["path", "site", "series_instance_uid"])
    by_series: dict[tuple[str, str], set[str]] = {}
    for row in instances:
        key = (str(row["site"]), str(row["series_instance_uid"]))
        by_series.setdefault(key, set()).add(str(row["path"]))
    archive = data / "synth" / "archive"
    wanted = set(case_ids)
    folders: dict[str, Path] = {}
    for case in sorted(cases, key=lambda c: str(c["case_id"])):
        paths = by_series.get((str(case["site"]), str(case["series_instance_uid"])), set())
        parents = {str(Path(p).parent) for p in paths}
        if str(case["case_id"]) not in wanted or len(parents) != 1:
            continue
        folder = archive / parents.pop()
        on_disk = {str(p.relative_to(archive)) for p in folder.iterdir() if p.is_file()}
        if on_disk == paths:
            folders[str(case["case_id"])] = folder
    return folders


def bench_pack(
    data: Path, params: PackParams, n_cases: int | None, work: Path
) -> tuple[Path, dict[str, Any]]:
    """Pack the first ``n_cases`` cases (all when None) into ``work/release``."""
    table = pq.read_table(data / "cases" / "cases.parquet")
    # Only cases whose series folder MONAI can read as it is (no other files in it), so
    # that every reader and every size covers the same cases.
    clean = series_folders(data, [str(c) for c in table["case_id"].to_pylist()])
    order = sorted(
        (i for i in range(table.num_rows) if str(table["case_id"][i]) in clean),
        key=lambda i: str(table["case_id"][i]),
    )
    if n_cases is not None:
        order = order[:n_cases]
    cases = work / "cases.parquet"
    write_parquet(cases, table.take(pa.array(order)))
    # pack reads the sharded index table; an older demo index is one file: reshard it.
    index = work / "index"
    rows = pa.Table.from_pylist(read_instances(data, pack.INSTANCE_COLUMNS))
    write_parquet(index / "instances" / shard_name(0), rows)
    out = work / "release"
    start = time.perf_counter()
    pack.run(
        cases=cases,
        index_dir=index,
        archive=data / "synth" / "archive",
        annotations_dir=data / "synth" / "annotations",
        out=out,
        params=params,
    )
    seconds = time.perf_counter() - start
    manifest = ctcurate.release.format.read_manifest(out)
    packed = {(str(c["site"]), str(c["series_instance_uid"])) for c in manifest["cases"]}
    instances = read_instances(data, ["site", "series_instance_uid", "size"])
    dicom_bytes = sum(
        int(r["size"]) for r in instances if (r["site"], r["series_instance_uid"]) in packed
    )
    release_bytes = _folder_bytes(out)
    shard_bytes = sum(int(s["bytes"]) for s in manifest["shards"].values())
    n = len(manifest["cases"])
    return out, {
        "cases_seen": len(order),
        "cases_packed": n,
        "seconds": seconds,
        "cases_per_s": n / seconds,
        "dicom_mb_per_s": dicom_bytes / seconds / 1e6,
        "dicom_bytes": dicom_bytes,
        "release_bytes": release_bytes,
        "shard_bytes": shard_bytes,
        "release_vs_dicom": release_bytes / dicom_bytes,
    }


def bench_read(
    release: Path, data: Path, params: PackParams, work: Path, passes: int
) -> dict[str, Any]:
    """Samples/s of the release, MONAI on DICOM and MONAI's PersistentDataset."""
    from monai.data import Dataset, PersistentDataset, PydicomReader
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        ResizeWithPadOrCropd,
        Spacingd,
    )

    manifest = ctcurate.release.format.read_manifest(release)
    folders = series_folders(data, [str(c["case_id"]) for c in manifest["cases"]])
    ids = sorted(folders)
    # MONAI arrays are (channel, x, y, z); the release's are (channel, z, y, x).
    transform = Compose(
        [
            LoadImaged(keys="image", reader=PydicomReader()),
            EnsureChannelFirstd(keys="image"),
            Spacingd(keys="image", pixdim=tuple(reversed(params.spacing_mm)), mode="bilinear"),
            ResizeWithPadOrCropd(keys="image", spatial_size=tuple(reversed(params.shape))),
        ]
    )
    items = [{"image": str(folders[cid])} for cid in ids]
    full = ctcurate.release.open(release)
    index = {str(c["case_id"]): i for i, c in enumerate(full.cases)}
    released = [index[cid] for cid in ids]
    dicom = Dataset(items, transform=transform)
    cache = work / "persistent"
    persistent = PersistentDataset(items, transform=transform, cache_dir=cache)

    shape_release = tuple(full[released[0]]["image"].shape)
    shape_monai = tuple(dicom[0]["image"].shape)
    if shape_release[1:] != tuple(reversed(shape_monai[1:])):
        msg = f"release sample {shape_release} and MONAI sample {shape_monai} differ"
        raise RuntimeError(msg)

    n = len(ids)
    readers: dict[str, Callable[[int], Any]] = {
        "release": lambda i: full[released[i]],
        "monai_dicom": dicom.__getitem__,
        "persistent_dataset": persistent.__getitem__,
    }
    fill, _ = _timed_pass(persistent.__getitem__, n)
    # Passes interleave the readers, so that load from other processes hits all alike;
    # each reader's best pass counts (DICOM, a hundred times slower, gets fewer).
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
    for round_ in range(passes):
        for name, get in readers.items():
            if name != "monai_dicom" or round_ < 2:
                timings[name].append(_timed_pass(get, n))
    full.close()
    sizes = {
        "release": sum(int(s["bytes"]) for s in manifest["shards"].values()),
        "monai_dicom": sum(_folder_bytes(folders[cid]) for cid in ids),
        "persistent_dataset": _folder_bytes(cache),
    }
    rows = []
    base = n / min(w for w, _ in timings["monai_dicom"])
    base_cpu = min(c for _, c in timings["monai_dicom"]) / n
    for name, times in timings.items():
        rate = n / min(w for w, _ in times)
        cpu = min(c for _, c in times) / n
        rows.append(
            {
                "reader": name,
                "passes": len(times),
                "samples_per_s": rate,
                "vs_dicom": rate / base,
                "cpu_ms_per_sample": cpu * 1e3,
                "cpu_vs_dicom": base_cpu / cpu,
                "bytes_on_disk": sizes[name],
            }
        )
    persistent_row = rows[2]
    for row in rows:
        row["vs_persistent"] = row["samples_per_s"] / persistent_row["samples_per_s"]
        row["cpu_vs_persistent"] = persistent_row["cpu_ms_per_sample"] / row["cpu_ms_per_sample"]
        row["disk_vs_release"] = row["bytes_on_disk"] / sizes["release"]
    return {
        "cases": n,
        "sample_shape_zyx": list(shape_release[1:]),
        "persistent_fill_samples_per_s": n / fill,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    p, r = result["pack"], result["read"]
    mb = 1e6
    one = result["pack_one_worker"]
    lines = [
        f"pack on 1 process: {one['seconds']:.1f} s = {one['cases_per_s']:.2f} cases/s; "
        f"on {result['workers']} workers: {p['seconds']:.1f} s = {p['cases_per_s']:.2f} "
        f"cases/s ({p['cases_per_s'] / one['cases_per_s']:.2f}x)",
        "",
        f"pack: {p['cases_packed']} of {p['cases_seen']} cases in {p['seconds']:.1f} s = "
        f"{p['cases_per_s']:.2f} cases/s, {p['dicom_mb_per_s']:.1f} MB/s of DICOM; release "
        f"{p['release_bytes'] / mb:.1f} MB (shards {p['shard_bytes'] / mb:.1f} MB) vs DICOM "
        f"{p['dicom_bytes'] / mb:.1f} MB = {p['release_vs_dicom']:.3f}x",
        "",
        f"read path: {r['cases']} cases, samples of {'x'.join(map(str, r['sample_shape_zyx']))} "
        f"(z, y, x), best pass of each reader; PersistentDataset cache fill "
        f"{r['persistent_fill_samples_per_s']:.1f} samples/s",
        "",
        "| reader | passes | samples/s | x DICOM | x PersistentDataset | CPU ms/sample "
        "| CPU x DICOM | CPU x PersistentDataset | MB on disk | disk x release |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['reader']} | {row['passes']} | {row['samples_per_s']:.1f} "
        f"| {row['vs_dicom']:.1f} | {row['vs_persistent']:.2f} "
        f"| {row['cpu_ms_per_sample']:.1f} | {row['cpu_vs_dicom']:.1f} "
        f"| {row['cpu_vs_persistent']:.2f} | {row['bytes_on_disk'] / mb:.2f} "
        f"| {row['disk_vs_release']:.2f} |"
        for row in r["rows"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="pack and read 8 cases only")
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    needed = ["cases/cases.parquet", "index", "synth/archive"]
    if missing := [n for n in needed if not (args.data / n).exists()]:
        sys.stderr.write(
            f"missing {args.data / missing[0]}: build the demo inputs first "
            "(dvc repro annotate_join)\n"
        )
        return 2
    params = load_section(args.params, "pack", PackParams)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n_cases = 8 if args.small else None
        serial = params.model_copy(update={"workers": 1})
        (work / "one").mkdir()
        _, one_result = bench_pack(args.data, serial, n_cases, work / "one")
        release, pack_result = bench_pack(args.data, params, n_cases, work)
        read_result = bench_read(release, args.data, params, work, 3 if args.small else 5)
    result = {
        "small": args.small,
        "workers": params.workers,
        "pack_one_worker": one_result,
        "pack": pack_result,
        "read": read_result,
    }
    text = table(result)
    OUT.mkdir(exist_ok=True)
    (OUT / "pack_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "pack_bench.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
