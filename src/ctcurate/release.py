"""Releases: the HDF5 shard layout, the manifest, content addresses and ``verify``.

The on-disk layout is documented in ``docs/release.md``. This module is the only code that
knows it: ``pack`` writes through :func:`write_shard` and :func:`build_manifest`, consumers
read through :func:`open` (a torch / MONAI dataset) and :func:`read_case`, and
``ctcurate verify`` calls :func:`verify`. Shards are Blosc-compressed: importing this
module registers the filter (``hdf5plugin``). :func:`build_lock` keeps two builds of one
release folder from running at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import h5py
import hdf5plugin  # registers the Blosc filter the shards are compressed with
import numpy as np
import numpy.typing as npt

from ctcurate.errors import InputError, LockedError, VerifyError
from ctcurate.io.atomic import atomic_path, dumps_json, sha256_file

if TYPE_CHECKING:
    from collections.abc import Callable

    from ctcurate.dataset import ReleaseDataset

FORMAT = "ctcurate-release"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
CASES_GROUP = "cases"
IMAGE = "image"
LABEL = "label"
#: Label values of the ``label`` dataset.
LABELS: dict[str, int] = {"background": 0, "normal_lung": 1, "ggo": 2, "consolidation": 3}
#: Chunk shape (z, y, x) of image and label datasets: one chunk holds a slab of slices,
#: so a per-case read and a patch read touch few chunks.
CHUNK_Z = 16
#: Compression of image and label datasets, chosen by ``benchmarks/h5_bench.py`` and
#: ``benchmarks/pack_bench.py``: Blosc with lz4hc level 5 and byte shuffle decompresses
#: about 3x faster than zstd-3 + shuffle at about 1.1x its size (lz4hc spends its effort
#: on the write side). Readers need the filter registered: importing this module
#: (``import hdf5plugin``) does it.
BLOSC_CNAME: Final = "lz4hc"
BLOSC_LEVEL = 5
#: Name of the lock file beside a release folder (``data/.release.lock``): a pack holds it
#: while it builds, so that two builds of one output never run at once.
LOCK_SUFFIX = ".lock"

MetaValue = str | int | float | bool | None | list[float] | list[int] | list[str]
#: Keys of a manifest case entry that are not case attributes.
MANIFEST_ONLY = frozenset({"shard", "shape", "sha256"})


@dataclass(frozen=True)
class CaseRecord:
    """One case of a release: an int16 HU volume, its uint8 label volume and metadata.

    ``image`` and ``label`` are (z, y, x) arrays of equal shape; ``meta`` holds JSON-able
    scalars (case_id, site, era, labels, ``spacing_mm`` (z, y, x), ``origin_mm`` ...).
    """

    case_id: str
    image: npt.NDArray[np.int16]
    label: npt.NDArray[np.uint8]
    meta: Mapping[str, MetaValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.dtype != np.int16:
            msg = f"case {self.case_id}: image dtype must be int16, got {self.image.dtype}"
            raise ValueError(msg)
        if self.label.dtype != np.uint8:
            msg = f"case {self.case_id}: label dtype must be uint8, got {self.label.dtype}"
            raise ValueError(msg)
        if self.image.ndim != 3 or self.image.shape != self.label.shape:
            msg = (
                f"case {self.case_id}: image {self.image.shape} and label {self.label.shape} "
                "must be equal 3-D (z, y, x) shapes"
            )
            raise ValueError(msg)


def _canonical_meta(meta: Mapping[str, MetaValue]) -> str:
    return json.dumps(dict(meta), sort_keys=True, separators=(",", ":"), allow_nan=False)


def case_digest(
    image: npt.NDArray[np.int16], label: npt.NDArray[np.uint8], meta: Mapping[str, MetaValue]
) -> str:
    """sha256 of a case's canonical bytes: arrays (little-endian, C order) and metadata."""
    digest = hashlib.sha256()
    for name, arr in ((IMAGE, image), (LABEL, label)):
        canon = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        digest.update(f"{name}:{canon.dtype.str}:{canon.shape}\n".encode())
        digest.update(canon.tobytes())
    digest.update(b"meta:")
    digest.update(_canonical_meta(meta).encode())
    return digest.hexdigest()


def _attr_value(value: MetaValue) -> Any:
    if value is None:
        return "null"
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return json.dumps(value)
        return np.asarray(value, dtype=np.float64)
    return value


