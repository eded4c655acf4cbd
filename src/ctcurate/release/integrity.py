"""``ctcurate verify``: hold a release folder to its manifest, and the manifest to an id.

The manifest is read and its structure checked (:func:`ctcurate.release.format.read_manifest`),
then, in this order, each check stopping at the first mismatch with a
:class:`~ctcurate.errors.VerifyError` naming the file:

1. ``release_id`` is the hash of the manifest's content, and equals ``expect`` when given
   (an id taken from git, which an edited release folder cannot change);
2. ``splits`` lists exactly the cases of each ``split`` attribute;
3. the folder holds exactly ``manifest.json``, the listed shards and the listed files, each
   with its sha256;
4. each shard holds exactly the cases the manifest lists for it, each case's canonical
   bytes hash to its ``sha256``, and its manifest entry (shape, labels, split, every
   attribute) equals what the shard stores.

Readers take labels and splits from the manifest (faster than the HDF5 attributes), so
step 4 is what makes an edited manifest fail even when its ``release_id`` was recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py

from ctcurate.errors import VerifyError
from ctcurate.io.atomic import sha256_file
from ctcurate.io.outputs import MARKER
from ctcurate.release.format import (
    CASES_GROUP,
    MANIFEST,
    MANIFEST_ONLY,
    SHARD_DIR,
    case_digest,
    manifest_release_id,
    read_case,
    read_manifest,
)
from ctcurate.release.manifest import SHA256_RE


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def check_expected(manifest: Mapping[str, Any], path: Path, expect: str | None) -> str:
    """The release id of ``manifest`` once it matches its content (and ``expect``)."""
    actual = manifest_release_id(manifest)
    if manifest["release_id"] != actual:
        msg = f"{path}: release_id does not match the manifest's content"
        raise VerifyError(msg)
    if expect is not None:
        wanted = expect.strip().lower()
        if not SHA256_RE.fullmatch(wanted):
            msg = f"--expect {expect[:80]!r}: not a release id (64 hex digits)"
            raise VerifyError(msg)
        if wanted != actual:
            msg = f"{path}: release {actual[:16]} is not the expected release {wanted[:16]}"
            raise VerifyError(msg)
    return actual


def _check_splits(manifest: Mapping[str, Any], path: Path) -> None:
    derived: dict[str, list[str]] = {}
    for case in sorted(manifest["cases"], key=lambda c: str(c["case_id"])):
        derived.setdefault(str(case.get("split", "all")), []).append(str(case["case_id"]))
    # every split is listed, an empty one too (pack lists train, val and test always)
    listed = {k: sorted(v) for k, v in manifest["splits"].items() if v}
    if listed != derived:
        msg = f"{path}: splits do not list the cases of each split attribute"
        raise VerifyError(msg)


def _check_hash(file: Path, entry: Mapping[str, Any]) -> None:
    if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
        msg = f"{file}: sha256 does not match the manifest"
        raise VerifyError(msg)


def _check_folder(release_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Exactly the manifest, the listed shards and the listed files, with their hashes."""
    shard_dir = release_dir / SHARD_DIR
    shards: Mapping[str, Any] = manifest["shards"]
    files: Mapping[str, Any] = manifest["files"]
    for name in sorted(shards):
        if not (shard_dir / name).is_file():
            msg = f"{shard_dir / name}: shard listed in the manifest is missing"
            raise VerifyError(msg)
    for rel in sorted(files):
        if not (release_dir / rel).is_file():
            msg = f"{release_dir / rel}: file listed in the manifest is missing"
            raise VerifyError(msg)
    listed = {MANIFEST, MARKER} | {f"{SHARD_DIR}/{n}" for n in shards} | set(files)
    marker = release_dir / MARKER  # the output guard's marker: unhashed, so checked whole
    if marker.exists() and (marker.is_symlink() or marker.read_bytes() != b"pack\n"):
        msg = f"{marker}: not the marker pack writes"
        raise VerifyError(msg)
    for path in sorted(release_dir.rglob("*")):
        rel = path.relative_to(release_dir).as_posix()
        if path.is_dir() or rel in listed:
            continue
        what = "shard" if path.parent == shard_dir and path.suffix == ".h5" else "file"
        msg = f"{path}: {what} not listed in the manifest"
        raise VerifyError(msg)
    for name in sorted(shards):
        _check_hash(shard_dir / name, shards[name])
    for rel in sorted(files):
        _check_hash(release_dir / rel, files[rel])


