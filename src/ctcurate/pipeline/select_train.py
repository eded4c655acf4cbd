"""select-train: fit the pneumonia selector on a labelled audit list.

The audit list is a CSV file a radiologist fills in, one row per audited series::

    series_instance_uid,site,pneumonia
    1.2.826.0.1.3680043.8.498.1048...,H01,yes

(``pneumonia``: ``yes`` / ``no``; a series is named by its site and series uid, as in the
index). For the synthetic demo archive ``select-audit-list`` writes one from the ground
truth: a seeded, per-class sample of ``audit_fraction`` of the chest CT series.

``select-train`` reads the listed series' pixels from the archive (paths from the index),
measures their opacity features (:mod:`ctcurate.selection.pneumonia`) on a local process pool and
fits the logistic regression; the model file is canonical JSON whose sha256 is the
selector's version. With ``validation``, it also writes what the fit is expected to be worth
on series it has not seen (:mod:`ctcurate.selection.validation`: stratified
cross-validation over ``select.validation_folds`` folds and leave one site out), from the
same features, as canonical JSON; with ``review``, the audited series from the largest
held-out disagreement with their label down, as CSV. Audited series that are not indexed
or whose pixels cannot be read are left out of the fit and counted in the log; an audit
list that gives no usable row fails the stage. With one class only, the model is the
class prior (a warning says so).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctcurate.catalog.paths import series_paths
from ctcurate.errors import InputError
from ctcurate.io.outputs import check_output_file, publish_file
from ctcurate.io.tables import read_parquet
from ctcurate.log import get_logger
from ctcurate.params import SelectParams
from ctcurate.selection.pneumonia import (
    FEATURES,
    ScoreTask,
    SelectorModel,
    fit_selector,
    model_bytes,
    model_version,
    score_all,
)
from ctcurate.selection.validation import review_csv, validate

log = get_logger("select_train")

AUDIT_COLUMNS = ("series_instance_uid", "site", "pneumonia")
_YES_NO = {"yes": True, "no": False}


@dataclass(frozen=True)
class AuditRow:
    """One audited series."""

    line: int
    site: str
    series_instance_uid: str
    pneumonia: bool


def audit_list_from_truth(truth: pa.Table, fraction: float, rng: np.random.Generator) -> bytes:
    """The demo audit list (CSV bytes) from the synthetic ``truth.parquet`` table.

    Candidates: ``chest_ct`` series that are neither duplicates nor expected in
    quarantine, sorted by (site, series uid); from each class (pneumonia yes / no)
    ``ceil(fraction * n)`` are drawn with ``rng``. Rows are written sorted by (site, uid).
    """
    rows = [
        r
        for r in truth.to_pylist()
        if r["kind"] == "chest_ct" and r["duplicate_of"] is None and not r["expected_quarantine"]
    ]
    rows.sort(key=lambda r: (str(r["site"]), str(r["series_instance_uid"])))
    chosen: list[dict[str, object]] = []
    for label in (False, True):
        group = [r for r in rows if bool(r["pneumonia"]) is label]
        k = min(len(group), math.ceil(fraction * len(group)))
        picks = [int(i) for i in rng.permutation(len(group))[:k]]
        chosen.extend(group[i] for i in picks)
    chosen.sort(key=lambda r: (str(r["site"]), str(r["series_instance_uid"])))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(AUDIT_COLUMNS)
    for r in chosen:
        writer.writerow([r["series_instance_uid"], r["site"], "yes" if r["pneumonia"] else "no"])
    return out.getvalue().encode()


def parse_audit_list(text: str, where: str) -> list[AuditRow]:
    """Validate an audit list; :class:`InputError` naming ``where:line`` on the first fault."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or not lines[0].strip():
        msg = f"{where}: empty audit list"
        raise InputError(msg)
    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    if header != list(AUDIT_COLUMNS):
        msg = f"{where}:1: header must be {','.join(AUDIT_COLUMNS)}"
        raise InputError(msg)
    rows: list[AuditRow] = []
    seen: dict[tuple[str, str], int] = {}
    for number, values in enumerate(csv.reader(lines[1:]), start=2):
        if not values or not "".join(values).strip():
            continue
        if len(values) != len(AUDIT_COLUMNS):
            msg = f"{where}:{number}: expected {len(AUDIT_COLUMNS)} fields, got {len(values)}"
            raise InputError(msg)
        uid, site, label = (v.strip() for v in values)
        if not uid or not site:
            msg = f"{where}:{number}: empty series_instance_uid or site"
            raise InputError(msg)
        if label.lower() not in _YES_NO:
            msg = f"{where}:{number}: pneumonia must be yes or no"
            raise InputError(msg)
        key = (site, uid)
        if key in seen:
            msg = f"{where}:{number}: series listed again (first on line {seen[key]})"
            raise InputError(msg)
        seen[key] = number
        rows.append(AuditRow(number, site, uid, _YES_NO[label.lower()]))
    if not rows:
        msg = f"{where}: audit list has no rows"
        raise InputError(msg)
    return rows