def _decode_attr(value: Any) -> MetaValue:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        if value == "null":
            return None
        if value.startswith("["):
            decoded: list[str] = json.loads(value)
            return decoded
        return value
    if isinstance(value, np.ndarray):
        return [float(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value  # type: ignore[no-any-return]


def _compression() -> dict[str, Any]:
    """``create_dataset`` keyword arguments of the shard compression (a fresh mapping)."""
    return dict(
        hdf5plugin.Blosc(cname=BLOSC_CNAME, clevel=BLOSC_LEVEL, shuffle=hdf5plugin.Blosc.SHUFFLE)
    )


def lock_path(out: Path) -> Path:
    """The lock file of a release folder: a hidden sibling, outside the DVC-tracked out."""
    out = Path(out)
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[Path]:
    """Hold the exclusive build lock of the release folder ``out`` (fail fast, never wait).

    The lock is an ``fcntl.flock`` on :func:`lock_path`; the holder writes its pid there and
    removes the file when done. The kernel drops the lock when the holder dies (even on
    ``kill -9``), so a stale file never blocks a later build.

    Raises
    ------
    LockedError
        When another process holds the lock of ``out``.
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _lock_holder(path)
            msg = (
                f"{out}: another build is writing this release ({holder}lock {path}); "
                "wait for it to finish"
            )
            raise LockedError(msg) from None
        try:
            same = os.fstat(fd).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        # The previous holder removed the file between our open and lock: lock the new one.
        os.close(fd)
    else:  # pragma: no cover - ten lost races in a row
        msg = f"{out}: could not take the build lock {path}"
        raise LockedError(msg)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f"pid {pid} holds the " if pid.isdigit() else ""


def write_shard(path: Path, records: Iterable[CaseRecord]) -> list[dict[str, Any]]:
    """Write one HDF5 shard atomically; return one manifest entry per case (sorted by id).

    Groups and attributes are inserted in sorted order and no timestamps are stored, so the
    file's bytes depend only on its cases.
    """
    entries: list[dict[str, Any]] = []
    ordered = sorted(records, key=lambda r: r.case_id)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=False) as h5:
        h5.attrs["format"] = FORMAT
        h5.attrs["format_version"] = FORMAT_VERSION
        cases = h5.create_group(CASES_GROUP, track_order=False)
        for rec in ordered:
            grp = cases.create_group(rec.case_id, track_order=False)
            chunks = (min(CHUNK_Z, rec.image.shape[0]), *rec.image.shape[1:])
            for name, arr in ((IMAGE, rec.image), (LABEL, rec.label)):
                grp.create_dataset(
                    name,
                    data=arr,
                    chunks=chunks,
                    track_times=False,
                    **_compression(),
                )
            for key in sorted(rec.meta):
                grp.attrs[key] = _attr_value(rec.meta[key])
            entries.append(
                {
                    "case_id": rec.case_id,
                    "shard": path.name,
                    "shape": list(rec.image.shape),
                    "sha256": case_digest(rec.image, rec.label, rec.meta),
                    **{k: rec.meta[k] for k in sorted(rec.meta) if k != "case_id"},
                }
            )
    return entries


def build_manifest(
    release_dir: Path,
    cases: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    code_version: str,
    extra: Mapping[str, Any] | None = None,
    split_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Assemble the manifest of the shards under ``release_dir`` and its ``release_id``.

    ``release_id`` is the sha256 of the canonical JSON of the manifest without it; the
    manifest names every shard with its sha256, every case with its digest and split
    (``split_names`` are listed even when no case falls in them).
    """
    shard_dir = Path(release_dir) / SHARD_DIR
    shards = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(shard_dir.glob("*.h5"))
    }
    ordered = sorted(cases, key=lambda c: str(c["case_id"]))
    splits: dict[str, list[str]] = {name: [] for name in split_names}
    for case in ordered:
        splits.setdefault(str(case.get("split", "all")), []).append(str(case["case_id"]))
    body: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "code_version": code_version,
        "params": dict(params),
        "labels": LABELS,
        "cases": [dict(c) for c in ordered],
        "shards": shards,
        "splits": splits,
        **(dict(extra) if extra else {}),
    }
    body["release_id"] = hashlib.sha256(dumps_json(body).encode()).hexdigest()
    return body


