"""``ctcurate diff OLD NEW``: what changed between two releases, for a reviewer.

Both folders are read through their ``manifest.json`` only (no shard is opened): cases
added, removed (with the reason the new release gives for leaving one out), relabelled
(which label fields), moved between splits, or otherwise changed (other attributes, or
the voxels alone when only the case hash moved); case counts per cohort, site, split and
label before and after; the excluded cases per reason; the pack params and the rule files
recorded at pack time. :func:`diff_manifests` is pure; :func:`render_markdown` formats its
result for a pull-request comment; :func:`run` reads the two folders.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ctcurate.io.atomic import dumps_json
from ctcurate.release.format import MANIFEST_ONLY, read_manifest

#: Case attributes that are labels: a change in one of them is a relabelling.
LABEL_FIELDS = ("typical", "consensus_grade", "pcr", "cohort", "exclusion")
#: Case attributes counted before → after.
COUNTED = (("cohort", "cohort"), ("site", "site"), ("split", "split"), ("typical", "typical"))
#: Cases listed per section of the Markdown report (the JSON report lists all).
MARKDOWN_MAX_CASES = 50

Format = Literal["markdown", "json"]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b": leaf}`` (lists stay leaves)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(_flatten(value[key], f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: {"old": a, "new": b}}`` for every key whose value differs (None = absent)."""
    return {
        key: {"old": old.get(key), "new": new.get(key)}
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    }


def _count(cases: Sequence[Mapping[str, Any]], key: str) -> dict[str, int]:
    return dict(
        sorted(Counter("none" if c.get(key) is None else str(c.get(key)) for c in cases).items())
    )


def _before_after(old: Mapping[str, int], new: Mapping[str, int]) -> dict[str, list[int]]:
    return {k: [int(old.get(k, 0)), int(new.get(k, 0))] for k in sorted(set(old) | set(new))}


def _summary(case: Mapping[str, Any]) -> dict[str, Any]:
    return {k: case.get(k) for k in ("case_id", "split", "site", "cohort", "typical")}


