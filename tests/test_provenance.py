"""Provenance: releases and model cards name their code and environment by content."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from ctcurate import provenance

ROOT = Path(__file__).resolve().parents[1]


def test_source_files_follow_the_stage_imports_only() -> None:
    names = {
        p.relative_to(ROOT / "src" / "ctcurate").as_posix()
        for p in provenance.source_files(["ctcurate.pipeline.pack"])
    }
    assert {
        "pipeline/pack.py",
        "release/format.py",
        "release/card.py",
        "imaging/volume.py",
        "io/atomic.py",
        "provenance.py",
    } <= names
    assert "pipeline/train.py" not in names
    assert "demo/anatomy.py" not in names


def test_code_fingerprint_is_stable_and_names_the_modules() -> None:
    pack = provenance.code_sha256(["ctcurate.pipeline.pack"])
    assert pack == provenance.code_sha256(["ctcurate.pipeline.pack"])
    assert re.fullmatch(r"[0-9a-f]{64}", pack)
    assert pack != provenance.code_sha256(["ctcurate.pipeline.train"])
    record = provenance.provenance("ctcurate.pipeline.pack")
    assert record["code_sha256"] == pack
    assert provenance.LOCK_FILE == ROOT / "requirements.lock"
    assert record["environment_lock_sha256"] is not None


def test_the_lock_pins_every_dependency_and_setup_installs_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += [d for d in extra if not d.startswith("ctcurate")]
    pinned = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    names = {re.split(r"[<>=\[;]", d)[0].strip().lower().replace("_", "-") for d in wanted}
    assert names - {"torch"} <= pinned, sorted(names - {"torch"} - pinned)
    assert "torch" not in pinned  # setup.sh picks the CPU or CUDA build
    assert "-c requirements.lock" in (ROOT / "scripts" / "setup.sh").read_text()