def _check_entry(shard: Path, case: Mapping[str, Any], shape: Sequence[int], meta: Any) -> None:
    """The manifest entry of a case against what its shard stores."""
    cid = str(case["case_id"])
    if list(case["shape"]) != list(shape):
        msg = f"{shard}: case {cid}: manifest shape does not match the shard"
        raise VerifyError(msg)
    entry = {k: v for k, v in case.items() if k not in MANIFEST_ONLY}
    for key in sorted(set(entry) | set(meta)):
        if key not in meta:
            msg = f"{shard}: case {cid}: manifest attribute {key!r} is not in the shard"
            raise VerifyError(msg)
        if key not in entry:
            msg = f"{shard}: case {cid}: shard attribute {key!r} is not in the manifest"
            raise VerifyError(msg)
        if _canonical(entry[key]) != _canonical(meta[key]):
            msg = f"{shard}: case {cid}: manifest attribute {key!r} does not match the shard"
            raise VerifyError(msg)


def _check_shard(shard: Path, cases: Sequence[Mapping[str, Any]]) -> None:
    try:
        h5 = h5py.File(shard, "r")
    except OSError as exc:
        msg = f"{shard}: not a readable HDF5 file"
        raise VerifyError(msg) from exc
    with h5:
        group = h5.get(CASES_GROUP)
        if not isinstance(group, h5py.Group):
            msg = f"{shard}: no {CASES_GROUP} group"
            raise VerifyError(msg)
        stored = set(group.keys())
        listed = {str(c["case_id"]) for c in cases}
        if extra := sorted(stored - listed):
            msg = (
                f"{shard}: case {extra[0]} is in the shard but the manifest does not list it there"
            )
            raise VerifyError(msg)
        if missing := sorted(listed - stored):
            msg = f"{shard}: case {missing[0]} is missing"
            raise VerifyError(msg)
        for case in sorted(cases, key=lambda c: str(c["case_id"])):
            cid = str(case["case_id"])
            try:
                image, label, meta = read_case(h5, cid)
            except (KeyError, OSError, ValueError) as exc:
                msg = f"{shard}: case {cid} cannot be read"
                raise VerifyError(msg) from exc
            if case_digest(image, label, meta) != case["sha256"]:
                msg = f"{shard}: case {cid} does not match its sha256"
                raise VerifyError(msg)
            _check_entry(shard, case, image.shape, meta)


def verify_release(release_dir: Path, expect: str | None = None) -> str:
    """See :func:`ctcurate.release.verify`: one-line summary or :class:`VerifyError`."""
    release_dir = Path(release_dir)
    path = release_dir / MANIFEST
    manifest = read_manifest(release_dir)
    if "files" not in manifest:
        msg = f"{path}: missing key 'files' (packed before card and report were hashed)"
        raise VerifyError(msg)
    release_id = check_expected(manifest, path, expect)
    _check_splits(manifest, path)
    _check_folder(release_dir, manifest)
    by_shard: dict[str, list[Mapping[str, Any]]] = {name: [] for name in manifest["shards"]}
    for case in manifest["cases"]:
        if str(case["shard"]) not in by_shard:
            msg = f"{path}: case {case['case_id']} names a shard the manifest does not list"
            raise VerifyError(msg)
        by_shard[str(case["shard"])].append(case)
    for name, cases in sorted(by_shard.items()):
        _check_shard(release_dir / SHARD_DIR / name, cases)
    pinned = "; its id is the expected one" if expect is not None else ""
    return (
        f"release {release_id[:16]} verified: "
        f"{len(manifest['cases'])} cases in {len(manifest['shards'])} shards{pinned}"
    )
