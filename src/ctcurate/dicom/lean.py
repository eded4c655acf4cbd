"""The lean header reader: the tags ``index`` needs, straight from the bytes.

:func:`read_lean` walks the elements of a file with a preamble and file meta in Explicit
or Implicit VR Little Endian, or an encapsulated (compressed) transfer syntax, up to the
pixel data, and converts only the needed values. It gives the same ``instances`` row as
the pydicom path of :mod:`ctcurate.dicom.header` or gives up (returns ``None``) so that the
pydicom path decides. It gives up on anything it cannot prove clean:

- a file whose checks would fail (not indexable, PHI, missing or short pixel data, a
  missing, invalid or multi-valued core attribute): the pydicom path names the reason;
- Deflated and Big Endian syntaxes, unknown VRs, ``UN`` elements, undefined lengths
  outside sequences and encapsulated pixel data, an element past the bytes read, nesting
  deeper than pydicom's PHI walk, a file meta that does not parse, a needed attribute
  seen twice;
- an identifying attribute the PHI policy (:mod:`ctcurate.dicom.phi`) rejects (so a
  ``phi_present`` verdict and its detail come from the pydicom path), a non-empty one whose
  value is not plain printable ASCII, whose VR is not the dictionary's or whose length is
  undefined, a non-empty identifying sequence. Accepted values, top-level and nested
  (named by their sequence path), are judged once per distinct combination (cached) and
  counted in ``phi_accepted``; and a non-empty top-level
  AnatomicRegionSequence (its code meanings are read by the pydicom path);
- a needed value that is not plain printable ASCII, a DS/IS that does not match the
  strict grammar, a binary value of unexpected length, a needed value whose VR differs
  from the dictionary's, a character set other than the default, Latin-1 or UTF-8.

How it stays fast (about 10x fewer Python operations per file than a generic walk):

- the top-level walk looks each element up by its 6 header bytes (tag and VR) in a table
  of plans filled on first sight: most elements cost one unpack, one lookup and one
  addition; needed values are kept as raw bytes;
- the values shared by the files of a series (UIDs, descriptions, geometry of the grid,
  pixel attributes...) are converted once per distinct combination
  (:func:`shared_columns`, cached); only SOPInstanceUID, ImagePositionPatient and
  InstanceNumber are converted per file, by narrow fast paths that fall back to the
  reference conversion for anything unusual.

The values are converted as pydicom converts them: each column is the pydicom path's
record builder applied to the lean conversion of its attribute
(:func:`column_reference`). Differential tests compare both paths on every file of the
synthetic archive and of pydicom's own test files, and property tests compare the fast
paths with the reference conversion.
"""

from __future__ import annotations