def diff_manifests(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The differences between two release manifests (see the module docstring).

    Every list is sorted by case id; the result is plain JSON data.
    """
    old_cases = {str(c["case_id"]): c for c in old.get("cases", [])}
    new_cases = {str(c["case_id"]): c for c in new.get("cases", [])}
    excluded_now = {str(e["case_id"]): str(e["reason"]) for e in new.get("excluded", [])}

    added = [_summary(new_cases[c]) for c in sorted(set(new_cases) - set(old_cases))]
    removed = [
        {**_summary(old_cases[c]), "reason": excluded_now.get(c, "not in the cases table")}
        for c in sorted(set(old_cases) - set(new_cases))
    ]
    relabelled, moved, changed = [], [], []
    for cid in sorted(set(old_cases) & set(new_cases)):
        a, b = old_cases[cid], new_cases[cid]
        labels = {k: v for k, v in _changes(a, b).items() if k in LABEL_FIELDS}
        if labels:
            relabelled.append({"case_id": cid, "fields": labels})
        if a.get("split") != b.get("split"):
            moved.append({"case_id": cid, "old": a.get("split"), "new": b.get("split")})
        skip = {*LABEL_FIELDS, "split", *MANIFEST_ONLY}
        others = sorted(k for k in _changes(a, b) if k not in skip)
        if (
            not others
            and not labels
            and a.get("split") == b.get("split")
            and a.get("sha256") != b.get("sha256")
        ):
            others = ["voxels"]
        if others:
            changed.append({"case_id": cid, "fields": others})

    old_list, new_list = list(old_cases.values()), list(new_cases.values())
    rules_recorded = "rules" in old and "rules" in new
    return {
        "old_release_id": old.get("release_id"),
        "new_release_id": new.get("release_id"),
        "cases": [len(old_cases), len(new_cases)],
        "added": added,
        "removed": removed,
        "relabelled": relabelled,
        "moved": moved,
        "changed": changed,
        "counts": {
            name: _before_after(_count(old_list, key), _count(new_list, key))
            for name, key in COUNTED
        },
        "excluded_reasons": _before_after(
            Counter(str(e["reason"]) for e in old.get("excluded", [])),
            Counter(str(e["reason"]) for e in new.get("excluded", [])),
        ),
        "params": _changes(_flatten(old.get("params", {})), _flatten(new.get("params", {}))),
        "rules_recorded": rules_recorded,
        "rules": _changes(old.get("rules", {}), new.get("rules", {})) if rules_recorded else {},
        "code_version": _changes(
            {"code_version": old.get("code_version")}, {"code_version": new.get("code_version")}
        ),
    }


# --------------------------------------------------------------------------- Markdown


def _cell(value: Any) -> str:
    text = "—" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], total: int) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows),
    ]
    if total > len(rows):
        lines.append(f"\n… and {total - len(rows)} more (`--format json` lists all)")
    return lines


def _short(release_id: Any) -> str:
    return "—" if release_id is None else f"`{str(release_id)[:16]}`"


def render_markdown(diff: Mapping[str, Any]) -> str:
    """The diff as Markdown (a heading, a summary line, then one section per kind)."""
    n_old, n_new = diff["cases"]
    out = [
        f"## Release diff {_short(diff['old_release_id'])} → {_short(diff['new_release_id'])}",
        "",
        f"{n_old} → {n_new} cases: {len(diff['added'])} added, {len(diff['removed'])} removed, "
        f"{len(diff['relabelled'])} relabelled, {len(diff['moved'])} moved between splits, "
        f"{len(diff['changed'])} otherwise changed.",
    ]
    if diff["old_release_id"] == diff["new_release_id"]:
        out += ["", "The releases are identical."]
        return "\n".join(out) + "\n"

    def section(title: str, header: Sequence[str], rows: list[list[Any]]) -> None:
        if rows:
            shown = rows[:MARKDOWN_MAX_CASES]
            out.extend(["", f"### {title}", "", *_table(header, shown, len(rows))])

    case_header = ["case", "split", "site", "cohort", "typical"]
    keys = ("case_id", "split", "site", "cohort", "typical")
    section("Added", case_header, [[c[k] for k in keys] for c in diff["added"]])
    section(
        "Removed",
        [*case_header, "reason"],
        [[*(c[k] for k in keys), c["reason"]] for c in diff["removed"]],
    )
    section(
        "Relabelled",
        ["case", "field", "old", "new"],
        [
            [r["case_id"], field, change["old"], change["new"]]
            for r in diff["relabelled"]
            for field, change in r["fields"].items()
        ],
    )
    section(
        "Moved between splits",
        ["case", "old", "new"],
        [[m["case_id"], m["old"], m["new"]] for m in diff["moved"]],
    )
    section(
        "Otherwise changed",
        ["case", "fields"],
        [[c["case_id"], ", ".join(c["fields"])] for c in diff["changed"]],
    )

    out += ["", "### Counts", ""]
    rows = [
        [name, value, before, after, f"{after - before:+d}"]
        for name, counts in diff["counts"].items()
        for value, (before, after) in counts.items()
        if before != after
    ]
    rows += [
        ["excluded", reason, before, after, f"{after - before:+d}"]
        for reason, (before, after) in diff["excluded_reasons"].items()
        if before != after
    ]
    out += _table(["by", "value", "old", "new", "Δ"], rows, len(rows)) if rows else ["No change."]

    out += ["", "### Params and rules", ""]
    changes = [["param", f"pack.{k}", v["old"], v["new"]] for k, v in diff["params"].items()]
    changes += [
        ["rule file", k, (v["old"] or "")[:12] or None, (v["new"] or "")[:12] or None]
        for k, v in diff["rules"].items()
    ]
    changes += [["code", k, v["old"], v["new"]] for k, v in diff["code_version"].items()]
    if changes:
        out += _table(["kind", "name", "old", "new"], changes, len(changes))
    else:
        out.append("No change to the pack params or the rule files.")
    if not diff["rules_recorded"]:
        out += ["", "Rule files: not recorded in both manifests (packed without `--rules`)."]
    return "\n".join(out) + "\n"


def run(old: Path, new: Path, fmt: Format = "markdown") -> str:
    """The diff of the releases in folders ``old`` and ``new`` as Markdown or JSON text.

    Raises
    ------
    InputError, VerifyError
        When a folder holds no readable release manifest.
    """
    diff = diff_manifests(read_manifest(Path(old)), read_manifest(Path(new)))
    return dumps_json(diff) if fmt == "json" else render_markdown(diff)
