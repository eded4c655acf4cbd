"""Distribution: push a release to a DVC remote, clone fresh, pull into an empty cache, verify.

The origin is a git repository holding the project's ``.dvc/config`` (its default remote
``local``, overridden per test with ``dvc remote modify --local``) and a tiny release
tracked by DVC. The same round trip runs against a real S3 API (moto's server on loopback)
when ``dvc-s3`` and ``moto[server]`` are installed (the ``dev`` extra).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ctcurate.errors import VerifyError
from ctcurate.io.atomic import write_json
from ctcurate.release import verify
from ctcurate.release.format import MANIFEST, SHARD_DIR, CaseRecord, build_manifest, write_shard

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RELEASE = "data/release"
BUCKET = "ctcurate-releases"
ENV = os.environ | {
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "ctcurate",
    "GIT_AUTHOR_EMAIL": "ctcurate@example.org",
    "GIT_COMMITTER_NAME": "ctcurate",
    "GIT_COMMITTER_EMAIL": "ctcurate@example.org",
    # Credentials of the loopback S3 server; a real bucket takes the usual AWS settings.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _run(args: list[str], cwd: Path, *, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, cwd=cwd, env=ENV, capture_output=True, text=True, check=False, timeout=120
    )
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _set_local_remote(repo: Path, name: str, url: str, **options: str) -> None:
    """What ``dvc remote add/modify --local NAME ...`` writes: a remote in config.local.

    Written directly (replacing the file), which saves a DVC start-up per setting; the
    git-ignored ``config.local`` is where a user points the project's remotes at their own
    storage.
    """
    config = repo / ".dvc" / "config.local"
    lines = [f"['remote \"{name}\"']", f"    url = {url}"]
    lines += [f"    {key} = {value}" for key, value in sorted(options.items())]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_tiny_release(out: Path) -> str:
    """Three 4x6x6 cases in two shards with a manifest; returns the release id."""
    rng = np.random.default_rng(7)
    records = [
        CaseRecord(
            case_id=f"case{i}",
            image=rng.integers(-1024, 400, size=(4, 6, 6)).astype(np.int16),
            label=rng.integers(0, 4, size=(4, 6, 6)).astype(np.uint8),
            meta={"case_id": f"case{i}", "split": split, "site": "H01", "typical": i % 2},
        )
        for i, split in enumerate(("train", "train", "test"))
    ]
    entries = write_shard(out / SHARD_DIR / "shard-00000.h5", records[:2])
    entries += write_shard(out / SHARD_DIR / "shard-00001.h5", records[2:])
    manifest = build_manifest(out, entries, {"shape": [4, 6, 6]}, "test")
    write_json(out / MANIFEST, manifest)
    return str(manifest["release_id"])


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository with the project's DVC config and a tiny release under DVC."""
    proj = tmp_path_factory.mktemp("origin")
    (proj / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy2(ROOT / ".dvc" / name, proj / ".dvc" / name)
    write_tiny_release(proj / RELEASE)
    _run(["git", "init", "-q"], proj)
    _run(["dvc", "add", "-q", RELEASE], proj)
    _run(["git", "add", "-A"], proj)
    _run(["git", "commit", "-q", "-m", "release"], proj)
    return proj


@pytest.fixture(scope="module")
def pushed(origin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local remote directory the origin's release was pushed to (the default remote)."""
    remote = tmp_path_factory.mktemp("remote") / "store"
    _run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], origin)
    _run(["dvc", "push"], origin)
    assert _objects(remote)
    return remote


def _clone(origin: Path, dest: Path, remote: Path) -> Path:
    _run(["git", "clone", "-q", str(origin), str(dest)], dest.parent)
    assert not (dest / RELEASE).exists()
    assert not (dest / ".dvc" / "cache").exists()  # an empty cache
    _set_local_remote(dest, "local", str(remote))
    return dest


