"""Lesion masks as DICOM Segmentation (SEG) objects, written and read with highdicom.

One SEG per CT series. Segments: 1 normal lung, 2 ground-glass opacity, 3 consolidation.
Each frame references the CT instance it was derived from by SOPInstanceUID, so a reader
can align the mask with the images whatever order the CT files come in.

:func:`read_seg_labels` reads any BINARY, FRACTIONAL or LABELMAP SEG, whoever wrote it: it
maps segments to label values by coded property or label (:func:`segment_label_values`),
not by segment number. SEGs :func:`write_seg` wrote take a shortcut (about 50x faster, same
result) past highdicom's parsing of every per-frame item.

The written bytes depend only on the inputs: every UID is derived from the source series
UID and every date from the source study, never from the clock.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ctcurate import labels
from ctcurate.errors import InputError
from ctcurate.io.atomic import atomic_path
from ctcurate.io.paths import open_regular
from ctcurate.log import get_logger

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
"""SOP Class UID of the Segmentation Storage IOD."""
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
"""SOP Class UID of the Label Map Segmentation Storage IOD (LABELMAP SEGs)."""

LABELS: dict[int, str] = labels.NAMES
"""Segment number → label; the segment number is the label value in a label volume."""
LUNG_SEGMENTS: dict[int, str] = {1: "lung"}
"""The one segment of a lung mask (label value 1, coded like segment 1: SNOMED CT Lung)."""

_log = get_logger("seg")

_MANUFACTURER = "ctcurate"
_SOFTWARE = "ctcurate"
_SERIAL = "0"
_SEG_SERIES_NUMBER = 900
_DEFAULT_DATE = "20000101"
_CONTENT_TIME = "000000"


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
    return {lab.value: (Code(*lab.category), Code(*lab.property_type)) for lab in labels.VOCABULARY}


def _check_inputs(
    source: Sequence[pydicom.Dataset], labels: np.ndarray, largest: int = max(LABELS)
) -> None:
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
    if labels.size and int(labels.max()) > largest:
        msg = f"write_seg: label value {int(labels.max())} outside 0..{largest}"
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
    segments: Mapping[int, str] = LABELS,
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
    segments
        Segment number → segment label of the segments to write (default :data:`LABELS`;
        :data:`LUNG_SEGMENTS` for a lung mask); each keeps its number's coded property.

    Raises
    ------
    ValueError
        When ``labels`` does not match ``source`` in slice count or frame size, or holds
        a value that is no segment of ``segments`` (outside 0..3 by default).
    """
    import highdicom as hd

    labels = np.asarray(labels)
    _check_inputs(source, labels, max(segments))
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
            segment_label=segments[number],
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=algorithm_type,
            algorithm_identification=identification,
            tracking_uid=_uid("tracking", ct_series_uid, salt, str(number)),
            tracking_id=segments[number],
        )
        for number, (category, prop_type) in sorted(_segment_codes().items())
        if number in segments
    ]
    # highdicom's warnings quote header values (a patient name it finds odd): never log them
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")
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


# -- reading ------------------------------------------------------------------------------

#: A fractional pixel is in its segment from this fraction of MaximumFractionalValue up.
FRACTIONAL_THRESHOLD = 0.5
#: Largest distance (mm) between a CT slice's ImagePositionPatient and a SEG frame's for
#: the two to be matched, when the SEG's frames do not reference the CT instances.
POSITION_TOLERANCE_MM = 0.05


class SegError(InputError):
    """A SEG that cannot give the label volume of a series.

    ``reason`` is the exclusion code a caller records: ``seg_unreadable`` (not a readable
    DICOM Segmentation) or ``seg_mismatch`` (it references none of the series' slices).
    """

    def __init__(self, message: str, reason: str = "seg_unreadable") -> None:
        super().__init__(message)
        self.reason = reason


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[-_]", " ", text.lower()).split())


