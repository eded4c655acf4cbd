"""select-train (audit list → selector model) and the scorer's side of select."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers.chest import chest, ct_slices

from ctcurate.demo import audit
from ctcurate.errors import InputError
from ctcurate.io.tables import write_parquet
from ctcurate.params import SelectParams
from ctcurate.pipeline import select, select_train
from ctcurate.selection.pneumonia import FEATURES, ScoreResult, read_model
from ctcurate.selection.validation import REVIEW_COLUMNS

PARAMS = SelectParams(workers=1)


# --- audit list ----------------------------------------------------------------------------


def truth_table(n_pos: int, n_neg: int) -> pa.Table:
    rows = []
    for i in range(n_pos + n_neg):
        rows.append(
            {
                "series_instance_uid": f"1.2.{i}",
                "site": f"H0{i % 3 + 1}",
                "kind": "chest_ct",
                "pneumonia": i < n_pos,
                "duplicate_of": None,
                "expected_quarantine": None,
            }
        )
    rows.append(rows[0] | {"series_instance_uid": "9.9", "kind": "localizer"})
    rows.append(rows[0] | {"series_instance_uid": "9.8", "duplicate_of": "1.2.0"})
    rows.append(rows[0] | {"series_instance_uid": "9.7", "expected_quarantine": "truncated"})
    return pa.Table.from_pylist(rows)


def test_audit_list_is_a_seeded_per_class_sample() -> None:
    truth = truth_table(7, 3)
    a = select_train.audit_list_from_truth(truth, 0.5, np.random.default_rng(1))
    b = select_train.audit_list_from_truth(truth, 0.5, np.random.default_rng(1))
    assert a == b
    rows = select_train.parse_audit_list(a.decode(), "audit.csv")
    labels = [r.pneumonia for r in rows]
    assert labels.count(True) == 4  # ceil(0.5 * 7)
    assert labels.count(False) == 2  # ceil(0.5 * 3): both classes always drawn
    assert not {r.series_instance_uid for r in rows} & {"9.9", "9.8", "9.7"}
    keys = [(r.site, r.series_instance_uid) for r in rows]
    assert keys == sorted(keys)
    c = select_train.audit_list_from_truth(truth, 0.5, np.random.default_rng(2))
    assert c != a


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"a\.csv: empty audit list"),
        ("uid,site,pneumonia\n", r"a\.csv:1: header must be"),
        ("series_instance_uid,site,pneumonia\n1.2,H01,maybe\n", r"a\.csv:2: pneumonia must be"),
        ("series_instance_uid,site,pneumonia\n1.2,H01\n", r"a\.csv:2: expected 3 fields"),
        ("series_instance_uid,site,pneumonia\n,H01,yes\n", r"a\.csv:2: empty series"),
        (
            "series_instance_uid,site,pneumonia\n1.2,H01,yes\n1.2,H01,no\n",
            r"a\.csv:3: series listed again \(first on line 2\)",
        ),
        ("series_instance_uid,site,pneumonia\n\n", r"a\.csv: audit list has no rows"),
    ],
)
def test_bad_audit_lists_fail_naming_file_and_line(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        select_train.parse_audit_list(text, "a.csv")


def test_audit_list_accepts_bom_spaces_and_case() -> None:
    rows = select_train.parse_audit_list(
        "\ufeffseries_instance_uid,site,pneumonia\n 1.2 , H01 , YES \n", "a.csv"
    )
    assert rows[0].series_instance_uid == "1.2"
    assert rows[0].site == "H01"
    assert rows[0].pneumonia is True


def test_missing_audit_list_fails(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.csv: audit list not found"):
        select_train.read_audit_list(tmp_path / "nope.csv")


# --- select-train on a tiny archive --------------------------------------------------------


def tiny_archive(root: Path) -> list[tuple[str, str, bool]]:
    """Four tiny chest series (two with ground glass) and the index's instances shard."""
    series = []
    rows = []
    for i in range(4):
        sick = i % 2 == 0
        hu, _ = chest(nz=6, n=32, ggo=[(2, 16, 8), (3, 16, 23)] if sick else None)
        uid = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        site = "H01"
        for k, ds in enumerate(ct_slices(hu, uid)):
            rel = f"{site}/s{i}/{k}.dcm"
            (root / "archive" / site / f"s{i}").mkdir(parents=True, exist_ok=True)
            ds.save_as(root / "archive" / rel, enforce_file_format=True)
            rows.append({"path": rel, "site": site, "series_instance_uid": uid})
        series.append((site, uid, sick))
    write_parquet(root / "index" / "instances" / "part-00000.parquet", pa.Table.from_pylist(rows))
    lines = ["series_instance_uid,site,pneumonia"]
    lines += [f"{uid},{site},{'yes' if sick else 'no'}" for site, uid, sick in series]
    lines.append("1.2.999,H01,no")  # audited but not indexed: left out, counted
    (root / "audit.csv").write_text("\n".join(lines) + "\n")
    return series


