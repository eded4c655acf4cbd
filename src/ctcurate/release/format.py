"""The release format: the HDF5 shard layout, the manifest and content addresses.

The on-disk layout is documented in ``docs/release.md``. This module is the only code that
knows it: ``pack`` writes through :func:`write_shard` and :func:`build_manifest`; consumers
read through :func:`ctcurate.release.open` (a torch / MONAI dataset) and :func:`read_case`;
``ctcurate verify`` checks a release against it (:mod:`ctcurate.release.integrity`; the
manifest's structure in :mod:`ctcurate.release.manifest`). Shards are Blosc-compressed:
importing this module registers the filter (``hdf5plugin``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import h5py
import hdf5plugin  # registers the Blosc filter the shards are compressed with
import numpy as np
import numpy.typing as npt

from ctcurate import labels
from ctcurate.errors import InputError, VerifyError
from ctcurate.io.atomic import atomic_path, dumps_json, sha256_file
from ctcurate.release.manifest import check_manifest

FORMAT = "ctcurate-release"


FORMAT_VERSION = 1


MANIFEST = "manifest.json"


SHARD_DIR = "shards"


CASES_GROUP = "cases"


IMAGE = "image"


LABEL = "label"


#: Label values of the ``label`` dataset.
LABELS: dict[str, int] = labels.KEYS


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


def manifest_release_id(manifest: Mapping[str, Any]) -> str:
    """The release id of a manifest: sha256 of its canonical JSON without ``release_id``."""
    body = {k: v for k, v in manifest.items() if k != "release_id"}
    return hashlib.sha256(dumps_json(body).encode()).hexdigest()


def release_files(release_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes}}`` of every file of a release folder other than
    ``manifest.json`` and the shards (the card, ``report.json`` ...), sorted."""
    release_dir = Path(release_dir)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(release_dir.rglob("*")):
        rel = path.relative_to(release_dir).as_posix()
        if not path.is_file() or rel == MANIFEST or rel.startswith(f"{SHARD_DIR}/"):
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def build_manifest(
    release_dir: Path,
    cases: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    code_version: str,
    extra: Mapping[str, Any] | None = None,
    split_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Assemble the manifest of the release folder ``release_dir`` and its ``release_id``.

    ``release_id`` is the sha256 of the canonical JSON of the manifest without it; the
    manifest names every shard with its sha256, every case with its digest and split
    (``split_names`` are listed even when no case falls in them), and every other file
    already in the folder (card, report) with its sha256 (``files``): write those before
    the manifest.
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
        "files": release_files(release_dir),
        **(dict(extra) if extra else {}),
    }
    body["release_id"] = manifest_release_id(body)
    return body


def read_manifest(release_dir: Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a release folder and check its structure.

    Raises
    ------
    InputError
        When the folder holds no manifest.
    VerifyError
        Naming the file (and key) when it is not JSON, not a manifest of this format, or
        not of the manifest's structure (:func:`ctcurate.release.manifest.check_manifest`).
    """
    path = Path(release_dir) / MANIFEST
    if not path.is_file():
        msg = f"{path}: no manifest (is this a release folder?)"
        raise InputError(msg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        msg = f"{path}: not valid JSON"
        raise VerifyError(msg) from exc
    except OSError as exc:
        msg = f"{path}: cannot be read ({exc.strerror or type(exc).__name__})"
        raise VerifyError(msg) from exc
    if isinstance(data, dict) and data.get("format") != FORMAT:
        msg = f"{path}: not a {FORMAT} manifest"
        raise VerifyError(msg)
    if isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION:
        msg = f"{path}: format_version {data.get('format_version')} is not supported"
        raise VerifyError(msg)
    return check_manifest(data, path)


def read_arrays(h5: h5py.File, case_id: str) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    """Read one case's (image, label) arrays from an open shard."""
    grp = h5[CASES_GROUP][case_id]
    image = np.asarray(grp[IMAGE][()], dtype=np.int16)
    label = np.asarray(grp[LABEL][()], dtype=np.uint8)
    return image, label


def case_affine_zyx(meta: Mapping[str, Any]) -> npt.NDArray[np.float64]:
    """The RAS+ affine of a release case in its stored (z, y, x) voxel order.

    Voxel ``[k, j, i]`` lies at LPS ``origin_mm + (i * sx, j * sy, k * sz)``
    (``spacing_mm`` is (z, y, x), ``origin_mm`` is (x, y, z)); RAS+ negates x and y. This
    is the affine MONAI expects of a ``MetaTensor`` (``Orientationd`` / ``Spacingd`` /
    ``SaveImaged`` read it).
    """
    sz, sy, sx = (float(v) for v in meta["spacing_mm"])
    ox, oy, oz = (float(v) for v in meta["origin_mm"])
    return np.array(
        [
            [0.0, 0.0, -sx, -ox],
            [0.0, -sy, 0.0, -oy],
            [sz, 0.0, 0.0, oz],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def read_case(
    h5: h5py.File, case_id: str
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8], dict[str, MetaValue]]:
    """Read one case (image, label, meta) from an open shard."""
    image, label = read_arrays(h5, case_id)
    attrs = h5[CASES_GROUP][case_id].attrs
    meta = {str(k): _decode_attr(v) for k, v in sorted(attrs.items())}
    return image, label, meta