import io
import math
import re
import struct
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctcurate.dicom import checks, phi, record

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
    "StudyDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
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
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "LongitudinalTemporalInformationModified",
)
_NEEDED: dict[int, tuple[str, str]] = {
    int(tag_for_keyword(k) or 0): (k, str(dictionary_VR(k))) for k in NEEDED_KEYWORDS
}
_BY_KEYWORD = {k: t for t, (k, _) in _NEEDED.items()}
_PHI = checks.PHI_TAG_NAMES
_WATCHED = frozenset(_PHI) | checks.PIXEL_TAGS
#: Character sets whose ASCII bytes pydicom decodes as ASCII.
PLAIN_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6"})

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC "
    b"UI UL UN UR US UT UV".split()
)
_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VR_INFO = {vr: (vr.decode(), vr in _LONG) for vr in _VRS}
_ITEM, _ITEM_DELIM, _SEQ_DELIM = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CODE_VALUE = 0x00080100
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16
_STRIP = b" \x00"
_EMPTY_PHI = b" \x00^=\\"
_DS_RE = re.compile(rb"^ *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *$")
_IS_RE = re.compile(rb"^ *[+-]?[0-9]+ *$")
_PRINTABLE_RE = re.compile(rb"^[\x20-\x7e]*$")
_VR_LIKE = re.compile(rb"^[A-Z]{2}$")
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

    def __init__(
        self, buf: bytes, implicit: bool, codes: list[bytes] | None = None, seq: int = 0
    ) -> None:
        self.buf, self.implicit = buf, implicit
        self.needed: dict[int, Any] = {}
        self.pixel_pos: int | None = None
        self.codes = codes  # CodeValues of the items of the walked sequence, if not None
        #: Tags of the sequences around the element being walked (``seq``: the outermost).
        self.stack: list[int] = [seq] if seq else []
        #: Non-empty identifying values found in the items: (sequence tags, tag, value).
        self.nested: list[tuple[tuple[int, ...], int, bytes]] = []

    def _phi(self, tag: int, vr: str, start: int, length: int) -> None:
        """Keep a non-empty nested identifying value (the dictionary's VR, defined length)
        for the PHI policy; give up on a non-empty sequence or any other VR."""
        if vr == "SQ" or length == _UNDEFINED or vr != _PHI_VR_BY_TAG[tag] or not self.stack:
            _check_phi(vr, self.buf, start, length)
            return
        if start + length > len(self.buf):
            raise _GiveUp
        value = self.buf[start : start + length]
        if value.strip(_EMPTY_PHI):
            self.nested.append((tuple(self.stack), tag, value))

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
                if top and tag in checks.PIXEL_TAGS:
                    self.pixel_pos = pos
                    return pos
                raise _GiveUp
            if tag in _WATCHED:
                if top and tag in checks.PIXEL_TAGS:
                    self.pixel_pos = pos
                    return pos
                if tag in _PHI:
                    self._phi(tag, vr, start, length)
            if vr == "SQ":
                if depth + 1 > _MAX_DEPTH:
                    raise _GiveUp
                self.stack.append(tag)
                pos = self.sequence(start, length, depth + 1)
                self.stack.pop()
                continue
            if length == _UNDEFINED:
                raise _GiveUp
            pos = start + length
            if pos > n:
                raise _GiveUp
            if tag == _CODE_VALUE and depth == 1 and self.codes is not None:
                if vr != "SH" or b"\\" in buf[start:pos]:
                    raise _GiveUp
                self.codes.append(buf[start:pos])
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
    pos, n, ts, sop = 132, len(head), None, None
    while pos + 8 <= n:
        group, elem, vr, length = _TAG_VR_LEN16.unpack_from(head, pos)
        if group != 0x0002:
            break
        info = _META_VRS.get(vr)
        if info is None:
            raise _GiveUp
        if info:
            if pos + 12 > n:
                raise _GiveUp
            length = _U32.unpack_from(head, pos + 8)[0]
            start = pos + 12
        else:
            start = pos + 8
        pos = start + length
        if length == _UNDEFINED or pos > n:
            raise _GiveUp
        if elem == 0x0010:
            ts = head[start:pos]
        elif elem == 0x0002:
            sop = head[start:pos]
    if ts is None:
        raise _GiveUp
    ts_text, sop_text = _meta_uids(ts, sop)
    return pos, ts_text, sop_text


_META_VRS = {vr: long for vr, (_, long) in _VR_INFO.items() if vr not in {b"SQ", b"UN"}}


@lru_cache(maxsize=1024)
def _meta_uids(ts: bytes, sop: bytes | None) -> tuple[str, str | None]:
    ts_text = convert("UI", ts)
    sop_text = convert("UI", sop) if sop is not None else None
    if ts_text != ts.decode("ascii").rstrip(" \x00") or not checks.valid_uid(ts_text):
        raise _GiveUp
    return ts_text, sop_text


@lru_cache(maxsize=256)
def _syntax_ok(ts: str) -> bool:
    """Little endian syntaxes the walker reads whose pixels have an installed decoder."""
    uid = UID(ts)
    if ts == DeflatedExplicitVRLittleEndian or not uid.is_transfer_syntax:
        return False
    if not uid.is_little_endian:
        return False
    try:
        checks.check_decoder(ts)
    except checks.Reject:
        return False
    return True


# --- the fast top-level walk ----------------------------------------------------------------
#
# Each element of the top-level dataset is looked up by its first 6 bytes (tag and VR, as
# they are in the file; the 4-byte tag for implicit VR) in a table of what to do with it
# (a "plan"), filled the first time a tag and VR are seen. Most elements are skipped
# with one unpack, one lookup and one addition; an element running past the bytes read
# ends the loop, and the walk gives up.