def test_select_train_is_deterministic_and_separates_the_audit_list(tmp_path: Path) -> None:
    series = tiny_archive(tmp_path)
    outs = [tmp_path / "a" / "selector.json", tmp_path / "b" / "selector.json"]
    for out in outs:
        select_train.run(
            tmp_path / "index", tmp_path / "archive", tmp_path / "audit.csv", out, PARAMS
        )
    data = [o.read_bytes() for o in outs]
    assert data[0] == data[1]
    assert hashlib.sha256(data[0]).digest() == hashlib.sha256(data[1]).digest()
    model, version = read_model(outs[0])
    assert version.startswith("sha256:")
    assert model.n_fit == 4
    assert model.n_positive == 2
    assert json.loads(data[0])["features"] == list(FEATURES)

    # scoring the same series with the fitted model calls the audited labels back
    results = [
        select_train.score_all(
            [
                select_train.ScoreTask(
                    site,
                    uid,
                    tuple(
                        str(p)
                        for p in sorted((tmp_path / "archive" / site).rglob("*.dcm"))
                        if p.parent.name == f"s{i}"
                    ),
                    None,
                )
            ],
            1,
        )[0]
        for i, (site, uid, _) in enumerate(series)
    ]
    probs = model.predict_proba(np.asarray([r.features for r in results]))
    assert [bool(p >= model.threshold) for p in probs] == [sick for _, _, sick in series]


def test_select_train_writes_its_validation_report(tmp_path: Path) -> None:
    tiny_archive(tmp_path)
    args = (tmp_path / "index", tmp_path / "archive", tmp_path / "audit.csv")
    reports = [tmp_path / "a" / "validation.json", tmp_path / "b" / "validation.json"]
    for i, report in enumerate(reports):
        select_train.run(*args, tmp_path / f"m{i}.json", PARAMS, validation=report)
    data = reports[0].read_bytes()
    assert reports[1].read_bytes() == data  # same audit list, same bytes
    assert (tmp_path / "m0.json").read_bytes() == (tmp_path / "m1.json").read_bytes()
    report = json.loads(data)
    _, version = read_model(tmp_path / "m0.json")
    assert report["selector"] == version
    assert (report["series"], report["pneumonia"]) == (4, 2)  # the unindexed row left out
    cv = report["cross_validation"]
    assert cv["folds"] == 2
    assert cv["series"] == 4
    assert cv["precision"] == cv["recall"] == 1.0  # ground glass against none
    assert report["leave_one_site_out"] is None  # one site
    # a report that would overwrite the model is refused before anything is written
    with pytest.raises(InputError, match="must be other files"):
        select_train.run(*args, tmp_path / "m2.json", PARAMS, validation=tmp_path / "m2.json")
    with pytest.raises(InputError, match="must be other files"):
        select_train.run(
            *args, tmp_path / "m2.json", PARAMS, validation=tmp_path / "v.json",
            review=tmp_path / "v.json",
        )  # fmt: skip
    assert not (tmp_path / "m2.json").exists()
    assert not (tmp_path / "v.json").exists()

    # the review list: every audited series with features, largest disagreement first
    review = tmp_path / "review.csv"
    select_train.run(*args, tmp_path / "m3.json", PARAMS, review=review)
    lines = review.read_text().splitlines()
    assert lines[0] == ",".join(REVIEW_COLUMNS)
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 4  # the unindexed series has no features: not listed
    misses = [abs((r[2] == "yes") - float(r[3])) for r in rows]
    assert misses == sorted(misses, reverse=True)
    assert all(r[4] == "" for r in rows)  # one site: nothing held out by site
    assert all(r[5] == "no" for r in rows)