def read_audit_list(path: Path) -> list[AuditRow]:
    """Read and validate an audit list file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        msg = f"{path}: audit list not found"
        raise InputError(msg) from exc
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: unreadable audit list ({exc.__class__.__name__})"
        raise InputError(msg) from exc
    return parse_audit_list(text, str(path))


def _fit_rows(
    audit: Sequence[AuditRow], features: Mapping[tuple[str, str], Sequence[float]]
) -> tuple[list[AuditRow], np.ndarray, np.ndarray]:
    """The audited series that have features (audit-list order), their features and labels."""
    used = [r for r in audit if (r.site, r.series_instance_uid) in features]
    x = np.asarray(
        [features[(r.site, r.series_instance_uid)] for r in used], dtype=np.float64
    ).reshape(len(used), len(FEATURES))
    y = np.asarray([int(r.pneumonia) for r in used], dtype=np.int64)
    return used, x, y


def train_selector(
    audit: Sequence[AuditRow],
    features: Mapping[tuple[str, str], Sequence[float]],
    params: SelectParams,
) -> SelectorModel:
    """Fit the selector on the audited series that have features (audit-list order)."""
    _, x, y = _fit_rows(audit, features)
    return fit_selector(
        x,
        y,
        l2=params.l2,
        threshold=params.threshold,
        working_spacing_mm=params.working_spacing_mm,
    )


def validation_files(
    audit: Sequence[AuditRow],
    features: Mapping[tuple[str, str], Sequence[float]],
    params: SelectParams,
    version: str,
) -> tuple[dict[str, Any], bytes, bytes]:
    """The validation report, its file (canonical JSON) and the review list (CSV) of the
    fit of :func:`train_selector`."""
    used, x, y = _fit_rows(audit, features)
    labels = [int(v) for v in y]
    checked = validate(
        x,
        labels,
        [r.site for r in used],
        l2=params.l2,
        threshold=params.threshold,
        folds=params.validation_folds,
    )
    report = {"selector": version, "l2": params.l2, **checked.report}
    keys = [(r.site, r.series_instance_uid) for r in used]
    return (
        report,
        (json.dumps(report, sort_keys=True, indent=2) + "\n").encode(),
        review_csv(keys, labels, checked, params.threshold),
    )


def _figures(part: dict[str, object] | None) -> str:
    if not part:
        return "n/a"
    return ", ".join(
        f"{name} {'n/a' if part[name] is None else format(part[name], '.3f')}"
        for name in ("precision", "recall", "auc")
    )


def run_audit_list(truth: Path, out: Path, params: SelectParams) -> None:
    """Write the demo audit list drawn from the synthetic truth (``select-audit-list``)."""
    table = read_parquet(
        Path(truth),
        columns=[
            "series_instance_uid",
            "site",
            "kind",
            "pneumonia",
            "duplicate_of",
            "expected_quarantine",
        ],
    )
    data = audit_list_from_truth(
        table, params.audit_fraction, np.random.default_rng(params.audit_seed)
    )
    rows = data.decode().count("\n") - 1
    if rows == 0:
        msg = f"{truth}: no chest CT series to audit"
        raise InputError(msg)
    with publish_file(Path(out), inputs=[truth]) as tmp:
        tmp.write_bytes(data)
    log.info("audit list: %d series", rows)


def run(
    index_dir: Path,
    archive: Path,
    audit_list: Path,
    out: Path,
    params: SelectParams,
    scheduler: str | None = None,
    validation: Path | None = None,
    review: Path | None = None,
) -> None:
    """Fit the selector on ``audit_list`` and write the model file ``out`` atomically; with
    ``validation`` and ``review``, also the validation report and the review list there.

    The audited series are scored on the local pool of ``params.workers`` or, with
    ``scheduler``, on that Dask cluster."""
    inputs = [Path(index_dir), Path(archive), Path(audit_list)]
    check_output_file(Path(out), inputs)
    extra = [Path(f) for f in (validation, review) if f is not None]
    for i, path in enumerate(extra):
        if path.resolve() in {Path(f).resolve() for f in [out, *extra[:i]]}:
            msg = f"{path}: the model, validation report and review list must be other files"
            raise InputError(msg)
        check_output_file(path, inputs)
    audit = read_audit_list(Path(audit_list))
    paths = series_paths(Path(index_dir) / "instances")
    archive = Path(archive)
    if not archive.is_dir():
        msg = f"{archive}: archive folder not found"
        raise InputError(msg)
    tasks = [
        ScoreTask(
            r.site,
            r.series_instance_uid,
            tuple(str(archive / p) for p in paths[(r.site, r.series_instance_uid)]),
            None,
            working_spacing_mm=params.working_spacing_mm,
        )
        for r in audit
        if (r.site, r.series_instance_uid) in paths
    ]
    skipped: Counter[str] = Counter({"not_indexed": len(audit) - len(tasks)})
    results = score_all(tasks, params.workers, scheduler, log)
    features = {}
    for res in results:
        if res.features is None:
            skipped[str(res.error)] += 1
        else:
            features[(res.site, res.series_instance_uid)] = res.features
    for reason, count in sorted(skipped.items()):
        if count:
            log.info("audit list: %d series left out (%s)", count, reason)
    if not features:
        msg = f"{audit_list}: none of the {len(audit)} audited series could be measured"
        raise InputError(msg)
    model = train_selector(audit, features, params)
    if model.n_positive in (0, model.n_fit):
        log.warning(
            "audit list holds one class only (%d of %d pneumonia): the selector is the prior",
            model.n_positive,
            model.n_fit,
        )
    data = model_bytes(model)
    with publish_file(Path(out), inputs=inputs) as tmp:
        tmp.write_bytes(data)
    log.info(
        "selector %s fitted on %d series (%d pneumonia)",
        model_version(data),
        model.n_fit,
        model.n_positive,
    )
    if validation is None and review is None:
        return
    report, report_file, listing = validation_files(audit, features, params, model_version(data))
    for target, content in ((validation, report_file), (review, listing)):
        if target is not None:
            with publish_file(Path(target), inputs=inputs) as tmp:
                tmp.write_bytes(content)
    log.info("validation, cross-validated: %s", _figures(report["cross_validation"]))
    log.info(
        "validation, leave one site out: %s",
        _figures((report["leave_one_site_out"] or {}).get("pooled")),
    )
