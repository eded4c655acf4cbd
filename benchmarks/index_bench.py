"""Header-scan throughput of ``ctcurate index`` against the baselines, side by side.

Usage::

    .venv/bin/python benchmarks/index_bench.py            # 100,000 + 25,000 instances
    .venv/bin/python benchmarks/index_bench.py --small    # a quick check (3,000 + 1,000)

On a header-heavy synthetic archive (:func:`ctcurate.demo.headerheavy.write_header_heavy`)
it measures, in one run:

- files/s of ``ctcurate index --workers 1`` and ``--workers 2`` (whole archive, from
  scratch), of a naive ``pydicom.dcmread(stop_before_pixels=True)`` loop, of python-gdcm's
  ``Scanner`` on the same tags (installed apart, see :func:`gdcm_scanner`), and of
  reading the first 16 KB of every file (the I/O limit); the baselines run on a sample of
  the files (``--sample``);
- an incremental rerun after 1% of the files were touched (new mtime), as a fraction of
  the full ``--workers 1`` run;
- peak RSS of ``ctcurate index --workers 1`` on the large and the small archive.

Files are in the page cache (just written): the numbers are CPU-bound rates. Each method
is timed in wall seconds and in CPU seconds (its process's, with reaped workers): on a
shared machine the CPU rate (files per CPU-second) is the per-core rate, the wall rate
depends on the load. Results go to ``benchmarks/out/index_bench.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
BIN = Path(sys.executable).parent
SEED = 20200101
#: Tags the index reads, as (group, element), for the gdcm Scanner.
TAGS = [
    (0x0008, 0x0016),
    (0x0008, 0x0018),
    (0x0020, 0x000D),
    (0x0020, 0x000E),
    (0x0010, 0x0020),
    (0x0008, 0x0020),
    (0x0008, 0x0060),
    (0x0008, 0x0008),
    (0x0008, 0x103E),
    (0x0018, 0x0015),
    (0x0008, 0x1030),
    (0x0018, 0x1030),
    (0x0032, 0x1060),
    (0x0018, 0x1210),
    (0x0008, 0x0070),
    (0x0018, 0x0050),
    (0x0028, 0x0030),
    (0x0028, 0x0010),
    (0x0028, 0x0011),
    (0x0020, 0x0032),
    (0x0020, 0x0037),
    (0x0020, 0x0013),
    (0x0028, 0x1053),
    (0x0028, 0x1052),
    (0x0028, 0x0301),
    (0x0010, 0x0010),
    (0x0010, 0x0030),
    (0x0008, 0x0080),
]


def archive(n: int, work: Path) -> Path:
    """A header-heavy archive of ``n`` instances (kept between runs)."""
    from ctcurate.demo.headerheavy import write_header_heavy

    folder = work / f"hh-{n}"
    if not (folder / "archive").is_dir():
        write_header_heavy(folder, n, SEED)
    return folder / "archive"


def snapshot(arch: Path, dest: Path) -> Path:
    from ctcurate.io.tables import write_parquet
    from ctcurate.pipeline.snapshot import list_archive

    write_parquet(dest, list_archive(arch))
    return dest


def run_index(arch: Path, listing: Path, out: Path, workers: int, fresh: bool) -> dict[str, Any]:
    """Time one ``ctcurate index`` process; its peak RSS (largest process of its tree)."""
    if fresh:  # from scratch: no previous index, no work folder of an interrupted run
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.work", ignore_errors=True)
    cmd = [
        str(BIN / "ctcurate"),
        "index",
        "--archive",
        str(arch),
        "--snapshot",
        str(listing),
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        msg = f"{' '.join(cmd)} failed:\n{err.decode(errors='replace')}"
        raise SystemExit(msg)
    report = json.loads((out / "report.json").read_text())
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # with its reaped worker processes
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "files": report["files_seen"],
    }


def naive_pydicom(paths: list[Path]) -> tuple[float, float]:
    """Wall and CPU seconds of a ``pydicom.dcmread(stop_before_pixels=True)`` loop."""
    import pydicom

    start, cpu = time.perf_counter(), time.process_time()
    for p in paths:
        try:
            pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # the naive loop skips bad files
            continue
    return time.perf_counter() - start, time.process_time() - cpu


GDCM_DIR = OUT / "gdcm"
GDCM_SCAN = """
import sys, time, gdcm
tags, names = eval(sys.argv[1]), sys.stdin.read().splitlines()
scanner = gdcm.Scanner()
for group, element in tags:
    scanner.AddTag(gdcm.Tag(group, element))
