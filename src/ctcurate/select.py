"""select: the SQL rules over the index catalog, the pneumonia scorer and the era split.

Every indexed series gets a verdict: ``rule_reason`` (null when every rule passed, else the
first failing rule's name), an ``era`` from its study date and, when selected, a cohort
(``non_covid`` before ``pandemic_start``, ``covid_candidate`` from that day on).

With a selector model (``select-train``) and the archive, the rule survivors' pixels are
read on a local process pool and scored (:mod:`ctcurate.pneumonia`): each survivor gets
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
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctcurate.errors import AccountingError, InputError
from ctcurate.io.atomic import write_bytes, write_json
from ctcurate.io.outputs import check_output_dir, publish_dir
from ctcurate.io.tables import read_parquet, write_parquet
from ctcurate.log import get_logger
from ctcurate.params import SelectParams
from ctcurate.pneumonia import ScoreResult, ScoreTask, read_model, score_all
from ctcurate.region import UNKNOWN, VOCABULARY_FILE, BodyRegions, read_vocabulary

log = get_logger("select")

#: The stage name (its output folder's marker) and what it writes into that folder.
STAGE = "select"
OWN_FILES = ("series.parquet", "report.json", "audit_sample.csv")

#: Columns of the index ``series`` table the runner itself needs (rules may use any).
SERIES_KEY_COLUMNS = (
    "series_instance_uid",
    "site",
    "study_instance_uid",
    "patient_id",
    "study_date",
)
#: Columns of ``truth.parquet`` used for the audit figures.
TRUTH_COLUMNS = (
    "series_instance_uid",
    "study_instance_uid",
    "site",
    "kind",
    "pneumonia",
    "duplicate_of",
)
#: Traps of ``truth_files.parquet`` that make a series fail a rule however good the selector
#: (a missing or repeated slice; any file the index is expected to quarantine leaves a gap).
SERIES_TRAPS = ("duplicate_slice", "missing_slice")
PRE_PANDEMIC = "pre_pandemic"
PANDEMIC = "pandemic"
COHORT_OF_ERA = {PRE_PANDEMIC: "non_covid", PANDEMIC: "covid_candidate"}

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("series_instance_uid", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("study_instance_uid", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("study_date", pa.date32()),
        pa.field("body_region", pa.string()),
        pa.field("body_region_source", pa.string()),
        pa.field("rule_reason", pa.string()),
        pa.field("era", pa.string()),
        pa.field("selected", pa.bool_(), nullable=False),
        pa.field("cohort", pa.string()),
    ]
)
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

_PARAM_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_LINE_COMMENT_RE = re.compile(r"--[^\n]*")
_BLOCK_COMMENT_RE = re.compile(r"/\*.*?\*/", re.DOTALL)
_STRING_RE = re.compile(r"'(?:[^']|'')*'")
# DuckDB errors whose text describes the SQL, never the data (safe to show to the user)
_SQL_ERRORS: tuple[type[Exception], ...] = (
    duckdb.ParserException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.InvalidInputException,
)
_DIGITS = 6
#: The catalog view of every index series; the rules' ``series`` view leaves out those with
#: no site (a file at the archive root), which are rejected ``no_site`` (site ``''``).
ALL_SERIES = "series_all"
SERIES_VIEW = f"CREATE VIEW series AS SELECT * FROM {ALL_SERIES} WHERE site IS NOT NULL"


def rule_parameters(params: SelectParams) -> dict[str, Any]:
    """The DuckDB named parameters a rule file may use (``$name``)."""
    return {
        "min_slices": params.min_slices,
        "max_slice_thickness_mm": params.max_slice_thickness_mm,
        "min_z_coverage_mm": params.min_z_coverage_mm,
        "pandemic_start": params.pandemic_start,
    }


def used_parameters(sql: str) -> list[str]:
    """Sorted names of the ``$name`` parameters in ``sql`` (comments and strings ignored)."""
    code = _BLOCK_COMMENT_RE.sub(" ", sql)
    code = _STRING_RE.sub("''", code)
    code = _LINE_COMMENT_RE.sub(" ", code)
    return sorted(set(_PARAM_RE.findall(code)))


def read_rules(rules_dir: Path) -> list[tuple[str, str]]:
    """Return ``(file name, SQL)`` of every ``*.sql`` file in ``rules_dir``, sorted by name."""
    rules_dir = Path(rules_dir)
    if not rules_dir.is_dir():
        msg = f"{rules_dir}: rules folder not found"
        raise InputError(msg)
    files = sorted(p for p in rules_dir.glob("*.sql") if p.is_file())
    if not files:
        msg = f"{rules_dir}: no *.sql rule files"
        raise InputError(msg)
    rules = []
    for path in files:
        try:
            sql = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"{path}: unreadable rule file ({exc.__class__.__name__})"
            raise InputError(msg) from exc
        if not _LINE_COMMENT_RE.sub("", _BLOCK_COMMENT_RE.sub("", sql)).strip(" \t\r\n;"):
            msg = f"{path}: rule file holds no SQL"
            raise InputError(msg)
        rules.append((path.name, sql))
    return rules


def _sql_literal(path: Path) -> str:
    return "'" + path.as_posix().replace("'", "''") + "'"


def _check_series(con: duckdb.DuckDBPyConnection, where: str) -> None:
    columns = {row[0] for row in con.sql(f"DESCRIBE {ALL_SERIES}").fetchall()}
    missing = [c for c in SERIES_KEY_COLUMNS if c not in columns]
    if missing:
        msg = f"{where}: missing column(s) {', '.join(missing)}"
        raise InputError(msg)
    n_rows, n_keys = con.sql(
        f"SELECT count(*), count(DISTINCT (site, series_instance_uid)) FROM {ALL_SERIES}"
    ).fetchall()[0]
    if n_rows == 0:
        msg = f"{where}: no series (empty table)"
        raise InputError(msg)
    if n_keys != n_rows:
        msg = f"{where}: {n_rows - n_keys} duplicate (site, series_instance_uid) row(s)"
        raise InputError(msg)


def open_catalog(series_path: Path, instances_path: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views ``series`` and ``instances`` over the index files.

    Raises :class:`InputError` naming the file when one is missing, unreadable or empty,
    or when ``series`` lacks a key column or repeats a (site, series uid).
    """
    sources = {series_path: [Path(series_path)]}  # instances: a folder of Parquet shards
    sources[instances_path] = sorted(Path(instances_path).glob("part-*.parquet"))
    for path, files in sources.items():
        if not files or not all(f.is_file() for f in files):
            msg = f"{path}: no such Parquet file" if files else f"{path}: no Parquet shards"
            raise InputError(msg)
        try:
            n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        except (pa.ArrowInvalid, OSError) as exc:
            msg = f"{path}: not a readable Parquet file ({exc.__class__.__name__})"
            raise InputError(msg) from exc
        if n_rows == 0:
            msg = f"{path}: empty table"
            raise InputError(msg)
    con = duckdb.connect(":memory:")
    con.execute(
        f"CREATE VIEW {ALL_SERIES} AS SELECT * FROM read_parquet({_sql_literal(series_path)})"
    )
    con.execute(
        "CREATE VIEW instances AS SELECT * FROM "
        f"read_parquet({_sql_literal(Path(instances_path) / 'part-*.parquet')})"
    )
    _check_series(con, str(series_path))
    con.execute(SERIES_VIEW)
    return con


