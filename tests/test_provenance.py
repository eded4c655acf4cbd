"""Provenance: releases and model cards name their code (content and commit) and environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

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


def _git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "PATH": os.environ.get("PATH", ""),
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=env
    )
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_the_last_commit_of_the_stage_sources(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    code, other = repo / "src" / "stage.py", repo / "README.md"
    code.write_text("x = 1\n")
    other.write_text("docs\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "code")
    built = _git(repo, "rev-parse", "HEAD")
    assert provenance.last_commit([code], repo) == built
    other.write_text("more docs\n")
    _git(repo, "commit", "-q", "-am", "docs")  # a commit that leaves the code alone
    assert provenance.last_commit([code], repo) == built
    code.write_text("x = 2\n")  # a local change: no commit names this code
    assert provenance.last_commit([code], repo) is None
    _git(repo, "commit", "-q", "-am", "code 2")
    assert provenance.last_commit([code], repo) == _git(repo, "rev-parse", "HEAD") != built
    (repo / "src" / "new.py").write_text("y = 1\n")  # untracked
    assert provenance.last_commit([repo / "src" / "new.py"], repo) is None
    assert provenance.last_commit([code], tmp_path) is None  # not a checkout


def test_provenance_names_a_commit_only_for_committed_code() -> None:
    record = provenance.provenance("ctcurate.pipeline.pack")
    commit = record["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    files = provenance.source_files(["ctcurate.pipeline.pack"])
    assert commit == provenance.last_commit(files, ROOT / "src")