def _le(tag: int) -> int:
    """A tag as the little endian 32-bit word of its bytes in the file."""
    return (tag & 0xFFFF) << 16 | tag >> 16


_NEED, _PHI_CHECK, _PIXEL, _CODES = 1, 2, 3, 4
_CODE_SEQUENCE = int(tag_for_keyword("DeidentificationMethodCodeSequence") or 0)
_ACTION: dict[int, int] = (
    dict.fromkeys(map(_le, _NEEDED), _NEED)
    | dict.fromkeys(map(_le, _PHI), _PHI_CHECK)
    | dict.fromkeys(map(_le, checks.PIXEL_TAGS), _PIXEL)
    | {_le(_CODE_SEQUENCE): _CODES}
)
#: A coded body region the pydicom path reads (its items are not walked for values here):
#: gives up when not empty, as for a PHI-bearing attribute.
_ACTION[_le(int(tag_for_keyword("AnatomicRegionSequence") or 0))] = _PHI_CHECK
_NEEDED_VR = {_le(tag): vr for tag, (_, vr) in _NEEDED.items()}
_PHI_VR = {_le(tag): str(dictionary_VR(tag)) for tag in _PHI}
_PHI_VR_BY_TAG = {tag: str(dictionary_VR(tag)) for tag in _PHI}
#: Plans: skip a short / long element, keep a needed value, check a PHI value (short,
#: long, sequence), walk a sequence, stop at the pixel element (short, long header),
#: keep a non-empty identifying value (short, the dictionary's VR) for the PHI policy,
#: walk DeidentificationMethodCodeSequence keeping its CodeValues.
(
    _SKIP,
    _SKIP_LONG,
    _KEEP,
    _PHI_SHORT,
    _PHI_LONG,
    _PHI_SEQ,
    _SEQ,
    _PIX,
    _PIX_LONG,
    _PHI_KEEP,
    _CODE_SEQ,
) = range(11)
_TAG_VR = struct.Struct("<L2s")
_KEY_LEN16 = struct.Struct("<6sH")
_LE_TAG_LEN = struct.Struct("<LL")
_MAX_PLANS = 1 << 16  # distinct tags remembered (a fuzzed archive must not grow it freely)
_explicit_plans: dict[bytes, int] = {}
_implicit_plans: dict[int, int] = {}


def _key(tag_le: int, vr: str) -> bytes:
    return _TAG_VR.pack(tag_le, vr.encode())


def _plan(tag: int, vr: str, long: bool) -> int:
    """What the walk does with a top-level element (raises _GiveUp where :class:`_Walker`
    gives up whatever the element's value)."""
    group = tag & 0xFFFF
    if group == 0x0002 or group == 0xFFFE or vr == "UN":  # noqa: PLR1714 - ints
        if tag in _PIXEL_LE:
            return _PIX_LONG if long else _PIX
        raise _GiveUp
    action = _ACTION.get(tag)
    if action == _PIXEL:
        return _PIX_LONG if long else _PIX
    if action == _PHI_CHECK:
        if vr == "SQ":
            return _PHI_SEQ
        if long:
            return _PHI_LONG
        return _PHI_KEEP if vr == _PHI_VR[tag] else _PHI_SHORT
    if vr == "SQ":
        return _CODE_SEQ if action == _CODES else _SEQ
    if action == _NEED:
        if vr != _NEEDED_VR[tag] or long:
            raise _GiveUp
        return _KEEP
    return _SKIP_LONG if long else _SKIP


def _explicit_plan(key: bytes) -> int:
    tag, vr_bytes = _TAG_VR.unpack(key)
    info = _VR_INFO.get(vr_bytes)
    if info is None:
        raise _GiveUp
    plan = _plan(tag, *info)
    if len(_explicit_plans) < _MAX_PLANS:
        _explicit_plans[key] = plan
    return plan


def _implicit_plan(tag: int, length: int) -> int:
    vr = _implicit_vr(_le(tag), length)  # the swap is its own inverse
    plan = _plan(tag, vr, False)
    if length != _UNDEFINED and len(_implicit_plans) < _MAX_PLANS:
        _implicit_plans[tag] = plan  # an undefined length may change the VR (UN)
    return plan


