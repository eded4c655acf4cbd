"""DICOM header reading for ``index``: one archive file in, one outcome out.

A file is read header-only (pydicom, ``stop_before_pixels``) and checked without decoding
any pixel:

- it must be DICOM: a preamble with file meta, or else the core attributes
  (SOPInstanceUID, SeriesInstanceUID, Modality) with valid UIDs — ``dcmread(force=True)``
  alone accepts text and random bytes;
- identifying attributes must pass the PHI policy (:mod:`ctcurate.io.phi`), also inside
  sequences (tag names and rule names are reported, never values);
- its transfer syntax must have an installed pixel decoder;
- its pixel data must be all there: a length check from Rows, Columns, SamplesPerPixel,
  BitsAllocated and NumberOfFrames against the bytes after the PixelData tag (native
  syntaxes), or a walk over the fragment headers (encapsulated syntaxes).

Every failure becomes a quarantine reason; no exception escapes :func:`read_instance`.

The common case takes a faster route: :func:`read_instance` first opens the file with
plain ``os`` calls and tries the lean reader (:mod:`ctcurate.io.lean`), which gives the
same row for a clean file in a common transfer syntax and gives up on anything else,
which is then read here with pydicom.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import io
import math
import os
import re
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
from typing import Any, BinaryIO, Literal, Protocol

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ctcurate.io import archive_file, phi
from ctcurate.io.paths import NotRegularFileError, irregular, open_regular

Status = Literal["indexed", "quarantined", "skipped"]

#: Identifying attributes judged by the PHI policy (keywords, :mod:`ctcurate.io.phi`).
PHI_KEYWORDS: tuple[str, ...] = phi.ELEMENTS
#: Attributes a file without preamble / file meta must carry to be accepted as DICOM.
CORE_KEYWORDS: tuple[str, ...] = ("SOPInstanceUID", "SeriesInstanceUID", "Modality")
#: What a file with DICOM file meta must carry to be indexed (Modality may be missing).
TRUSTED_CORE_KEYWORDS: tuple[str, ...] = ("SOPInstanceUID", "SeriesInstanceUID")

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
NATIVE_SYNTAXES = frozenset(
    {
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # PixelData, Float, DoubleFloat
_ITEM, _SEQ_DELIM = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS |= {b"UR", b"UT", b"UV"}
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_CHARS = 64
_MAX_SEQ_DEPTH = 16
_HEAD_BYTES = 1 << 16
_CHANGED = "changed_since_snapshot"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_INT64_LIMIT = 1 << 63
_MIN_AXIS_NORM = 0.5  # ImageOrientationPatient row / column vectors shorter than this are bad

PHI_TAG_NAMES = {int(BaseTag(pydicom.datadict.tag_for_keyword(k) or 0)): k for k in PHI_KEYWORDS}


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


class Header(Protocol):
    """What the checks and the record builder read of a header: a pydicom Dataset, or
    the needed values of the lean reader (:class:`ctcurate.io.lean.LeanHeader`)."""

    file_meta: Any

    def get(self, key: str, default: Any = None) -> Any:
        """The value of an attribute by keyword, ``default`` when absent."""

    def __contains__(self, key: str) -> bool:
        """Whether an attribute (keyword) is present."""


class Reject(Exception):
    """Ends the checks of one file with a quarantine or skip outcome."""

    def __init__(self, reason: str, detail: str, status: Status = "quarantined") -> None:
        super().__init__(reason)
        self.reason, self.detail, self.status = reason, detail, status


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

    Identifying attributes are judged by ``policy`` (:mod:`ctcurate.io.phi`).

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
        Try the lean reader (:mod:`ctcurate.io.lean`) first; ``False`` reads every file
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
    from ctcurate.io.lean import read_lean

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


def _check_complete(ds: Dataset) -> None:
    """A top-level value shorter than its declared length means the file was cut."""
    for tag in ds.keys():  # noqa: SIM118 - keys() does not convert raw elements
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != _UNDEFINED
            and raw.value is not None
            and len(raw.value) < raw.length
        ):
            msg = f"{_tag_name(int(tag))} declares more bytes than the file holds"
            raise Reject(reason="truncated", detail=msg)


def sop_class(ds: Header) -> str | None:
    """SOPClassUID, else the file meta's MediaStorageSOPClassUID, if a valid UID."""
    for keyword in ("SOPClassUID", "MediaStorageSOPClassUID"):
        source = ds if keyword == "SOPClassUID" else ds.file_meta
        try:
            value = source.get(keyword)
        except Exception:  # an unconvertible UID is no UID
            continue
        if isinstance(value, str):
            text = value.strip(" \x00")
            if valid_uid(text):
                return text
    return None


