"""select: the SQL rules over the index catalog, the pneumonia scorer and the era split.

Every indexed series gets a verdict: ``rule_reason`` (null when every rule passed, else the
first failing rule's name), an ``era`` from its study date and, when selected, a cohort
(``non_covid`` before ``pandemic_start``, ``covid_candidate`` from that day on).

With a selector model (``select-train``) and the archive, the rule survivors' pixels are
read on a local process pool and scored (:mod:`ctcurate.selection.pneumonia`): each survivor gets
``pneumonia_score``, the ``threshold`` and the ``selector_version`` (the model file's
sha256) and ``pneumonia`` (score ≥ threshold); ``selected`` = rules passed and
``pneumonia``. A survivor whose pixels cannot be used gets ``score_error`` and is not
selected. Without a model the selection is the rules' (the scorer columns stay null).

The rules live in ``stages/select/*.sql``; the contract of a rule file is written at the top
of ``stages/select/rules.sql``. The files run in an in-memory DuckDB with the views
``series`` and ``instances`` over the index tables and ``candidates`` (the series every
earlier file passed).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctcurate.demo.audit import TRUTH_COLUMNS, audit_against_truth, blocked_series, lung_mask_audit
from ctcurate.errors import AccountingError, InputError
from ctcurate.io.atomic import write_bytes, write_json
from ctcurate.io.outputs import check_output_dir, publish_dir
from ctcurate.io.report import rounded
from ctcurate.io.tables import read_parquet, write_parquet
from ctcurate.log import get_logger
from ctcurate.params import SelectParams
from ctcurate.selection.pneumonia import ScoreResult, ScoreTask, read_model, score_all
from ctcurate.selection.region import UNKNOWN, VOCABULARY_FILE, read_vocabulary
from ctcurate.selection.rules import OUTPUT_SCHEMA, apply_rules, open_catalog, read_rules

log = get_logger("select")

#: The stage name (its output folder's marker) and what it writes into that folder.
STAGE = "select"
OWN_FILES = ("series.parquet", "report.json", "audit_sample.csv")

PRE_PANDEMIC = "pre_pandemic"
PANDEMIC = "pandemic"
COHORT_OF_ERA = {PRE_PANDEMIC: "non_covid", PANDEMIC: "covid_candidate"}

#: The scorer's columns, appended to :data:`OUTPUT_SCHEMA` by :func:`apply_scores`.
SCORE_FIELDS = (
    pa.field("pneumonia_score", pa.float64()),
    pa.field("threshold", pa.float64()),
    pa.field("selector_version", pa.string()),
    pa.field("pneumonia", pa.bool_()),
    pa.field("score_error", pa.string()),
)
SCORED_SCHEMA = pa.schema([*OUTPUT_SCHEMA, *SCORE_FIELDS])
AUDIT_SAMPLE_COLUMNS = (
    "decision",
    "site",
    "series_instance_uid",
    "study_instance_uid",
    "study_date",
    "era",
    "pneumonia_score",
    "threshold",
    "selector_version",
)


def apply_scores(
    selection: pa.Table,
    results: Sequence[ScoreResult],
    scores: Mapping[tuple[str, str], float],
    threshold: float | None,
    version: str | None,
) -> pa.Table:
    """The selection with the scorer's columns (:data:`SCORED_SCHEMA`).

    ``results`` are the rule survivors' feature results, ``scores`` their pneumonia
    probabilities by (site, series uid). A survivor is selected when its score is at
    least ``threshold``; one with an error is not selected. With ``version`` None (no
    model) the scorer columns are null and the rules alone select.
    """
    by_key = {(r.site, r.series_instance_uid): r for r in results}
    rows = selection.to_pylist()
    for row in rows:
        key = (str(row["site"]), str(row["series_instance_uid"]))
        row.update(
            pneumonia_score=None,
            threshold=None,
            selector_version=None,
            pneumonia=None,
            score_error=None,
        )
        if version is None or not row["selected"]:
            continue
        result = by_key.get(key)
        row["threshold"], row["selector_version"] = threshold, version
        if result is None or result.features is None:
            row["score_error"] = result.error if result is not None else "not_scored"
            row["selected"], row["cohort"] = False, None
            continue
        score = float(scores[key])
        row["pneumonia_score"] = rounded(score)
        row["pneumonia"] = threshold is not None and score >= threshold
        if not row["pneumonia"]:
            row["selected"], row["cohort"] = False, None
    return pa.Table.from_pylist(rows, schema=SCORED_SCHEMA)


def audit_sample(selection: pa.Table, k: int, rng: np.random.Generator) -> bytes:
    """CSV of K selected and K scorer-rejected series drawn with ``rng``, for human review.

    Draws from the rows sorted by (site, series uid); fewer when fewer exist. Rows are
    written sorted by (decision, site, series uid).
    """
    rows = sorted(
        selection.to_pylist(), key=lambda r: (str(r["site"]), str(r["series_instance_uid"]))
    )
    groups = {
        "selected": [r for r in rows if r["selected"]],
        "rejected": [r for r in rows if not r["selected"] and r["pneumonia_score"] is not None],
    }
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(AUDIT_SAMPLE_COLUMNS)
    for decision in sorted(groups):
        group = groups[decision]
        picks = sorted(int(i) for i in rng.permutation(len(group))[: min(k, len(group))])
        for i in picks:
            r = group[i]
            writer.writerow(
                [
                    decision,
                    r["site"],
                    r["series_instance_uid"],
                    r["study_instance_uid"],
                    r["study_date"].isoformat() if r["study_date"] is not None else "",
                    r["era"] or "",
                    "" if r["pneumonia_score"] is None else f"{r['pneumonia_score']:.6f}",
                    "" if r["threshold"] is None else f"{r['threshold']:g}",
                    r["selector_version"] or "",
                ]
            )
    return out.getvalue().encode()


def summarize(
    selection: pa.Table, truth: pa.Table | None = None, blocked: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The content of ``report.json`` for one selection (and the truth, when given)."""
    reasons = Counter(r for r in selection.column("rule_reason").to_pylist() if r is not None)
    cohorts = Counter(c for c in selection.column("cohort").to_pylist() if c is not None)
    eras = Counter(e for e in selection.column("era").to_pylist() if e is not None)
    n_selected = sum(bool(s) for s in selection.column("selected").to_pylist())
    scorer: dict[str, Any] | None = None
    scorer_rejected = 0
    if "selector_version" in selection.column_names:
        scored = [
            r
            for r in selection.to_pylist()
            if r["rule_reason"] is None and r["selector_version"] is not None
        ]
        if scored:
            errors = Counter(str(r["score_error"]) for r in scored if r["score_error"])
            not_pneumonia = sum(r["pneumonia"] is False for r in scored)
            scorer_rejected = not_pneumonia + sum(errors.values())
            scorer = {
                "selector_version": scored[0]["selector_version"],
                "threshold": scored[0]["threshold"],
                "rule_survivors": len(scored),
                "pneumonia": sum(r["pneumonia"] is True for r in scored),
                "not_pneumonia": not_pneumonia,
                "errors": dict(sorted(errors.items())),
            }
    regions = Counter(selection.column("body_region").to_pylist())
    report: dict[str, Any] = {
        "series_seen": selection.num_rows,
        "body_regions": dict(sorted(regions.items())),
        "series_selected": n_selected,
        "series_rejected": sum(reasons.values()) + scorer_rejected,
        "scorer": scorer,
        "rule_rejections": dict(sorted(reasons.items())),
        "cohorts": {c: cohorts.get(c, 0) for c in sorted(COHORT_OF_ERA.values())},
        "eras": {e: eras.get(e, 0) for e in sorted(COHORT_OF_ERA)},
    }
    if truth is not None:
        report.update(audit_against_truth(selection, truth, blocked))
    return report


