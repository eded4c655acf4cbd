"""The package layout: stage modules apart from the domain, dependencies pointing one way.

Layers, from the top: the command line (``cli``, ``entry``, ``__main__``), ``pipeline`` (one
module per DVC stage or command), the domain packages, and at the bottom the shared core
(``errors``, ``log``, ``labels``, ``params``, ``provenance``, ``executor``) and ``io``. Every
import is checked, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ctcurate"
CLI = {"cli", "entry", "__main__"}
CORE = {"", "errors", "log", "labels", "params", "provenance", "executor"}
DOMAIN = {"dicom", "catalog", "imaging", "selection", "models", "release", "annotations", "demo"}
#: ``params`` validates the PHI policy with the policy's own model.
ALLOWED = {("params", "dicom.phi")}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports() -> dict[str, set[str]]:
    """Module → the ctcurate modules it imports (relative names, ``''`` is the package)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] != "ctcurate":
                    continue
                base = node.module[len("ctcurate.") :] if "." in node.module else ""
                for alias in node.names:
                    full = f"{base}.{alias.name}".strip(".")
                    found.add(full if full in mods else base)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "ctcurate":
                        found.add(alias.name[len("ctcurate.") :] if "." in alias.name else "")
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
        graph[name] = found - {name}
    return graph


def layer(module: str) -> str:
    top = module.split(".", maxsplit=1)[0]
    if top in CLI:
        return "cli"
    if top == "pipeline":
        return "pipeline"
    if top == "io":
        return "io"
    if top in DOMAIN:
        return "domain"
    assert top in CORE, f"ctcurate.{module}: not in any layer (add it to tests/test_layout.py)"
    return "core"


RANK = {"cli": 4, "pipeline": 3, "domain": 2, "core": 1, "io": 1}


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if (module, target) in ALLOWED or target == "":
                continue
            a, b = layer(module), layer(target)
            if a == "pipeline" and b == "pipeline":
                bad.append(f"{module} -> {target}: stage modules never import each other")
            elif RANK[b] > RANK[a]:
                bad.append(f"{module} -> {target}: {a} imports {b}")
            elif a == "io" and b != "io" and target not in {"errors", "log"}:
                bad.append(f"{module} -> {target}: io imports only io, errors and log")
            elif a == "core" and b == "core" and module == "labels":
                bad.append(f"{module} -> {target}: the label vocabulary imports nothing")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "" or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_dependencies_point_one_way() -> None:
    assert violations(imports()) == []


def test_no_import_cycles() -> None:
    assert cycles(imports()) == []


def test_at_most_two_levels_and_no_name_shared_with_the_stages_folder() -> None:
    for name in modules():
        assert name.count(".") <= 1, name
    assert not (PACKAGE / "stages").exists()


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ({"pipeline.a": {"pipeline.b"}, "pipeline.b": set()}, "never import each other"),
        ({"dicom.x": {"pipeline.a"}, "pipeline.a": set()}, "domain imports pipeline"),
        ({"io.x": {"dicom.y"}, "dicom.y": set()}, "io imports domain"),
        ({"io.x": {"params"}, "params": set()}, "io imports only io"),
        ({"labels": {"errors"}, "errors": set()}, "imports nothing"),
    ],
)
def test_the_rule_catches_a_wrong_import(graph: dict[str, set[str]], message: str) -> None:
    assert any(message in v for v in violations(graph)), violations(graph)


def test_the_cycle_check_catches_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
