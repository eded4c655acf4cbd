"""The demo build of the ``e2e`` tests: ``dvc repro`` on a tiny archive in a copy of the project.

One build serves every end-to-end check: the archive is generated (``dvc repro synth``), a
canary is planted in the headers and file names of one pneumonia study, the change is
committed to DVC, and the whole pipeline runs from there (``dvc repro``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = {
    "synth": {"patients": 14, "matrix": 48},
    "pack": {"shape": [24, 32, 32], "spacing_mm": [8.0, 7.0, 7.0]},
    "train": {"epochs": 1, "channels": [4, 8, 16]},
}

CANARY = "QX7K2ZV9"
#: Free-text value representations; a canary appended to them keeps every rule matching.
TEXT_VRS = {"LO": 64, "SH": 16, "ST": 1024, "LT": 10240, "UT": 2**20}


@dataclass
class DemoBuild:
    """The built project copy, the truth row of the series carrying the canary, and the
    output of every DVC command run on it (tests append theirs)."""

    proj: Path
    planted: dict[str, Any]
    logs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = run(list(args), self.proj)
        self.logs.append(proc)
        return proc


def project_copy(dest: Path) -> Path:
    """The pipeline's declaration, sources and stage inputs, with the ``TINY`` params."""
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


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command of the venv (dvc, ctcurate) in ``cwd``; fail the test on a non-zero exit."""
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
    }
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def plant_canary(archive: Path, paths: list[str]) -> int:
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


def _canary_series(proj: Path) -> tuple[dict[str, Any], list[str]]:
    """The most severe clean pneumonia series of the archive (no trap, no copy) and the
    files of its study."""
    import pyarrow.parquet as pq
    import pydicom

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
    return planted, paths


def build_demo(dest: Path) -> DemoBuild:
    """Copy the project into ``dest``, generate the archive, plant the canary, run the rest."""
    proj = project_copy(dest)
    logs = [run(["dvc", "repro", "synth"], proj)]
    planted, paths = _canary_series(proj)
    assert paths
    assert plant_canary(proj / "data/synth/archive", paths) >= 3 * len(paths)
    run(["dvc", "commit", "-f", "synth"], proj)  # DVC bookkeeping, not a stage's log
    logs.append(run(["dvc", "repro"], proj))
    return DemoBuild(proj, planted, logs)