_PIXEL_LE = frozenset(map(_le, checks.PIXEL_TAGS))
_IMPLICIT_KEYS = {tag: _key(tag, vr) for tag, vr in _NEEDED_VR.items()}
_PHI_IMPLICIT_KEYS = {tag: _key(tag, vr) for tag, vr in _PHI_VR.items()}
#: Keyword and VR of each identifying element by its key (tag and the dictionary's VR).
_PHI_BY_KEY = {_key(_le(t), _PHI_VR[_le(t)]): (k, _PHI_VR[_le(t)]) for t, k in _PHI.items()}


Raw = dict[bytes, bytes]


def walk_top(buf: bytes, pos: int, implicit: bool) -> tuple[Raw, Raw, int]:
    """The raw bytes of the needed top-level values, of the extra values and the offset of
    the pixel element.

    The same walk as :class:`_Walker` at depth 0 (sequences are walked by it), keeping
    the undecoded values (keyed by their 6 bytes of tag and VR); raises _GiveUp where it
    does, and on a needed tag seen twice. The extra values are the non-empty top-level
    identifying values (by their key) and the CodeValues of
    DeidentificationMethodCodeSequence (joined by backslashes, key :data:`_CODES_KEY`).
    """
    if implicit:
        return _walk_implicit(buf, pos)
    n = len(buf)
    raw: Raw = {}
    extra: Raw = {}
    unpack = _KEY_LEN16.unpack_from
    plans = _explicit_plans
    while pos + 8 <= n:
        key, length = unpack(buf, pos)
        plan = plans.get(key)
        if plan is None:
            plan = _explicit_plan(key)
        if plan == _SKIP:
            pos += 8 + length
        elif plan == _KEEP:
            start = pos + 8
            pos = start + length
            if pos > n or key in raw:
                raise _GiveUp
            raw[key] = buf[start:pos]
        elif plan == _SKIP_LONG:  # an undefined length jumps past the end: gives up
            pos += 12 + _U32.unpack_from(buf, pos + 8)[0]
        elif plan == _PIX:
            return raw, extra, pos
        elif plan == _PIX_LONG:
            if pos + 12 > n:
                raise _GiveUp
            return raw, extra, pos
        elif plan == _PHI_KEEP:
            start = pos + 8
            pos = start + length
            _keep_phi(extra, key, buf, start, pos)
        elif plan == _PHI_SHORT:
            if buf[pos + 8 : pos + 8 + length].strip(_EMPTY_PHI):
                raise _GiveUp
            pos += 8 + length
        else:  # long PHI values and sequences
            length = _U32.unpack_from(buf, pos + 8)[0]
            start = pos + 12
            if plan == _PHI_LONG:
                _check_phi("OB", buf, start, length)
                pos = start + length
                continue
            if plan == _PHI_SEQ:
                _check_phi("SQ", buf, start, length)
            elif plan == _CODE_SEQ:
                pos = _walk_codes(extra, buf, start, length, implicit=False)
                continue
            pos = _walk_sequence(extra, buf, start, length, _le(_U32.unpack_from(key)[0]), False)
    raise _GiveUp  # no pixel element in the bytes read: the pydicom path decides


#: Key of the DeidentificationMethodCodeSequence CodeValues among the extra values.
_CODES_KEY = b"codes"


def _walk_sequence(
    extra: Raw, buf: bytes, start: int, length: int, tag: int, implicit: bool
) -> int:
    """Walk a top-level sequence (``tag``); keep its nested identifying values in ``extra``
    (keys :func:`_nested_key`); return its end."""
    walker = _Walker(buf, implicit=implicit, seq=tag)
    end = walker.sequence(start, length, 1)
    for path, phi_tag, value in walker.nested:
        extra[_nested_key(path, phi_tag, len(extra))] = value
    return end


def _nested_key(path: tuple[int, ...], tag: int, n: int) -> bytes:
    """Key of a nested identifying value: a marker, the sequence tags, its tag, a number
    that keeps two values of one path apart."""
    return _NESTED + struct.pack(f"<{len(path) + 2}L", *path, tag, n)


