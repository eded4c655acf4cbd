"""Body region from the headers: the vocabulary, its matching, select's use, real headers."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Any

import pydicom
import pytest
from helpers.chest import chest as phantom_chest
from helpers.chest import ct_slices
from helpers.realdata import TCIA
from helpers.select import (
    PARAMS,
    REGIONS,
    RULES_DIR,
    chest,
    instances_table,
    series_table,
    write_index,
)

from ctcurate.dicom import header as dicom
from ctcurate.dicom import record
from ctcurate.errors import InputError
from ctcurate.pipeline import select
from ctcurate.selection import region, rules
from ctcurate.selection.pneumonia import ScoreTask, score_series

HEADERS = REGIONS.headers


def headers(**values: str | None) -> list[str | None]:
    """Header values in vocabulary order (keywords as keys; missing: absent)."""
    return [values.get(h) for h in HEADERS]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("CHEST", ["chest"]),
        ("2 Chest C-/Thorax", ["chest"]),
        ("CT_CHEST_WO", ["chest"]),
        ("Thorax 1.0 B70f", ["chest"]),
        ("ThoraxRoutine  8.0.0  B70f", ["chest"]),
        ("AThoraxRoutine", ["chest"]),
        ("thoracic", ["chest"]),
        ("Lunge", ["chest"]),  # German
        ("Tórax", ["chest"]),  # Spanish, accent
        ("TORACE", ["chest"]),  # Italian
        ("poumons", ["chest"]),  # French
        ("Longen", ["chest"]),  # Dutch
        ("PŁUCA", ["chest"]),  # Polish
        ("胸部単純CT", ["chest"]),  # Japanese
        ("肺 CT", ["chest"]),
        ("胸腹部", ["chest", "abdomen"]),
        ("흉부", ["chest"]),  # Korean
        ("CHESTER", []),
        ("Chester", []),
        ("ribbon", []),
        ("ribs", ["chest"]),
        ("Lungs", ["chest"]),
        ("HEAD", ["head"]),
        ("CT Kopf nativ", ["head"]),
        ("Schädel", ["head"]),
        ("头颅平扫", ["head"]),
        ("Abd/Pelvis", ["abdomen", "pelvis"]),
        ("KNEE", ["extremity"]),
        ("headless", []),  # whole words only
        ("5mm", []),
        ("", []),
        (None, []),
    ],
)
def test_terms_match_whole_words_in_many_languages(text: str | None, names: list[str]) -> None:
    assert REGIONS.regions_named(text) == names


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # the TCIA Philips series: BodyPartExamined empty, the study names the chest
        (
            headers(
                StudyDescription="Chest", ProtocolName="2 Chest C-/Thorax", SeriesDescription="5mm"
            ),
            ("chest", "StudyDescription"),
        ),
        (
            headers(BodyPartExamined="CHEST", StudyDescription="Thorax"),
            ("chest", "BodyPartExamined"),
        ),
        # a header naming the chest wins over one naming another region
        (
            headers(BodyPartExamined="ABDOMEN", SeriesDescription="Lung 1.0"),
            ("chest", "SeriesDescription"),
        ),
        (headers(BodyPartExamined="HEAD", StudyDescription="CT"), ("head", "BodyPartExamined")),
        (
            headers(AnatomicRegionSequence="Chest", SeriesDescription="Brain"),
            ("chest", "AnatomicRegionSequence"),
        ),
        (
            headers(ProtocolName="Routine", SeriesDescription="Brain 5mm"),
            ("head", "SeriesDescription"),
        ),
        (
            headers(RequestedProcedureDescription="CT ABDOMEN PELVIS"),
            ("abdomen", "RequestedProcedureDescription"),
        ),
        (headers(SeriesDescription="5mm", StudyDescription="CHESTER"), ("unknown", None)),
        (headers(), ("unknown", None)),
    ],
)
def test_classify_records_the_deciding_header(
    values: list[str | None], expected: tuple[str, str | None]
) -> None:
    assert REGIONS.classify(values) == expected


def write_vocabulary(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("headers: [BodyPartExamined]\nchest: [chest]\nother: {}\nextra: 1\n", "extra"),
        ("headers: [Kernel]\nchest: [chest]\nother: {}\n", "unknown header.*Kernel"),
        ("headers: [BodyPartExamined]\nchest: []\nother: {}\n", "chest"),
        ("headers: [BodyPartExamined]\nchest: [chest]\nother: {chest: [x]}\n", "not other"),
        ("headers: [BodyPartExamined]\nchest: [chest]\nother: {Head: [x]}\n", "other"),
        ("- just a list\n", "must be a mapping"),
        ("headers: [\n", "unreadable"),
    ],
)
def test_bad_vocabulary_fails_naming_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = write_vocabulary(tmp_path / "body_region.yaml", text)
    with pytest.raises(InputError, match=f"body_region.yaml.*{match}"):
        region.read_vocabulary(path)


def test_missing_vocabulary_fails_the_select_run(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.sql").write_text((RULES_DIR / "rules.sql").read_text())
    with pytest.raises(InputError, match=r"body_region\.yaml: body region vocabulary not found"):
        select.run(tmp_path / "index", rules, tmp_path / "out", None, PARAMS)


def selected(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    con = rules.catalog_from_tables(series_table(rows), instances_table(rows))
    table = rules.apply_rules(con, rules.read_rules(RULES_DIR), PARAMS, REGIONS)
    return {r["series_instance_uid"]: r for r in table.to_pylist()}


def test_select_keeps_chest_and_unknown_and_rejects_other_regions() -> None:
    words = {"body_part_examined": None, "series_description": "5mm"}
    out = selected(
        [
            chest("1.1", "9.1", **words, study_description="Chest"),
            chest("1.2", "9.2", **words),  # no header names a region
            chest("1.3", "9.3", **words, protocol_name="HeadRoutine"),
            chest("1.4", "9.4", **words, study_description="CHESTER"),
        ]
    )
    got = {
        uid: (r["body_region"], r["body_region_source"], r["rule_reason"]) for uid, r in out.items()
    }
    assert got == {
        "1.1": ("chest", "StudyDescription", None),
        "1.2": ("unknown", None, None),
        "1.3": ("head", "ProtocolName", "not_chest"),
        "1.4": ("unknown", None, None),
    }


def test_an_edited_vocabulary_changes_the_verdict(tmp_path: Path) -> None:
    text = (RULES_DIR / region.VOCABULARY_FILE).read_text(encoding="utf-8")
    edited = text.replace("  head:\n", "  head:\n    - routine\n", 1)
    regions = region.read_vocabulary(write_vocabulary(tmp_path / "body_region.yaml", edited))
    values = headers(ProtocolName="Routine")
    assert (REGIONS.classify(values), regions.classify(values)) == (
        ("unknown", None),
        ("head", "ProtocolName"),
    )


# --- real headers (TCIA Lung-PET-CT-Dx; skipped where ../shared/realct is absent) -----------


def real_series() -> dict[str, Path]:
    """The first file of each real series, by patient and series folder."""
    if not TCIA.is_dir():
        pytest.skip("../shared/realct is absent")
    firsts: dict[str, Path] = {}
    for path in sorted(TCIA.rglob("*.dcm")):
        key = f"{path.parts[-4]}/{path.parts[-2].split('-')[0]}"
        firsts.setdefault(key, path)
    return firsts


def test_real_tcia_series_are_chest_by_the_header_that_says_so() -> None:
    found = {}
    for key, path in real_series().items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values = [record.column_value(ds, "text", h)[0] for h in HEADERS]
        found[key] = REGIONS.classify(values)
    assert found == {
        "Lung_Dx-A0001/2.000000": ("chest", "StudyDescription"),
        "Lung_Dx-A0001/3.000000": ("chest", "StudyDescription"),
        "Lung_Dx-A0002/2.000000": ("chest", "BodyPartExamined"),
        "Lung_Dx-A0002/3.000000": ("chest", "BodyPartExamined"),
    }


def test_real_philips_series_passes_the_region_rule() -> None:
    """The series once rejected ``not_chest`` (empty BodyPartExamined) now passes."""
    path = real_series()["Lung_Dx-A0001/2.000000"]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    record = dicom.instance_record(ds, "TCIA/a.dcm", 0, 0, None, [])
    assert (record["body_part_examined"], record["series_description"]) == (None, "5mm")
    words = {
        k: record[k]
        for k in (
            "body_part_examined",
            "study_description",
            "protocol_name",
            "series_description",
            "requested_procedure_description",
        )
    }
    (row,) = selected([chest("1.1", "9.1", **words)]).values()
    assert (row["body_region"], row["body_region_source"], row["rule_reason"]) == (
        "chest",
        "StudyDescription",
        None,
    )


# --- unknown region: the image decides (a minimum lung volume in the scorer) ---------------


def test_unknown_region_survivors_need_lung_in_the_scorer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [
        chest("1.1", "9.1", study_description="Chest"),
        chest("1.2", "9.2", body_part_examined=None, series_description="5mm"),
    ]
    index = write_index(tmp_path / "index", rows)
    con = rules.open_catalog(index / "series.parquet", index / "instances")
    selection = rules.apply_rules(con, rules.read_rules(RULES_DIR), PARAMS, REGIONS)
    seen: dict[str, float] = {}

    def fake_score_all(tasks: list[ScoreTask], *args: Any) -> list[Any]:
        seen.update({t.series_instance_uid: t.min_lung_ml for t in tasks})
        return []

    monkeypatch.setattr(select, "score_all", fake_score_all)
    select._score_survivors(
        selection, index, tmp_path, None, 1, None, 2.0, unknown_min_lung_ml=500.0
    )
    assert seen == {"1.1": 0.0, "1.2": 500.0}


def test_score_series_requires_the_minimum_lung_volume(tmp_path: Path) -> None:
    hu, _ = phantom_chest(nz=6, n=32)
    paths = []
    for i, ds in enumerate(ct_slices(hu, "1.2.3")):
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
        paths.append(str(tmp_path / f"{i}.dcm"))
    task = ScoreTask("H01", "1.2.3", tuple(paths), None)
    assert score_series(task).error is None
    small = score_series(dataclasses.replace(task, min_lung_ml=1e6))
    assert (small.features, small.error) == (None, "no_lung")


@pytest.mark.slow
def test_real_gzipped_chest_series_has_lungs_for_the_scorer(tmp_path: Path) -> None:
    """The real Siemens soft-tissue series (30 slices of 8 mm), gzip-compressed, through the
    scorer's reader: lungs found well above the default minimum."""
    real_series()
    folder = next(TCIA.rglob("3.000000-ThoraxRoutine*"))
    paths = []
    for src in sorted(folder.glob("*.dcm")):
        target = tmp_path / (src.name + ".gz")
        target.write_bytes(gzip.compress(src.read_bytes(), compresslevel=1))
        paths.append(str(target))
    assert len(paths) == 30
    task = ScoreTask(
        "TCIA", "1.2", tuple(paths), None, min_lung_ml=PARAMS.unknown_region_min_lung_ml
    )
    result = score_series(task)
    assert (result.error, result.features is not None) == (None, True)


def test_each_vocabulary_term_is_listed_once_and_names_its_region() -> None:
    import yaml

    data = yaml.safe_load((RULES_DIR / region.VOCABULARY_FILE).read_text(encoding="utf-8"))
    listed = [("chest", t) for t in data["chest"]]
    listed += [(name, t) for name, terms in data["other"].items() for t in terms]
    terms = [region.normalise(t) for _, t in listed]
    assert len(terms) == len(set(terms)), sorted(t for t in terms if terms.count(t) > 1)
    for name, term in listed:
        assert name in REGIONS.regions_named(term.rstrip("*")), (name, term)
