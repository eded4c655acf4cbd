"""Pure tables of ``index``: schemas, duplicate rules, series geometry, the report.

No paths and no clock here: functions take rows, outcomes or arrays and return tables.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctcurate.dicom.checks import Status
from ctcurate.dicom.header import FileOutcome
from ctcurate.errors import AccountingError

#: Slices closer than this along the normal share one position (mm).
DUPLICATE_TOL_MM = 0.01
#: A step larger than this multiple of the median step is a gap (missing slices).
GAP_FACTOR = 1.5
#: Steps differing by more than this make the spacing "varying" (mm).
SPACING_TOL_MM = 0.05
#: Stacking direction more than this off the slice normal is a gantry tilt (degrees).
TILT_TOL_DEG = 0.5
#: Normals further than this from every patient axis are "oblique" (degrees).
OBLIQUE_LIMIT_DEG = 30.0
#: Orientation components differing by more than this are another orientation.
ORIENTATION_TOL = 1e-3
_MM_DECIMALS, _DEG_DECIMALS = 6, 4

_STR, _F64, _I64 = pa.string(), pa.float64(), pa.int64()
INSTANCE_SCHEMA = pa.schema(
    [
        pa.field("path", _STR, nullable=False),
        ("size", _I64),
        ("mtime_ns", _I64),
        ("site", _STR),
        ("sop_instance_uid", _STR),
        ("sop_class_uid", _STR),
        ("series_instance_uid", _STR),
        ("study_instance_uid", _STR),
        ("patient_id", _STR),
        ("study_date", pa.date32()),
        ("modality", _STR),
        ("image_type", _STR),
        ("series_description", _STR),
        ("body_part_examined", _STR),
        ("study_description", _STR),
        ("protocol_name", _STR),
        ("requested_procedure_description", _STR),
        ("anatomic_region", _STR),
        ("convolution_kernel", _STR),
        ("manufacturer", _STR),
        ("slice_thickness", _F64),
        ("pixel_spacing_row", _F64),
        ("pixel_spacing_col", _F64),
        ("rows", _I64),
        ("columns", _I64),
        ("image_position_x", _F64),
        ("image_position_y", _F64),
        ("image_position_z", _F64),
        ("image_orientation", pa.list_(_F64)),
        ("instance_number", _I64),
        ("transfer_syntax_uid", _STR),
        ("rescale_slope", _F64),
        ("rescale_intercept", _F64),
        ("burned_in_annotation", _STR),
        ("patient_identity_removed", _STR),
        ("deidentification_method", _STR),
        ("deidentification_method_codes", pa.list_(_STR)),
        ("longitudinal_temporal_information_modified", _STR),
        ("phi_accepted", pa.list_(_STR)),
        ("flags", pa.list_(_STR)),
    ]
)
#: Series columns copied from the series' instances (first non-null value in path order).
SERIES_COPIED = (
    "study_instance_uid",
    "patient_id",
    "study_date",
    "modality",
    "sop_class_uid",
    "image_type",
    "series_description",
    "body_part_examined",
    "study_description",
    "protocol_name",
    "requested_procedure_description",
    "anatomic_region",
    "convolution_kernel",
    "manufacturer",
    "rows",
    "columns",
    "pixel_spacing_row",
    "pixel_spacing_col",
    "slice_thickness",
    "patient_identity_removed",
    "deidentification_method",
    "deidentification_method_codes",
    "longitudinal_temporal_information_modified",
)
SERIES_SCHEMA = pa.schema(
    [
        pa.field("series_instance_uid", _STR, nullable=False),
        ("site", _STR),
        *[INSTANCE_SCHEMA.field(name) for name in SERIES_COPIED],
        ("slice_count", _I64),
        ("orientation", _STR),
        ("gantry_tilt_deg", _F64),
        ("spacing_min_mm", _F64),
        ("spacing_max_mm", _F64),
        ("z_coverage_mm", _F64),
        ("n_gaps", _I64),
        ("n_duplicate_positions", _I64),
        ("flags", pa.list_(_STR)),
    ]
)
#: ``quarantine`` and ``skipped``: the file's listing row, why, and tag names (no values).
REASON_SCHEMA = pa.schema(
    [
        pa.field("path", _STR, nullable=False),
        ("size", _I64),
        ("mtime_ns", _I64),
        pa.field("reason", _STR, nullable=False),
        ("detail", _STR),
    ]
)
#: One row per read file before the duplicate rules: its listing row, the outcome of the
#: header read and, for an indexed file, the ``instances`` columns.
LEDGER_SCHEMA = pa.schema(
    [
        pa.field("path", _STR, nullable=False),
        ("size", _I64),
        ("mtime_ns", _I64),
        pa.field("status", _STR, nullable=False),
        ("reason", _STR),
        ("detail", _STR),
        *[f for f in INSTANCE_SCHEMA if f.name not in {"path", "size", "mtime_ns"}],
    ]
)
VIEWS = ("instances", "series", "quarantine", "skipped")
#: The PHI census view of the catalog (over the ``instances`` and ``quarantine`` views).
PHI_CENSUS_VIEW = "phi_census"
#: Site of a quarantine row: the first folder of its path (as the instances' ``site``).
_SITE_OF_PATH = "CASE WHEN contains(path, '/') THEN split_part(path, '/', 1) END"
#: One attribute name of a ``phi_present`` detail (names joined by commas; a tag without
#: keyword is written ``(gggg,eeee)``).
_DETAIL_NAME_RE = r"(?:\([0-9A-F]{4},[0-9A-F]{4}\)|[^,])+"
_PHI_CENSUS_SQL = (
    "SELECT site, element, rule, count(*)::BIGINT AS files FROM ("
    "SELECT site, regexp_replace(label, ':[a-z]+$', '') AS element, "
    "regexp_extract(label, ':([a-z]+)$', 1) AS rule "
    "FROM (SELECT site, unnest(phi_accepted) AS label FROM $instances) "
    "UNION ALL SELECT $site_of_path AS site, "
    f"unnest(regexp_extract_all(detail, '{_DETAIL_NAME_RE}')) AS element, 'phi' AS rule "
    "FROM $quarantine WHERE reason = 'phi_present'"
    ") GROUP BY site, element, rule ORDER BY site ASC NULLS LAST, element, rule"
)


def phi_census_sql(instances: str, quarantine: str, site_of_path: str = _SITE_OF_PATH) -> str:
    """SQL of the PHI census over the relations ``instances`` and ``quarantine``.

    Per site, identifying attribute and rule, the files whose attribute is not empty:
    indexed files under the rule that accepted it (``phi_accepted``), files quarantined
    ``phi_present`` under ``phi`` for each attribute their detail names. Tag names and
    counts only, never values. ``site_of_path``: the SQL giving a quarantined file's site
    from its ``path`` (:func:`ctcurate.catalog.site.site_sql` of the index's layout rule).
    """
    return (
        _PHI_CENSUS_SQL.replace("$instances", instances)
        .replace("$quarantine", quarantine)
        .replace("$site_of_path", site_of_path)
    )


#: Key of the files without a site in the report's census.
NO_SITE = "(no site)"
#: Instance flag set by the duplicate rules (not by the header read).
SHARED_FLAG = "uid_shared_across_sites"


# --- pure core ------------------------------------------------------------------------------


def duplicate_outcomes(
    groups: Iterable[Sequence[str]], digest: Callable[[str], str | None]
) -> list[tuple[str, Status, str, str]]:
    """``(path, status, reason, detail)`` of the files the duplicate rules take out.

    Each group lists the paths (sorted) of indexed files sharing one (site,
    SOPInstanceUID). ``digest(path)`` is a content hash (``None`` if the file cannot be
    read). Byte-identical copies: the first path stays indexed, the others are skipped
    ``duplicate_identical``; otherwise every copy is quarantined ``uid_conflict``.
    """
    out: list[tuple[str, Status, str, str]] = []
    for paths in groups:
        if len(paths) < 2:
            continue
        digests = [digest(p) for p in paths]
        if None not in digests and len(set(digests)) == 1:
            out += [
                (p, "skipped", "duplicate_identical", f"same bytes as {paths[0]}")
                for p in paths[1:]
            ]
        else:
            detail = f"SOPInstanceUID shared by {len(paths)} files of the site, bytes differ"
            out += [(p, "quarantined", "uid_conflict", detail) for p in paths]
    return sorted(out)


def resolve_duplicates(
    outcomes: Sequence[FileOutcome], digest: Callable[[str], str | None]
) -> list[FileOutcome]:
    """Apply the duplicate rules to in-memory outcomes (sorted by path).

    The same rules as the streaming build: :func:`duplicate_outcomes` per (site,
    SOPInstanceUID), then the flag :data:`SHARED_FLAG` on instances whose SOPInstanceUID
    is indexed under more than one site.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for o in outcomes:
        if o.record is not None:
            key = (o.record["site"] or "", o.record["sop_instance_uid"])
            groups.setdefault(key, []).append(o.path)
    taken = {t[0]: t for t in duplicate_outcomes(groups.values(), digest)}
    out = [
        FileOutcome(o.path, t[1], t[2], t[3], None, o.size, o.mtime_ns)
        if (t := taken.get(o.path))
        else o
        for o in outcomes
    ]
    sites: dict[str, set[str]] = {}
    for o in out:
        if o.record is not None:
            sites.setdefault(o.record["sop_instance_uid"], set()).add(o.record["site"] or "")
    for i, o in enumerate(out):
        if o.record is not None and len(sites[o.record["sop_instance_uid"]]) > 1:
            flags = sorted({*o.record["flags"], SHARED_FLAG})
            out[i] = FileOutcome(
                o.path, o.status, None, None, {**o.record, "flags": flags}, o.size, o.mtime_ns
            )
    return out


def instances_table(outcomes: Iterable[FileOutcome]) -> pa.Table:
    """The ``instances`` table of the indexed outcomes, sorted by path."""
    rows = sorted((o.record for o in outcomes if o.record is not None), key=lambda r: r["path"])
    return pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)