_NESTED = b"\xff"


def _keep_phi(extra: Raw, key: bytes, buf: bytes, start: int, end: int) -> None:
    """Keep a top-level identifying value for the PHI policy when it is not empty."""
    if end > len(buf) or key in extra:
        raise _GiveUp
    value = buf[start:end]
    if value.strip(_EMPTY_PHI):
        extra[key] = value


def _walk_codes(extra: Raw, buf: bytes, start: int, length: int, *, implicit: bool) -> int:
    """Walk DeidentificationMethodCodeSequence keeping its CodeValues; return its end."""
    if _CODES_KEY in extra:
        raise _GiveUp
    codes: list[bytes] = []
    end = _Walker(buf, implicit=implicit, codes=codes).sequence(start, length, 1)
    extra[_CODES_KEY] = b"\\".join(codes)
    return end


def _walk_implicit(buf: bytes, pos: int) -> tuple[Raw, Raw, int]:
    """:func:`walk_top` of an implicit VR little endian dataset."""
    n = len(buf)
    raw: Raw = {}
    extra: Raw = {}
    unpack = _LE_TAG_LEN.unpack_from
    plans = _implicit_plans
    while pos + 8 <= n:
        tag, length = unpack(buf, pos)
        plan = plans.get(tag) if length != _UNDEFINED else None
        if plan is None:
            plan = _implicit_plan(tag, length)
        start = pos + 8
        if plan == _SKIP:
            pos = start + length
        elif plan == _KEEP:
            pos = start + length
            key = _IMPLICIT_KEYS[tag]
            if pos > n or key in raw:
                raise _GiveUp
            raw[key] = buf[start:pos]
        elif plan == _PIX:
            return raw, extra, pos
        elif plan == _PHI_KEEP:
            pos = start + length
            _keep_phi(extra, _PHI_IMPLICIT_KEYS[tag], buf, start, pos)
        elif plan == _CODE_SEQ:
            pos = _walk_codes(extra, buf, start, length, implicit=True)
        elif plan in {_PHI_SHORT, _PHI_SEQ}:
            _check_phi("SQ" if plan == _PHI_SEQ else "", buf, start, length)
            if plan == _PHI_SEQ:
                pos = _walk_sequence(extra, buf, start, length, _le(tag), True)
            else:
                pos = start + length
        else:  # _SEQ (implicit VR elements are never "long")
            pos = _walk_sequence(extra, buf, start, length, _le(tag), True)
    raise _GiveUp


# --- the record, column by column -----------------------------------------------------------

_T = {k: _key(_le(t), vr) for t, (k, vr) in _NEEDED.items()}
_UID_BYTES_RE = re.compile(rb"[0-9]+(?:\.[0-9]+)*")
_DS_NUM = rb" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *"
_DS3_RE = re.compile(_DS_NUM + rb"\\" + _DS_NUM + rb"\\" + _DS_NUM)
_IS15_RE = re.compile(rb" *[+-]?[0-9]{1,15} *")
_isfinite = math.isfinite
#: ``(column, keyword, kind)`` of the columns shared by the files of a series, computed
#: by :func:`column_reference` (kinds of :func:`ctcurate.dicom.header.column_value`).
SHARED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("series_instance_uid", "SeriesInstanceUID", "core"),
    ("study_instance_uid", "StudyInstanceUID", "uid"),
    ("patient_id", "PatientID", "text"),
    ("study_date", "StudyDate", "date"),
    ("modality", "Modality", "core"),
    ("image_type", "ImageType", "text"),
    ("series_description", "SeriesDescription", "text"),
    ("body_part_examined", "BodyPartExamined", "text"),
    ("study_description", "StudyDescription", "text"),
    ("protocol_name", "ProtocolName", "text"),
    ("requested_procedure_description", "RequestedProcedureDescription", "text"),
    ("convolution_kernel", "ConvolutionKernel", "text"),
    ("manufacturer", "Manufacturer", "text"),
    ("slice_thickness", "SliceThickness", "float"),
    ("rows", "Rows", "int"),
    ("columns", "Columns", "int"),
    ("rescale_slope", "RescaleSlope", "float"),
    ("rescale_intercept", "RescaleIntercept", "float"),
    ("burned_in_annotation", "BurnedInAnnotation", "text"),
    ("image_orientation", "ImageOrientationPatient", "orientation"),
    ("patient_identity_removed", "PatientIdentityRemoved", "text"),
    ("deidentification_method", "DeidentificationMethod", "text"),
    (
        "longitudinal_temporal_information_modified",
        "LongitudinalTemporalInformationModified",
        "text",
    ),
)
#: Attributes whose values are usually the same for every file of a series.
_SHARED_KEYWORDS = (
    *(kw for _, kw, _ in SHARED_COLUMNS),
    "SpecificCharacterSet",
    "SOPClassUID",
    "PixelSpacing",
    "NumberOfFrames",
    "BitsAllocated",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
_SHARED_TAGS = tuple(_T[k] for k in _SHARED_KEYWORDS)
_PIXEL_KEYWORDS = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "PhotometricInterpretation",
)
_SOP_INSTANCE, _POSITION, _NUMBER = (
    _T[k] for k in ("SOPInstanceUID", "ImagePositionPatient", "InstanceNumber")
)