def read_manifest(release_dir: Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a release folder."""
    path = Path(release_dir) / MANIFEST
    if not path.is_file():
        msg = f"{path}: no manifest (is this a release folder?)"
        raise InputError(msg)
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = f"{path}: not valid JSON"
        raise VerifyError(msg) from exc
    if manifest.get("format") != FORMAT:
        msg = f"{path}: not a {FORMAT} manifest"
        raise VerifyError(msg)
    if manifest.get("format_version") != FORMAT_VERSION:
        msg = f"{path}: format_version {manifest.get('format_version')} is not supported"
        raise VerifyError(msg)
    return manifest


def read_arrays(h5: h5py.File, case_id: str) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    """Read one case's (image, label) arrays from an open shard."""
    grp = h5[CASES_GROUP][case_id]
    image = np.asarray(grp[IMAGE][()], dtype=np.int16)
    label = np.asarray(grp[LABEL][()], dtype=np.uint8)
    return image, label


def read_case(
    h5: h5py.File, case_id: str
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8], dict[str, MetaValue]]:
    """Read one case (image, label, meta) from an open shard."""
    image, label = read_arrays(h5, case_id)
    attrs = h5[CASES_GROUP][case_id].attrs
    meta = {str(k): _decode_attr(v) for k, v in sorted(attrs.items())}
    return image, label, meta


def verify(release_dir: Path) -> str:
    """Re-hash every shard and case of a release against its manifest.

    Returns a one-line summary; raises :class:`VerifyError` naming the first mismatch
    (a missing, extra or corrupted shard, a case whose bytes or metadata changed, or a
    manifest whose ``release_id`` does not match its content).
    """
    release_dir = Path(release_dir)
    manifest = read_manifest(release_dir)
    body = {k: v for k, v in manifest.items() if k != "release_id"}
    expected_id = hashlib.sha256(dumps_json(body).encode()).hexdigest()
    if manifest.get("release_id") != expected_id:
        msg = f"{release_dir / MANIFEST}: release_id does not match the manifest's content"
        raise VerifyError(msg)
    shard_dir = release_dir / SHARD_DIR
    on_disk = {p.name for p in shard_dir.glob("*.h5")} if shard_dir.is_dir() else set()
    listed = set(manifest["shards"])
    if missing := sorted(listed - on_disk):
        msg = f"{shard_dir / missing[0]}: shard listed in the manifest is missing"
        raise VerifyError(msg)
    if extra := sorted(on_disk - listed):
        msg = f"{shard_dir / extra[0]}: shard not listed in the manifest"
        raise VerifyError(msg)
    for name in sorted(listed):
        if sha256_file(shard_dir / name) != manifest["shards"][name]["sha256"]:
            msg = f"{shard_dir / name}: sha256 does not match the manifest"
            raise VerifyError(msg)
    by_shard: dict[str, list[Mapping[str, Any]]] = {}
    for case in manifest["cases"]:
        by_shard.setdefault(str(case["shard"]), []).append(case)
    for name, cases in sorted(by_shard.items()):
        try:
            h5 = h5py.File(shard_dir / name, "r")
        except OSError as exc:
            msg = f"{shard_dir / name}: not a readable HDF5 file"
            raise VerifyError(msg) from exc
        with h5:
            for case in cases:
                cid = str(case["case_id"])
                try:
                    image, label, meta = read_case(h5, cid)
                except KeyError as exc:
                    msg = f"{shard_dir / name}: case {cid} is missing"
                    raise VerifyError(msg) from exc
                if case_digest(image, label, meta) != case["sha256"]:
                    msg = f"{shard_dir / name}: case {cid} does not match its sha256"
                    raise VerifyError(msg)
    return (
        f"release {manifest['release_id'][:16]} verified: "
        f"{len(manifest['cases'])} cases in {len(listed)} shards"
    )


def open(
    release_dir: Path | str,
    split: str | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> ReleaseDataset:
    """Open a release as a torch / MONAI map-style dataset of dict samples.

    Each sample is ``{"image": float32 (1, z, y, x) HU, "label": int64 (1, z, y, x),
    "typical": int (-1 unknown), "case_id": str, "meta": dict}``; ``split`` picks
    ``train`` / ``val`` / ``test`` (all cases when None). Shards are opened once per
    DataLoader worker process.
    """
    from ctcurate.dataset import ReleaseDataset

    return ReleaseDataset(Path(release_dir), split=split, transform=transform)