def reasons_table(outcomes: Iterable[FileOutcome], status: str) -> pa.Table:
    """``path, size, mtime_ns, reason, detail`` of the outcomes with ``status``, by path."""
    rows = sorted(
        (
            {
                "path": o.path,
                "size": o.size,
                "mtime_ns": o.mtime_ns,
                "reason": o.reason,
                "detail": o.detail,
            }
            for o in outcomes
            if o.status == status
        ),
        key=lambda r: str(r["path"]),
    )
    return pa.Table.from_pylist(rows, schema=REASON_SCHEMA)


def ledger_table(outcomes: Iterable[FileOutcome]) -> pa.Table:
    """The ledger rows (:data:`LEDGER_SCHEMA`) of outcomes, in the given order.

    Built column by column (one Python list per column, not one dict per row).
    """
    outcomes = list(outcomes)
    records = [o.record for o in outcomes]
    arrays = []
    for f in LEDGER_SCHEMA:
        name = f.name
        if name in _OUTCOME_FIELDS:
            values = [getattr(o, name) for o in outcomes]
        else:
            values = [None if r is None else r.get(name) for r in records]
        arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=LEDGER_SCHEMA)


_OUTCOME_FIELDS = frozenset({"path", "size", "mtime_ns", "status", "reason", "detail"})


