"""Lesion masks as DICOM Segmentation (SEG) objects: written with highdicom, read with numpy.

One SEG per CT series. Segments: 1 normal lung, 2 ground-glass opacity, 3 consolidation.
Each frame references the CT instance it was derived from by SOPInstanceUID, so a reader
can align the mask with the images whatever order the CT files come in.

The written bytes depend only on the inputs: every UID is derived from the source series
UID and every date from the source study, never from the clock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import pixel_array
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ctcurate.errors import InputError
from ctcurate.io.atomic import atomic_path

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
"""SOP Class UID of the Segmentation Storage IOD."""

LABELS: dict[int, str] = {1: "normal lung", 2: "ground-glass opacity", 3: "consolidation"}
"""Segment number → label; the segment number is the label value in a label volume."""

_MANUFACTURER = "ctcurate"
_SOFTWARE = "ctcurate"
_SERIAL = "0"
_SEG_SERIES_NUMBER = 900
_DEFAULT_DATE = "20000101"
_CONTENT_TIME = "000000"

# Local coding scheme for a concept without a widely used SNOMED CT code here.
_LOCAL_SCHEME = "99CTCURATE"


@dataclass(frozen=True)
class SegAlgorithm:
    """Who made a SEG's segments: the algorithm identification and what it changes.

    ``uid_salt`` enters every derived UID (empty for the synthetic truth), so a predicted
    SEG of a series never shares a UID with its reference SEG or with another model's.
    """

    name: str
    version: str
    family: tuple[str, str, str]  # (code value, coding scheme, meaning)
    automatic: bool
    series_description: str
    uid_salt: str = ""


#: The synthetic archive's reference masks.
TRUTH = SegAlgorithm(
    name="ctcurate synthetic truth",
    version="1",
    family=("123109", "DCM", "Manual Processing"),
    automatic=False,
    series_description="lesion segmentation",
)


def _segment_codes() -> dict[int, tuple[Code, Code]]:
    """Segmented property (category, type) per segment number."""
    anatomical = Code("91723000", "SCT", "Anatomical Structure")
    altered = Code("49755003", "SCT", "Morphologically Altered Structure")
    return {
        1: (anatomical, Code("39607008", "SCT", "Lung")),
        2: (altered, Code("GGO", _LOCAL_SCHEME, "Ground-glass opacity")),
        3: (altered, Code("95436008", "SCT", "Lung consolidation")),
    }


def _check_inputs(source: Sequence[pydicom.Dataset], labels: np.ndarray) -> None:
    if len(source) == 0:
        msg = "write_seg: source must hold at least one CT instance"
        raise ValueError(msg)
    if labels.ndim != 3:
        msg = f"write_seg: labels must be 3D (slices, rows, cols), got shape {labels.shape}"
        raise ValueError(msg)
    if labels.shape[0] != len(source):
        msg = (
            f"write_seg: labels has {labels.shape[0]} slices but source has {len(source)} instances"
        )
        raise ValueError(msg)
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    if labels.shape[1:] != (rows, cols):
        msg = f"write_seg: labels frames are {labels.shape[1:]} but source is {(rows, cols)}"
        raise ValueError(msg)
    if labels.size and int(labels.max()) > max(LABELS):
        msg = f"write_seg: label value {int(labels.max())} outside 0..{max(LABELS)}"
        raise ValueError(msg)


def _pin_clock_and_uids(seg: pydicom.Dataset, series_uid: str, date: str) -> None:
    """Replace the creation dates and random UIDs highdicom fills in with derived values."""
    for keyword in ("ContentDate", "SeriesDate", "InstanceCreationDate"):
        if keyword in seg:
            setattr(seg, keyword, date)
    for keyword in ("ContentTime", "SeriesTime", "InstanceCreationTime"):
        if keyword in seg:
            setattr(seg, keyword, _CONTENT_TIME)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + _CONTENT_TIME
    dim_uid = generate_uid(entropy_srcs=["ctcurate-seg-dimension", series_uid])
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid


def _uid(kind: str, series_uid: str, salt: str, *more: str) -> str:
    sources = [f"ctcurate-seg-{kind}", series_uid, *more, *([salt] if salt else [])]
    return str(generate_uid(entropy_srcs=sources))


def write_seg(
    path: Path,
    source: Sequence[pydicom.Dataset],
    labels: np.ndarray,
    *,
    algorithm: SegAlgorithm = TRUTH,
) -> None:
    """Write a label volume as a BINARY DICOM SEG derived from ``source``.

    Parameters
    ----------
    path
        SEG file to write (atomically).
    source
        The CT instances of one series; ``labels[i]`` belongs to ``source[i]``.
    labels
        uint8 label volume (n_slices, rows, cols): 0 background, 1 normal lung,
        2 ground-glass opacity, 3 consolidation.
    algorithm
        The segments' algorithm identification (default: the synthetic truth, manual).

    Raises
    ------
    ValueError
        When ``labels`` does not match ``source`` in slice count or frame size, or holds
        a value outside 0..3.
    """
    import highdicom as hd

    labels = np.asarray(labels)
    _check_inputs(source, labels)
    labels = labels.astype(np.uint8, copy=False)
    first = source[0]
    ct_series_uid = str(first.SeriesInstanceUID)
    salt = algorithm.uid_salt
    seg_series_uid = _uid("series", ct_series_uid, salt)
    seg_sop_uid = _uid("instance", ct_series_uid, salt)
    date = str(first.get("StudyDate", "") or _DEFAULT_DATE)

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=Code(*algorithm.family)
    )
    algorithm_type = (
        hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        if algorithm.automatic
        else hd.seg.SegmentAlgorithmTypeValues.MANUAL
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=LABELS[number],
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=algorithm_type,
            algorithm_identification=identification,
            tracking_uid=_uid("tracking", ct_series_uid, salt, str(number)),
            tracking_id=LABELS[number],
        )
        for number, (category, prop_type) in sorted(_segment_codes().items())
    ]
    seg = hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=seg_series_uid,
        series_number=_SEG_SERIES_NUMBER,
        sop_instance_uid=seg_sop_uid,
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=_SOFTWARE,
        device_serial_number=_SERIAL,
        omit_empty_frames=bool(labels.any()),
        series_description=algorithm.series_description,
    )
    _pin_clock_and_uids(seg, seg_series_uid, date)
    with atomic_path(Path(path)) as tmp:
        seg.save_as(tmp, enforce_file_format=True)


# In Explicit VR Little Endian: (0008,1155) ReferencedSOPInstanceUID UI, then
# (0062,000B) ReferencedSegmentNumber US of length 2. Neither byte run can occur inside
# the text values of the per-frame functional groups.
_REFERENCE_RUNS = re.compile(rb"\x08\x00\x55\x11UI(..)|\x62\x00\x0b\x00US\x02\x00(..)", re.DOTALL)
_PER_FRAME_TAG = 0x52009230


def _scan_frame_references(raw: bytes, n_frames: int) -> list[tuple[int, list[str]]] | None:
    """Frame references read straight from the raw per-frame sequence bytes.

    Within each per-frame item the Derivation Image Sequence (0008,9124) precedes the
    Segment Identification Sequence (0062,000A), so the referenced UIDs of a frame come
    before its segment number. ``None`` when the bytes do not show that shape (the caller
    then walks the parsed sequence).
    """
    out: list[tuple[int, list[str]]] = []
    refs: list[str] = []
    for match in _REFERENCE_RUNS.finditer(raw):
        if match.group(1) is not None:
            length = int.from_bytes(match.group(1), "little")
            value = raw[match.end() : match.end() + length]
            refs.append(value.rstrip(b"\x00 ").decode("ascii"))
        else:
            out.append((int.from_bytes(match.group(2), "little"), refs))
            refs = []
    if refs or len(out) != n_frames:
        return None
    return out


def _frame_references(ds: pydicom.Dataset, n_frames: int) -> list[tuple[int, list[str]]]:
    """(segment number, referenced SOPInstanceUIDs) of every frame, in frame order."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax == ExplicitVRLittleEndian and _PER_FRAME_TAG in ds:
        raw = ds.get_item(_PER_FRAME_TAG)
        if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
            scanned = _scan_frame_references(raw.value, n_frames)
            if scanned is not None:
                return scanned
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != n_frames:
        msg = f"{len(per_frame)} per-frame functional groups for {n_frames} frames"
        raise ValueError(msg)
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else None
    out = []
    for item in per_frame:
        ident = item.get("SegmentIdentificationSequence")
        if ident is None and shared_item is not None:
            ident = shared_item.get("SegmentIdentificationSequence")
        segment = int(ident[0].ReferencedSegmentNumber)
        refs = [
            str(source.ReferencedSOPInstanceUID)
            for derivation in item.get("DerivationImageSequence", [])
            for source in derivation.get("SourceImageSequence", [])
        ]
        out.append((segment, refs))
    return out


