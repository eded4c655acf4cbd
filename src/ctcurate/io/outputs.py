"""Guarded, locked, atomic publishing of a stage's outputs.

A stage may replace its ``--out`` only when that path holds a previous output of the same
stage, or is empty or absent: a folder output carries a marker file (:data:`MARKER`, naming
the stage) written with it. Whatever else the path holds — an archive, a user's folder, the
repository — the stage refuses with one line and touches nothing. An output may never be,
hold or lie inside one of the stage's inputs, nor be a repository root.

While a stage writes, it holds an exclusive lock on a hidden sibling of its output
(``.<name>.lock``): a second run into the same output fails fast. Under that lock the
temporary siblings a killed run left behind (``.<name>.*.tmp``, ``.<name>.old``) are
removed, and a full disk ends in one line naming the output, with no half file left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ctcurate.errors import LockedError, OutputError
from ctcurate.io.atomic import atomic_dir, atomic_path

#: Name of the marker file inside every folder a stage publishes; it holds the stage name.
MARKER = ".ctcurate-output"
#: Suffix of the lock file beside an output (``data/.index.lock``).
LOCK_SUFFIX = ".lock"
#: Names whose presence marks a folder as a project or repository root.
_ROOT_NAMES = (".git", ".dvc", "dvc.yaml")
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def lock_path(out: Path) -> Path:
    """The lock file of an output: a hidden sibling, outside the DVC-tracked out."""
    out = Path(out)
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold the exclusive lock of the output ``out`` (fail fast, never wait).

    The lock is an ``fcntl.flock`` on :func:`lock_path`; the holder writes its pid there and
    removes the file when done. The kernel drops the lock when the holder dies (even on
    ``kill -9``), so a stale file never blocks a later run.

    Raises
    ------
    LockedError
        When another process holds the lock of ``out``.
    """
    import fcntl  # POSIX only: imported here so that reading a release needs no fcntl

    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _lock_holder(path)
            msg = (
                f"{out}: another process is writing this output ({holder}lock {path}); "
                "wait for it to finish"
            )
            raise LockedError(msg) from None
        try:
            same = os.fstat(fd).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        # The previous holder removed the file between our open and lock: lock the new one.
        os.close(fd)
    else:  # pragma: no cover - ten lost races in a row
        msg = f"{out}: could not take the lock {path}"
        raise LockedError(msg)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f"pid {pid} holds the " if pid.isdigit() else ""


def _refuse_overlap(out: Path, inputs: Iterable[Path]) -> None:
    """Raise :class:`OutputError` when ``out`` equals, holds or lies inside an input."""
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents or source in target.parents:
            msg = f"{out}: refusing to write an output over or inside the input {given}"
            raise OutputError(msg)


def _is_root(folder: Path) -> bool:
    return folder.resolve() == Path(folder.resolve().anchor) or any(
        (folder / name).exists() for name in _ROOT_NAMES
    )


def check_output_dir(
    out: Path, stage: str, inputs: Iterable[Path] = (), own: Iterable[str] = ()
) -> None:
    """Refuse to publish the folder ``out`` over anything but a previous ``stage`` output.

    ``out`` may be absent, an empty folder, a folder whose marker names ``stage``, or a
    folder holding only names in ``own`` (the stage's files, written before the marker
    existed). It may never be, hold or lie inside one of ``inputs``, nor be a repository
    or file-system root.

    Raises
    ------
    OutputError
        Naming ``out`` and why it is refused.
    """
    out = Path(out)
    _refuse_overlap(out, inputs)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        msg = f"{out}: refusing to replace something that is not a folder of `{stage}`"
        raise OutputError(msg)
    if _is_root(out):
        msg = f"{out}: refusing to replace a repository or file-system root"
        raise OutputError(msg)
    marker = out / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            written_by = marker.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            written_by = ""
        if written_by == stage:
            return
        msg = (
            f"{out}: refusing to replace the output of another stage "
            f"(`{written_by or 'unknown'}`, not `{stage}`)"
        )
        raise OutputError(msg)
    names = {p.name for p in out.iterdir()}
    if names <= set(own):
        return
    msg = (
        f"{out}: refusing to replace a folder that `{stage}` did not write "
        f"({len(names)} entries, no {MARKER} marker); choose an empty or new folder"
    )
    raise OutputError(msg)


