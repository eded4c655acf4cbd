"""The declared build cannot go stale: every source file a stage's command imports is a dep.

Each ``dvc.yaml`` stage runs one ``ctcurate`` subcommand. The test finds the function of that
subcommand in ``cli.py``, follows every ``ctcurate`` import it makes (at module level and
inside functions, so lazy imports count) through the package, and requires each reached file
to be listed in the stage's ``deps`` — itself or a folder above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from ctcurate.provenance import imported_modules, source_files

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "ctcurate"
STAGES: dict[str, dict[str, object]] = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def command_function(name: str) -> ast.FunctionDef:
    """The ``cli.py`` function registered as the subcommand ``name``."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "command":
                given = deco.args[0].value if deco.args else None  # type: ignore[attr-defined]
                if (given or node.name.replace("_", "-")) == name:
                    return node
    msg = f"no cli.py function for the subcommand {name}"
    raise AssertionError(msg)


def command_files(subcommand: str) -> set[Path]:
    """Every source file the ``ctcurate <subcommand>`` process imports."""
    cli_tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    top_level = [n for n in cli_tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
    start: set[str] = set()
    for node in top_level:
        start |= imported_modules(node, "ctcurate.cli")
    start |= imported_modules(command_function(subcommand), "ctcurate.cli")
    # cli.py itself, but only what this subcommand's function imports from it
    start.discard("ctcurate.cli")
    return set(source_files(start)) | {PACKAGE / "cli.py"}


def declared(stage: dict[str, object]) -> list[Path]:
    deps = stage.get("deps", [])
    assert isinstance(deps, list)
    return [ROOT / (d if isinstance(d, str) else next(iter(d))) for d in deps]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_every_imported_source_file_is_a_dep(stage_name: str) -> None:
    stage = STAGES[stage_name]
    cmd = str(stage["cmd"]).split()
    assert cmd[0] == "ctcurate", f"{stage_name}: the command is not a ctcurate subcommand"
    files = command_files(cmd[1])
    deps = declared(stage)
    missing = sorted(p.relative_to(ROOT).as_posix() for p in files if not covered(p, deps))
    assert not missing, f"{stage_name}: dvc.yaml misses deps {missing}"


def test_the_import_walk_sees_lazy_and_relative_imports() -> None:
    # ``pack`` imports the card module inside a function; cli imports stages lazily
    files = {p.relative_to(PACKAGE).as_posix() for p in command_files("pack")}
    assert {
        "cli.py",
        "pipeline/pack.py",
        "release/card.py",
        "release/format.py",
        "errors.py",
        "__init__.py",
    } <= files
    assert "pipeline/train.py" not in files


def test_the_archive_is_one_edit_away() -> None:
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    names = {k for entry in raw["vars"] for k in entry}
    assert names == {"archive", "annotations", "audit_list"}
    for name, stage in STAGES.items():
        if name == "synth":
            continue
        text = yaml.safe_dump(stage)
        for literal in ("data/synth/archive", "data/synth/annotations"):
            assert literal not in text, f"{name}: {literal} instead of its var"
    assert {"pneumonia-ct-release", "pneumonia-ct-models"} <= set(raw["artifacts"])


#: Stages that read a whole params section (the others read the keys they list).
WHOLE_SECTION = {
    "synth": "synth",
    "snapshot": "snapshot",
    "index": "index",
    "select": "select",
    "annotate_join": "annotate_join",
    "pack": "pack",
    "train": "train",
    "evaluate": "evaluate",
}


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_stages_track_content_params_not_execution_knobs(stage_name: str) -> None:
    from ctcurate.params import Params

    sections = {name: field.annotation for name, field in Params.model_fields.items()}
    listed = [p for p in STAGES[stage_name].get("params", []) if isinstance(p, str)]  # type: ignore[union-attr]
    for key in listed:
        section, _, name = key.partition(".")
        model = sections[section]
        assert name in model.model_fields, f"{stage_name}: no param {key}"  # type: ignore[union-attr]
        assert name not in model.EXECUTION, f"{stage_name}: {key} is an execution knob"  # type: ignore[union-attr]
    if stage_name in WHOLE_SECTION:
        section = WHOLE_SECTION[stage_name]
        model = sections[section]
        wanted = {f"{section}.{k}" for k in model.model_fields if k not in model.EXECUTION}  # type: ignore[union-attr]
        assert set(listed) == wanted, f"{stage_name}: params listed differ from the section"