def _frames(ds: pydicom.Dataset, n_frames: int, rows: int, cols: int) -> np.ndarray:
    """Boolean (frames, rows, cols) masks of a BINARY or FRACTIONAL SEG."""
    binary = str(ds.get("SegmentationType", "BINARY")) == "BINARY"
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        data = np.frombuffer(ds.PixelData, dtype=np.uint8)
        if binary:
            need = n_frames * rows * cols
            if data.size * 8 < need:
                msg = f"PixelData holds {data.size * 8} bits, {need} needed"
                raise ValueError(msg)
            bits = np.unpackbits(data, count=need, bitorder="little")
            return bits.reshape(n_frames, rows, cols).astype(bool)
        values = data[: n_frames * rows * cols].reshape(n_frames, rows, cols)
    else:
        values = np.asarray(pixel_array(ds)).reshape(n_frames, rows, cols)
        if binary:
            return values.astype(bool)
    maximum = float(ds.get("MaximumFractionalValue", 255) or 255)
    return np.asarray(values.astype(np.float32) / maximum >= 0.5)


def read_seg_labels(path: Path, sop_instance_uids: Sequence[str]) -> np.ndarray:
    """Read a SEG back as a label volume aligned with ``sop_instance_uids``.

    Slice ``i`` of the result holds the segments of the frames that reference
    ``sop_instance_uids[i]`` (segment number = label value; where segments overlap the
    higher number wins); zeros where no frame does. Segments absent from the file read as
    zeros. Frames are matched to images through the per-frame functional groups'
    ReferencedSOPInstanceUID and ReferencedSegmentNumber, and BINARY pixel data is unpacked
    with numpy (FRACTIONAL: a pixel is set at half the MaximumFractionalValue or above).

    Raises
    ------
    InputError
        When ``path`` is missing or not a readable DICOM Segmentation.
    """
    path = Path(path)
    uids = [str(u) for u in sop_instance_uids]
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        msg = f"{path}: not a readable DICOM SEG ({exc.__class__.__name__})"
        raise InputError(msg) from exc
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        msg = f"{path}: not a DICOM SEG (SOPClassUID is not Segmentation Storage)"
        raise InputError(msg)
    try:
        if "SegmentSequence" not in ds:
            msg = "no SegmentSequence"
            raise ValueError(msg)
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        references = _frame_references(ds, n_frames)
        out = np.zeros((len(uids), rows, cols), dtype=np.uint8)
        position = {uid: i for i, uid in enumerate(uids)}
        wanted = [
            (segment, frame, position[ref])
            for frame, (segment, refs) in enumerate(references)
            for ref in refs
            if ref in position
        ]
        if not wanted:
            return out
        masks = _frames(ds, n_frames, rows, cols)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        msg = f"{path}: not a readable DICOM SEG ({exc.__class__.__name__})"
        raise InputError(msg) from exc
    for segment, frame, slot in sorted(wanted):
        out[slot][masks[frame]] = segment
    return out
