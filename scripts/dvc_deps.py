"""Rewrite the code deps of every dvc.yaml stage from the import walk of its command.

usage: .venv/bin/python scripts/dvc_deps.py   (from the repository root)

Each stage keeps its other deps; its ``src/ctcurate`` deps become exactly the files its
``ctcurate`` command imports (the walk of ``tests/test_dvc_deps.py``, which fails when one is
missing), a package folder listed whole when the command needs every file in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_dvc_deps as walk  # noqa: E402


def code_deps(command: str) -> list[str]:
    """The sorted code deps of ``ctcurate COMMAND``: files, or a folder needed whole."""
    files = sorted(p.relative_to(ROOT).as_posix() for p in walk.command_files(command))
    folders: dict[str, list[str]] = {}
    for name in files:
        folders.setdefault(name.rsplit("/", 1)[0], []).append(name)
    out: list[str] = []
    for folder, names in sorted(folders.items()):
        whole = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob("*.py"))
        if folder != "src/ctcurate" and names == whole and len(names) > 3:
            out.append(folder)
        else:
            out.extend(names)
    return out


def main() -> None:
    path = ROOT / "dvc.yaml"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for stage_name, stage in walk.STAGES.items():
        command = str(stage["cmd"]).split()[1]
        start = lines.index(f"  {stage_name}:\n")
        deps = next(i for i in range(start, len(lines)) if lines[i].strip() == "deps:")
        end = deps + 1
        kept = []
        while end < len(lines) and lines[end].startswith("      - "):
            if not lines[end].strip()[2:].startswith("src/ctcurate"):
                kept.append(lines[end])
            end += 1
        lines[deps + 1 : end] = kept + [f"      - {dep}\n" for dep in code_deps(command)]
    path.write_text("".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
