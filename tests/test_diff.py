"""ctcurate diff on hand-made manifests: the pure comparison and its Markdown."""

from __future__ import annotations

from typing import Any

from ctcurate.release.diff import MARKDOWN_MAX_CASES, diff_manifests, render_markdown


def _case(cid: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "case_id": cid,
        "split": "train",
        "site": "H01",
        "cohort": "covid",
        "typical": 1,
        "consensus_grade": 1,
        "pcr": "positive",
        "exclusion": None,
        "spacing_mm": [4.0, 4.0, 4.0],
        "shard": "shard-00000.h5",
        "shape": [4, 4, 4],
        "sha256": f"h-{cid}",
    }
    return base | overrides


def _manifest(release_id: str, cases: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"release_id": release_id, "cases": cases, "params": {"shape": [4, 4, 4]}} | extra


def test_voxels_and_other_attributes_are_told_apart_from_labels() -> None:
    old = _manifest("a", [_case("c1"), _case("c2"), _case("c3")])
    new = _manifest(
        "b",
        [
            _case("c1", sha256="other", shard="shard-00001.h5"),  # voxels only
            _case("c2", spacing_mm=[2.0, 2.0, 2.0], sha256="x"),  # an attribute
            _case("c3", shard="shard-00001.h5"),  # moved shard only: not a change
        ],
        params={"shape": [8, 8, 8]},
    )
    diff = diff_manifests(old, new)
    assert diff["changed"] == [
        {"case_id": "c1", "fields": ["voxels"]},
        {"case_id": "c2", "fields": ["spacing_mm"]},
    ]
    assert diff["relabelled"] == []
    assert diff["moved"] == []
    assert diff["params"] == {"shape": {"old": [4, 4, 4], "new": [8, 8, 8]}}
    assert diff["rules_recorded"] is False


def test_markdown_lists_at_most_the_cap_and_points_to_json() -> None:
    n = MARKDOWN_MAX_CASES + 7
    old = _manifest("a", [])
    new = _manifest("b", [_case(f"c{i:03d}") for i in range(n)])
    text = render_markdown(diff_manifests(old, new))
    assert f"0 → {n} cases: {n} added" in text
    assert "| c049 | train | H01 | covid | 1 |" in text
    assert "c050" not in text
    assert "… and 7 more (`--format json` lists all)" in text
    assert f"| site | H01 | 0 | {n} | +{n} |" in text
    assert "Rule files: not recorded" in text
