"""The structure of a release's ``manifest.json``: keys, types, file names.

:func:`check_manifest` is the reader's first line of defence: a manifest that is not a JSON
object, lacks a key, holds a value of the wrong type, or names a shard or file outside the
release folder fails with one :class:`~ctcurate.errors.VerifyError` naming the file and the
key, before anything trusts it. The layout itself is documented in ``docs/release.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Final

from ctcurate.errors import VerifyError

#: A sha256 as the manifest writes it: 64 lowercase hex digits.
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
#: Top-level keys every manifest holds, with their JSON type.
REQUIRED: Final[Mapping[str, type]] = {
    "format": str,
    "format_version": int,
    "release_id": str,
    "code_version": str,
    "params": dict,
    "labels": dict,
    "cases": list,
    "shards": dict,
    "splits": dict,
}
#: Top-level keys a manifest may hold, with their JSON type.
OPTIONAL: Final[Mapping[str, type]] = {
    "files": dict,
    "counts": dict,
    "excluded": list,
    "pseudonym_key_id": str,
}
#: Keys of a case entry that are not case attributes, with their JSON type.
CASE_KEYS: Final[Mapping[str, type]] = {
    "case_id": str,
    "shard": str,
    "shape": list,
    "sha256": str,
}
_TYPE_NAMES: Final[Mapping[type, str]] = {
    str: "a string",
    int: "an integer",
    dict: "an object",
    list: "a list",
}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - json.loads makes only the above


def _is(value: object, kind: type) -> bool:
    """``isinstance`` where a JSON boolean is not an integer."""
    if kind is int and isinstance(value, bool):
        return False
    return isinstance(value, kind)


def _require(path: Path, where: str, value: object, kind: type) -> None:
    if not _is(value, kind):
        msg = f"{path}: {where}: expected {_TYPE_NAMES[kind]}, got {_json_type(value)}"
        raise VerifyError(msg)


def _digest(path: Path, where: str, value: object) -> None:
    _require(path, where, value, str)
    if not SHA256_RE.fullmatch(str(value)):
        msg = f"{path}: {where}: not a sha256 (64 lowercase hex digits)"
        raise VerifyError(msg)


def _is_attribute(value: object) -> bool:
    """A case attribute: a JSON scalar or a flat list of scalars."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    return isinstance(value, list) and all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
    )


def _check_hashed(path: Path, key: str, table: dict[str, Any], *, shard: bool) -> None:
    """``{name: {sha256, bytes}}`` where every name stays inside the release folder."""
    for name, entry in table.items():
        where = f"{key}[{name!r}]"
        pure = PurePosixPath(name)
        inside = (
            bool(name)
            and not pure.is_absolute()
            and ".." not in pure.parts
            and "\\" not in name
            and str(pure) == name
        )
        if not inside or (shard and (len(pure.parts) != 1 or pure.suffix != ".h5")):
            kind = "a shard file name (NAME.h5)" if shard else "a relative path in the release"
            msg = f"{path}: {where}: not {kind}"
            raise VerifyError(msg)
        _require(path, where, entry, dict)
        _digest(path, f"{where}.sha256", entry.get("sha256"))
        _require(path, f"{where}.bytes", entry.get("bytes"), int)


def _check_case(path: Path, i: int, case: object) -> str:
    where = f"cases[{i}]"
    if not isinstance(case, dict):
        msg = f"{path}: {where}: expected an object, got {_json_type(case)}"
        raise VerifyError(msg)
    for key, kind in CASE_KEYS.items():
        if key not in case:
            msg = f"{path}: {where}: missing key {key!r}"
            raise VerifyError(msg)
        _require(path, f"{where}.{key}", case[key], kind)
    _digest(path, f"{where}.sha256", case["sha256"])
    shape = case["shape"]
    if len(shape) != 3 or not all(_is(n, int) and n >= 0 for n in shape):
        msg = f"{path}: {where}.shape: expected 3 non-negative integers"
        raise VerifyError(msg)
    cid = str(case["case_id"])
    if not cid or "/" in cid or cid in {".", ".."}:
        msg = f"{path}: {where}.case_id: not a case id"
        raise VerifyError(msg)
    if "split" in case:
        _require(path, f"{where}.split", case["split"], str)
    for key, value in case.items():
        if not _is_attribute(value) and key not in CASE_KEYS:
            msg = f"{path}: {where}.{key}: expected a scalar or a list of scalars"
            raise VerifyError(msg)
    return cid


def check_manifest(data: object, path: Path) -> dict[str, Any]:
    """``data`` (parsed ``manifest.json`` at ``path``) if it has the manifest's structure.

    Checks the top-level keys and their types, every case entry (``case_id``, ``shard``,
    ``shape``, ``sha256``; attributes scalar or flat lists), case ids listed once,
    ``shards`` and ``files`` as ``{name: {sha256, bytes}}`` naming files inside the release,
    ``splits`` as ``{split: [case_id, ...]}``. Values are not compared with the shards here
    (that is :func:`ctcurate.release.verify`).

    Raises
    ------
    VerifyError
        Naming ``path`` and the first key that does not fit.
    """
    if not isinstance(data, dict):
        msg = f"{path}: expected a JSON object, got {_json_type(data)}"
        raise VerifyError(msg)
    for key, kind in REQUIRED.items():
        if key not in data:
            msg = f"{path}: missing key {key!r}"
            raise VerifyError(msg)
        _require(path, key, data[key], kind)
    for key, kind in OPTIONAL.items():
        if key in data:
            _require(path, key, data[key], kind)
    _digest(path, "release_id", data["release_id"])
    seen: set[str] = set()
    for i, case in enumerate(data["cases"]):
        cid = _check_case(path, i, case)
        if cid in seen:
            msg = f"{path}: cases[{i}].case_id: case {cid} is listed twice"
            raise VerifyError(msg)
        seen.add(cid)
    _check_hashed(path, "shards", data["shards"], shard=True)
    _check_hashed(path, "files", data.get("files", {}), shard=False)
    for split, ids in data["splits"].items():
        _require(path, f"splits[{split!r}]", ids, list)
        for j, cid in enumerate(ids):
            _require(path, f"splits[{split!r}][{j}]", cid, str)
    return data