@pytest.mark.slow
def test_select_train_gives_the_same_model_on_a_pool_and_on_dask(tmp_path: Path) -> None:
    from distributed import LocalCluster

    tiny_archive(tmp_path)
    args = (tmp_path / "index", tmp_path / "archive", tmp_path / "audit.csv")
    select_train.run(*args, tmp_path / "one.json", PARAMS)
    select_train.run(*args, tmp_path / "pool.json", SelectParams(workers=2))
    with LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as cluster:
        select_train.run(*args, tmp_path / "dask.json", PARAMS, cluster.scheduler_address)
    one = (tmp_path / "one.json").read_bytes()
    assert json.loads(one)["n_fit"] == 4
    assert (tmp_path / "pool.json").read_bytes() == one
    assert (tmp_path / "dask.json").read_bytes() == one


def test_select_train_fails_when_nothing_can_be_measured(tmp_path: Path) -> None:
    tiny_archive(tmp_path)
    (tmp_path / "other.csv").write_text("series_instance_uid,site,pneumonia\n1.2.999,H01,no\n")
    with pytest.raises(InputError, match=r"other\.csv: none of the 1 audited series"):
        select_train.run(
            tmp_path / "index",
            tmp_path / "archive",
            tmp_path / "other.csv",
            tmp_path / "m.json",
            PARAMS,
        )
    assert not (tmp_path / "m.json").exists()
    with pytest.raises(InputError, match=r"nowhere: archive folder not found"):
        select_train.run(
            tmp_path / "index",
            tmp_path / "nowhere",
            tmp_path / "audit.csv",
            tmp_path / "m.json",
            PARAMS,
        )


# --- the scorer's columns, report and audit sample in select -------------------------------


def rule_selection() -> pa.Table:
    rows = []
    for i in range(6):
        day = dt.date(2019, 12, 31) if i % 2 else dt.date(2020, 1, 1)
        era = "pre_pandemic" if i % 2 else "pandemic"
        rows.append(
            {
                "series_instance_uid": f"1.2.{i}",
                "site": "H01",
                "study_instance_uid": f"9.{i}",
                "patient_id": f"P{i}",
                "study_date": day,
                "rule_reason": "localizer" if i == 5 else None,
                "era": era,
                "selected": i != 5,
                "cohort": None if i == 5 else select.COHORT_OF_ERA[era],
            }
        )
    return pa.Table.from_pylist(rows, schema=select.OUTPUT_SCHEMA)


def test_scores_decide_the_selection_and_are_stored_per_series() -> None:
    table = rule_selection()
    feats = tuple(0.0 for _ in FEATURES)
    results = [ScoreResult("H01", f"1.2.{i}", feats, None) for i in range(4)]
    results.append(ScoreResult("H01", "1.2.4", None, "pixel_data"))
    scores = {
        ("H01", "1.2.0"): 0.9,
        ("H01", "1.2.1"): 0.5,
        ("H01", "1.2.2"): 0.2,
        ("H01", "1.2.3"): 0.49999,
    }
    out = select.apply_scores(table, results, scores, 0.5, "sha256:abc")
    assert out.schema == select.SCORED_SCHEMA
    rows = {r["series_instance_uid"]: r for r in out.to_pylist()}
    assert rows["1.2.0"]["selected"]
    assert rows["1.2.0"]["cohort"] == "covid_candidate"
    assert rows["1.2.1"]["selected"]
    assert rows["1.2.1"]["cohort"] == "non_covid"
    assert not rows["1.2.2"]["selected"]
    assert rows["1.2.2"]["cohort"] is None
    assert rows["1.2.2"]["pneumonia"] is False
    assert rows["1.2.2"]["pneumonia_score"] == 0.2
    assert not rows["1.2.3"]["selected"]
    assert rows["1.2.4"]["score_error"] == "pixel_data"
    assert not rows["1.2.4"]["selected"]
    assert rows["1.2.5"]["selector_version"] is None  # rule-rejected: never scored
    assert {r["threshold"] for r in out.to_pylist() if r["rule_reason"] is None} == {0.5}

    report = select.summarize(out)
    assert report["series_seen"] == report["series_selected"] + report["series_rejected"]
    assert report["scorer"]["pneumonia"] == 2
    assert report["scorer"]["not_pneumonia"] == 2
    assert report["scorer"]["errors"] == {"pixel_data": 1}
    assert report["cohorts"] == {"covid_candidate": 1, "non_covid": 1}

    a = select.audit_sample(out, 1, np.random.default_rng(3))
    b = select.audit_sample(out, 1, np.random.default_rng(3))
    assert a == b
    lines = a.decode().splitlines()
    assert lines[0].startswith("decision,site,series_instance_uid")
    assert [line.split(",")[0] for line in lines[1:]] == ["rejected", "selected"]
    assert len(select.audit_sample(out, 10, np.random.default_rng(3)).decode().splitlines()) == 5


