"""The ``instances`` row of a checked header: values parsed, unparsable ones null + a flag."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from ctcurate.dicom import phi
from ctcurate.dicom.checks import (
    Header,
    _flag,
    _int,
    _text,
    _value,
    core_value,
    sop_class,
    valid_uid,
)

_MIN_AXIS_NORM = 0.5  # ImageOrientationPatient row / column vectors shorter than this are bad


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
    modality = core_value(ds, "Modality")
    if modality is None:
        flags.append("no_modality")
    return {
        "path": path,
        "size": size,
        "mtime_ns": mtime_ns,
        "site": site,
        "sop_instance_uid": core_value(ds, "SOPInstanceUID"),
        "sop_class_uid": sop_class(ds),
        "series_instance_uid": core_value(ds, "SeriesInstanceUID"),
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
    when missing or invalid), ``floats2`` / ``floats3`` (a list of 2 or 3 numbers),
    ``orientation`` or ``codes`` (a code sequence's CodeMeanings, ``\\``-joined).
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
        value = core_value(ds, keyword)
    elif kind in {"floats2", "floats3"}:
        value = _floats(ds, keyword, int(kind[-1]), flags)
    elif kind == "orientation":
        value = _orientation(ds, flags)
    elif kind == "codes":
        value = _code_meanings(ds, keyword, flags)
    else:
        msg = f"unknown column kind {kind!r}"
        raise ValueError(msg)
    return value, flags


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
