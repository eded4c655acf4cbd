"""Archive paths as the listing spells them, and opening archive files safely.

A POSIX file name is bytes. The listing (a Parquet string column) holds UTF-8 text, so a
name whose bytes are not UTF-8 is listed with each undecodable byte written ``\\xNN``
(Python's ``backslashreplace``): :func:`listed_path` spells it, :func:`fs_path` turns it
back into the exact bytes that open the file. ``index`` quarantines such files
``undecodable_name`` without reading them.

:func:`open_regular` is the only way the stages open an archive file: it never follows a
symbolic link, never waits on a FIFO (``O_NONBLOCK``) and refuses anything that is not a
regular file (FIFO, socket, device, folder) before a byte is read.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

#: Reason codes of files that are never opened, by file type (``S_IFMT`` bits).
_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFDIR: "folder",
    stat.S_IFLNK: "symbolic link",
}
_ESCAPE = re.compile(r"\\x([89a-f][0-9a-f])")


class NotRegularFileError(OSError):
    """An archive path that is not a regular file (it was not opened for reading)."""


def file_kind(mode: int) -> str:
    """``regular file``, ``FIFO``, ``socket``, ``character device``, ``folder``, …"""
    return "regular file" if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "other")


def listed_path(rel: str) -> tuple[str, bool]:
    """The listing spelling of a relative path from ``os.scandir``; whether it was escaped.

    ``rel`` may hold lone surrogates (undecodable bytes under ``surrogateescape``); those
    bytes become ``\\xNN`` and the second value is True.
    """
    raw = os.fsencode(rel)
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), True


def escaped_bytes(listed: str) -> bytes | None:
    """The file name bytes an escaped listing path stands for, ``None`` if it is plain text.

    Only a path whose ``\\xNN`` escapes decode to bytes that are not UTF-8 is escaped (a
    plain name never decodes to invalid UTF-8 through :func:`listed_path`).
    """
    if "\\x" not in listed:
        return None
    raw = _ESCAPE.sub(lambda m: chr(0xDC00 + int(m[1], 16)), listed)  # surrogateescape
    data = os.fsencode(raw)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    return None


def fs_path(archive: Path | str, listed: str) -> bytes:
    """The bytes path of a listed file under ``archive`` (round trip of :func:`listed_path`)."""
    root = os.fsencode(str(archive)) + b"/"
    literal = root + listed.encode("utf-8")
    name = escaped_bytes(listed)
    if name is None or os.path.lexists(literal):  # a real name wins over an escape
        return literal
    return root + name


def open_regular(path: Path | str | bytes) -> BinaryIO:
    """Open a regular file for reading, without following a symlink or waiting on a FIFO.

    Raises :class:`NotRegularFileError` for a FIFO, socket, device or folder, and
    ``OSError`` (``ELOOP``) for a symbolic link, before anything is read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            msg = f"not a regular file ({file_kind(mode)})"
            raise NotRegularFileError(errno.EINVAL, msg)
        return open(fd, "rb", closefd=True)  # noqa: PTH123 - a descriptor
    except BaseException:
        os.close(fd)
        raise


def irregular(archive: Path | str, listed: str) -> tuple[str, str] | None:
    """``(reason, detail)`` of a listed path that must not be read, ``None`` otherwise.

    Decided from ``lstat`` alone (nothing is opened or followed): ``undecodable_name`` (a
    name that is not UTF-8, listed escaped), ``symlink`` / ``symlink_loop`` (a symbolic
    link, the detail says to what kind of entry, inside or outside the archive),
    ``unlistable_folder`` (a folder the snapshot could not list) and ``not_regular_file``
    (FIFO, socket, device). ``None`` for a regular file, or a path that is gone (the reader
    reports it).
    """
    literal = str(Path(archive) / listed)
    try:
        mode = os.lstat(literal).st_mode
    except FileNotFoundError:
        name = escaped_bytes(listed)
        if name is not None and os.path.lexists(os.fsencode(str(archive)) + b"/" + name):
            return "undecodable_name", "file name is not UTF-8 (not read)"
        return None
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return _symlink(str(archive), literal)
    if stat.S_ISDIR(mode):
        return "unlistable_folder", "folder could not be listed (its files are not indexed)"
    return "not_regular_file", f"{file_kind(mode)} (not opened)"


def _symlink(archive: str, link: str) -> tuple[str, str]:
    try:
        target = Path(link).stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink_loop", "symbolic link loop (not followed)"
        return "symlink", "dangling symbolic link (not followed)"
    root = os.path.realpath(archive)
    inside = os.path.commonpath([os.path.realpath(link), root]) == root
    where = "inside" if inside else "outside"
    kind = file_kind(target.st_mode)
    return "symlink", f"symbolic link to a {kind} {where} the archive (not followed)"