def _score_survivors(
    selection: pa.Table,
    index_dir: Path,
    archive: Path,
    seg_dir: Path | None,
    workers: int,
    scheduler: str | None,
    spacing_mm: float,
    unknown_min_lung_ml: float = 0.0,
) -> list[ScoreResult]:
    """Features of every rule survivor (pixels read from ``archive``, paths from the index),
    measured on the working grid of ``spacing_mm``.

    A survivor whose body region is ``unknown`` needs ``unknown_min_lung_ml`` of lung mask
    (``score_error = no_lung`` otherwise): the image decides what no header said.
    """
    from ctcurate.catalog.paths import series_paths

    if not archive.is_dir():
        msg = f"{archive}: archive folder not found"
        raise InputError(msg)
    paths = series_paths(index_dir / "instances")
    tasks = []
    for row in selection.to_pylist():
        if not row["selected"]:
            continue
        key = (str(row["site"]), str(row["series_instance_uid"]))
        seg = seg_dir / f"{key[1]}.dcm" if seg_dir is not None else None
        tasks.append(
            ScoreTask(
                key[0],
                key[1],
                tuple(str(archive / p) for p in paths.get(key, [])),
                str(seg) if seg is not None and seg.is_file() else None,
                min_lung_ml=unknown_min_lung_ml if row["body_region"] == UNKNOWN else 0.0,
                working_spacing_mm=spacing_mm,
            )
        )
    where = "a Dask cluster" if scheduler else f"{workers} worker(s)"
    log.info("scoring %d rule survivors on %s", len(tasks), where)
    return score_all(tasks, workers, scheduler, log)


