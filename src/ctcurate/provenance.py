"""What built an output: the source files of the stage's code, their commit, the lock.

A release's manifest and a model card name the code that wrote them:

- ``code_sha256`` hashes every ``ctcurate`` source file the stage's module imports
  (followed through the package, lazy imports included: the files ``dvc.yaml`` lists as the
  stage's deps). Same code → same fingerprint, on any machine, with or without git.
- ``git_commit``: the last commit that changed one of those files, when the sources are a git
  checkout and none of them differs from that commit (``None`` otherwise: a wheel, a copy
  without ``.git``, local changes — ``code_sha256`` still pins the content). It is the
  commit to check out to get the code back, and, unlike ``HEAD``, it does not move with
  commits that leave the stage's code alone (docs, other stages), so those never change a
  release's bytes.
- ``environment_lock_sha256`` hashes ``requirements.lock``, the pinned environment
  ``scripts/setup.sh`` installs.
"""

from __future__ import annotations

import ast
import hashlib
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

#: The package's source root (``src/`` in a checkout, ``site-packages`` when installed).
_SRC = Path(__file__).resolve().parents[1]
#: The environment lock beside ``src/`` in a checkout (absent from an installed wheel).
LOCK_FILE = _SRC.parent / "requirements.lock"


def _module_file(name: str) -> Path | None:
    if name != "ctcurate" and not name.startswith("ctcurate."):
        return None
    base = _SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(tree: ast.AST, current: str, is_package: bool = False) -> set[str]:
    """The ``ctcurate`` modules imported anywhere under ``tree`` (of the module ``current``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = current.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if _module_file(m) is not None}


def source_files(modules: Iterable[str]) -> list[Path]:
    """Every ``ctcurate`` source file reached from ``modules``, sorted."""
    todo: set[str] = set()
    for name in modules:
        parts = name.split(".")
        todo |= {".".join(parts[: i + 1]) for i in range(len(parts))}
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for module in imported_modules(tree, name, path.name == "__init__.py"):
            parts = module.split(".")
            todo |= {".".join(parts[: i + 1]) for i in range(len(parts))} - seen
    return sorted(p for m in seen if (p := _module_file(m)) is not None)


def code_sha256(modules: Iterable[str]) -> str:
    """sha256 over the relative path and bytes of each of :func:`source_files`."""
    return _files_sha256(source_files(modules))


def _files_sha256(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(_SRC).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(
            [git, "-C", str(root), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def last_commit(files: Iterable[Path], root: Path) -> str | None:
    """The last commit of the git checkout at ``root`` that changed one of ``files``;
    ``None`` when ``root`` is no checkout, git is missing, a file is untracked or differs
    from that commit (staged or not)."""
    names = [str(Path(f).resolve()) for f in files]
    if not names or _git(root, "rev-parse", "--is-inside-work-tree") is None:
        return None
    tracked = _git(root, "ls-files", "--error-unmatch", "--", *names)
    status = _git(root, "status", "--porcelain", "--", *names)
    if tracked is None or status is None or status.strip():
        return None
    commit = (_git(root, "log", "-1", "--format=%H", "--", *names) or "").strip()
    return commit if len(commit) == 40 else None


def provenance(*modules: str) -> dict[str, str | None]:
    """``{"code_sha256", "git_commit", "environment_lock_sha256"}`` of a stage whose code is
    ``modules`` (``git_commit`` per :func:`last_commit`; the lock's hash is ``None`` where no
    lock file is beside the sources)."""
    lock = hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest() if LOCK_FILE.is_file() else None
    files = source_files(modules)
    return {
        "code_sha256": _files_sha256(files),
        "git_commit": last_commit(files, _SRC),
        "environment_lock_sha256": lock,
    }