def _header(values: dict[str, bytes | None], meta_sop: str | None = None) -> LeanHeader:
    """A header holding the lean conversion of raw values (keywords; None: absent)."""
    converted = {
        _BY_KEYWORD[k]: convert(_NEEDED[_BY_KEYWORD[k]][1], v)
        for k, v in values.items()
        if v is not None
    }
    return LeanHeader(converted, LeanMeta(meta_sop))


def column_reference(kind: str, keyword: str, raw: bytes | None) -> tuple[Any, tuple[str, ...]]:
    """``(value, flags)`` of one column from the raw value of its attribute.

    The pydicom path's record builder applied to the lean conversion of ``raw``; raises
    _GiveUp where the conversion does and where a core attribute is missing or invalid.
    """
    header = _header({keyword: raw})
    if kind == "core" and isinstance(header.get(keyword), list):
        raise _GiveUp  # pydicom's MultiValue is no core value
    value, flags = record.column_value(header, kind, keyword)
    if kind == "core" and value is None:
        raise _GiveUp  # the pydicom path names the missing attribute
    return value, tuple(flags)


@lru_cache(maxsize=512)  # files come in path order: a series' files follow each other
def shared_columns(
    raws: tuple[bytes | None, ...], meta_sop: str | None, native: bool
) -> tuple[dict[str, Any], tuple[str, ...], int]:
    """Columns, flags and expected native pixel bytes (-1: encapsulated) of shared values.

    ``raws`` are the raw values of :data:`_SHARED_KEYWORDS` (None: absent). Raises
    _GiveUp on anything the pydicom path must decide: a conversion that gives up, a
    character set other than plain ones, a DICOMDIR, missing core or pixel attributes.
    """
    values = dict(zip(_SHARED_KEYWORDS, raws, strict=True))
    header = _header(values, meta_sop)  # converts every value (gives up where convert does)
    charset = header.get("SpecificCharacterSet")
    if isinstance(charset, list) or (charset or "") not in PLAIN_CHARSETS:
        raise _GiveUp
    sop = checks.sop_class(header)
    if sop == checks.DICOMDIR_SOP_CLASS:
        raise _GiveUp
    columns: dict[str, Any] = {"sop_class_uid": sop}
    flags: list[str] = []
    for col, keyword, kind in SHARED_COLUMNS:
        columns[col], bad = column_reference(kind, keyword, values[keyword])
        flags += bad
    spacing, bad = column_reference("floats2", "PixelSpacing", values["PixelSpacing"])
    flags += bad
    columns["pixel_spacing_row"] = spacing[0] if spacing else None
    columns["pixel_spacing_col"] = spacing[1] if spacing else None
    frames, _ = column_reference("int", "NumberOfFrames", values["NumberOfFrames"])
    if frames is not None and frames > 1:
        flags.append("multiframe")
    expected = -1
    if native:
        try:
            expected = checks.expected_pixel_bytes(_header({k: values[k] for k in _PIXEL_KEYWORDS}))
        except checks.Reject:
            raise _GiveUp from None
    return columns, tuple(flags), expected


