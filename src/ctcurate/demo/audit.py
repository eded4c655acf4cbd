"""The demo's truth audit: a selection measured against the synthetic archive's truth.

Only the built-in synthetic archive has a truth table (``select --truth``): precision and
recall of the selection, per site, and the lung masks' Dice on the audited series.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctcurate.io.report import ratio, rounded
from ctcurate.io.tables import read_parquet
from ctcurate.selection.pneumonia import ScoreResult

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


def lung_mask_audit(results: Sequence[ScoreResult]) -> dict[str, Any]:
    """Mean Dice (and kept consolidation) of both lung masks on the audited series."""
    audited = sorted(
        (r for r in results if r.dice_robust is not None and r.dice_threshold is not None),
        key=lambda r: (r.site, r.series_instance_uid),
    )

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return rounded(float(np.mean(kept))) if kept else None

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
            "precision": ratio(hits[site], sel_per_site[site]),
            "recall": ratio(
                len(pos_site.get(site, set()) & chosen_studies), len(pos_site.get(site, set()))
            ),
            "eligible_recall": ratio(
                len(eli_site.get(site, set()) & chosen_studies), len(eli_site.get(site, set()))
            ),
        }
        for site in sites
    }
    return {
        "precision": ratio(sum(hits.values()), len(picked)),
        "recall": ratio(positives["found"], positives["total"]),
        "eligible_recall": ratio(eligible["found"], eligible["total"]),
        "pneumonia_studies": {
            "total": positives["total"],
            "found": positives["found"],
            "eligible": eligible["total"],
            "eligible_found": eligible["found"],
        },
        "per_site": per_site,
        "truth_unmatched": unmatched,
    }


def blocked_series(truth: Path) -> frozenset[str]:
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
