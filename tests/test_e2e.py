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
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
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
