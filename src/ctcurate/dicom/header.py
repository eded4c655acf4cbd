"""DICOM header reading for ``index``: one archive file in, one outcome out.

A file is read header-only (pydicom, ``stop_before_pixels``) and checked without decoding
any pixel:

- it must be DICOM: a preamble with file meta, or else the core attributes
  (SOPInstanceUID, SeriesInstanceUID, Modality) with valid UIDs — ``dcmread(force=True)``
  alone accepts text and random bytes;
- identifying attributes must pass the PHI policy (:mod:`ctcurate.dicom.phi`), also inside
  sequences (tag names and rule names are reported, never values);
- its transfer syntax must have an installed pixel decoder;
- its pixel data must be all there: a length check from Rows, Columns, SamplesPerPixel,
  BitsAllocated and NumberOfFrames against the bytes after the PixelData tag (native
  syntaxes), or a walk over the fragment headers (encapsulated syntaxes).

Every failure becomes a quarantine reason; no exception escapes :func:`read_instance`.

The common case takes a faster route: :func:`read_instance` first opens the file with
plain ``os`` calls and tries the lean reader (:mod:`ctcurate.dicom.lean`), which gives the
same row for a clean file in a common transfer syntax and gives up on anything else,
which is then read here with pydicom.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import stat
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
)

from ctcurate.dicom import archive_file, phi
from ctcurate.dicom.checks import (
    _LONG_VRS,
    _UNDEFINED,
    DICOMDIR_SOP_CLASS,
    PIXEL_TAGS,
    Reject,
    Status,
    _check_complete,
    check_core,
    check_decoder,
    check_pixel_element,
    deidentification_codes,
    phi_verdict,
    sop_class,
)
from ctcurate.dicom.record import instance_record
from ctcurate.io.paths import NotRegularFileError, irregular, open_regular

_LONG_VRS |= {b"UR", b"UT", b"UV"}
_HEAD_BYTES = 1 << 16
_CHANGED = "changed_since_snapshot"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True, slots=True)
class FileOutcome:
    """What became of one listed file.

    ``record`` holds the ``instances`` columns when ``status == "indexed"``; ``reason`` and
    ``detail`` say why a file was quarantined or skipped (tag names, never values).
    """

    path: str
    status: Status
    reason: str | None = None
    detail: str | None = None
    record: dict[str, Any] | None = None
    size: int = -1
    mtime_ns: int = -1


class _FileTimeout(BaseException):
    """Raised when one file takes longer than the per-file time cap.

    A ``BaseException`` so that no ``except Exception`` inside a reader swallows it.
    """


_timeout_s: float = 0.0


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _FileTimeout


def quiet_pydicom() -> None:
    """Silence pydicom's logger in this process: its messages may quote header values."""
    import logging

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def init_worker(timeout_s: float) -> None:
    """Prepare a worker process: per-file time cap (SIGALRM) and a quiet pydicom logger."""
    global _timeout_s  # noqa: PLW0603 - per-process setting of a pool worker
    quiet_pydicom()
    if timeout_s > 0 and hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, _on_alarm)
        _timeout_s = timeout_s
    else:
        _timeout_s = 0.0


def timeout_s() -> float:
    """The per-file time cap of this process (0: none)."""
    return _timeout_s