@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of one series from its slice positions along the slice normal."""

    orientation: str = "unknown"
    gantry_tilt_deg: float | None = None
    spacing_min_mm: float | None = None
    spacing_max_mm: float | None = None
    z_coverage_mm: float | None = None
    n_gaps: int = 0
    n_duplicate_positions: int = 0
    flags: tuple[str, ...] = field(default=())


def orientation_label(normal: np.ndarray) -> str:
    """``axial``/``coronal``/``sagittal`` for a unit slice normal near a patient axis."""
    a = np.abs(normal)
    axis = int(np.argmax(a))
    angle = math.degrees(math.acos(min(1.0, float(a[axis]))))
    if angle > OBLIQUE_LIMIT_DEG:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def series_geometry(positions: np.ndarray, orientations: np.ndarray) -> SeriesGeometry:
    """Spacing, coverage, gaps, duplicates, orientation and tilt of one series.

    Parameters
    ----------
    positions
        ``(n, 3)`` ImagePositionPatient in mm; NaN where unknown.
    orientations
        ``(n, 6)`` ImageOrientationPatient; NaN where unknown.

    Positions are projected on the slice normal (row × column direction of the first slice
    with a known geometry) and sorted; steps within :data:`DUPLICATE_TOL_MM` are duplicate
    positions, steps over :data:`GAP_FACTOR` × the median step are gaps. The gantry tilt is
    the angle between the normal and the line from the first to the last slice position.
    """
    flags: list[str] = []
    ok = np.isfinite(positions).all(axis=1) & np.isfinite(orientations).all(axis=1)
    if not ok.all():
        flags.append("missing_geometry")
    if not ok.any():
        return SeriesGeometry(flags=tuple(flags))
    pos, ori = positions[ok], orientations[ok]
    ref = ori[0]
    if float(np.abs(ori - ref).max()) > ORIENTATION_TOL:
        flags.append("mixed_orientation")
    normal = np.cross(ref[:3] / np.linalg.norm(ref[:3]), ref[3:] / np.linalg.norm(ref[3:]))
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:  # row and column directions (nearly) parallel
        return SeriesGeometry(flags=(*flags, "bad_image_orientation_patient"))
    normal = normal / norm
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    duplicate = steps <= DUPLICATE_TOL_MM
    spacing = steps[~duplicate]
    n_dup = int(duplicate.sum())
    n_gaps, smin, smax, tilt = 0, None, None, None
    if spacing.size:
        median = float(np.median(spacing))
        n_gaps = int((spacing > GAP_FACTOR * median).sum())
        smin, smax = float(spacing.min()), float(spacing.max())
        stack = pos[order[-1]] - pos[order[0]]
        cos = abs(float(stack @ normal)) / float(np.linalg.norm(stack))
        tilt = round(math.degrees(math.acos(min(1.0, cos))), _DEG_DECIMALS)
        if n_gaps:
            flags.append("gaps")
        if smax - smin > SPACING_TOL_MM:
            flags.append("varying_spacing")
        if tilt > TILT_TOL_DEG:
            flags.append("gantry_tilt")
    if n_dup:
        flags.append("duplicate_positions")
    return SeriesGeometry(
        orientation=orientation_label(normal),
        gantry_tilt_deg=tilt,
        spacing_min_mm=None if smin is None else round(smin, _MM_DECIMALS),
        spacing_max_mm=None if smax is None else round(smax, _MM_DECIMALS),
        z_coverage_mm=round(float(along[order[-1]] - along[order[0]]), _MM_DECIMALS),
        n_gaps=n_gaps,
        n_duplicate_positions=n_dup,
        flags=tuple(flags),
    )


def _group_bounds(keys: list[tuple[str, str]]) -> Iterator[tuple[int, int]]:
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            yield start, i
            start = i


def series_table(instances: pa.Table) -> pa.Table:
    """One row per (site, series_instance_uid) of ``instances``, sorted by those."""
    n = instances.num_rows
    if n == 0:
        return SERIES_SCHEMA.empty_table()
    order = pc.sort_indices(
        instances,
        sort_keys=[(k, "ascending", "at_end") for k in ("site", "series_instance_uid", "path")],
    )
    table = instances.take(order)
    cols = {
        name: table[name].to_pylist()
        for name in ("site", "series_instance_uid", "study_instance_uid", "rows", "columns")
    }
    keys = [
        (site or "", uid)
        for site, uid in zip(cols["site"], cols["series_instance_uid"], strict=True)
    ]
    bounds = list(_group_bounds(keys))
    starts = np.array([b[0] for b in bounds], dtype=np.int64)
    stops = np.array([b[1] for b in bounds], dtype=np.int64)
    copied = {name: _first_valid(table[name], starts, stops) for name in SERIES_COPIED}
    member_flags = _group_flags(table["flags"], starts, stops)
    xyz = np.column_stack(
        [table[f"image_position_{a}"].to_numpy(zero_copy_only=False) for a in "xyz"]
    ).astype(np.float64)
    ori = _orientations(table["image_orientation"].combine_chunks())
    rows: list[dict[str, Any]] = []
    for g, (start, stop) in enumerate(bounds):
        row: dict[str, Any] = {
            "series_instance_uid": cols["series_instance_uid"][start],
            "site": cols["site"][start],
        }
        for name in SERIES_COPIED:
            row[name] = copied[name][g]
        geo = series_geometry(xyz[start:stop], ori[start:stop])
        flags = member_flags[g] | set(geo.flags)
        if len(set(cols["study_instance_uid"][start:stop])) > 1:
            flags.add("mixed_study")
        matrix = zip(cols["rows"][start:stop], cols["columns"][start:stop], strict=True)
        if len(set(matrix)) > 1:
            flags.add("mixed_matrix")
        row |= {
            "slice_count": stop - start,
            "orientation": geo.orientation,
            "gantry_tilt_deg": geo.gantry_tilt_deg,
            "spacing_min_mm": geo.spacing_min_mm,
            "spacing_max_mm": geo.spacing_max_mm,
            "z_coverage_mm": geo.z_coverage_mm,
            "n_gaps": geo.n_gaps,
            "n_duplicate_positions": geo.n_duplicate_positions,
            "flags": sorted(flags),
        }
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SERIES_SCHEMA)


def _first_valid(column: pa.ChunkedArray, starts: np.ndarray, stops: np.ndarray) -> list[Any]:
    """The first non-null value of each row range ``[start, stop)`` (None if all null)."""
    valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
    at = np.searchsorted(valid, starts)
    found = at < len(valid)
    first = np.where(found, valid[np.minimum(at, max(len(valid) - 1, 0))], 0) if len(valid) else 0
    found &= first < stops
    picked = column.take(pa.array(np.where(found, first, 0))).to_pylist()
    return [v if ok else None for v, ok in zip(picked, found.tolist(), strict=True)]


def _group_flags(column: pa.ChunkedArray, starts: np.ndarray, stops: np.ndarray) -> list[set[str]]:
    """The union of the flag lists of each row range ``[start, stop)``."""
    out: list[set[str]] = [set() for _ in range(len(starts))]
    flat = column.combine_chunks()
    values = pc.list_flatten(flat)
    if len(values) == 0:
        return out
    rows = pc.list_parent_indices(flat).to_numpy(zero_copy_only=False)
    groups = np.searchsorted(stops, rows, side="right")
    for g, flag in zip(groups.tolist(), values.to_pylist(), strict=True):
        out[g].add(flag)
    return out


def _orientations(column: pa.Array) -> np.ndarray:
    """``(n, 6)`` ImageOrientationPatient values; NaN rows where null."""
    ori = np.full((len(column), 6), np.nan)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if not valid.any():
        return ori
    values = column.flatten()
    if values.null_count == 0 and len(values) == 6 * int(valid.sum()):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if (lengths[valid] == 6).all():
            ori[valid] = values.to_numpy(zero_copy_only=False).reshape(-1, 6)
            return ori
    for i, value in enumerate(column.to_pylist()):  # odd lengths or null cosines
        if value is not None:
            ori[i] = value
    return ori


def build_report(
    files_seen: int,
    n_indexed: int,
    quarantine_reasons: Mapping[str, int],
    skip_reasons: Mapping[str, int],
    n_series: int,
    reader: str,
    phi_census: Iterable[tuple[str | None, str, str, int]] = (),
) -> dict[str, Any]:
    """``report.json`` of one run; raises AccountingError if the files do not balance.

    ``reader`` is the fingerprint of the header reader whose rows the index holds (a later
    run reuses rows only from an index with the same fingerprint). ``phi_census`` holds
    the rows of :func:`phi_census_sql` (site, element, rule, files), reported as
    ``{site: {element: {rule: files}}}``.
    """
    n_quarantined = sum(quarantine_reasons.values())
    n_skipped = sum(skip_reasons.values())
    report = {
        "files_seen": files_seen,
        "files_indexed": n_indexed,
        "files_quarantined": n_quarantined,
        "files_skipped": n_skipped,
        "quarantine_reasons": dict(sorted(Counter(quarantine_reasons).items())),
        "skip_reasons": dict(sorted(Counter(skip_reasons).items())),
        "series": n_series,
        "reader": reader,
        "phi_census": census_tree(phi_census),
    }
    accounted = n_indexed + n_quarantined + n_skipped
    if accounted != files_seen:
        msg = (
            f"index does not balance: {files_seen} files seen, {n_indexed} indexed + "
            f"{n_quarantined} quarantined + {n_skipped} skipped = {accounted}"
        )
        raise AccountingError(msg)
    return report


def census_tree(rows: Iterable[tuple[str | None, str, str, int]]) -> dict[str, Any]:
    """``{site: {element: {rule: files}}}`` of census rows, keys sorted."""
    tree: dict[str, dict[str, dict[str, int]]] = {}
    for site, element, rule, files in rows:
        rules = tree.setdefault(NO_SITE if site is None else site, {}).setdefault(element, {})
        rules[rule] = rules.get(rule, 0) + int(files)
    return {
        site: {el: dict(sorted(r.items())) for el, r in sorted(elements.items())}
        for site, elements in sorted(tree.items())
    }
