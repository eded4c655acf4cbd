"""The lean header reader: the tags ``index`` needs, straight from the bytes.

:func:`read_lean` walks the elements of a file with a preamble and file meta in Explicit
or Implicit VR Little Endian, or an encapsulated (compressed) transfer syntax, up to the
pixel data, and converts only the needed values. It gives the same ``instances`` row as
the pydicom path of :mod:`ctcurate.io.dicom` or gives up (returns ``None``) so that the
pydicom path decides. It gives up on anything it cannot prove clean:

- a file whose checks would fail (not indexable, PHI, missing or short pixel data): the
  pydicom path names the reason;
- Deflated and Big Endian syntaxes, unknown VRs, ``UN`` elements, undefined lengths
  outside sequences and encapsulated pixel data, an element past the bytes read, nesting
  deeper than pydicom's PHI walk, a file meta that does not parse;
- a PHI-bearing attribute that is not empty, at any depth of any sequence (so the PHI
  verdict and its detail always come from the pydicom path);
- a needed value that is not plain printable ASCII, a DS/IS that does not match the
  strict grammar, a binary value of unexpected length, a needed value whose VR differs
  from the dictionary's, a character set other than the default, Latin-1 or UTF-8.

The values of the needed attributes are then converted as pydicom converts them
(differential tests compare both paths on every file of the synthetic archive and of
pydicom's own test files), and the same record builder runs on them.
"""

from __future__ import annotations

import re
import struct
from functools import lru_cache
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctcurate.io import dicom

#: Attributes the record builder and the checks read (keywords).
NEEDED_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "StudyDate",
    "Modality",
    "ImageType",
    "SeriesDescription",
    "BodyPartExamined",
    "ConvolutionKernel",
    "Manufacturer",
    "SliceThickness",
    "PixelSpacing",
    "Rows",
    "Columns",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "RescaleSlope",
    "RescaleIntercept",
    "BurnedInAnnotation",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "PhotometricInterpretation",
)
_NEEDED: dict[int, tuple[str, str]] = {
    int(tag_for_keyword(k) or 0): (k, str(dictionary_VR(k))) for k in NEEDED_KEYWORDS
}
_BY_KEYWORD = {k: t for t, (k, _) in _NEEDED.items()}
_PHI = dicom.PHI_TAG_NAMES
_WATCHED = frozenset(_PHI) | dicom.PIXEL_TAGS
#: Character sets whose ASCII bytes pydicom decodes as ASCII.
PLAIN_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6"})

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC "
    b"UI UL UN UR US UT UV".split()
)
_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VR_INFO = {vr: (vr.decode(), vr in _LONG) for vr in _VRS}
_ITEM, _ITEM_DELIM, _SEQ_DELIM = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16
_STRIP = b" \x00"
_EMPTY_PHI = b" \x00^=\\"
_DS_RE = re.compile(rb"^ *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *$")
_IS_RE = re.compile(rb"^ *[+-]?[0-9]+ *$")
_PRINTABLE_RE = re.compile(rb"^[\x20-\x7e]*$")
_VR_LIKE = re.compile(rb"^[A-Z]{2}$")
_SPLIT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})
_U16 = struct.Struct("<H")
_TAG_VR_LEN16 = struct.Struct("<HH2sH")
_U32 = struct.Struct("<L")
_TAG_LEN = struct.Struct("<HHL")


class _GiveUp(Exception):
    """The lean path cannot prove the file clean: the pydicom path reads it."""


class LeanMeta:
    """The file meta values the checks read."""

    def __init__(self, sop_class: str | None) -> None:
        self._sop_class = sop_class

    def get(self, key: str, default: Any = None) -> Any:
        """``MediaStorageSOPClassUID`` (or ``default``)."""
        if key == "MediaStorageSOPClassUID" and self._sop_class is not None:
            return self._sop_class
        return default


class LeanHeader:
    """Needed values of one file, answering ``get(keyword)`` as a pydicom Dataset does."""

    def __init__(self, values: dict[int, Any], meta: LeanMeta) -> None:
        self._values = values
        self.file_meta = meta

    def __contains__(self, keyword: object) -> bool:
        tag = _BY_KEYWORD.get(keyword) if isinstance(keyword, str) else None
        return tag is not None and tag in self._values

    def get(self, keyword: str, default: Any = None) -> Any:
        """The converted value of a needed attribute (``default`` when absent)."""
        tag = _BY_KEYWORD.get(keyword)
        if tag is None:
            msg = f"{keyword} is not read by the lean reader"
            raise KeyError(msg)
        return self._values.get(tag, default)