def _objects(remote: Path) -> list[Path]:
    """The remote's file objects (not the ``.dir`` listings), largest first."""
    files = [p for p in remote.rglob("*") if p.is_file() and p.suffix != ".dir"]
    return sorted(files, key=lambda p: (-p.stat().st_size, str(p)))


def test_default_remote_is_a_local_directory_users_can_override() -> None:
    config = (ROOT / ".dvc" / "config").read_text()
    assert "remote = local" in config
    assert "url = ../dvc-remote" in config  # relative to .dvc/: <repo>/dvc-remote
    assert "verify = true" in config
    assert "/dvc-remote" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.slow
def test_push_clone_pull_verify(origin: Path, pushed: Path, tmp_path: Path) -> None:
    release_id = json.loads((origin / RELEASE / MANIFEST).read_text())["release_id"]
    clone = _clone(origin, tmp_path / "clone", pushed)
    _run(["dvc", "pull"], clone)
    assert _tree(clone / RELEASE) == _tree(origin / RELEASE)
    verified = _run(["ctcurate", "verify", RELEASE], clone)
    assert f"release {release_id[:16]} verified: 3 cases in 2 shards" in verified.stdout


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_remote_object_fails_the_pull_without_output(
    origin: Path, pushed: Path, tmp_path: Path, damage: str
) -> None:
    remote = tmp_path / "remote"
    shutil.copytree(pushed, remote)
    shard_object = _objects(remote)[0]  # the largest object: a shard
    if damage == "corrupt":
        data = bytearray(shard_object.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard_object.chmod(0o644)
        shard_object.write_bytes(bytes(data))
    else:
        shard_object.unlink()
    clone = _clone(origin, tmp_path / "clone", remote)
    pulled = _run(["dvc", "pull"], clone, ok=False)
    assert pulled.returncode != 0
    assert "failed" in pulled.stderr
    assert not (clone / RELEASE).exists()  # no partial release
    if damage == "corrupt":
        # Without the remote's hash check the damage lands in the workspace; verify sees it.
        _set_local_remote(clone, "local", str(remote), verify="false")
        _run(["dvc", "pull"], clone)
        checked = _run(["ctcurate", "verify", RELEASE], clone, ok=False)
        assert checked.returncode == VerifyError.exit_code
        assert "sha256 does not match the manifest" in checked.stderr


def _documented_example(heading: str) -> str:
    """The first python code block under ``heading`` in docs/release.md."""
    text = (ROOT / "docs" / "release.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.slow
def test_documented_training_example_runs_on_a_pulled_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _documented_example("### Train from a pulled release")
    assert "ctcurate.release.open(RELEASE" in code
    release_id = write_tiny_release(tmp_path / RELEASE)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/release.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"release {release_id[:16]} verified: 3 cases in 2 shards"
    losses = [float(line.rsplit(" ", 1)[1]) for line in out[1:]]
    assert [line.split(":")[0] for line in out[1:]] == ["epoch 0", "epoch 1"]
    assert all(np.isfinite(losses))
    assert losses[0] > 0


# --------------------------------------------------------------------------- S3 on loopback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with one empty bucket; stopped on teardown."""
    for module in ("dvc_s3", "moto.server", "flask"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, "moto server exited"
            assert time.monotonic() < deadline, "moto server did not start within 30 s"
            try:
                request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert response.status == 200
                break
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@pytest.mark.slow
def test_push_clone_pull_verify_through_s3(origin: Path, s3_endpoint: str, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/ctcurate"
    config = origin / ".dvc" / "config.local"
    saved = config.read_text()
    _set_local_remote(origin, "s3", url, endpointurl=s3_endpoint)
    try:
        pushed = _run(["dvc", "push", "-r", "s3"], origin)
        assert "pushed" in pushed.stdout
    finally:
        config.write_text(saved)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    _set_local_remote(clone, "s3", url, endpointurl=s3_endpoint)
    _run(["dvc", "pull", "-r", "s3"], clone)
    assert _tree(clone / RELEASE) == _tree(origin / RELEASE)
    assert verify(clone / RELEASE).endswith("verified: 3 cases in 2 shards")