def run(
    index_dir: Path,
    rules_dir: Path,
    out: Path,
    truth: Path | None,
    params: SelectParams,
    archive: Path | None = None,
    model: Path | None = None,
    seg_dir: Path | None = None,
    scheduler: str | None = None,
) -> None:
    """Select series from ``index_dir`` with the rules in ``rules_dir`` into ``out``.

    With ``model`` (from ``select-train``) and ``archive``, the rule survivors are scored
    for pneumonia (on the local pool of ``params.workers`` or, with ``scheduler``, on that
    Dask cluster); ``seg_dir`` (DICOM SEGs named ``<series uid>.dcm``) adds the lung-mask
    Dice audit. Writes ``out/series.parquet``, ``out/report.json`` and, when scored,
    ``out/audit_sample.csv`` atomically (the whole folder).
    """
    index_dir = Path(index_dir)
    inputs = [index_dir, rules_dir, truth, archive, model, seg_dir]
    check_output_dir(Path(out), STAGE, [Path(p) for p in inputs if p is not None], OWN_FILES)
    rules = read_rules(rules_dir)
    regions = read_vocabulary(Path(rules_dir) / VOCABULARY_FILE)
    if (model is None) != (archive is None):
        msg = "select: --model and --archive go together"
        raise InputError(msg)
    selector = None
    if model is not None:
        try:
            selector = read_model(Path(model))
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        fitted_on = selector[0].working_spacing_mm
        if fitted_on != params.working_spacing_mm:
            msg = (
                f"{model}: selector fitted on a {fitted_on:g} mm working grid, "
                f"select.working_spacing_mm is {params.working_spacing_mm:g}: retrain it"
            )
            raise InputError(msg)
    truth_table = None
    if truth is not None:
        try:  # an unreadable file is named by read_parquet below
            names = pq.read_schema(Path(truth)).names
        except (pa.ArrowInvalid, OSError):
            names = []
        optional = ["expected_quarantine"] if "expected_quarantine" in names else []
        truth_table = read_parquet(Path(truth), columns=[*TRUTH_COLUMNS, *optional])
    blocked = blocked_series(Path(truth)) if truth is not None else frozenset()
    con = open_catalog(index_dir / "series.parquet", index_dir / "instances")
    try:
        selection = apply_rules(con, rules, params, regions)
    finally:
        con.close()
    results: list[ScoreResult] = []
    if selector is not None and archive is not None:
        selector_model, version = selector
        results = _score_survivors(
            selection,
            index_dir,
            Path(archive),
            Path(seg_dir) if seg_dir else None,
            params.workers,
            scheduler,
            params.working_spacing_mm,
            params.unknown_region_min_lung_ml,
        )
        measured = [r for r in results if r.features is not None]
        probs = (
            selector_model.predict_proba(np.asarray([r.features for r in measured]))
            if measured
            else np.zeros(0)
        )
        scores = {
            (r.site, r.series_instance_uid): float(p) for r, p in zip(measured, probs, strict=True)
        }
        selection = apply_scores(selection, results, scores, selector_model.threshold, version)
    else:
        selection = apply_scores(selection, [], {}, None, None)
    report = summarize(selection, truth_table, blocked)
    if selector is not None:
        report["lung_mask"] = lung_mask_audit(results)
    if report["series_seen"] != report["series_selected"] + report["series_rejected"]:
        msg = f"{index_dir}: series seen != selected + rejected"
        raise AccountingError(msg)
    for reason, count in report["rule_rejections"].items():
        log.info("rule %s: %d series rejected", reason, count)
    if report["scorer"] is not None:
        sc = report["scorer"]
        log.info(
            "scorer %s: %d survivors, %d pneumonia, %d not, %d errors",
            sc["selector_version"],
            sc["rule_survivors"],
            sc["pneumonia"],
            sc["not_pneumonia"],
            sum(sc["errors"].values()),
        )
        lm = report["lung_mask"]
        if lm["series"]:  # only with --seg: SEGs of consolidated series to compare with
            log.info(
                "lung mask Dice on %d consolidated series: threshold %s, robust %s",
                lm["series"],
                lm["dice_threshold"],
                lm["dice_robust"],
            )
    log.info(
        "%d series seen, %d selected (%s)",
        report["series_seen"],
        report["series_selected"],
        ", ".join(f"{k} {v}" for k, v in report["cohorts"].items()),
    )
    if truth_table is not None:
        log.info(
            "against truth: precision %s, recall %s (pneumonia studies with an eligible "
            "series: %s of %s), all pneumonia studies %s (%s of %s)",
            report["precision"],
            report["eligible_recall"],
            report["pneumonia_studies"]["eligible_found"],
            report["pneumonia_studies"]["eligible"],
            report["recall"],
            report["pneumonia_studies"]["found"],
            report["pneumonia_studies"]["total"],
        )
    with publish_dir(Path(out), STAGE, inputs=inputs, own=OWN_FILES) as tmp:
        write_parquet(tmp / "series.parquet", selection)
        write_json(tmp / "report.json", report)
        if selector is not None:
            sample = audit_sample(
                selection, params.audit_sample_k, np.random.default_rng(params.audit_seed)
            )
            write_bytes(tmp / "audit_sample.csv", sample)