def sop_instance_uid(raw: bytes | None) -> str:
    """SOPInstanceUID as the core check reads it; _GiveUp unless a plain valid UID."""
    if raw is None:
        raise _GiveUp
    text = raw.rstrip(b" \x00").lstrip(b" ")
    if len(text) > checks.UID_MAX_CHARS or _UID_BYTES_RE.fullmatch(text) is None:
        raise _GiveUp
    return text.decode("ascii")


def image_position(raw: bytes | None) -> tuple[list[float] | None, tuple[str, ...]]:
    """ImagePositionPatient as :func:`column_reference` gives it (three plain numbers fast)."""
    if raw is not None and _DS3_RE.fullmatch(raw) is not None:
        a, b, c = raw.split(b"\\")
        values = [float(a), float(b), float(c)]
        if _isfinite(values[0]) and _isfinite(values[1]) and _isfinite(values[2]):
            return values, ()
    return column_reference("floats3", "ImagePositionPatient", raw)


def instance_number(raw: bytes | None) -> int | None:
    """InstanceNumber as :func:`column_reference` gives it (a plain integer fast)."""
    if raw is not None and _IS15_RE.fullmatch(raw) is not None:
        return int(raw)
    value, _ = column_reference("int", "InstanceNumber", raw)
    return value  # type: ignore[no-any-return]


def site_of(path: str) -> str | None:
    """The first folder of ``path`` (``None`` for a file at the archive root)."""
    if path and path[0] not in "/." and path[-1] != "/" and "//" not in path and "/." not in path:
        i = path.find("/")
        return path[:i] if i > 0 else None
    parts = PurePosixPath(path).parts
    return parts[0] if len(parts) > 1 else None


def lean_record(
    raw: Raw,
    meta_sop: str | None,
    path: str,
    size: int,
    mtime_ns: int,
    ts: str,
    flags: list[str],
    extra: Raw | None = None,
    policy: phi.Policy = phi.DEFAULT_POLICY,
) -> tuple[dict[str, Any], int]:
    """The ``instances`` row from the raw needed values (what ``instance_record`` gives)
    and the native pixel bytes expected (-1 for an encapsulated syntax).

    ``extra`` holds the extra values of :func:`walk_top`, judged by ``policy``; gives up
    when the policy does not accept them (the pydicom path names the tags).
    """
    shared, shared_flags, expected = shared_columns(
        tuple(map(raw.get, _SHARED_TAGS)), meta_sop, ts in checks.NATIVE_SYNTAXES
    )
    position, position_flags = image_position(raw.get(_POSITION))
    record = shared.copy()
    record["path"] = path
    record["size"] = size
    record["mtime_ns"] = mtime_ns
    site = record["site"] = site_of(path) if policy.site_rule is None else policy.site_of(path)
    record["sop_instance_uid"] = sop_instance_uid(raw.get(_SOP_INSTANCE))
    record["image_position_x"] = position[0] if position else None
    record["image_position_y"] = position[1] if position else None
    record["image_position_z"] = position[2] if position else None
    record["instance_number"] = instance_number(raw.get(_NUMBER))
    record["transfer_syntax_uid"] = ts
    record["anatomic_region"] = None  # a non-empty AnatomicRegionSequence gave up
    accepted: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()
    if extra:
        codes_raw = extra.get(_CODES_KEY)
        if codes_raw:
            codes = _codes(codes_raw)
        values = tuple(sorted(kv for kv in extra.items() if kv[0] != _CODES_KEY))
        if values:
            accepted = _accepted(policy.rules_for(site), values, record["patient_id"])
    record["deidentification_method_codes"] = list(codes)
    record["phi_accepted"] = list(accepted)
    if flags or shared_flags or position_flags or site is None:
        every = [*flags, *shared_flags, *position_flags]
        if site is None:
            every.append("no_site")
        record["flags"] = sorted(set(every))
    else:
        record["flags"] = []
    return record, expected