#: Segment labels (lower case, ``-``/``_`` read as spaces) → label value.
_LABEL_NAMES: dict[str, int] = {
    **dict.fromkeys(("normal lung", "healthy lung", "lung", "lungs", "left lung", "right lung"), 1),
    **dict.fromkeys(("ground glass opacity", "ground glass", "ggo"), 2),
    **dict.fromkeys(("consolidation", "lung consolidation"), 3),
}
#: Segmented property type (coding scheme, code value) → label value: the writer's codes,
#: and DICOM's "Ground glass opacity" (DCM 112120, CID 6102).
_PROPERTY_CODES: dict[tuple[str, str], int] = {
    **{
        (str(code.scheme_designator), str(code.value)): number
        for number, (_, code) in _segment_codes().items()
    },
    ("DCM", "112120"): 2,
}


def segment_label_values(segments: Sequence[pydicom.Dataset]) -> dict[int, int]:
    """Label value (1 normal lung, 2 ground-glass opacity, 3 consolidation) per segment.

    A segment is recognised by its SegmentedPropertyTypeCodeSequence (SNOMED CT 39607008
    Lung, DCM 112120 Ground glass opacity, SNOMED CT 95436008 Lung consolidation, and the
    writer's local GGO code) or, failing that, by its SegmentLabel (e.g. ``normal lung``,
    ``lung``, ``ground-glass opacity``, ``GGO``, ``consolidation``; case, ``-`` and ``_``
    ignored). Segments recognised by neither are left out (the caller ignores them).
    """
    out: dict[int, int] = {}
    for item in segments:
        value = None
        for code in item.get("SegmentedPropertyTypeCodeSequence", []):
            key = (str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", "")))
            value = _PROPERTY_CODES.get(key)
            if value is not None:
                break
        if value is None:
            value = _LABEL_NAMES.get(_normalise(str(item.get("SegmentLabel", ""))))
        if value is not None:
            out[int(item.SegmentNumber)] = value
    return out


def _frame_references(ds: pydicom.Dataset) -> list[list[str]]:
    """Referenced SOPInstanceUIDs of every frame (per-frame Derivation Image Sequence)."""
    return [
        [
            str(source.ReferencedSOPInstanceUID)
            for derivation in item.get("DerivationImageSequence", [])
            for source in derivation.get("SourceImageSequence", [])
            if "ReferencedSOPInstanceUID" in source
        ]
        for item in ds.get("PerFrameFunctionalGroupsSequence", [])
    ]


def _is_set(values: np.ndarray, ds: pydicom.Dataset) -> npt.NDArray[np.bool_]:
    """Boolean mask of stored values (not rescaled): FRACTIONAL at the threshold."""
    if str(ds.get("SegmentationType", "")) == "FRACTIONAL":
        maximum = float(ds.get("MaximumFractionalValue", 255) or 255)
        return np.asarray(values.astype(np.float32) >= FRACTIONAL_THRESHOLD * maximum)
    return np.asarray(values > 0)


def _positions_to_slices(
    affine: np.ndarray, n_slices: int, positions: Sequence[Sequence[float]]
) -> list[int | None]:
    """Volume slice whose origin is within POSITION_TOLERANCE_MM of each position."""
    inverse = np.linalg.inv(affine)
    out: list[int | None] = []
    for position in positions:
        point = np.asarray([*map(float, position), 1.0])
        index = int(np.rint((inverse @ point)[0]))
        origin = affine @ np.asarray([index, 0.0, 0.0, 1.0])
        close = np.linalg.norm(origin[:3] - point[:3]) <= POSITION_TOLERANCE_MM
        out.append(index if 0 <= index < n_slices and close else None)
    return out


def _read_by_reference(
    seg: Any, ds: pydicom.Dataset, uids: list[str], values: dict[int, list[int]]
) -> np.ndarray:
    """(len(uids), rows, cols) label slices of the frames referencing ``uids``."""
    out = np.zeros((len(uids), int(ds.Rows), int(ds.Columns)), dtype=np.uint8)
    for value, numbers in sorted(values.items()):
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=numbers,
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
            rescale_fractional=False,
            skip_overlap_checks=True,
        )
        out[_is_set(pixels, ds).any(axis=-1)] = value
    return out


