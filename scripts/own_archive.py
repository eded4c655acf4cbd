"""Point the pipeline at your own archive: the edit of README's "A real archive", done for you.

usage: .venv/bin/python scripts/own_archive.py --archive DIR --annotations DIR \
           --audit-list CSV [--project DIR]

Rewrites ``dvc.yaml`` of the project (default: the current folder) in place:

- ``vars``: ``archive``, ``annotations`` and ``audit_list`` name your folders and file;
- the demo-only stages ``synth`` (the built-in synthetic archive) and ``select_audit`` (an
  audit list drawn from the synthetic truth) are removed;
- ``snapshot`` no longer waits for ``data/synth/truth.parquet``, and ``select`` no longer
  audits against the synthetic truth (``--seg``, ``--truth`` and their deps).

Nothing else changes; comments stay. The paths are written as given (relative ones are
relative to the project, as DVC reads them); they must exist. Run again on a pipeline it
already edited, it only points the ``vars`` at the new paths (an archive that moved). A
``dvc.yaml`` that is neither (edited by hand half-way) is refused, naming what is missing,
and left as it is. Then ``dvc repro``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from ctcurate.io.atomic import write_bytes

DEMO_STAGES = ("synth", "select_audit")
DEMO_VARS = {
    "archive": "data/synth/archive",
    "annotations": "data/synth/annotations",
    "audit_list": "data/select_audit/audit_list.csv",
}
#: Exact pieces of the demo's dvc.yaml this script removes (each must be there once).
DEMO_PIECES = (
    "      - data/synth/truth.parquet   # orders it after synth in the demo\n",
    "\n      --seg ${annotations}/seg --truth data/synth/truth.parquet --out data/select",
    "      - ${annotations}/seg\n      - data/synth/truth.parquet\n",
)
REPLACEMENTS = ("", "\n      --out data/select", "")
_STAGE = re.compile(r"^  ([A-Za-z_][\w-]*):\s*$")


class ScriptError(Exception):
    """A one-line reason the edit was refused."""


def _drop_stages(text: str, names: tuple[str, ...]) -> str:
    lines = text.splitlines(keepends=True)
    kept: list[str] = []
    dropping = False
    found: set[str] = set()
    for line in lines:
        match = _STAGE.match(line)
        if match:
            dropping = match.group(1) in names
            if dropping:
                found.add(match.group(1))
        elif dropping and line.strip() and not line.startswith("    "):
            dropping = False  # a top-level key after the stages
        if not dropping:
            kept.append(line)
    missing = [n for n in names if n not in found]
    if missing:
        msg = f"no stage {', '.join(missing)} in dvc.yaml: not the demo's pipeline"
        raise ScriptError(msg)
    return "".join(kept)


def _yaml_scalar(value: str) -> str:
    """``value`` as a YAML scalar that reads back as the same string."""
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return dumped.removesuffix("\n...").strip()


def _converted(text: str) -> bool:
    """Whether ``text`` is a pipeline this script already pointed elsewhere: the demo's
    stages and truth options gone, the three ``vars`` still there."""
    data = yaml.safe_load(text)
    stages = data.get("stages", {}) if isinstance(data, dict) else {}
    variables = data.get("vars") if isinstance(data, dict) else None
    keys = set().union(*(v for v in variables if isinstance(v, dict))) if variables else set()
    return (
        not any(name in stages for name in DEMO_STAGES)
        and not any(piece in text for piece in DEMO_PIECES)
        and set(DEMO_VARS) <= keys
    )


def _set_vars(text: str, new: dict[str, str], demo_only: bool) -> str:
    for key, demo in DEMO_VARS.items():
        value = re.escape(demo) if demo_only else r"\S.*?"
        pattern = re.compile(rf"^(\s+-?\s*{key}: ){value}\s*$", re.MULTILINE)
        if len(pattern.findall(text)) != 1:
            want = f"'{key}: {demo}'" if demo_only else f"'{key}:'"
            msg = f"dvc.yaml: vars {want} not found once: not the demo's pipeline"
            raise ScriptError(msg)
        text = pattern.sub(lambda m, key=key: m.group(1) + _yaml_scalar(new[key]), text)
    return text


def rewrite(text: str, archive: str, annotations: str, audit_list: str) -> str:
    """The demo's ``dvc.yaml`` text pointed at an archive of one's own (one this script
    already pointed elsewhere: only its ``vars`` change)."""
    new = {"archive": archive, "annotations": annotations, "audit_list": audit_list}
    if _converted(text):
        return _set_vars(text, new, demo_only=False)
    text = _set_vars(text, new, demo_only=True)
    for piece, replacement in zip(DEMO_PIECES, REPLACEMENTS, strict=True):
        if text.count(piece) != 1:
            first = piece.strip().splitlines()[0]
            msg = f"dvc.yaml: '{first}' not found once: not the demo's pipeline"
            raise ScriptError(msg)
        text = text.replace(piece, replacement)
    text = _drop_stages(text, DEMO_STAGES)
    stages = yaml.safe_load(text)["stages"]
    left = [name for name, stage in stages.items() if "data/synth" in yaml.safe_dump(stage)]
    if left:
        msg = f"dvc.yaml: stage(s) {', '.join(left)} still read data/synth"
        raise ScriptError(msg)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--audit-list", required=True)
    parser.add_argument("--project", type=Path, default=Path())
    args = parser.parse_args(argv)
    path = args.project / "dvc.yaml"
    try:
        for name, value, want_dir in (
            ("--archive", args.archive, True),
            ("--annotations", args.annotations, True),
            ("--audit-list", args.audit_list, False),
        ):
            if any(ch.isspace() for ch in value):
                msg = (
                    f"{name} {value!r}: whitespace in a path (DVC pastes it into commands unquoted)"
                )
                raise ScriptError(msg)
            target = args.project / value
            if not (target.is_dir() if want_dir else target.is_file()):
                kind = "folder" if want_dir else "file"
                msg = f"{name} {value}: no such {kind} (relative paths start at the project)"
                raise ScriptError(msg)
        if not path.is_file():
            msg = f"{path}: no dvc.yaml here (--project names the repository root)"
            raise ScriptError(msg)
        text = rewrite(
            path.read_text(encoding="utf-8"), args.archive, args.annotations, args.audit_list
        )
    except ScriptError as exc:
        sys.stderr.write(f"error: {exc}; nothing changed\n")
        return 2
    write_bytes(path, text.encode("utf-8"))
    sys.stdout.write(
        f"{path}: archive, annotations and audit_list set; stages {', '.join(DEMO_STAGES)} "
        "removed; run `dvc repro`\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
