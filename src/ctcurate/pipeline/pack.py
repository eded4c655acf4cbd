"""pack: cases → a content-addressed, byte-reproducible HDF5 release.

Which cases are packed: every row of ``cases.parquet`` with a resolved typicality label
(``typical`` not null), whatever its ``cohort`` — pre-pandemic cases with a consensus
grade are the negatives a typicality model needs. ``cohort`` and the annotate-join
``exclusion`` travel in each case's metadata, so a consumer can filter on them. A case
without a label (``unlabeled``), without a usable SEG mask (``no_seg``, ``seg_unreadable``,
``seg_mismatch`` when it does not reference every instance of the series, ``empty_mask``)
or whose series cannot be assembled (see :data:`ctcurate.imaging.volume.REASONS`) is excluded and
listed with its reason (:data:`EXCLUSION_REASONS`) in the manifest and ``report.json``;
``cases_seen == cases_packed + cases_excluded``.

Layers: :func:`ctcurate.release.splits.assign_splits` (stable splits), :func:`plan_shards` and
:func:`case_meta` are pure;
:func:`ctcurate.imaging.volume.series_to_volume` builds each volume; :func:`run` reads the
inputs, writes the shards through :mod:`ctcurate.release` and publishes the whole release
folder atomically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctcurate import __version__, executor
from ctcurate.dicom import archive_file
from ctcurate.errors import AccountingError, InputError
from ctcurate.imaging.volume import REASONS, ExcludedSeries, VolumeGeometry, series_to_volume
from ctcurate.io.atomic import sha256_file, write_json
from ctcurate.io.outputs import guarded_output, marked_dir
from ctcurate.io.shards import read_shards
from ctcurate.io.tables import read_parquet
from ctcurate.log import get_logger
from ctcurate.params import PackParams
from ctcurate.provenance import provenance
from ctcurate.release.format import (
    MANIFEST,
    SHARD_DIR,
    CaseRecord,
    MetaValue,
    build_manifest,
    write_shard,
)
from ctcurate.release.splits import SPLITS, assign_splits

REPORT = "report.json"
#: The stage name (its output folder's marker) and what it writes into that folder.
STAGE = "pack"
OWN_FILES = (SHARD_DIR, MANIFEST, REPORT, "card.md", "card.html", "card")
#: Why a case is not packed: its own reasons, then those of the series assembly.
EXCLUSION_REASONS = (
    "unlabeled",
    "no_seg",
    "no_instances",
    "unreadable",
    "seg_unreadable",
    "seg_mismatch",
    "empty_mask",
    *REASONS,
)
SEG_DIR = "seg"
#: A release names the scanner's vendor from this list (the first whose pattern is in the
#: lower-cased Manufacturer), never the header text itself: free text stays in the archive.
VENDORS = (
    ("Siemens", ("siemens",)),
    ("GE", ("ge medical", "ge healthcare", "general electric")),
    ("Philips", ("philips",)),
    ("Toshiba", ("toshiba",)),
    ("Canon", ("canon",)),
    ("Hitachi", ("hitachi",)),
    ("Fujifilm", ("fujifilm",)),
    ("United Imaging", ("united imaging", "uih")),
    ("Neusoft", ("neusoft",)),
)
OTHER_VENDOR = "other"
#: Environment variable holding the key of the patient pseudonyms (``pack.patient_pseudonyms``).
PSEUDONYM_KEY_ENV = "CTCURATE_PSEUDONYM_KEY"
#: Shortest key accepted (characters): a guessable key would make the pseudonyms reversible.
PSEUDONYM_KEY_MIN = 32
SCRATCH_DIR = ".scratch"

CASE_COLUMNS = [
    "case_id",
    "series_instance_uid",
    "patient_id",
    "site",
    "study_date",
    "era",
    "cohort",
    "exclusion",
    "pcr",
    "consensus_grade",
    "typical",
]
INSTANCE_COLUMNS = [
    "path",
    "site",
    "series_instance_uid",
    "sop_instance_uid",
    "manufacturer",
    "slice_thickness",
]

log = get_logger("pack")


# --------------------------------------------------------------------------- pure core


def plan_shards(case_ids: Sequence[str], max_cases: int) -> list[tuple[str, list[str]]]:
    """Shard names and their cases: sorted case ids, ``max_cases`` per shard."""
    ordered = sorted(case_ids)
    return [
        (f"shard-{n:05d}.h5", ordered[start : start + max_cases])
        for n, start in enumerate(range(0, len(ordered), max_cases))
    ]


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def case_meta(
    case: Mapping[str, Any],
    split: str,
    geometry: VolumeGeometry,
    manufacturer: str | None,
    slice_thickness_mm: float | None,
    pseudonym_key: bytes | None = None,
) -> dict[str, MetaValue]:
    """The attributes a release stores for one case (docs/release.md); no patient id, and
    with ``pseudonym_key`` its keyed :func:`patient_pseudonym`."""
    study_date = case.get("study_date")
    grade = case.get("consensus_grade")
    typical = case.get("typical")
    meta: dict[str, MetaValue] = {
        "case_id": str(case["case_id"]),
        "split": split,
        "site": str(case["site"]),
        "era": _optional_str(case.get("era")),
        "cohort": _optional_str(case.get("cohort")),
        "exclusion": _optional_str(case.get("exclusion")),
        "pcr": _optional_str(case.get("pcr")),
        "consensus_grade": 0 if grade is None else int(grade),
        "typical": -1 if typical is None else int(typical),
        "spacing_mm": [float(v) for v in geometry.spacing_mm],
        "origin_mm": [float(v) for v in geometry.origin_mm],
        "manufacturer": manufacturer,
        "slice_thickness_mm": (
            None if slice_thickness_mm is None else round(float(slice_thickness_mm), 4)
        ),
        "study_year": study_date.year if isinstance(study_date, dt.date) else None,
        "series_instance_uid": str(case["series_instance_uid"]),
    }
    if pseudonym_key is not None:
        meta["patient_pseudonym"] = patient_pseudonym(
            pseudonym_key, str(case["site"]), str(case["patient_id"])
        )
    return meta


def rule_hashes(paths: Sequence[Path]) -> dict[str, str]:
    """``{name: sha256}`` of each rule file: a file by its name, a folder's files by
    ``<folder name>/<relative path>`` (hidden files skipped); recorded in the manifest so
    that ``ctcurate diff`` can name the rule files that changed between two releases."""
    hashes: dict[str, str] = {}
    for path in map(Path, paths):
        if path.is_file():
            hashes[path.name] = sha256_file(path)
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if child.is_file() and not any(part.startswith(".") for part in rel.parts):
                    hashes[f"{path.name}/{rel.as_posix()}"] = sha256_file(child)
        else:
            msg = f"{path}: rule file or folder not found"
            raise InputError(msg)
    return dict(sorted(hashes.items()))


def pseudonym_key() -> bytes:
    """The pseudonym key from :data:`PSEUDONYM_KEY_ENV`; fails closed when it is missing or
    short (never a release with raw or unkeyed patient ids)."""
    key = os.environ.get(PSEUDONYM_KEY_ENV, "")
    if len(key) < PSEUDONYM_KEY_MIN:
        state = "not set" if not key else f"shorter than {PSEUDONYM_KEY_MIN} characters"
        msg = (
            f"pack.patient_pseudonyms is on but {PSEUDONYM_KEY_ENV} is {state}: set it to a "
            "secret kept outside git, DVC and the release (e.g. `openssl rand -hex 32`)"
        )
        raise InputError(msg)
    return key.encode()


def patient_pseudonym(key: bytes, site: str, patient_id: str) -> str:
    """HMAC-SHA256 of (site, patient id) under ``key``, 32 hex digits: the same patient of
    the same site gets the same pseudonym in every release built with the key."""
    message = f"{site}\x1f{patient_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def pseudonym_key_id(key: bytes) -> str:
    """A fingerprint of the key (not the key): releases with equal ids share pseudonyms."""
    return hmac.new(key, b"ctcurate pseudonym key id", hashlib.sha256).hexdigest()[:16]


def vendor(manufacturer: str) -> str:
    """The :data:`VENDORS` name of a Manufacturer value, ``"other"`` when none matches."""
    text = manufacturer.lower()
    for name, patterns in VENDORS:
        if any(p in text for p in patterns):
            return name
    return OTHER_VENDOR


def _series_header_summary(rows: Sequence[Mapping[str, Any]]) -> tuple[str | None, float | None]:
    """(most common vendor, median slice thickness) of a series' index rows."""
    vendors = Counter(vendor(str(r["manufacturer"])) for r in rows if r.get("manufacturer"))
    manufacturer = min(vendors, key=lambda v: (-vendors[v], v)) if vendors else None
    thickness = [float(r["slice_thickness"]) for r in rows if r.get("slice_thickness") is not None]
    finite = [t for t in thickness if math.isfinite(t)]
    return manufacturer, float(np.median(finite)) if finite else None


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class _Packed:
    case: Mapping[str, Any]
    geometry: VolumeGeometry
    manufacturer: str | None
    slice_thickness_mm: float | None