def convert(vr: str, value: bytes) -> Any:
    """A needed value as pydicom gives it (str, float, int or a list of them, or None).

    Raises _GiveUp for anything outside the plain cases (checked when the file is walked,
    so that the record builder never meets it).
    """
    if vr == "US":
        if len(value) == 0:
            return None
        if len(value) != 2:
            raise _GiveUp
        return _U16.unpack(value)[0]
    text = value.rstrip(_STRIP) if vr == "UI" else value.rstrip(b" ")
    if not _PRINTABLE_RE.match(text):
        raise _GiveUp
    parts = text.split(b"\\")
    if vr in {"DS", "IS"}:
        if not text.strip(b" "):
            return None
        regex = _DS_RE if vr == "DS" else _IS_RE
        if not all(regex.match(p) for p in parts):
            raise _GiveUp
        numbers: list[Any] = [float(p) if vr == "DS" else int(p) for p in parts]
        return numbers if len(numbers) > 1 else numbers[0]
    strings = [p.decode("ascii").strip(" ") for p in parts]
    if len(strings) > 1:
        if vr == "UI":
            raise _GiveUp
        return strings
    return strings[0]


# --- walking ---------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _implicit_vr(tag: int, length: int) -> str:
    """The VR pydicom reads an implicit VR element with: the dictionary's, else bytes."""
    vr = _dictionary_vr(tag)
    if vr is None or " " in vr:  # private or ambiguous (US or SS, ...)
        return "UN" if length == _UNDEFINED else "OB"
    return vr


def _check_phi(vr: str, buf: bytes, start: int, length: int) -> None:
    if vr == "SQ":
        if length != 0 and not (
            length == _UNDEFINED and _TAG_LEN.unpack_from(buf, start)[:2] == (0xFFFE, 0xE0DD)
        ):
            raise _GiveUp
    elif buf[start : start + length].strip(_EMPTY_PHI):
        raise _GiveUp


class _Walker:
    """Element walker over the bytes of one file (little endian)."""

    def __init__(self, buf: bytes, implicit: bool) -> None:
        self.buf, self.implicit = buf, implicit
        self.needed: dict[int, Any] = {}
        self.pixel_pos: int | None = None

    def dataset(self, pos: int, end: int, depth: int) -> int:
        """Walk a dataset from ``pos`` to ``end`` (or its item delimiter); return the end."""
        buf, n, implicit = self.buf, len(self.buf), self.implicit
        top = depth == 0
        while pos < end:
            if pos + 8 > n:
                raise _GiveUp
            if implicit:
                group, elem, length = _TAG_LEN.unpack_from(buf, pos)
                tag = group << 16 | elem
                if tag == _ITEM_DELIM:
                    return self._item_end(pos, length == 0 and not top)
                vr = _implicit_vr(tag, length)
                start = pos + 8
            else:
                group, elem, vr_bytes, length = _TAG_VR_LEN16.unpack_from(buf, pos)
                tag = group << 16 | elem
                if tag == _ITEM_DELIM:
                    return self._item_end(pos, vr_bytes == b"\0\0" and length == 0 and not top)
                info = _VR_INFO.get(vr_bytes)
                if info is None:
                    raise _GiveUp
                vr, long = info
                if long:
                    if pos + 12 > n:
                        raise _GiveUp
                    length = _U32.unpack_from(buf, pos + 8)[0]
                    start = pos + 12
                else:
                    start = pos + 8
            if group == 0x0002 or group == 0xFFFE or vr == "UN":  # noqa: PLR1714 - ints
                if top and tag in dicom.PIXEL_TAGS:
                    self.pixel_pos = pos
                    return pos
                raise _GiveUp
            if tag in _WATCHED:
                if top and tag in dicom.PIXEL_TAGS:
                    self.pixel_pos = pos
                    return pos
                if tag in _PHI:
                    _check_phi(vr, buf, start, length)
            if vr == "SQ":
                if depth + 1 > _MAX_DEPTH:
                    raise _GiveUp
                pos = self.sequence(start, length, depth + 1)
                continue
            if length == _UNDEFINED:
                raise _GiveUp
            pos = start + length
            if pos > n:
                raise _GiveUp
            if top and tag in _NEEDED:
                if vr != _NEEDED[tag][1]:
                    raise _GiveUp
                # gives up here on values the record builder must not meet
                self.needed[tag] = convert(vr, buf[start:pos])
        if pos != end and not top:
            raise _GiveUp
        return pos

    @staticmethod
    def _item_end(pos: int, ok: bool) -> int:
        if not ok:
            raise _GiveUp
        return pos + 8

    def sequence(self, start: int, length: int, depth: int) -> int:
        """Walk the items of a sequence; return the offset after it."""
        buf = self.buf
        undefined = length == _UNDEFINED
        end = len(buf) if undefined else start + length
        if end > len(buf):
            raise _GiveUp
        pos = start
        while pos < end:
            if pos + 8 > len(buf):
                raise _GiveUp
            group, elem, item_len = _TAG_LEN.unpack_from(buf, pos)
            tag = group << 16 | elem
            if tag == _SEQ_DELIM and undefined:
                return pos + 8
            if tag != _ITEM:
                raise _GiveUp
            if item_len == _UNDEFINED:
                pos = self.dataset(pos + 8, len(buf), depth)
            else:
                item_end = pos + 8 + item_len
                if item_end > end:
                    raise _GiveUp
                self.dataset(pos + 8, item_end, depth)
                pos = item_end
        if undefined or pos != end:
            raise _GiveUp
        return pos