start, cpu = time.perf_counter(), time.process_time()
ok = scanner.Scan(names)
print(time.perf_counter() - start, time.process_time() - cpu) if ok else print("failed")
"""


def gdcm_scanner(paths: list[Path]) -> tuple[float, float] | str:
    """Wall and CPU seconds of python-gdcm's Scanner on ``paths``, run in its own process.

    python-gdcm is kept out of the project environment (pydicom would pick it up as a
    pixel decoder and change which transfer syntaxes index accepts); install it with
    ``.venv/bin/pip install --target benchmarks/out/gdcm python-gdcm``.
    """
    if not (GDCM_DIR / "gdcm.py").is_file():
        return f"python-gdcm not installed in {GDCM_DIR} (see the docstring)"
    proc = subprocess.run(
        [sys.executable, "-c", GDCM_SCAN, repr(TAGS)],
        input="\n".join(str(p.resolve()) for p in paths),
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(GDCM_DIR)},
        cwd=GDCM_DIR,
        check=False,
    )
    try:
        wall, cpu = (float(v) for v in proc.stdout.split())
    except ValueError:
        return f"gdcm Scanner failed: {(proc.stderr or proc.stdout).strip()[-200:]}"
    return wall, cpu


def first_16k(paths: list[Path]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for p in paths:
        with p.open("rb") as fh:
            fh.read(16384)
    return time.perf_counter() - start, time.process_time() - cpu


def touch_one_percent(arch: Path, listing: Path) -> int:
    """Give 1% of the files (every 100th of the listing) a new mtime; return how many."""
    paths = pq.read_table(listing, columns=["path"])["path"].to_pylist()
    changed = paths[::100]
    for rel in changed:
        full = arch / rel
        st = full.stat()
        os.utime(full, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    return len(changed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="3,000 + 1,000 instances")
    parser.add_argument("--sample", type=int, default=20000, help="files for the baselines")
    args = parser.parse_args()
    large, small = (3000, 1000) if args.small else (100_000, 25_000)
    work = OUT / "index_bench"
    work.mkdir(parents=True, exist_ok=True)

    arch = archive(large, work)
    listing = snapshot(arch, work / f"listing-{large}.parquet")
    rels = pq.read_table(listing, columns=["path"])["path"].to_pylist()
    sample = [arch / r for r in rels[:: max(1, len(rels) // args.sample)]][: args.sample]

    rows: list[dict[str, Any]] = []
    naive_s, naive_cpu = naive_pydicom(sample)
    naive_rate = len(sample) / naive_s
    rows.append(
        {
            "method": "naive pydicom.dcmread loop (1 core)",
            "files": len(sample),
            "seconds": naive_s,
            "cpu_seconds": naive_cpu,
        }
    )
    gdcm = gdcm_scanner(sample)
    if isinstance(gdcm, tuple):
        rows.append(
            {
                "method": "python-gdcm Scanner (1 core)",
                "files": len(sample),
                "seconds": gdcm[0],
                "cpu_seconds": gdcm[1],
            }
        )
    else:
        rows.append({"method": "python-gdcm Scanner (1 core)", "note": gdcm})
    wall_16k, cpu_16k = first_16k(sample)
    rows.append(
        {
            "method": "read first 16 KB (I/O limit, 1 core)",
            "files": len(sample),
            "seconds": wall_16k,
            "cpu_seconds": cpu_16k,
        }
    )
    out = work / "index-out"
    w1 = run_index(arch, listing, out, workers=1, fresh=True)
    rows.append({"method": "ctcurate index --workers 1", **w1})
    w2 = run_index(arch, listing, work / "index-out-2", workers=2, fresh=True)
    rows.append({"method": "ctcurate index --workers 2", **w2})
    n_changed = touch_one_percent(arch, listing)
    listing2 = snapshot(arch, work / f"listing-{large}-touched.parquet")
    inc = run_index(arch, listing2, out, workers=1, fresh=False)
    rows.append(
        {
            "method": f"incremental rerun, 1% touched ({n_changed} files), --workers 1",
            **inc,
            "fraction_of_full": inc["seconds"] / w1["seconds"],
        }
    )
    small_arch = archive(small, work)
    small_listing = snapshot(small_arch, work / f"listing-{small}.parquet")
    ws = run_index(small_arch, small_listing, work / "index-out-small", workers=1, fresh=True)
    rows.append({"method": f"ctcurate index --workers 1 ({small} instances)", **ws})

    gdcm_rate = len(sample) / gdcm[0] if isinstance(gdcm, tuple) else None
    gdcm_cpu_rate = len(sample) / gdcm[1] if isinstance(gdcm, tuple) else None
    for row in rows:
        if "seconds" in row:
            row["files_per_s"] = row["files"] / row["seconds"]
            row["files_per_cpu_s"] = row["files"] / max(row["cpu_seconds"], 1e-9)
            row["vs_naive"] = row["files_per_s"] / naive_rate
            if gdcm_rate is not None and gdcm_cpu_rate is not None:
                row["vs_gdcm"] = row["files_per_s"] / gdcm_rate
                row["vs_gdcm_cpu"] = row["files_per_cpu_s"] / gdcm_cpu_rate
    per_core = w1["files"] / w1["cpu_seconds"]  # per CPU-second: what one core does
    hours = {n: 160e6 / (per_core * n) / 3600 for n in (1, 16, 64, 256)}
    result = {
        "instances": {"large": w1["files"], "small": ws["files"]},
        "rows": rows,
        "peak_rss_mb": {"large": w1["peak_rss_mb"], "small": ws["peak_rss_mb"]},
        "projection_hours_160M": hours,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    lines = [
        f"Header-heavy archive: {w1['files']} files (baselines on {len(sample)} of them); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
        "",
        "| method | files | seconds | files/s | × naive pydicom | × gdcm Scanner "
        "| CPU s | files per CPU-s | × gdcm per CPU-s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "seconds" not in row:
            lines.append(f"| {row['method']} | – | – | – | – | – | – | – | – | {row['note']} |")
            continue
        rss = f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else ""
        vs_gdcm = f"{row['vs_gdcm']:.2f}" if "vs_gdcm" in row else "–"
        vs_gdcm_cpu = f"{row['vs_gdcm_cpu']:.2f}" if "vs_gdcm_cpu" in row else "–"
        lines.append(
            f"| {row['method']} | {row['files']} | {row['seconds']:.1f} | "
            f"{row['files_per_s']:.0f} | {row['vs_naive']:.2f} | {vs_gdcm} | "
            f"{row['cpu_seconds']:.1f} | {row['files_per_cpu_s']:.0f} | {vs_gdcm_cpu} | {rss} |"
        )
    lines += [
        "",
        f"Incremental rerun: {inc['seconds'] / w1['seconds']:.1%} of the full run.",
        f"Peak RSS: {w1['peak_rss_mb']:.0f} MB at {w1['files']} vs {ws['peak_rss_mb']:.0f} MB "
        f"at {ws['files']} instances ({w1['peak_rss_mb'] / ws['peak_rss_mb'] - 1:+.1%}).",
        "160 M instances at the measured per-core rate of --workers 1 ("
        f"{per_core:.0f} files per CPU-second): "
        + ", ".join(f"{h:.1f} h on {n} workers" for n, h in hours.items()),
    ]
    table = "\n".join(lines) + "\n"
    (OUT / "index_bench.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (OUT / "index_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
