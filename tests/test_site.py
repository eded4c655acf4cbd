"""The site of a file from the declared layout rule ``index.site_from``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.index import run_index, table, write_series
from helpers.realdata import TCIA

from ctcurate.catalog.site import site_of
from ctcurate.errors import ParamsError
from ctcurate.params import IndexParams, SiteRule, load_section
from ctcurate.pipeline.snapshot import list_archive

TCIA_REGEX = r"manifest-[0-9]+/(?P<site>[^/]+)/"
PATH = (
    "manifest-1675442780019/Lung-PET-CT-Dx/Lung_Dx-A0001/04-04-2007-NA-Chest-07990/2-5mm/1-01.dcm"
)


@pytest.mark.parametrize(
    ("rule", "path", "site"),
    [
        (SiteRule(path_component=0), "H01/study/series/a.dcm", "H01"),
        (SiteRule(path_component=0), "a.dcm", None),  # a file at the archive root
        (SiteRule(path_component=0), PATH, "manifest-1675442780019"),
        (SiteRule(path_component=1), PATH, "Lung-PET-CT-Dx"),
        (SiteRule(path_component=-4), PATH, "Lung-PET-CT-Dx"),
        (SiteRule(path_component=-1), PATH, "2-5mm"),
        (SiteRule(path_component=5), PATH, None),  # the file name is no folder
        (SiteRule(path_component=-5), PATH, "manifest-1675442780019"),
        (SiteRule(path_component=-6), PATH, None),
        (SiteRule(path_regex=TCIA_REGEX), PATH, "Lung-PET-CT-Dx"),
        (SiteRule(path_regex=TCIA_REGEX), "H01/a.dcm", None),
        (SiteRule(path_regex=r"^(?P<site>[A-Z]+)[0-9]*/"), "HOSP12/x/a.dcm", "HOSP"),
        (SiteRule(path_regex=r"^(?P<site>[0-9]*)x/"), "x/a.dcm", None),  # empty group
    ],
)
def test_site_of_follows_the_rule(rule: SiteRule, path: str, site: str | None) -> None:
    assert site_of(path, rule) == site


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("index:\n  site_from: {}\n", "exactly one of path_component, path_regex"),
        (
            "index:\n  site_from: {path_component: 0, path_regex: '(?P<site>x)'}\n",
            "exactly one",
        ),
        ("index:\n  site_from: {path_regex: '([a-z]+)/'}\n", r"named group \(\?P<site>"),
        ("index:\n  site_from: {path_regex: '(?P<site>['}\n", "does not compile"),
        ("index:\n  site_from: {tag: InstitutionName}\n", r"index\.site_from\.tag"),
    ],
)
def test_bad_site_rule_is_named(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=match):
        load_section(path, "index", IndexParams)


def test_index_takes_the_site_from_the_rule(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_series(archive / "manifest-123" / "COLL" / "P01", site="study_root", n=3)
    out = tmp_path / "out"
    run_index(archive, out)
    assert {r["site"] for r in table(out, "instances")} == {"manifest-123"}
    report = run_index(archive, out, site_from={"path_component": -5})
    assert report["files_indexed"] == 3
    rows = table(out, "instances")
    assert {r["site"] for r in rows} == {"COLL"}  # read again: the rule is part of the reader
    assert all("no_site" not in r["flags"] for r in rows)
    (series,) = table(out, "series")
    assert series["site"] == "COLL"
    run_index(archive, out, site_from={"path_regex": r"^(?P<site>[a-z]+)-"})
    assert {r["site"] for r in table(out, "instances")} == {"manifest"}
    run_index(archive, out, site_from={"path_component": 9})
    rows = table(out, "instances")
    assert {r["site"] for r in rows} == {None}
    assert all("no_site" in r["flags"] for r in rows)


def test_real_tcia_layout_gives_the_collection_as_site() -> None:
    """The real TCIA download (skipped where ../shared/realct is absent)."""
    root = TCIA / "Lung-PET-CT-Dx"
    if not root.is_dir():
        pytest.skip("../shared/realct is absent")
    paths = [p for p in list_archive(root).column("path").to_pylist() if p.endswith(".dcm")]
    assert len(paths) == 188
    first = {site_of(p, SiteRule(path_component=0)) for p in paths}
    assert first == {"manifest-1675442780019"}  # the first folder is no site here
    for rule in (SiteRule(path_component=-4), SiteRule(path_regex=TCIA_REGEX)):
        assert {site_of(p, rule) for p in paths} == {"Lung-PET-CT-Dx"}


@pytest.mark.parametrize(
    "rule",
    [
        {"path_component": 0},
        {"path_component": 1},
        {"path_component": 3},
        {"path_component": -1},
        {"path_component": -2},
        {"path_component": -4},
        {"path_regex": r"^[^/]+/(?P<site>[^/]+)/"},
        {"path_regex": r"(?P<site>Lung[^/]*)"},
    ],
)
def test_site_sql_agrees_with_site_of(rule: dict[str, object]) -> None:
    import duckdb

    from ctcurate.catalog.site import site_sql

    parsed = SiteRule.model_validate(rule)
    paths = ["a.dcm", "H01/a.dcm", "H01/x/a.dcm", "m-1/Lung-X/p/s/a.dcm", "m-1//a.dcm", "a/b/c/d/e"]
    con = duckdb.connect()
    got = []
    for path in sorted(paths):
        row = con.execute(f"SELECT {site_sql(parsed)} FROM (SELECT ? AS path)", [path]).fetchone()
        got.append((path, None if row is None else row[0]))
    assert got == [(p, site_of(p, parsed)) for p in sorted(paths)]