def _meta(head: bytes) -> tuple[int, str, str | None]:
    """Offset after the file meta, its TransferSyntaxUID and MediaStorageSOPClassUID."""
    pos, values = 132, {}
    while pos + 8 <= len(head):
        group, elem, vr, length = _TAG_VR_LEN16.unpack_from(head, pos)
        if group != 0x0002:
            break
        if vr not in _VRS or vr in {b"SQ", b"UN"}:
            raise _GiveUp
        if vr in _LONG:
            if pos + 12 > len(head):
                raise _GiveUp
            length = _U32.unpack_from(head, pos + 8)[0]
            start = pos + 12
        else:
            start = pos + 8
        if length == _UNDEFINED or start + length > len(head):
            raise _GiveUp
        values[elem] = head[start : start + length]
        pos = start + length
    ts = values.get(0x0010)
    if ts is None:
        raise _GiveUp
    ts_text = convert("UI", ts)
    sop = values.get(0x0002)
    sop_text = convert("UI", sop) if sop is not None else None
    if ts_text != ts.decode("ascii").rstrip(" \x00") or not dicom.valid_uid(ts_text):
        raise _GiveUp
    return pos, ts_text, sop_text


@lru_cache(maxsize=256)
def _syntax_ok(ts: str) -> bool:
    """Little endian syntaxes the walker reads whose pixels have an installed decoder."""
    uid = UID(ts)
    if ts == DeflatedExplicitVRLittleEndian or not uid.is_transfer_syntax:
        return False
    if not uid.is_little_endian:
        return False
    try:
        dicom.check_decoder(ts)
    except dicom.Reject:
        return False
    return True


def read_lean(
    fp: BinaryIO,
    head: bytes,
    path: str,
    size: int,
    mtime_ns: int,
    file_size: int,
    flags: list[str],
) -> dict[str, Any] | None:
    """The ``instances`` row of a clean file, or ``None`` to let the pydicom path decide.

    ``head`` holds the first bytes of the file (the whole file when it is small); ``fp``
    is the open file (read for encapsulated pixel data); ``size`` and ``mtime_ns`` are
    its listing row, ``file_size`` its size now; ``flags`` the flags found so far.
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    try:
        start, ts, meta_sop = _meta(head)
        if not _syntax_ok(ts):
            return None
        walker = _Walker(head, implicit=ts == ImplicitVRLittleEndian)
        if walker.implicit and _VR_LIKE.match(head[start + 4 : start + 6]):
            return None  # an explicit VR dataset under an implicit syntax: pydicom guesses
        walker.dataset(start, len(head), 0)
        if walker.pixel_pos is None:
            return None
        header = LeanHeader(walker.needed, LeanMeta(meta_sop))
        charset = header.get("SpecificCharacterSet")
        if isinstance(charset, list) or (charset or "") not in PLAIN_CHARSETS:
            return None
        if dicom.sop_class(header) == dicom.DICOMDIR_SOP_CLASS:
            return None
        dicom.check_core(header, trusted=True)
        dicom.check_pixel_element(
            header, ts, fp, walker.pixel_pos, file_size, implicit=walker.implicit, little=True
        )
        return dicom.instance_record(header, path, size, mtime_ns, ts, flags)
    except (_GiveUp, dicom.Reject, struct.error, UnicodeDecodeError, ValueError):
        return None