def check_core(ds: Header, *, trusted: bool) -> None:
    """Reject a header without valid core attributes (``not_dicom`` when untrusted).

    A file with DICOM file meta needs only its two UIDs: one without Modality (Type 1, but
    left out by some converters of secondary captures) is indexed with ``modality`` null
    and the flag ``no_modality``, which ``select`` rejects ``not_ct``. Without file meta,
    Modality is part of the evidence that the bytes are DICOM at all.
    """
    keywords = CORE_KEYWORDS if not trusted else TRUSTED_CORE_KEYWORDS
    problems = [kw for kw in keywords if _core_value(ds, kw) is None]
    if problems:
        if trusted:
            raise Reject(
                reason="missing_attributes", detail="missing or invalid " + ",".join(problems)
            )
        msg = "no DICOM file meta and missing or invalid " + ",".join(problems)
        raise Reject(reason="not_dicom", detail=msg)


def _core_value(ds: Header, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # unconvertible bytes count as missing
        return None
    if value is None or isinstance(value, (MultiValue, DicomSequence, bytes)):
        return None
    text = str(value).strip(" \x00")
    if not text:
        return None
    if keyword.endswith("UID"):
        return text if valid_uid(text) else None
    return text if text.isprintable() and len(text) <= 16 else None


def valid_uid(text: str) -> bool:
    """Whether ``text`` is a DICOM UID (digits and dots, at most 64 characters)."""
    return len(text) <= UID_MAX_CHARS and _UID_RE.match(text) is not None


def _tag_name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


tag_name = _tag_name  # the name of a tag in details and census labels: keyword or (gggg,eeee)


# --- PHI -----------------------------------------------------------------------------------


def phi_verdict(ds: Dataset, rules: phi.Rules) -> tuple[list[str], list[str]]:
    """``(offending, accepted)``: the identifying attributes of ``ds`` judged by ``rules``.

    ``offending`` names the attributes the policy rejects (sorted, unique); ``accepted``
    the census labels (``Keyword:rule``) of the non-empty attributes it accepts. Attributes
    inside sequences are named by their path (``Seq>Attribute``) and compared with the
    file's PatientID too. Values are never returned.
    """
    patient_id = _text(ds, "PatientID", [])
    offending: set[str] = set()
    accepted: set[str] = set()
    for name, rule in _phi_walk(ds, rules, patient_id, "", 0):
        if rule == "phi":
            offending.add(name)
        elif rule != "empty":
            accepted.add(phi.accepted_label(name, rule))
    return sorted(offending), sorted(accepted)


def _phi_walk(
    ds: Dataset, rules: phi.Rules, patient_id: str | None, prefix: str, depth: int
) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for tag in list(ds.keys()):
        itag = int(tag)
        if itag in PHI_TAG_NAMES:
            keyword = PHI_TAG_NAMES[itag]
            try:
                texts = _phi_texts(ds[tag].value)
            except Exception:  # bytes that do not convert are still bytes: not empty
                texts = None
            found.append((prefix + keyword, rules.judge(keyword, texts, patient_id)))
            continue
        if depth >= _MAX_SEQ_DEPTH or not _is_sequence(ds, tag):
            continue
        try:
            items = ds[tag].value
        except Exception:  # an unparsable sequence holds nothing we can check
            continue
        if isinstance(items, DicomSequence):
            for item in items:
                found += _phi_walk(
                    item, rules, patient_id, f"{prefix}{_tag_name(itag)}>", depth + 1
                )
    return found


def _phi_texts(value: Any) -> list[str] | None:
    """An identifying value as text values (``None``: not text, e.g. a non-empty sequence)."""
    if value is None:
        return []
    if isinstance(value, DicomSequence):
        return None if len(value) else []
    if isinstance(value, bytes):
        return None if value.strip(b" \x00") else []
    if isinstance(value, (MultiValue, list, tuple)):
        out: list[str] = []
        for v in value:
            texts = _phi_texts(v)
            if texts is None:
                return None
            out += texts
        return out
    return [str(value)]


def deidentification_codes(ds: Header) -> list[str]:
    """The CodeValues of DeidentificationMethodCodeSequence, sorted and unique.

    Unparsable items or values are left out (the column records, it does not judge).
    """
    try:
        items = ds.get("DeidentificationMethodCodeSequence")
    except Exception:  # an unparsable sequence records nothing
        return []
    if not isinstance(items, DicomSequence):
        return []
    codes: set[str] = set()
    for item in items:
        text = _text(item, "CodeValue", [])
        if text is not None:
            codes.add(text)
    return sorted(codes)


def _is_sequence(ds: Dataset, tag: BaseTag) -> bool:
    elem = ds.get_item(tag)
    if elem is None:
        return False
    vr = elem.VR
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    return vr == "SQ" or isinstance(getattr(elem, "value", None), DicomSequence)


# --- transfer syntax and pixel data ---------------------------------------------------------


def check_decoder(ts: str | None) -> None:
    """Reject a transfer syntax without an installed pixel decoder."""
    if ts is None or ts in NATIVE_SYNTAXES:
        return
    if not _decoder_available(ts):
        name = UID(ts).name if valid_uid(ts) else "not a UID"
        raise Reject(
            reason="unsupported_transfer_syntax", detail=f"no installed decoder for {ts} ({name})"
        )


@functools.lru_cache(maxsize=256)
def _decoder_available(ts: str) -> bool:
    try:
        return bool(get_decoder(UID(ts)).is_available)
    except (NotImplementedError, ValueError):
        return False


def requires_pixels(ds: Header) -> bool:
    """Whether ``ds`` is an image: it has Rows / Columns or an image storage SOP class."""
    if "Rows" in ds or "Columns" in ds:
        return True
    sop = sop_class(ds)
    return bool(sop and valid_uid(sop) and UID(sop).name.endswith("Image Storage"))


def expected_pixel_bytes(ds: Header) -> int:
    """Bytes of native pixel data the image attributes call for.

    Raises ``Reject("missing_attributes")`` when an attribute needed is absent or invalid.
    """
    values: dict[str, int] = {}
    for kw, default in (
        ("Rows", None),
        ("Columns", None),
        ("BitsAllocated", None),
        ("SamplesPerPixel", 1),
        ("NumberOfFrames", 1),
    ):
        v = _int(ds, kw)
        if v is None:
            v = default
        if v is None or v < 1:
            msg = f"missing or invalid {kw}"
            raise Reject(reason="missing_attributes", detail=msg)
        values[kw] = v
    samples = values["SamplesPerPixel"]
    if _text(ds, "PhotometricInterpretation", []) == "YBR_FULL_422":
        samples = 2  # chroma subsampled 2:1 horizontally: 2 samples per pixel on average
    bits = values["Rows"] * values["Columns"] * samples
    bits *= values["NumberOfFrames"] * values["BitsAllocated"]
    return (bits + 7) // 8


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


def check_pixel_element(
    ds: Header,
    ts: str | None,
    stream: BinaryIO,
    pos: int,
    stream_size: int,
    *,
    implicit: bool,
    little: bool,
) -> None:
    """Reject a file whose pixel element at ``pos`` is missing or shorter than needed."""
    header = _pixel_header(stream, pos, stream_size, implicit=implicit, little=little)
    if header is None:
        if requires_pixels(ds):
            raise Reject(reason="no_pixel_data", detail="image attributes but no PixelData element")
        return
    tag, length, value_start = header
    available = stream_size - value_start
    name = _tag_name(tag)
    encapsulated = ts is not None and ts not in NATIVE_SYNTAXES
    if length == _UNDEFINED:
        if not encapsulated:
            msg = f"{name} has undefined length in a native transfer syntax"
            raise Reject(reason="pixel_length_short", detail=msg)
        check_fragments(stream, value_start, stream_size, name)
        return
    expected = length if encapsulated else expected_pixel_bytes(ds)
    got = min(length, available)
    if got < expected:
        msg = f"{name} holds {got} of {expected} bytes"
        raise Reject(reason="pixel_length_short", detail=msg)


def _pixel_header(
    stream: BinaryIO, pos: int, size: int, *, implicit: bool, little: bool
) -> tuple[int, int, int] | None:
    """(tag, declared length, value offset) of the pixel element at ``pos``, if there is one."""
    if pos + 8 > size:
        return None
    stream.seek(pos)
    return pixel_element(stream.read(12), pos, size, implicit=implicit, little=little)


def pixel_element(
    raw: bytes, pos: int, size: int, *, implicit: bool, little: bool
) -> tuple[int, int, int] | None:
    """(tag, declared length, value offset) from the (up to) 12 bytes at ``pos``."""
    end = "<" if little else ">"
    group, elem = struct.unpack_from(f"{end}HH", raw, 0)
    tag = group << 16 | elem
    if tag not in PIXEL_TAGS:
        return None
    vr = raw[4:6]
    if implicit or not (vr.isalpha() and vr.isupper()):  # writers switch to implicit VR
        (length,) = struct.unpack_from(f"{end}L", raw, 4)
        return tag, length, pos + 8
    if vr in _LONG_VRS:
        if len(raw) < 12:
            return tag, 0, size
        (length,) = struct.unpack_from(f"{end}L", raw, 8)
        return tag, length, pos + 12
    (length,) = struct.unpack_from(f"{end}H", raw, 6)
    return tag, length, pos + 8


def check_fragments(stream: BinaryIO, start: int, size: int, name: str) -> None:
    """Walk the item headers of encapsulated pixel data (offset table, then fragments)."""
    pos, items = start, 0
    while True:
        stream.seek(pos)
        raw = stream.read(8)
        if len(raw) < 8:
            msg = f"{name} ends before its sequence delimiter"
            raise Reject(reason="pixel_length_short", detail=msg)
        group, elem, length = struct.unpack("<HHL", raw)
        tag = group << 16 | elem
        if tag == _SEQ_DELIM:
            break
        if tag != _ITEM or length == _UNDEFINED:
            msg = f"{name} has a malformed fragment item"
            raise Reject(reason="pixel_length_short", detail=msg)
        if pos + 8 + length > size:
            msg = f"{name} fragment {items} runs past the end of the file"
            raise Reject(reason="pixel_length_short", detail=msg)
        items += 1
        pos += 8 + length
    if items < 2:  # the basic offset table item, then at least one fragment
        msg = f"{name} holds no fragment"
        raise Reject(reason="no_pixel_data", detail=msg)


# --- instance columns -----------------------------------------------------------------------


def instance_record(
    ds: Header,
    path: str,
    size: int,
    mtime_ns: int,
    ts: str | None,
    flags: list[str],
    phi_accepted: Sequence[str] = (),
    deid_codes: Sequence[str] = (),
    site: str | bool | None = True,
) -> dict[str, Any]:
    """The ``instances`` row of a checked dataset; unparsable values become null + a flag.

    ``phi_accepted`` are the census labels of the identifying attributes the PHI policy
    accepted, ``deid_codes`` the CodeValues of DeidentificationMethodCodeSequence; ``site``
    the file's site (``True``: its first folder).
    """
    flags = list(flags)
    if site is True:
        site = phi.DEFAULT_POLICY.site_of(path)
    site = site or None
    if site is None:
        flags.append("no_site")
    position = _floats(ds, "ImagePositionPatient", 3, flags)
    orientation = _orientation(ds, flags)
    spacing = _floats(ds, "PixelSpacing", 2, flags)
    frames = _int(ds, "NumberOfFrames")
    if frames is not None and frames > 1:
        flags.append("multiframe")
    modality = _core_value(ds, "Modality")
    if modality is None:
        flags.append("no_modality")
    return {
        "path": path,
        "size": size,
        "mtime_ns": mtime_ns,
        "site": site,
        "sop_instance_uid": _core_value(ds, "SOPInstanceUID"),
        "sop_class_uid": sop_class(ds),
        "series_instance_uid": _core_value(ds, "SeriesInstanceUID"),
        "study_instance_uid": _uid(ds, "StudyInstanceUID", flags),
        "patient_id": _text(ds, "PatientID", flags),
        "study_date": _date(ds, "StudyDate", flags),
        "modality": modality,
        "image_type": _text(ds, "ImageType", flags),
        "series_description": _text(ds, "SeriesDescription", flags),
        "body_part_examined": _text(ds, "BodyPartExamined", flags),
        "study_description": _text(ds, "StudyDescription", flags),
        "protocol_name": _text(ds, "ProtocolName", flags),
        "requested_procedure_description": _text(ds, "RequestedProcedureDescription", flags),
        "anatomic_region": _code_meanings(ds, "AnatomicRegionSequence", flags),
        "convolution_kernel": _text(ds, "ConvolutionKernel", flags),
        "manufacturer": _text(ds, "Manufacturer", flags),
        "slice_thickness": _float(ds, "SliceThickness", flags),
        "pixel_spacing_row": spacing[0] if spacing else None,
        "pixel_spacing_col": spacing[1] if spacing else None,
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "image_position_x": position[0] if position else None,
        "image_position_y": position[1] if position else None,
        "image_position_z": position[2] if position else None,
        "image_orientation": orientation,
        "instance_number": _int(ds, "InstanceNumber"),
        "transfer_syntax_uid": ts,
        "rescale_slope": _float(ds, "RescaleSlope", flags),
        "rescale_intercept": _float(ds, "RescaleIntercept", flags),
        "burned_in_annotation": _text(ds, "BurnedInAnnotation", flags),
        "patient_identity_removed": _text(ds, "PatientIdentityRemoved", flags),
        "deidentification_method": _text(ds, "DeidentificationMethod", flags),
        "deidentification_method_codes": sorted(set(deid_codes)),
        "longitudinal_temporal_information_modified": _text(
            ds, "LongitudinalTemporalInformationModified", flags
        ),
        "phi_accepted": sorted(set(phi_accepted)),
        "flags": sorted(set(flags)),
    }


def column_value(ds: Header, kind: str, keyword: str) -> tuple[Any, list[str]]:
    """One value of :func:`instance_record` computed alone: ``(value, flags)``.

    ``kind`` names the conversion :func:`instance_record` applies to ``keyword``:
    ``text``, ``uid``, ``date``, ``float``, ``int``, ``core`` (a core attribute, ``None``
    when missing or invalid), ``floats2`` / ``floats3`` (a list of 2 or 3 numbers) or
    ``orientation``.
    """
    flags: list[str] = []
    value: Any
    if kind == "text":
        value = _text(ds, keyword, flags)
    elif kind == "uid":
        value = _uid(ds, keyword, flags)
    elif kind == "date":
        value = _date(ds, keyword, flags)
    elif kind == "float":
        value = _float(ds, keyword, flags)
    elif kind == "int":
        value = _int(ds, keyword)
    elif kind == "core":
        value = _core_value(ds, keyword)
    elif kind in {"floats2", "floats3"}:
        value = _floats(ds, keyword, int(kind[-1]), flags)
    elif kind == "orientation":
        value = _orientation(ds, flags)
    else:
        msg = f"unknown column kind {kind!r}"
        raise ValueError(msg)
    return value, flags


def _flag(keyword: str) -> str:
    return "bad_" + re.sub(r"(?<!^)(?=[A-Z])", "_", keyword).lower()


def _value(ds: Header, keyword: str, flags: list[str]) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # an unconvertible value is reported as a flag, not a crash
        flags.append(_flag(keyword))
        return None


def _text(ds: Header, keyword: str, flags: list[str]) -> str | None:
    value = _value(ds, keyword, flags)
    if value is None or isinstance(value, DicomSequence):
        return None
    if isinstance(value, bytes):
        flags.append(_flag(keyword))
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        text = "\\".join(str(v).strip(" \x00") for v in value)
    else:
        text = str(value)
    text = text.strip(" \x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes (surrogates) are no text
        flags.append(_flag(keyword))
        return None
    return text or None


def _code_meanings(ds: Header, keyword: str, flags: list[str]) -> str | None:
    """The CodeMeaning of each item of a code sequence, ``\\``-joined (None when none)."""
    if keyword not in ds:  # also: a lean header, which holds no sequence
        return None
    value = _value(ds, keyword, flags)
    if not isinstance(value, DicomSequence):
        return None
    meanings = [_text(item, "CodeMeaning", flags) for item in value]
    return "\\".join(m for m in meanings if m) or None


def _uid(ds: Header, keyword: str, flags: list[str]) -> str | None:
    text = _text(ds, keyword, flags)
    if text is not None and not valid_uid(text):
        flags.append(_flag(keyword))
        return None
    return text


def _int(ds: Header, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or isinstance(value, (DicomSequence, bytes, MultiValue)):
            return None
        text = str(value).strip(" \x00")
        result = int(float(text)) if text else None
    except Exception:  # missing and invalid integers are both "unknown"
        return None
    return result if result is None or abs(result) < _INT64_LIMIT else None


def _float(ds: Header, keyword: str, flags: list[str]) -> float | None:
    value = _value(ds, keyword, flags)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (MultiValue, list, tuple)):
            value = value[0]
        result = float(value)
    except (TypeError, ValueError, IndexError):
        flags.append(_flag(keyword))
        return None
    if not math.isfinite(result):
        flags.append(_flag(keyword))
        return None
    return result


def _floats(ds: Header, keyword: str, n: int, flags: list[str]) -> list[float] | None:
    value = _value(ds, keyword, flags)
    if value is None or value == "":
        return None
    try:
        result = [float(v) for v in value]
    except (TypeError, ValueError):
        result = []
    if len(result) != n or not all(math.isfinite(v) for v in result):
        flags.append(_flag(keyword))
        return None
    return result


def _orientation(ds: Header, flags: list[str]) -> list[float] | None:
    values = _floats(ds, "ImageOrientationPatient", 6, flags)
    if values is None:
        return None
    row, col = values[:3], values[3:]
    if min(math.hypot(*row), math.hypot(*col)) < _MIN_AXIS_NORM:
        flags.append(_flag("ImageOrientationPatient"))
        return None
    return values


def _date(ds: Header, keyword: str, flags: list[str]) -> dt.date | None:
    text = _text(ds, keyword, flags)
    if text is None:
        return None
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()  # noqa: DTZ007 - a date only
    except ValueError:
        flags.append(_flag(keyword))
        return None