def _read_cases(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = read_parquet(path, columns=CASE_COLUMNS).to_pylist()
    counts = Counter(str(r["case_id"]) for r in rows)
    if dupes := sorted(c for c, n in counts.items() if n > 1):
        msg = f"{path}: case_id {dupes[0]} appears {counts[dupes[0]]} times"
        raise InputError(msg)
    return sorted(rows, key=lambda r: str(r["case_id"]))


def _read_instances(path: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = read_shards(path, columns=INSTANCE_COLUMNS).to_pylist()
    by_series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: str(r["path"])):
        by_series.setdefault((str(row["site"]), str(row["series_instance_uid"])), []).append(row)
    return by_series


def _load_series(
    archive: Path, seg_path: Path, rows: Sequence[Mapping[str, Any]]
) -> tuple[list[Any], npt.NDArray[np.uint8]]:
    """Read a series' instances and its SEG label slices (aligned with the instances)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ctcurate.dicom.seg import SegError, read_seg_labels

    datasets = []
    for row in rows:
        try:
            datasets.append(archive_file.dcmread(archive / str(row["path"])))  # never a FIFO
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as exc:
            raise ExcludedSeries(
                reason="unreadable", detail=f"an instance could not be read ({exc})"
            ) from exc
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in datasets]
    try:
        header = pydicom.dcmread(seg_path, stop_before_pixels=True)
        positions = [ds.get("ImagePositionPatient") for ds in datasets]
        labels = read_seg_labels(
            seg_path, uids, positions=positions if None not in positions else None
        )
    except SegError as exc:
        raise ExcludedSeries(reason=exc.reason, detail=str(exc)) from exc
    except (InputError, InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise ExcludedSeries(reason="seg_unreadable", detail=str(exc)) from exc
    referenced = {
        str(item.get("ReferencedSOPInstanceUID", ""))
        for series in header.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedInstanceSequence", [])
    }
    if missing := len(set(uids) - referenced):
        detail = f"SEG does not reference {missing} of the series' {len(set(uids))} instances"
        raise ExcludedSeries(reason="seg_mismatch", detail=detail)
    if not labels.any():
        raise ExcludedSeries(reason="empty_mask", detail="SEG holds no labelled voxel")
    return datasets, labels


@dataclass(frozen=True)
class _CaseTask:
    """One case for :func:`_pack_one` (picklable: it may run in another process)."""

    case: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]
    archive: Path
    seg_path: Path
    scratch: Path
    params: PackParams


def _pack_one(task: _CaseTask) -> _Packed | dict[str, str]:
    """Build one case's volume into the scratch folder; the case or its exclusion."""
    case = task.case
    case_id = str(case["case_id"])
    try:
        if case.get("typical") is None:
            raise ExcludedSeries(reason="unlabeled", detail="no resolved typicality label")
        if not task.seg_path.is_file():
            raise ExcludedSeries(reason="no_seg", detail="no SEG mask for the series")
        if not task.rows:
            raise ExcludedSeries(reason="no_instances", detail="series has no indexed instances")
        datasets, labels = _load_series(task.archive, task.seg_path, task.rows)
        image, label, geometry = series_to_volume(datasets, labels, task.params)
    except ExcludedSeries as exc:
        return {"case_id": case_id, "reason": exc.reason}
    np.save(task.scratch / f"{case_id}.image.npy", image)
    np.save(task.scratch / f"{case_id}.label.npy", label)
    manufacturer, thickness = _series_header_summary(task.rows)
    return _Packed(case, geometry, manufacturer, thickness)


def _died_case(task: _CaseTask) -> dict[str, str]:
    """The exclusion of a case whose worker process died (OOM kill, crash): ``worker_died``."""
    return {"case_id": str(task.case["case_id"]), "reason": "worker_died"}


def _pack_cases(
    cases: Sequence[Mapping[str, Any]],
    instances: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    archive: Path,
    seg_dir: Path,
    scratch: Path,
    params: PackParams,
    scheduler: str | None = None,
) -> tuple[list[_Packed], list[dict[str, str]]]:
    """Build every case's volume into ``scratch`` on the executor ``index`` and ``select``
    use (:mod:`ctcurate.executor`); (packed cases, excluded cases), in case order."""
    tasks = [
        _CaseTask(
            case,
            instances.get((str(case["site"]), str(case["series_instance_uid"])), []),
            archive,
            seg_dir / f"{case['series_instance_uid']}.dcm",
            scratch,
            params,
        )
        for case in cases
    ]
    results = executor.map_ordered(
        _pack_one,
        tasks,
        workers=params.workers,
        scheduler=scheduler,
        progress_to=(log, "pack", "cases"),
        on_died=_died_case,
    )
    packed = [r for r in results if isinstance(r, _Packed)]
    excluded = [r for r in results if not isinstance(r, _Packed)]
    return packed, excluded


def _records(
    scratch: Path, metas: Mapping[str, dict[str, MetaValue]], case_ids: Sequence[str]
) -> Iterator[CaseRecord]:
    for cid in case_ids:
        yield CaseRecord(
            case_id=cid,
            image=np.load(scratch / f"{cid}.image.npy"),
            label=np.load(scratch / f"{cid}.label.npy"),
            meta=metas[cid],
        )


def _counts(
    metas: Mapping[str, Mapping[str, MetaValue]], excluded: Sequence[Mapping[str, str]], seen: int
) -> dict[str, Any]:
    def tally(key: str) -> dict[str, int]:
        return dict(sorted(Counter(str(m[key]) for m in metas.values()).items()))

    reasons = Counter(e["reason"] for e in excluded)
    return {
        "cases_seen": seen,
        "cases_packed": len(metas),
        "cases_excluded": len(excluded),
        "excluded_reasons": dict(sorted(reasons.items())),
        "splits": {s: sum(1 for m in metas.values() if m["split"] == s) for s in SPLITS},
        "typical": tally("typical"),
        "site": tally("site"),
    }


def run(
    cases: Path,
    index_dir: Path,
    archive: Path,
    annotations_dir: Path,
    out: Path,
    params: PackParams,
    scheduler: str | None = None,
    rules: Sequence[Path] = (),
) -> None:
    """Build the release folder ``out`` from the cases, the archive and the SEG masks.

    ``rules`` (files or folders, e.g. ``stages/select``) are hashed into the manifest's
    ``rules`` (:func:`rule_hashes`), with the pack params in its ``params``.

    The volumes are built on the local pool of ``params.workers`` or, with ``scheduler``,
    on that Dask cluster (its workers must reach the archive and ``out``'s parent folder at
    the same paths); the release is the same bytes either way.

    Writes ``out/shards/shard-*.h5``, ``out/manifest.json``, ``out/report.json``,
    ``out/card.md``, ``out/card/montage.png``, ``out/card.html`` and ``out/card/gallery/``;
    the folder is published atomically (a
    crash leaves the previous release or none). A lock file beside ``out`` keeps a second
    build of the same folder from running at the same time: it fails fast instead.

    Raises
    ------
    InputError
        When a table is missing or malformed, or no case could be packed.
    AccountingError
        When seen cases do not balance packed + excluded.
    LockedError
        When another build of ``out`` is running (see :func:`ctcurate.io.outputs.output_lock`).
    """
    inputs = [Path(cases), Path(index_dir), Path(archive), Path(annotations_dir), *map(Path, rules)]
    with guarded_output(Path(out), STAGE, inputs=inputs, own=OWN_FILES):
        _build(cases, index_dir, archive, annotations_dir, out, params, scheduler, rules)


def _build(
    cases: Path,
    index_dir: Path,
    archive: Path,
    annotations_dir: Path,
    out: Path,
    params: PackParams,
    scheduler: str | None,
    rules: Sequence[Path],
) -> None:
    from ctcurate.release import card

    key = pseudonym_key() if params.patient_pseudonyms else None  # before any work
    rule_files = rule_hashes(rules) if rules else None
    case_rows = _read_cases(Path(cases))
    instances = _read_instances(Path(index_dir) / "instances")
    seg_dir = Path(annotations_dir) / SEG_DIR
    with marked_dir(Path(out), STAGE) as release:
        # Volumes wait in a scratch folder inside the unpublished release until splits
        # are known; it is removed before the folder is published.
        scratch = release / SCRATCH_DIR
        scratch.mkdir()
        packed, excluded = _pack_cases(
            case_rows, instances, Path(archive), seg_dir, scratch, params, scheduler
        )
        if not packed:
            reasons = Counter(e["reason"] for e in excluded)
            detail = ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()))
            msg = f"{cases}: no case could be packed ({detail or 'no cases'})"
            raise InputError(msg)
        splits = assign_splits([p.case for p in packed], params.split_fractions, params.split_salt)
        metas = {
            str(p.case["case_id"]): case_meta(
                p.case,
                splits[str(p.case["case_id"])],
                p.geometry,
                p.manufacturer,
                p.slice_thickness_mm,
                key,
            )
            for p in packed
        }
        counts = _counts(metas, excluded, len(case_rows))
        for name, n in counts["splits"].items():
            if n == 0 and params.split_fractions[SPLITS.index(name)] > 0:
                log.warning("split %s is empty (%d packed cases)", name, len(metas))
        if counts["cases_seen"] != counts["cases_packed"] + counts["cases_excluded"]:
            msg = (
                f"{cases}: {counts['cases_seen']} cases seen but {counts['cases_packed']} "
                f"packed + {counts['cases_excluded']} excluded"
            )
            raise AccountingError(msg)

        entries: list[dict[str, Any]] = []
        for name, ids in plan_shards(sorted(metas), params.shard_max_cases):
            entries.extend(write_shard(release / SHARD_DIR / name, _records(scratch, metas, ids)))
        # Report and card first: the manifest hashes them (they do not name the release
        # id, which covers them).
        write_json(release / REPORT, counts)
        card.write_card(
            release,
            [metas[cid] for cid in sorted(metas)],
            excluded,
            lambda cid: (
                np.load(scratch / f"{cid}.image.npy"),
                np.load(scratch / f"{cid}.label.npy"),
            ),
            gallery_max_cases=params.card_gallery_max_cases,
        )
        shutil.rmtree(scratch)
        manifest = build_manifest(
            release,
            entries,
            params.model_dump(mode="json", exclude=set(params.EXECUTION)),  # not content
            __version__,
            extra={
                "counts": counts,
                "provenance": provenance("ctcurate.pipeline.pack"),
                "excluded": sorted(excluded, key=lambda e: e["case_id"]),
                **({} if key is None else {"pseudonym_key_id": pseudonym_key_id(key)}),
                **({} if rule_files is None else {"rules": rule_files}),
            },
            split_names=SPLITS,
        )
        write_json(release / MANIFEST, manifest)
    log.info(
        "packed %d of %d cases (%d excluded) into %d shards, release %s",
        counts["cases_packed"],
        counts["cases_seen"],
        counts["cases_excluded"],
        len(manifest["shards"]),
        str(manifest["release_id"])[:16],
    )
