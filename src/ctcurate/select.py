"""select: the SQL rules over the index catalog and the era split.

Every indexed series gets a verdict: ``rule_reason`` (null when every rule passed, else the
first failing rule's name), an ``era`` from its study date and, when selected, a cohort
(``non_covid`` before ``pandemic_start``, ``covid_candidate`` from that day on).

The rules live in ``stages/select/*.sql``; the contract of a rule file is written at the top
of ``stages/select/rules.sql``. The files run in an in-memory DuckDB with the views
``series`` and ``instances`` over the index tables and ``candidates`` (the series every
earlier file passed).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ctcurate.errors import AccountingError, InputError
from ctcurate.io.atomic import atomic_dir, write_json
from ctcurate.io.tables import read_parquet, write_parquet
from ctcurate.log import get_logger
from ctcurate.params import SelectParams

log = get_logger("select")

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
        pa.field("rule_reason", pa.string()),
        pa.field("era", pa.string()),
        pa.field("selected", pa.bool_(), nullable=False),
        pa.field("cohort", pa.string()),
    ]
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
    columns = {row[0] for row in con.sql("DESCRIBE series").fetchall()}
    missing = [c for c in SERIES_KEY_COLUMNS if c not in columns]
    if missing:
        msg = f"{where}: missing column(s) {', '.join(missing)}"
        raise InputError(msg)
    n_rows, n_keys = con.sql(
        "SELECT count(*), count(DISTINCT (site, series_instance_uid)) FROM series"
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
    for path in (series_path, instances_path):
        if not Path(path).is_file():
            msg = f"{path}: no such Parquet file"
            raise InputError(msg)
        try:
            n_rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            msg = f"{path}: not a readable Parquet file ({exc.__class__.__name__})"
            raise InputError(msg) from exc
        if n_rows == 0:
            msg = f"{path}: empty table"
            raise InputError(msg)
    con = duckdb.connect(":memory:")
    con.execute(f"CREATE VIEW series AS SELECT * FROM read_parquet({_sql_literal(series_path)})")
    con.execute(
        f"CREATE VIEW instances AS SELECT * FROM read_parquet({_sql_literal(instances_path)})"
    )
    _check_series(con, str(series_path))
    return con


def catalog_from_tables(series: pa.Table, instances: pa.Table) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views ``series`` and ``instances`` over Arrow tables."""
    con = duckdb.connect(":memory:")
    con.register("series_table", series)
    con.register("instances_table", instances)
    con.execute("CREATE VIEW series AS SELECT * FROM series_table")
    con.execute("CREATE VIEW instances AS SELECT * FROM instances_table")
    _check_series(con, "series")
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


def apply_rules(
    con: duckdb.DuckDBPyConnection, rules: Sequence[tuple[str, str]], params: SelectParams
) -> pa.Table:
    """Run ``rules`` (name, SQL) in order on the catalog ``con``; one verdict per series.

    Returns the table of :data:`OUTPUT_SCHEMA`, sorted by (site, series_instance_uid).
    """
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
                CAST(s.site AS VARCHAR) AS site,
                CAST(s.study_instance_uid AS VARCHAR) AS study_instance_uid,
                CAST(s.patient_id AS VARCHAR) AS patient_id,
                CAST(s.study_date AS DATE) AS study_date,
                f.rule_reason,
                CASE
                    WHEN s.study_date IS NULL THEN NULL
                    WHEN CAST(s.study_date AS DATE) >= $pandemic_start THEN 'pandemic'
                    ELSE 'pre_pandemic'
                END AS era,
                f.rule_reason IS NULL AS selected
            FROM series AS s
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


def audit_against_truth(selection: pa.Table, truth: pa.Table) -> dict[str, Any]:
    """Precision / recall of ``selection`` against the synthetic ``truth``.

    * precision: selected series whose truth row (matched on site + series uid, else on the
      series uid alone when it is unique in the truth) has ``pneumonia``; a selected series
      without a truth row counts as a false positive (and in ``truth_unmatched``);
    * recall: studies holding a truth series with ``pneumonia`` (duplicates excluded) that
      have a selected series — the selection keeps one series per study, so recall is
      counted per study;
    * eligible_recall: the same over studies holding a ``chest_ct`` series.
    Both are also given per site (the site of the selected series / of the truth row).
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
    eligible, eli_site = study_recall([r for r in originals if r["kind"] == "chest_ct"])

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
        "per_site": per_site,
        "truth_unmatched": unmatched,
    }


def summarize(selection: pa.Table, truth: pa.Table | None = None) -> dict[str, Any]:
    """The content of ``report.json`` for one selection (and the truth, when given)."""
    reasons = Counter(r for r in selection.column("rule_reason").to_pylist() if r is not None)
    cohorts = Counter(c for c in selection.column("cohort").to_pylist() if c is not None)
    eras = Counter(e for e in selection.column("era").to_pylist() if e is not None)
    n_selected = sum(bool(s) for s in selection.column("selected").to_pylist())
    report: dict[str, Any] = {
        "series_seen": selection.num_rows,
        "series_selected": n_selected,
        "series_rejected": sum(reasons.values()),
        "rule_rejections": dict(sorted(reasons.items())),
        "cohorts": {c: cohorts.get(c, 0) for c in sorted(COHORT_OF_ERA.values())},
        "eras": {e: eras.get(e, 0) for e in sorted(COHORT_OF_ERA)},
    }
    if truth is not None:
        report.update(audit_against_truth(selection, truth))
    return report


def run(
    index_dir: Path, rules_dir: Path, out: Path, truth: Path | None, params: SelectParams
) -> None:
    """Select series from ``index_dir`` with the rules in ``rules_dir`` into ``out``.

    Writes ``out/series.parquet`` and ``out/report.json`` atomically (the whole folder).
    """
    index_dir = Path(index_dir)
    rules = read_rules(rules_dir)
    truth_table = (
        read_parquet(Path(truth), columns=list(TRUTH_COLUMNS)) if truth is not None else None
    )
    con = open_catalog(index_dir / "series.parquet", index_dir / "instances.parquet")
    try:
        selection = apply_rules(con, rules, params)
    finally:
        con.close()
    report = summarize(selection, truth_table)
    if report["series_seen"] != report["series_selected"] + report["series_rejected"]:
        msg = f"{index_dir}: series seen != selected + rejected"
        raise AccountingError(msg)
    for reason, count in report["rule_rejections"].items():
        log.info("rule %s: %d series rejected", reason, count)
    log.info(
        "%d series seen, %d selected (%s)",
        report["series_seen"],
        report["series_selected"],
        ", ".join(f"{k} {v}" for k, v in report["cohorts"].items()),
    )
    if truth_table is not None:
        log.info(
            "against truth: precision %s, recall %s, eligible recall %s",
            report["precision"],
            report["recall"],
            report["eligible_recall"],
        )
    with atomic_dir(Path(out)) as tmp:
        write_parquet(tmp / "series.parquet", selection)
        write_json(tmp / "report.json", report)