def _read_by_position(
    seg: Any,
    ds: pydicom.Dataset,
    positions: Sequence[Sequence[float]],
    values: dict[int, list[int]],
) -> tuple[np.ndarray, int]:
    """Label slices of the frames at ``positions``, and how many positions matched a frame."""
    out = np.zeros((len(positions), int(ds.Rows), int(ds.Columns)), dtype=np.uint8)
    matched: set[int] = set()
    for value, numbers in sorted(values.items()):
        volume = seg.get_volume(segment_numbers=numbers, rescale_fractional=False)
        slices = _positions_to_slices(volume.affine, volume.spatial_shape[0], positions)
        masks = np.asarray(_is_set(np.asarray(volume.array), ds).any(axis=-1))
        for i, index in enumerate(slices):
            if index is not None:
                matched.add(i)
                out[i][masks[index]] = value
    return out, len(matched)


# -- the shortcut for this project's own SEGs ----------------------------------------------
# highdicom parses every per-frame functional group item: about 50x the time of this
# shortcut on a demo SEG. write_seg's own output has one fixed layout (BINARY, Explicit VR
# Little Endian, one segment and one source image per frame), so its frame references are
# read from the raw bytes: (0008,1155) ReferencedSOPInstanceUID UI, then (0062,000B)
# ReferencedSegmentNumber US of length 2 (neither byte run can occur inside the text values
# of those items). tests/test_seg.py checks it against the highdicom reading.
_REFERENCE_RUNS = re.compile(rb"\x08\x00\x55\x11UI(..)|\x62\x00\x0b\x00US\x02\x00(..)", re.DOTALL)
_PER_FRAME_TAG = 0x52009230


def _scan_frame_references(raw: bytes, n_frames: int) -> list[tuple[int, str]] | None:
    """(segment number, referenced SOPInstanceUID) of every frame, from the raw bytes.

    ``None`` unless every frame shows exactly one reference before its segment number.
    """
    out: list[tuple[int, str]] = []
    refs: list[str] = []
    for match in _REFERENCE_RUNS.finditer(raw):
        if match.group(1) is not None:
            length = int.from_bytes(match.group(1), "little")
            value = raw[match.end() : match.end() + length]
            refs.append(value.rstrip(b"\x00 ").decode("ascii"))
        elif len(refs) != 1:
            return None
        else:
            out.append((int.from_bytes(match.group(2), "little"), refs[0]))
            refs = []
    if refs or len(out) != n_frames:
        return None
    return out


def _read_own(ds: pydicom.Dataset, uids: list[str], values: dict[int, int]) -> np.ndarray | None:
    """Label slices of a SEG written by :func:`write_seg`; ``None`` for any other SEG."""
    own = (
        str(ds.get("Manufacturer", "")) == _MANUFACTURER  # the truth's or predict's SEGs
        and str(ds.get("SegmentationType", "")) == "BINARY"
        and ds.file_meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian
        and _PER_FRAME_TAG in ds
    )
    if not own:
        return None
    raw = ds.get_item(_PER_FRAME_TAG)
    if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    references = _scan_frame_references(raw.value, n_frames)
    if references is None:
        return None
    position = {uid: i for i, uid in enumerate(uids)}
    wanted = sorted(
        (values[segment], frame, position[ref])
        for frame, (segment, ref) in enumerate(references)
        if ref in position and segment in values
    )
    if not any(ref in position for _, ref in references):
        return None
    out = np.zeros((len(uids), rows, cols), dtype=np.uint8)
    need = n_frames * rows * cols
    data = np.frombuffer(ds.PixelData, dtype=np.uint8)
    if data.size * 8 < need:
        msg = f"PixelData holds {data.size * 8} bits, {need} needed"
        raise ValueError(msg)
    masks = np.unpackbits(data, count=need, bitorder="little").reshape(n_frames, rows, cols)
    for value, frame, slot in wanted:
        out[slot][masks[frame] > 0] = value
    return out


# -- the reader ----------------------------------------------------------------------------