def catalog_from_tables(series: pa.Table, instances: pa.Table) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views ``series`` and ``instances`` over Arrow tables."""
    con = duckdb.connect(":memory:")
    con.register("series_table", series)
    con.register("instances_table", instances)
    con.execute(f"CREATE VIEW {ALL_SERIES} AS SELECT * FROM series_table")
    con.execute("CREATE VIEW instances AS SELECT * FROM instances_table")
    _check_series(con, "series")
    con.execute(SERIES_VIEW)
    return con


def _sql_error(name: str, exc: duckdb.Error) -> InputError:
    if isinstance(exc, _SQL_ERRORS):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        msg = f"{name}: rule SQL failed: {first[:300]}"
    else:  # conversion errors may quote data values: name the class only
        msg = f"{name}: rule SQL failed ({exc.__class__.__name__})"
    return InputError(msg)


def _run_rule_file(
    con: duckdb.DuckDBPyConnection, rank: int, name: str, sql: str, values: Mapping[str, Any]
) -> None:
    names = used_parameters(sql)
    unknown = [n for n in names if n not in values]
    if unknown:
        msg = (
            f"{name}: unknown parameter(s) {', '.join('$' + n for n in unknown)} "
            f"(known: {', '.join('$' + n for n in sorted(values))})"
        )
        raise InputError(msg)
    body = sql.rstrip().rstrip(";").rstrip()
    try:
        con.execute("DROP TABLE IF EXISTS rule_out")
        con.execute(f"CREATE TEMP TABLE rule_out AS {body}\n", {n: values[n] for n in names})
    except duckdb.Error as exc:
        raise _sql_error(name, exc) from exc
    columns = [row[0] for row in con.sql("DESCRIBE rule_out").fetchall()]
    wanted = ["site", "series_instance_uid", "rule_reason"]
    if sorted(columns) != sorted(wanted):
        msg = f"{name}: a rule file must return the columns {', '.join(wanted)} (got {columns})"
        raise InputError(msg)
    n_rows, n_keys, n_unknown = con.sql(
        """
        SELECT count(*), count(DISTINCT (r.site, r.series_instance_uid)),
               count(*) FILTER (WHERE s.series_instance_uid IS NULL)
        FROM rule_out AS r
        LEFT JOIN series AS s USING (site, series_instance_uid)
        """
    ).fetchall()[0]
    if n_keys != n_rows:
        msg = f"{name}: returns {n_rows - n_keys} repeated (site, series_instance_uid) row(s)"
        raise InputError(msg)
    if n_unknown:
        msg = f"{name}: returns {n_unknown} row(s) that are not in `series`"
        raise InputError(msg)
    con.execute(
        """
        INSERT INTO verdicts
        SELECT $rank, site, series_instance_uid, CAST(rule_reason AS VARCHAR) FROM rule_out
        WHERE rule_reason IS NOT NULL
        """,
        {"rank": rank},
    )
    con.execute("DROP TABLE rule_out")


def attach_regions(con: duckdb.DuckDBPyConnection, regions: BodyRegions) -> Counter[str]:
    """Give the ``series_all`` and ``series`` views of ``con`` the columns ``body_region``
    and ``body_region_source`` (:mod:`ctcurate.region`); returns the series count per
    region.

    The index table becomes the view ``series_headers``; a header column it lacks counts
    as empty, a ``body_region`` it holds is replaced.
    """
    columns = {row[0] for row in con.sql(f"DESCRIBE {ALL_SERIES}").fetchall()}
    values = ", ".join(
        f'CAST("{c}" AS VARCHAR)' if c in columns else "NULL" for c in regions.columns
    )
    rows = con.sql(f"SELECT site, series_instance_uid, {values} FROM {ALL_SERIES}").fetchall()
    found = [regions.classify(row[2:]) for row in rows]
    con.register(
        "series_regions",
        pa.table(
            {
                "site": pa.array([r[0] for r in rows], pa.string()),
                "series_instance_uid": pa.array([r[1] for r in rows], pa.string()),
                "body_region": pa.array([f[0] for f in found], pa.string()),
                "body_region_source": pa.array([f[1] for f in found], pa.string()),
            }
        ),
    )
    replaced = [c for c in ("body_region", "body_region_source") if c in columns]
    every = f"s.* EXCLUDE ({', '.join(replaced)})" if replaced else "s.*"
    con.execute("DROP VIEW series")
    con.execute(f"ALTER VIEW {ALL_SERIES} RENAME TO series_headers")
    con.execute(
        f"CREATE VIEW {ALL_SERIES} AS SELECT {every}, r.body_region, r.body_region_source "
        "FROM series_headers AS s JOIN series_regions AS r "
        "ON s.site IS NOT DISTINCT FROM r.site "
        "AND s.series_instance_uid IS NOT DISTINCT FROM r.series_instance_uid"
    )
    con.execute(SERIES_VIEW)
    return Counter(f[0] for f in found)


def apply_rules(
    con: duckdb.DuckDBPyConnection,
    rules: Sequence[tuple[str, str]],
    params: SelectParams,
    regions: BodyRegions,
) -> pa.Table:
    """Run ``rules`` (name, SQL) in order on the catalog ``con``; one verdict per series.

    The series get their body region first (:func:`attach_regions`). Returns the table
    of :data:`OUTPUT_SCHEMA`, sorted by (site, series_instance_uid).
    """
    for name, count in sorted(attach_regions(con, regions).items()):
        log.info("body region %s: %d series", name, count)
    values = rule_parameters(params)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE verdicts "
        "(file_rank INTEGER, site VARCHAR, series_instance_uid VARCHAR, rule_reason VARCHAR)"
    )
    con.execute(
        """
        CREATE OR REPLACE TEMP VIEW candidates AS
        SELECT s.* FROM series AS s
        WHERE NOT EXISTS (
            SELECT 1 FROM verdicts AS v
            WHERE v.site = s.site AND v.series_instance_uid = s.series_instance_uid
        )
        """
    )
    for rank, (name, sql) in enumerate(rules):
        _run_rule_file(con, rank, name, sql, values)
    table = con.sql(
        """
        WITH first_reason AS (
            SELECT site, series_instance_uid, arg_min(rule_reason, file_rank) AS rule_reason
            FROM verdicts
            GROUP BY site, series_instance_uid
        ),
        judged AS (
            SELECT
                CAST(s.series_instance_uid AS VARCHAR) AS series_instance_uid,
                CAST(coalesce(s.site, '') AS VARCHAR) AS site,
                CAST(s.study_instance_uid AS VARCHAR) AS study_instance_uid,
                CAST(s.patient_id AS VARCHAR) AS patient_id,
                CAST(s.study_date AS DATE) AS study_date,
                CAST(s.body_region AS VARCHAR) AS body_region,
                CAST(s.body_region_source AS VARCHAR) AS body_region_source,
                CASE WHEN s.site IS NULL THEN 'no_site' ELSE f.rule_reason END AS rule_reason,
                CASE
                    WHEN s.study_date IS NULL THEN NULL
                    WHEN CAST(s.study_date AS DATE) >= $pandemic_start THEN 'pandemic'
                    ELSE 'pre_pandemic'
                END AS era,
                s.site IS NOT NULL AND f.rule_reason IS NULL AS selected
            FROM series_all AS s
            LEFT JOIN first_reason AS f USING (site, series_instance_uid)
        )
        SELECT *,
            CASE
                WHEN selected AND era = 'pre_pandemic' THEN 'non_covid'
                WHEN selected AND era = 'pandemic' THEN 'covid_candidate'
            END AS cohort
        FROM judged
        ORDER BY site, series_instance_uid
        """,
        params={"pandemic_start": params.pandemic_start},
    ).to_arrow_table()
    return table.cast(OUTPUT_SCHEMA)


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, _DIGITS) if den else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), _DIGITS)


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
        row["pneumonia_score"] = round(score, _DIGITS)
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


def lung_mask_audit(results: Sequence[ScoreResult]) -> dict[str, Any]:
    """Mean Dice (and kept consolidation) of both lung masks on the audited series."""
    audited = sorted(
        (r for r in results if r.dice_robust is not None and r.dice_threshold is not None),
        key=lambda r: (r.site, r.series_instance_uid),
    )

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return _rounded(float(np.mean(kept))) if kept else None

    return {
        "series": len(audited),
        "dice_threshold": mean([r.dice_threshold for r in audited]),
        "dice_robust": mean([r.dice_robust for r in audited]),
        "consolidation_kept_threshold": mean([r.consolidation_kept_threshold for r in audited]),
        "consolidation_kept_robust": mean([r.consolidation_kept_robust for r in audited]),
        "robust_better": sum((r.dice_robust or 0.0) > (r.dice_threshold or 0.0) for r in audited),
    }


def audit_against_truth(
    selection: pa.Table, truth: pa.Table, blocked: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Precision / recall of ``selection`` against the synthetic ``truth``.

    * precision: selected series whose truth row (matched on site + series uid, else on the
      series uid alone when it is unique in the truth) has ``pneumonia``; a selected series
      without a truth row counts as a false positive (and in ``truth_unmatched``);
    * recall: studies holding a truth series with ``pneumonia`` (duplicates excluded) that
      have a selected series — the selection keeps one series per study, so recall is
      counted per study;
    * eligible_recall: the same over the pneumonia studies that hold an *eligible* series:
      a ``chest_ct`` original, not expected in quarantine and not in ``blocked`` (series
      uids with a trap that makes a rule reject them, :data:`SERIES_TRAPS`). Rejecting the
      only series of a study for a gap is right, so this is the selector's recall;
    * pneumonia_studies: the counts behind both recalls.
    All but the counts are also given per site (of the selected series / of the truth row).
    """
    t = truth.to_pylist()
    by_key = {(str(r["site"]), str(r["series_instance_uid"])): r for r in t}
    uid_count = Counter(str(r["series_instance_uid"]) for r in t)
    by_uid = {
        str(r["series_instance_uid"]): r for r in t if uid_count[r["series_instance_uid"]] == 1
    }

    picked = [r for r in selection.to_pylist() if r["selected"]]
    chosen_studies: set[str] = set()
    hits: Counter[str] = Counter()
    sel_per_site: Counter[str] = Counter()
    unmatched = 0
    for row in picked:
        site, uid = str(row["site"]), str(row["series_instance_uid"])
        sel_per_site[site] += 1
        match = by_key.get((site, uid)) or by_uid.get(uid)
        if match is None:
            unmatched += 1
            if row["study_instance_uid"] is not None:
                chosen_studies.add(str(row["study_instance_uid"]))
            continue
        chosen_studies.add(str(match["study_instance_uid"]))
        if match["pneumonia"]:
            hits[site] += 1

    def study_recall(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, set[str]]]:
        studies = {str(r["study_instance_uid"]) for r in rows}
        per_site: dict[str, set[str]] = {}
        for r in rows:
            per_site.setdefault(str(r["site"]), set()).add(str(r["study_instance_uid"]))
        return {"found": len(studies & chosen_studies), "total": len(studies)}, per_site

    originals = [r for r in t if r["duplicate_of"] is None]
    positives, pos_site = study_recall([r for r in originals if r["pneumonia"]])
    eligible_rows = [
        r
        for r in originals
        if r["pneumonia"]
        and r["kind"] == "chest_ct"
        and not r.get("expected_quarantine")
        and str(r["series_instance_uid"]) not in blocked
    ]
    eligible, eli_site = study_recall(eligible_rows)

    sites = sorted(set(sel_per_site) | set(pos_site) | set(eli_site))
    per_site = {
        site: {
            "precision": _ratio(hits[site], sel_per_site[site]),
            "recall": _ratio(
                len(pos_site.get(site, set()) & chosen_studies), len(pos_site.get(site, set()))
            ),
            "eligible_recall": _ratio(
                len(eli_site.get(site, set()) & chosen_studies), len(eli_site.get(site, set()))
            ),
        }
        for site in sites
    }
    return {
        "precision": _ratio(sum(hits.values()), len(picked)),
        "recall": _ratio(positives["found"], positives["total"]),
        "eligible_recall": _ratio(eligible["found"], eligible["total"]),
        "pneumonia_studies": {
            "total": positives["total"],
            "found": positives["found"],
            "eligible": eligible["total"],
            "eligible_found": eligible["found"],
        },
        "per_site": per_site,
        "truth_unmatched": unmatched,
    }


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


def _blocked_series(truth: Path) -> frozenset[str]:
    """Series uids that ``truth_files.parquet`` (next to ``truth``) gives a rule-failing trap:
    one of :data:`SERIES_TRAPS` or a file expected in quarantine. Empty without the file."""
    path = truth.parent / "truth_files.parquet"
    if not path.is_file():
        return frozenset()
    rows = read_parquet(path, columns=["trap", "expected_reason", "series_instance_uid"])
    return frozenset(
        str(r["series_instance_uid"])
        for r in rows.to_pylist()
        if r["series_instance_uid"] is not None
        and (r["trap"] in SERIES_TRAPS or r["expected_reason"] is not None)
    )


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
    from ctcurate.select_train import series_paths

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
    blocked = _blocked_series(Path(truth)) if truth is not None else frozenset()
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
