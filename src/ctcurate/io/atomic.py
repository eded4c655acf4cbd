"""Atomic, deterministic publishing of files and folders.

A writer writes into a temporary sibling, fsyncs it and ``os.replace``-s it onto the final
path: a crash leaves the previous output or nothing, never a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (no-op where the OS does not support it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform dependent
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platform dependent
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The caller writes the whole file to the yielded path. On an exception the temporary
    file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as canonical JSON."""
    write_bytes(path, dumps_json(obj).encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: Path, fsync_each_file: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``.

    The previous folder (if any) is moved aside first and removed only after the new one
    is in place, so a crash leaves either the old or the new folder at ``path``. Every file
    is flushed to disk before the swap: one fsync per file, or — with
    ``fsync_each_file=False``, for folders of very many small files — one ``os.sync``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if fsync_each_file:
            for child in sorted(tmp.rglob("*")):
                if child.is_file():
                    with child.open("rb") as fh:
                        os.fsync(fh.fileno())
        else:
            os.sync()
        tmp.chmod(0o755)
        old: Path | None = None
        if path.exists():
            old = path.parent / f".{path.name}.old"
            if old.exists():
                shutil.rmtree(old)
            path.replace(old)
        tmp.replace(path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