def check_output_file(out: Path, inputs: Iterable[Path] = ()) -> None:
    """Refuse to publish the file ``out`` over a folder, or over or inside an input.

    Raises
    ------
    OutputError
        Naming ``out`` and why it is refused.
    """
    out = Path(out)
    _refuse_overlap(out, inputs)
    if out.is_dir() or (out.exists() and not out.is_file()):
        msg = f"{out}: refusing to replace something that is not a file"
        raise OutputError(msg)


def remove_stale_temporaries(out: Path) -> int:
    """Remove what killed runs left beside ``out``; return how many entries went.

    Only call this while holding :func:`output_lock` of ``out``: an unlocked caller could
    remove the temporary folder of a run still in progress.
    """
    out = Path(out)
    removed = 0
    if not out.parent.is_dir():
        return removed
    # mkstemp / mkdtemp names: ".<name>." + 8 random characters + ".tmp"
    stale = [*out.parent.glob(f".{out.name}.{'?' * 8}.tmp"), out.parent / f".{out.name}.old"]
    for path in sorted(stale):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed += 1
    return removed


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the device or quota is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and (
            current.errno in _FULL_DISK or "No space left on device" in str(current)
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def disk_full_as_error(out: Path) -> Iterator[None]:
    """Turn a full disk while writing ``out`` into a one-line :class:`OutputError`."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        msg = f"{out}: no space left on the device of {Path(out).parent}; nothing was replaced"
        raise OutputError(msg) from None


@contextlib.contextmanager
def guarded_output(
    out: Path,
    stage: str,
    *,
    inputs: Iterable[Path | None] = (),
    own: Iterable[str] = (),
    folder: bool = True,
) -> Iterator[None]:
    """Hold ``out`` for one run of ``stage``: checked, locked, cleaned, disk-full aware.

    Checks that ``stage`` may replace ``out`` (:func:`check_output_dir` for a folder,
    :func:`check_output_file` for a file), takes its lock, checks again now that no one
    else writes it, removes what killed runs left beside it, and turns a full disk inside
    the block into one line naming ``out``. Wrap a stage's whole run in it, so that a
    refusal or a second run comes before any work.

    Raises
    ------
    OutputError
        When ``out`` may not be replaced, or the disk fills up.
    LockedError
        When another process writes ``out``.
    """
    out = Path(out)
    given = [Path(p) for p in inputs if p is not None]
    names = tuple(own)

    def check() -> None:
        if folder:
            check_output_dir(out, stage, given, names)
        else:
            check_output_file(out, given)

    check()
    with output_lock(out), disk_full_as_error(out):
        check()
        remove_stale_temporaries(out)
        yield


@contextlib.contextmanager
def marked_dir(out: Path, stage: str, fsync_each_file: bool = True) -> Iterator[Path]:
    """:func:`~ctcurate.io.atomic.atomic_dir` that writes ``stage``'s marker into the folder.

    Use it inside :func:`guarded_output` of the same ``out``.
    """
    with atomic_dir(Path(out), fsync_each_file=fsync_each_file) as tmp:
        yield tmp
        # the marker takes the folder's times and leaves them as they were, so that a
        # stage that pins its file times (synth) stays byte- and time-identical
        before = tmp.stat()
        marker = tmp / MARKER
        marker.write_text(f"{stage}\n", encoding="ascii")
        os.utime(marker, ns=(before.st_mtime_ns, before.st_mtime_ns))
        os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))


@contextlib.contextmanager
def publish_dir(
    out: Path,
    stage: str,
    *,
    inputs: Iterable[Path | None] = (),
    own: Iterable[str] = (),
    fsync_each_file: bool = True,
) -> Iterator[Path]:
    """:func:`guarded_output` and :func:`marked_dir` in one: publish the folder ``out``.

    For a stage that computes first and writes at the end: call :func:`check_output_dir`
    before the work, so that a refused ``out`` costs nothing, and publish through this.
    """
    with (
        guarded_output(out, stage, inputs=inputs, own=own),
        marked_dir(out, stage, fsync_each_file) as tmp,
    ):
        yield tmp


@contextlib.contextmanager
def publish_file(out: Path, *, inputs: Iterable[Path | None] = ()) -> Iterator[Path]:
    """:func:`guarded_output` of a file and an atomic temporary path that replaces it."""
    with guarded_output(out, "", inputs=inputs, folder=False), atomic_path(Path(out)) as tmp:
        yield tmp