def _async_raise(ident: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in thread ``ident`` at its next bytecode (``None``: cancel a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None
    )


class _Watchdog:
    """The per-file time cap of a thread that cannot take signals (a Dask worker thread).

    A watcher thread raises :class:`_FileTimeout` in the reading thread once a file's
    deadline passes, as SIGALRM does on a main thread: between two bytecodes, so pure
    Python parsing loops are cut, a single long C call is not (the size caps bound those).
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.ident = threading.get_ident()
        self.cond = threading.Condition(threading.RLock())
        self.deadline: float | None = None
        self.fired = False
        self.stopped = False
        self.thread = threading.Thread(target=self._watch, name="file-time-cap", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        with self.cond:
            while not self.stopped:
                if self.deadline is None:
                    self.cond.wait()
                    continue
                left = self.deadline - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.deadline, self.fired = None, True
                _async_raise(self.ident, _FileTimeout)

    def arm(self) -> None:
        """Start the clock of one file."""
        with self.cond:
            self.deadline = time.monotonic() + self.limit_s
            self.cond.notify()

    def disarm(self) -> None:
        """Stop the clock; a timeout raised but not yet delivered is cancelled."""
        with self.cond:
            self.deadline = None
            if self.fired:
                _async_raise(self.ident, None)
                self.fired = False

    def stop(self) -> None:
        """End the watcher thread."""
        with self.cond:
            self.stopped, self.deadline = True, None
            self.cond.notify()
        self.thread.join()


def scan_files(
    archive: str,
    entries: Sequence[tuple[str, int, int]],
    max_bytes: int,
    timeout_s: float | None = None,
    policy: phi.Policy = phi.DEFAULT_POLICY,
) -> list[FileOutcome]:
    """Read every ``(path, size, mtime_ns)`` of ``entries`` under ``archive`` (worker task).

    Identifying attributes are judged by ``policy`` (:mod:`ctcurate.dicom.phi`).

    Each file gets the per-file time cap ``timeout_s`` (default: the one set by
    :func:`init_worker` in this process; 0: none); a file exceeding it is quarantined
    ``timeout``. On a process's main thread set up by :func:`init_worker` the cap is
    SIGALRM; on any other thread (Dask workers) it is a watcher thread.
    """
    root = Path(archive)
    cap = _timeout_s if timeout_s is None else timeout_s
    if cap <= 0:
        return [
            read_instance(root, p, size, mtime, max_bytes, policy=policy)
            for p, size, mtime in entries
        ]
    alarm = (
        threading.current_thread() is threading.main_thread()
        and _timeout_s == cap
        and signal.getsignal(signal.SIGALRM) is _on_alarm
    )
    dog = None if alarm else _Watchdog(cap)
    out: list[FileOutcome] = []
    try:
        for path, size, mtime_ns in entries:
            try:
                if dog is None:
                    signal.setitimer(signal.ITIMER_REAL, cap)
                else:
                    dog.arm()
                outcome = read_instance(root, path, size, mtime_ns, max_bytes, policy=policy)
                if dog is None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                else:
                    dog.disarm()
            except _FileTimeout:
                if dog is None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                else:
                    dog.disarm()
                outcome = FileOutcome(
                    path, "quarantined", "timeout", f"over {cap:g} s", None, size, mtime_ns
                )
            out.append(outcome)
    finally:
        if dog is None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        else:
            dog.stop()
    return out


def read_instance(
    archive: Path,
    path: str,
    size: int,
    mtime_ns: int,
    max_bytes: int,
    *,
    lean: bool = True,
    policy: phi.Policy = phi.DEFAULT_POLICY,
) -> FileOutcome:
    """Read and check one listed file; never raises for anything the file contains.

    Parameters
    ----------
    archive
        Archive root.
    path, size, mtime_ns
        The file's listing row (``path`` POSIX, relative to ``archive``).
    max_bytes
        Larger files are quarantined ``too_large`` without being read.
    lean
        Try the lean reader (:mod:`ctcurate.dicom.lean`) first; ``False`` reads every file
        with pydicom (the reference the lean reader is tested against).
    policy
        The PHI policy identifying attributes are judged by.
    """
    if lean:
        record = _read_lean_file(str(archive), path, size, mtime_ns, max_bytes, policy)
        if record is not None:
            return FileOutcome(path, "indexed", record=record, size=size, mtime_ns=mtime_ns)
    try:
        record = _read_checked(archive, path, size, mtime_ns, max_bytes, policy)
    except Reject as rej:
        return FileOutcome(path, rej.status, rej.reason, rej.detail, None, size, mtime_ns)
    except OSError as exc:
        detail = f"I/O error ({type(exc).__name__})"
        return FileOutcome(path, "quarantined", "unreadable", detail, None, size, mtime_ns)
    except Exception as exc:  # a malformed header must not end the batch: quarantine it
        detail = f"header does not parse ({type(exc).__name__})"
        return FileOutcome(path, "quarantined", "unreadable", detail, None, size, mtime_ns)
    return FileOutcome(path, "indexed", record=record, size=size, mtime_ns=mtime_ns)


# --- reading -------------------------------------------------------------------------------


def _resolve(archive: Path, path: str) -> Path:
    rel = PurePosixPath(path)
    if not path or rel.is_absolute() or ".." in rel.parts:
        msg = "listing path is outside the archive"
        raise Reject(reason="unreadable", detail=msg)
    return archive.joinpath(*rel.parts)


def _plain_path(path: str) -> bool:
    """Whether ``path`` is relative with no empty, ``.`` or ``..`` part (nor hidden name)."""
    return (
        bool(path)
        and path[0] not in "/."
        and path[-1] != "/"
        and "//" not in path
        and ("/." not in path)
    )


def _read_lean_file(
    archive: str, path: str, size: int, mtime_ns: int, max_bytes: int, policy: phi.Policy
) -> dict[str, Any] | None:
    """The row of a clean file by the lean reader, ``None`` to let :func:`_read_checked` read it.

    The same checks as :func:`_read_checked` up to the header read, with plain ``os``
    calls; anything unusual (an odd path, a stat or read error, a short read) is left to it.
    """
    if not _plain_path(path):
        return None
    from ctcurate.dicom.lean import read_lean

    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is not read); O_NOFOLLOW:
    # a symbolic link is left to _read_checked, which quarantines it unread
    try:
        fd = os.open(f"{archive}/{path}", os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return None
        flags = [] if st.st_size == size and st.st_mtime_ns == mtime_ns else [_CHANGED]
        head = os.read(fd, _HEAD_BYTES)
        if archive_file.is_gzip(head):
            with open(fd, "rb", buffering=0, closefd=False) as fp:
                fp.seek(0)
                data = archive_file.inflate(fp, max_bytes)
            return read_lean(None, data, path, size, mtime_ns, len(data), flags, policy)
        if len(head) >= st.st_size:  # the whole file
            return read_lean(None, head, path, size, mtime_ns, st.st_size, flags, policy)
        if len(head) < _HEAD_BYTES:
            return None
        with open(fd, "rb", buffering=0, closefd=False) as fp:
            return read_lean(fp, head, path, size, mtime_ns, st.st_size, flags, policy)
    except (OSError, archive_file.InflateError):
        return None
    finally:
        os.close(fd)


def _read_checked(
    archive: Path, path: str, size: int, mtime_ns: int, max_bytes: int, policy: phi.Policy
) -> dict[str, Any]:
    full = _resolve(archive, path)
    if (odd := irregular(archive, path)) is not None:
        raise Reject(reason=odd[0], detail=odd[1])
    try:
        fh = open_regular(full)
    except FileNotFoundError:
        msg = "file vanished since the snapshot"
        raise Reject(reason="unreadable", detail=msg) from None
    except NotRegularFileError as exc:  # replaced since the lstat above
        raise Reject(reason="not_regular_file", detail=exc.strerror or "") from None
    except OSError as exc:
        msg = f"cannot open ({type(exc).__name__})"
        raise Reject(reason="unreadable", detail=msg) from None
    with fh as raw:
        return _read_open(raw, path, size, mtime_ns, max_bytes, policy)


def _read_open(
    raw: BinaryIO, path: str, size: int, mtime_ns: int, max_bytes: int, policy: phi.Policy
) -> dict[str, Any]:
    st = os.fstat(raw.fileno())
    if st.st_size > max_bytes:
        msg = f"{st.st_size} bytes, over the {max_bytes} byte cap (max_file_mb)"
        raise Reject(reason="too_large", detail=msg)
    flags: list[str] = []
    if st.st_size != size or st.st_mtime_ns != mtime_ns:
        flags.append(_CHANGED)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp, file_size = _plain_stream(raw, st.st_size, max_bytes)
        head = fp.read(_HEAD_BYTES)
        has_preamble = head[128:132] == b"DICM"
        meta_ts = _meta_transfer_syntax(head) if has_preamble else None
        fp.seek(0)
        ds, stream, stream_size = _parse(fp, file_size, has_preamble, meta_ts, max_bytes)
        has_meta = "TransferSyntaxUID" in ds.file_meta
        trusted = has_preamble and has_meta
        if sop_class(ds) == DICOMDIR_SOP_CLASS:
            msg = "media storage directory (DICOMDIR)"
            raise Reject(reason="dicomdir", detail=msg, status="skipped")
        if not trusted:  # garbage parsed with force=True is not DICOM, whatever its lengths
            check_core(ds, trusted=False)
        _check_complete(ds)
        check_core(ds, trusted=trusted)
        rules = policy.rules_for(policy.site_of(path))
        offending, accepted = phi_verdict(ds, rules)
        if offending:
            raise Reject(reason="phi_present", detail=",".join(offending))
        ts = str(ds.file_meta.TransferSyntaxUID) if has_meta else None
        check_decoder(ts)
        _check_pixels(ds, ts, stream, stream_size)
        if not has_meta:
            flags.append("no_meta")
        return instance_record(
            ds,
            path,
            size,
            mtime_ns,
            ts,
            flags,
            accepted,
            deidentification_codes(ds),
            site=policy.site_of(path),
        )


def _plain_stream(raw: BinaryIO, size: int, max_bytes: int) -> tuple[BinaryIO, int]:
    """``raw`` and its size, or the decompressed content of a gzip file and its size."""
    if not archive_file.is_gzip(raw.read(132)):
        raw.seek(0)
        return raw, size
    raw.seek(0)
    try:
        data = archive_file.inflate(raw, max_bytes)
    except archive_file.InflateError as exc:
        raise Reject(reason=exc.reason, detail=exc.detail) from None
    return io.BytesIO(data), len(data)


def _parse(
    fp: BinaryIO, size: int, has_preamble: bool, meta_ts: str | None, max_bytes: int
) -> tuple[Dataset, BinaryIO, int]:
    """Parse up to the pixel data; return the dataset and the stream positioned there."""
    try:
        if meta_ts == DeflatedExplicitVRLittleEndian:
            return _parse_deflated(fp, max_bytes)
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    except (Reject, OSError):
        raise
    except (EOFError, struct.error) as exc:
        reason = "truncated" if has_preamble else "not_dicom"
        msg = f"header ends early ({type(exc).__name__})"
        raise Reject(reason=reason, detail=msg) from None
    except Exception as exc:
        if not has_preamble:
            raise Reject(
                reason="not_dicom", detail="no DICOM preamble and no parsable header"
            ) from None
        raise Reject(
            reason="unreadable", detail=f"header does not parse ({type(exc).__name__})"
        ) from None
    return ds, fp, size


def _meta_transfer_syntax(head: bytes) -> str | None:
    """The TransferSyntaxUID of the file meta group (explicit VR little endian)."""
    _, ts = _walk_meta(head)
    return ts


def _walk_meta(head: bytes) -> tuple[int, str | None]:
    """Offset of the first byte after the file meta group, and its TransferSyntaxUID."""
    pos, ts = 132, None
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            (length,) = struct.unpack_from("<L", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if length == _UNDEFINED:
            break
        if elem == 0x0010:
            ts = head[start : start + length].decode("ascii", "replace").strip(" \x00")
        pos = start + length
    return pos, ts


def _parse_deflated(fp: BinaryIO, max_bytes: int) -> tuple[Dataset, BinaryIO, int]:
    """Inflate a Deflated Explicit VR Little Endian body with a size cap, then parse it.

    pydicom inflates the whole body before reading any element, so a small file can claim
    gigabytes; the cap is ``max_bytes`` of inflated data.
    """
    data = fp.read()
    meta_end, _ = _walk_meta(data)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[meta_end:], max_bytes + 1)
    except zlib.error:
        msg = "deflated body does not inflate"
        raise Reject(reason="truncated", detail=msg) from None
    if len(body) > max_bytes or inflater.unconsumed_tail:
        msg = f"deflated body inflates past the {max_bytes} byte cap (max_file_mb)"
        raise Reject(reason="too_large", detail=msg)
    meta = pydicom.dcmread(io.BytesIO(data[:meta_end]), force=True).file_meta
    stream = io.BytesIO(body)
    ds = read_dataset(
        stream,
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=lambda tag, vr, length: int(tag) in PIXEL_TAGS,
    )
    ds.file_meta = meta
    return ds, stream, len(body)


# --- PHI -----------------------------------------------------------------------------------


# --- transfer syntax and pixel data ---------------------------------------------------------


def _check_pixels(ds: Dataset, ts: str | None, stream: BinaryIO, stream_size: int) -> None:
    implicit, little = ds.original_encoding
    check_pixel_element(
        ds,
        ts,
        stream,
        stream.tell(),
        stream_size,
        implicit=bool(implicit) if implicit is not None else True,
        little=bool(little) if little is not None else True,
    )


# --- instance columns -----------------------------------------------------------------------
