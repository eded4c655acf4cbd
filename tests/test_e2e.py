"""End to end: `dvc repro` on a tiny synthetic archive in a copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "synth": {"patients": 14, "matrix": 48},
    "pack": {"shape": [24, 32, 32], "spacing_mm": [8.0, 7.0, 7.0]},
    "train": {"epochs": 1, "channels": [4, 8, 16]},
}


def _project_copy(dest: Path) -> Path:
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "requirements.lock"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("src", "stages"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".dvc").mkdir()
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    (dest / "data").mkdir()
    shutil.copy2(ROOT / "data" / ".gitignore", dest / "data" / ".gitignore")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
    }
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_dvc_repro_builds_a_verified_release(tmp_path: Path) -> None:
    proj = _project_copy(tmp_path)
    _run(["dvc", "repro"], proj)
    # DuckDB writes a random id into the catalog: DVC must not hash it (.dvcignore)
    _run(["dvc", "check-ignore", "data/index/catalog.duckdb"], proj)

    index_report = json.loads((proj / "data/index/report.json").read_text())
    assert index_report["files_seen"] == (
        index_report["files_indexed"]
        + index_report["files_quarantined"]
        + index_report["files_skipped"]
    )
    assert index_report["files_quarantined"] > 0  # the archive's broken files

    manifest = json.loads((proj / "data/release/manifest.json").read_text())
    assert len(manifest["cases"]) > 0
    assert {"train", "test"} <= set(manifest["splits"])
    verified = _run([str(BIN / "ctcurate"), "verify", "data/release"], proj)
    assert manifest["release_id"][:16] in verified.stdout

    metrics = json.loads((proj / "metrics/eval.json").read_text())
    for key in ("lung_dice", "typicality_accuracy", "n_test"):
        assert key in metrics
    shown = _run(["dvc", "metrics", "show", "--json"], proj)
    assert "lung_dice" in shown.stdout

    # Nothing changed: only the (always-run) snapshot runs, nothing downstream of it.
    again = _run(["dvc", "repro"], proj)
    ran = [line for line in again.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'snapshot':"], again.stdout

    # From scratch, forced: the same release.
    _run(["dvc", "repro", "-f"], proj)
    rebuilt = json.loads((proj / "data/release/manifest.json").read_text())
    assert rebuilt["release_id"] == manifest["release_id"]


# --- canary: header text and file names never leave the archive's catalog ------------------

CANARY = "QX7K2ZV9"
#: Free-text value representations; a canary appended to them keeps every rule matching.
TEXT_VRS = {"LO": 64, "SH": 16, "ST": 1024, "LT": 10240, "UT": 2**20}
#: Outputs allowed to hold archive text: the archive, its listing (file names) and the index
#: catalog (paths, series descriptions, kernels), which the rules query.
CATALOG = ("data/synth", "data/snapshot", "data/index")
#: Tables that keep the archive's patient id (PCR results are linked by it, splits group by
#: it) in this column only.
PATIENT_TABLES = ("data/select/", "data/cases/")


def _text_of(path: Path, drop: tuple[str, ...] = ()) -> str:
    """What a reader of ``path`` sees: Parquet values (less the columns in ``drop``) and
    HDF5 names and attributes decoded (their pages may be compressed), any other file's
    bytes as they are."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        table = table.drop_columns([c for c in drop if c in table.column_names])
        return str(table.to_pylist()) + str(pq.read_metadata(path).metadata)
    if path.suffix in {".h5", ".hdf5"}:
        import h5py

        seen: list[str] = []
        with h5py.File(path, "r") as f:

            def visit(name: str, obj: object) -> None:
                seen.append(name)
                seen.extend(f"{k}={v!r}" for k, v in getattr(obj, "attrs", {}).items())
                if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "SOU":
                    seen.append(repr(obj[()]))

            seen.extend(f"{k}={v!r}" for k, v in f.attrs.items())
            f.visititems(visit)
        return "\n".join(seen) + path.read_bytes().decode("latin-1")
    return path.read_bytes().decode("latin-1")


def _plant_canary(archive: Path, paths: list[str]) -> int:
    """Append the canary to every free-text element (sequences and private tags included)
    and to the file name of each of ``paths``; returns the number of elements changed."""
    import pydicom

    changed = 0
    for rel in paths:
        src = archive / rel
        ds = pydicom.dcmread(src)

        def mark(dataset: object, elem: pydicom.DataElement) -> None:
            nonlocal changed
            if elem.VR in TEXT_VRS and isinstance(elem.value, str):
                keep = TEXT_VRS[elem.VR] - len(CANARY) - 1  # within the VR's length
                elem.value = f"{elem.value[:keep]} {CANARY}".strip()
                changed += 1

        ds.walk(mark)
        dest = src.with_name(f"{src.name}_{CANARY}")
        ds.save_as(dest, enforce_file_format=False)
        src.unlink()
    return changed


@pytest.mark.slow
def test_canary_in_headers_and_file_names_reaches_no_output_or_log(tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    import pydicom

    proj = _project_copy(tmp_path)
    logs = [_run(["dvc", "repro", "synth"], proj)]
    truth = pq.read_table(proj / "data/synth/truth.parquet").to_pylist()
    trapped = set(pq.read_table(proj / "data/synth/truth_files.parquet")["series_instance_uid"])
    copied = {r["duplicate_of"] for r in truth if r["duplicate_of"] is not None}
    chest = [
        r
        for r in truth
        if r["kind"] == "chest_ct"
        and r["pneumonia"]
        and r["expected_quarantine"] is None
        and r["duplicate_of"] is None
        and r["series_instance_uid"] not in trapped | copied
    ]
    planted = max(chest, key=lambda r: (r["severity"], r["series_instance_uid"]))
    archive = proj / "data/synth/archive"
    paths = []
    for p in sorted(archive.rglob("*")):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError):
            continue
        if getattr(ds, "StudyInstanceUID", None) == planted["study_instance_uid"]:
            paths.append(str(p.relative_to(archive)))
    assert paths
    assert _plant_canary(archive, paths) >= 3 * len(paths)
    _run(["dvc", "commit", "-f", "synth"], proj)
    logs.append(_run(["dvc", "repro"], proj))

    # the planted series went all the way into the release
    import h5py

    packed = set()
    for shard in (proj / "data/release/shards").glob("*.h5"):
        with h5py.File(shard, "r") as f:
            packed |= {str(g.attrs["series_instance_uid"]) for g in f["cases"].values()}
    assert planted["series_instance_uid"] in packed
    # the catalog does hold it: the search below can see it
    assert CANARY in _text_of(proj / "data/index/series.parquet")

    hits = []
    for path in sorted(proj.rglob("*")):
        rel = path.relative_to(proj).as_posix()
        if not path.is_file() or rel.startswith((*CATALOG, ".dvc/", ".git/", "src/")):
            continue
        drop = ("patient_id",) if rel.startswith(PATIENT_TABLES) else ()
        if CANARY in rel or CANARY in _text_of(path, drop):
            hits.append(rel)
    assert hits == []
    for proc in logs:
        assert CANARY not in proc.stdout + proc.stderr
