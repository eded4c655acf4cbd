"""What makes a DICOM header acceptable to ``index``: core attributes, the PHI policy, a
decoder for its transfer syntax, and pixel data that is all there.

Shared by both readers (:mod:`ctcurate.dicom.header`, the pydicom path, and
:mod:`ctcurate.dicom.lean`); every failure is a :class:`Reject` with a quarantine reason.
"""

from __future__ import annotations

import functools
import re
import struct
from typing import Any, BinaryIO, Literal, Protocol

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
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

from ctcurate.dicom import phi

Status = Literal["indexed", "quarantined", "skipped"]


#: Identifying attributes judged by the PHI policy (keywords, :mod:`ctcurate.dicom.phi`).
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


_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


UID_MAX_CHARS = 64


_MAX_SEQ_DEPTH = 16


PHI_TAG_NAMES = {int(BaseTag(pydicom.datadict.tag_for_keyword(k) or 0)): k for k in PHI_KEYWORDS}


class Header(Protocol):
    """What the checks and the record builder read of a header: a pydicom Dataset, or
    the needed values of the lean reader (:class:`ctcurate.dicom.lean.LeanHeader`)."""

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
    problems = [kw for kw in keywords if core_value(ds, kw) is None]
    if problems:
        if trusted:
            raise Reject(
                reason="missing_attributes", detail="missing or invalid " + ",".join(problems)
            )
        msg = "no DICOM file meta and missing or invalid " + ",".join(problems)
        raise Reject(reason="not_dicom", detail=msg)


def core_value(ds: Header, keyword: str) -> str | None:
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


_INT64_LIMIT = 1 << 63


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