@lru_cache(maxsize=256)
def _codes(raw: bytes) -> tuple[str, ...]:
    """The CodeValues joined by :func:`_walk_codes`, as ``deidentification_codes`` gives
    them (sorted, unique, empty ones left out)."""
    codes = set()
    for part in raw.split(b"\\"):
        value = convert("SH", part)
        if value:
            codes.add(value)
    return tuple(sorted(codes))


_UNSPLIT_VRS = frozenset({"LT", "ST", "UT"})  # single-valued: a backslash is text


@lru_cache(maxsize=512)
def _accepted(
    rules: phi.Rules, values: tuple[tuple[bytes, bytes], ...], patient_id: str | None
) -> tuple[str, ...]:
    """Census labels of the non-empty identifying values (by key) ``rules`` accept; gives
    up when it rejects one or a value is not plain printable ASCII."""
    labels = []
    for key, value in values:
        if key[:1] == _NESTED:  # named by its path, judged as its attribute
            *path, tag, _ = struct.unpack(f"<{(len(key) - 1) // 4}L", key[1:])
            name, vr = _PHI[tag], _PHI_VR_BY_TAG[tag]
            label = ">".join([*map(checks.tag_name, path), name])
        else:
            name, vr = _PHI_BY_KEY[key]
            label = name
        text = value.rstrip(_STRIP)
        if not _PRINTABLE_RE.match(text):
            raise _GiveUp
        parts = [text] if vr in _UNSPLIT_VRS else text.split(b"\\")
        rule = rules.judge(name, [p.decode("ascii") for p in parts], patient_id)
        if rule == "phi":
            raise _GiveUp
        if rule != "empty":
            labels.append(phi.accepted_label(label, rule))
    return tuple(sorted(set(labels)))


def _check_pixels(
    fp: BinaryIO | None, head: bytes, pos: int, file_size: int, implicit: bool, expected: int
) -> None:
    """Give up unless the pixel element at ``pos`` holds what ``check_pixel_element`` wants."""
    whole = len(head) >= file_size
    if pos + 8 > file_size or (fp is None and not whole):
        raise _GiveUp
    if whole or pos + 12 <= len(head):
        element = checks.pixel_element(
            head[pos : pos + 12], pos, file_size, implicit=implicit, little=True
        )
    else:
        assert fp is not None
        fp.seek(pos)
        element = checks.pixel_element(fp.read(12), pos, file_size, implicit=implicit, little=True)
    if element is None:
        raise _GiveUp
    _, length, value_start = element
    if length == _UNDEFINED:
        if expected >= 0:  # undefined length in a native syntax
            raise _GiveUp
        stream = io.BytesIO(head) if whole or fp is None else fp
        checks.check_fragments(stream, value_start, file_size, "")
    elif min(length, file_size - value_start) < (length if expected < 0 else expected):
        raise _GiveUp


def read_lean(
    fp: BinaryIO | None,
    head: bytes,
    path: str,
    size: int,
    mtime_ns: int,
    file_size: int,
    flags: list[str],
    policy: phi.Policy = phi.DEFAULT_POLICY,
) -> dict[str, Any] | None:
    """The ``instances`` row of a clean file, or ``None`` to let the pydicom path decide.

    ``head`` holds the first bytes of the file (the whole file when it is small); ``fp``
    is the open file (read for pixel data past ``head``; ``None`` when ``head`` holds the
    whole file); ``size`` and ``mtime_ns`` are
    its listing row, ``file_size`` its size now; ``flags`` the flags found so far.
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    try:
        start, ts, meta_sop = _meta(head)
        if not _syntax_ok(ts):
            return None
        implicit = ts == ImplicitVRLittleEndian
        if implicit and _VR_LIKE.match(head[start + 4 : start + 6]):
            return None  # an explicit VR dataset under an implicit syntax: pydicom guesses
        raw, extra, pixel_pos = walk_top(head, start, implicit)
        record, expected = lean_record(
            raw, meta_sop, path, size, mtime_ns, ts, flags, extra, policy
        )
        _check_pixels(fp, head, pixel_pos, file_size, implicit, expected)
    except Exception:  # _GiveUp, a Reject, or bytes that break a conversion: pydicom decides
        return None
    return record