def _read_with_highdicom(
    ds: pydicom.Dataset,
    uids: list[str],
    positions: Sequence[Sequence[float]] | None,
    by_number: dict[int, int],
) -> np.ndarray:
    """Label slices through highdicom: any segmentation type, layout or transfer syntax."""
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    values: dict[int, list[int]] = {}
    for number in seg.segment_numbers:
        if number in by_number:
            values.setdefault(by_number[number], []).append(int(number))
    out = np.zeros((len(uids), int(ds.Rows), int(ds.Columns)), dtype=np.uint8)
    by_frames = {uid for refs in _frame_references(ds) for uid in refs}
    if not by_frames and positions is not None:
        if not values:  # nothing recognised to place: an empty mask, whatever the match
            return out
        got, matched = _read_by_position(seg, ds, positions, values)
        if matched:
            return got
    wanted = list(dict.fromkeys(uid for uid in uids if uid in by_frames))
    if not wanted:
        msg = f"no frame matches any of the series' {len(set(uids))} instances"
        raise SegError(msg, reason="seg_mismatch")
    if values:
        got = _read_by_reference(seg, ds, wanted, values)
        slot = {uid: i for i, uid in enumerate(wanted)}
        for i, uid in enumerate(uids):
            if uid in slot:
                out[i] = got[slot[uid]]
    return out


def read_seg_labels(
    path: Path,
    sop_instance_uids: Sequence[str],
    positions: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Read a SEG back as a label volume aligned with ``sop_instance_uids``.

    Slice ``i`` of the result holds the label values (1 normal lung, 2 ground-glass
    opacity, 3 consolidation; see :func:`segment_label_values`) of the frames that
    reference ``sop_instance_uids[i]``; where segments overlap the higher label value
    wins; zeros where no frame does. BINARY, FRACTIONAL (a pixel is set from
    :data:`FRACTIONAL_THRESHOLD` of MaximumFractionalValue up) and LABELMAP SEGs are read
    through highdicom; segments it does not recognise are ignored (counted in the log).
    SEGs written by :func:`write_seg` take a faster path with the same result.

    When no frame references any instance and ``positions`` (the ImagePositionPatient of
    each instance) is given, frames are matched by position instead, within
    :data:`POSITION_TOLERANCE_MM`, assuming the SEG shares the CT's pixel grid (a SEG
    derived from the series does).

    Raises
    ------
    SegError
        When ``path`` is missing or not a readable DICOM Segmentation (``reason``
        ``seg_unreadable``), or when the SEG references none of the instances
        (``seg_mismatch``).
    """
    path = Path(path)
    uids = [str(u) for u in sop_instance_uids]
    if positions is not None and len(positions) != len(uids):
        msg = f"read_seg_labels: {len(positions)} positions for {len(uids)} instances"
        raise ValueError(msg)
    try:  # a regular file only: never a FIFO, device or symbolic link in annotations/
        with open_regular(path) as fh:
            ds = pydicom.dcmread(fh)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        msg = f"{path}: not a readable DICOM SEG ({exc.__class__.__name__})"
        raise SegError(msg) from exc
    if str(ds.get("SOPClassUID", "")) not in (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE):
        msg = f"{path}: not a DICOM SEG (SOPClassUID is not Segmentation Storage)"
        raise SegError(msg)
    try:
        if "SegmentSequence" not in ds:
            msg = "no SegmentSequence"
            raise ValueError(msg)
        by_number = segment_label_values(ds.SegmentSequence)
        # segment 0 is a LABELMAP's background, not a segment to recognise
        total = sum(int(item.SegmentNumber) != 0 for item in ds.SegmentSequence)
        if unknown := total - len(by_number):
            _log.info("seg: %d of %d segments not recognised, ignored", unknown, total)
        own = _read_own(ds, uids, by_number)
        return own if own is not None else _read_with_highdicom(ds, uids, positions, by_number)
    except SegError as exc:
        msg = f"{path}: {exc}"
        raise SegError(msg, reason=exc.reason) from exc
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        msg = f"{path}: not a readable DICOM SEG ({exc.__class__.__name__})"
        raise SegError(msg) from exc


class SegWriteError(InputError):
    """highdicom refused to derive a SEG from a series' instances."""