def test_without_a_model_the_rules_alone_select() -> None:
    out = select.apply_scores(rule_selection(), [], {}, None, None)
    assert out.column("selected").to_pylist() == [True] * 5 + [False]
    assert set(out.column("pneumonia_score").to_pylist()) == {None}
    assert select.summarize(out)["scorer"] is None


def test_lung_mask_audit_means() -> None:
    res = [
        ScoreResult("H01", "1", None, None, 0.9, 0.95, 0.1, 0.8),
        ScoreResult("H01", "2", None, None, 0.8, 0.75, 0.2, 0.4),
        ScoreResult("H01", "3", None, None),
    ]
    lm_audit = audit.lung_mask_audit(res)
    assert lm_audit["series"] == 2
    assert lm_audit["dice_threshold"] == pytest.approx(0.85)
    assert lm_audit["dice_robust"] == pytest.approx(0.85)
    assert lm_audit["consolidation_kept_robust"] == pytest.approx(0.6)
    assert lm_audit["robust_better"] == 1


def test_select_run_needs_model_and_archive_together(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--model and --archive go together"):
        select.run(
            tmp_path / "index",
            select_train_rules(),
            tmp_path / "out",
            None,
            PARAMS,
            archive=tmp_path / "archive",
        )


def select_train_rules() -> Path:
    return Path(__file__).resolve().parents[1] / "stages" / "select"


def test_select_refuses_a_selector_of_another_working_grid(tmp_path: Path) -> None:
    from ctcurate.selection.pneumonia import fit_selector, model_bytes

    x = np.random.default_rng(0).normal(size=(6, len(FEATURES)))
    model = fit_selector(x, [0, 1, 0, 1, 0, 1], l2=0.1, threshold=0.5, working_spacing_mm=1.5)
    path = tmp_path / "selector.json"
    path.write_bytes(model_bytes(model))
    assert read_model(path)[0].working_spacing_mm == 1.5
    with pytest.raises(InputError, match=r"selector\.json: selector fitted on a 1\.5 mm working"):
        select.run(
            tmp_path / "index",
            select_train_rules(),
            tmp_path / "out",
            None,
            PARAMS,
            archive=tmp_path / "archive",
            model=path,
        )
    assert not (tmp_path / "out").exists()


def test_select_train_scores_on_the_params_working_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audited series are measured on ``select.working_spacing_mm``, the grid the model
    file records, and with no lung-volume bar (an earlier version passed the spacing where
    the bar goes, and measured every model's features on the default grid)."""
    tiny_archive(tmp_path)
    seen: list[select_train.ScoreTask] = []
    real = select_train.score_all

    def spy(tasks: list[select_train.ScoreTask], *args: object, **kw: object) -> object:
        seen.extend(tasks)
        return real(tasks, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(select_train, "score_all", spy)
    params = SelectParams(workers=1, working_spacing_mm=3.0)
    out = tmp_path / "selector.json"
    select_train.run(tmp_path / "index", tmp_path / "archive", tmp_path / "audit.csv", out, params)
    assert len(seen) == 4
    assert {t.working_spacing_mm for t in seen} == {3.0}
    assert {t.min_lung_ml for t in seen} == {0.0}
    assert read_model(out)[0].working_spacing_mm == 3.0
