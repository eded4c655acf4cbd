"""``ctcurate export``: a release as NIfTI files for nnU-Net v2, MONAI or any other tool.

Formats (docs/release.md, "Exporting a release"):

- ``nnunet``: an nnU-Net v2 raw dataset — ``dataset.json``, ``imagesTr/<case>_0000.nii.gz``
  and ``labelsTr/<case>.nii.gz`` for the train and val splits, ``imagesTs/`` (and
  ``labelsTs/``) for the test split, and ``splits_final.json`` (the release's train / val
  as nnU-Net's fold 0);
- ``monai``: ``images/``, ``labels/`` and a Decathlon-style ``datalist.json`` (``training``,
  ``validation``, ``test``);
- ``nifti``: ``images/``, ``labels/`` and ``cases.csv`` of the case attributes.

Every volume keeps the release's voxels and dtype (int16 HU image, uint8 label, no scaling)
on the release's grid: the array is stored as (x, y, z) and the affine maps it to RAS+
world coordinates (the release's LPS position with x and y negated). Files are gzip with no
timestamp, so an export is byte-reproducible. The output folder is published atomically
and only ever replaces an empty folder or an earlier export (:mod:`ctcurate.io.outputs`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import numpy.typing as npt

from ctcurate.errors import InputError
from ctcurate.io.atomic import dumps_json
from ctcurate.io.outputs import check_output_dir, publish_dir
from ctcurate.log import get_logger, progress
from ctcurate.release import verify
from ctcurate.release.format import LABELS, MANIFEST_ONLY, SHARD_DIR, read_arrays, read_manifest

Format = Literal["nnunet", "monai", "nifti"]
FORMATS: tuple[Format, ...] = ("nnunet", "monai", "nifti")
#: The file that marks a folder as an export (the only kind of folder export replaces).
MARKER = ".ctcurate-export.json"
#: The output guard's stage name (the folder's ``.ctcurate-output`` marker).
STAGE = "export"
SUFFIX = ".nii.gz"
#: (LPS → RAS+) flips of the world x and y axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: nnU-Net gets these splits' cases as training data; the rest go to imagesTs.
NNUNET_TRAINING = ("train", "val")
DATALIST_KEYS = {"train": "training", "val": "validation", "test": "test"}

log = get_logger("export")


# --------------------------------------------------------------------------- pure core


def affine_ras(meta: Mapping[str, Any]) -> npt.NDArray[np.float64]:
    """The RAS+ affine of a release case stored as an (x, y, z) array.

    The release's voxel ``[k, j, i]`` lies at LPS ``origin_mm + (i * sx, j * sy, k * sz)``
    (``spacing_mm`` is (z, y, x), ``origin_mm`` is (x, y, z)); NIfTI voxel ``(i, j, k)``
    maps to RAS+, the same point with x and y negated.
    """
    sz, sy, sx = (float(v) for v in meta["spacing_mm"])
    ox, oy, oz = (float(v) for v in meta["origin_mm"])
    lps = np.array(
        [[sx, 0.0, 0.0, ox], [0.0, sy, 0.0, oy], [0.0, 0.0, sz, oz], [0.0, 0.0, 0.0, 1.0]]
    )
    return np.asarray(LPS_TO_RAS @ lps, dtype=np.float64)


def nifti_bytes(array: npt.NDArray[Any], affine: npt.NDArray[np.float64]) -> bytes:
    """A gzipped NIfTI-1 file of a (z, y, x) release array: stored (x, y, z), same dtype,
    no intensity scaling, qform and sform both the ``affine`` (scanner), units mm, and a
    gzip header without a timestamp (the bytes depend only on the array and affine)."""
    import nibabel as nib

    data = np.ascontiguousarray(array.transpose(2, 1, 0))
    image = nib.Nifti1Image(data, affine)
    header = image.header
    header.set_data_dtype(data.dtype)
    header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    header["scl_slope"], header["scl_inter"] = np.nan, np.nan  # no scaling: raw values
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def nnunet_dataset_json(release_id: str, n_training: int, n_test: int) -> dict[str, Any]:
    """nnU-Net v2's ``dataset.json`` of an export."""
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": n_training,
        "numTest": n_test,
        "file_ending": SUFFIX,
        "name": "ctcurate",
        "description": "ctcurate release (int16 HU, labels 0-3); test split in imagesTs",
        "release_id": release_id,
    }


def case_row(case: Mapping[str, Any]) -> dict[str, str]:
    """A manifest case as ``cases.csv`` text cells (lists as JSON, null as empty)."""
    row: dict[str, str] = {}
    for key in sorted(k for k in case if k not in MANIFEST_ONLY):
        value = case[key]
        if value is None:
            row[key] = ""
        elif isinstance(value, list):
            row[key] = json.dumps(value)
        else:
            row[key] = str(value)
    return row


# --------------------------------------------------------------------------- I/O


def _volumes(
    release: Path, cases: Sequence[Mapping[str, Any]]
) -> Iterator[tuple[Mapping[str, Any], npt.NDArray[np.int16], npt.NDArray[np.uint8]]]:
    """(case, image, label) of each case, one shard open at a time (memory: one case)."""
    by_shard: dict[str, list[Mapping[str, Any]]] = {}
    for case in cases:
        by_shard.setdefault(str(case["shard"]), []).append(case)
    for name in sorted(by_shard):
        with h5py.File(release / SHARD_DIR / name, "r") as h5:
            for case in by_shard[name]:
                image, label = read_arrays(h5, str(case["case_id"]))
                yield case, image, label


def case_paths(fmt: Format, case_id: str, split: str) -> tuple[str, str]:
    """(image, label) paths of a case inside an export, relative to its root."""
    if fmt == "nnunet":
        part = "Tr" if split in NNUNET_TRAINING else "Ts"
        return f"images{part}/{case_id}_0000{SUFFIX}", f"labels{part}/{case_id}{SUFFIX}"
    return f"images/{case_id}{SUFFIX}", f"labels/{case_id}{SUFFIX}"


def _write(
    release: Path, root: Path, fmt: Format, cases: Sequence[Mapping[str, Any]], release_id: str
) -> int:
    """Write every case's two files and the format's index files; the number of files."""
    written = 0
    paths: dict[str, tuple[str, str]] = {}
    volumes = progress(_volumes(release, cases), len(cases), "export", log, unit="cases")
    for case, image, label in volumes:
        cid = str(case["case_id"])
        paths[cid] = case_paths(fmt, cid, str(case.get("split")))
        affine = affine_ras(case)
        pairs: tuple[tuple[str, npt.NDArray[Any]], ...] = (
            (paths[cid][0], image),
            (paths[cid][1], label),
        )
        for rel, array in pairs:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(nifti_bytes(array, affine))
            written += 1
    by_split: dict[str, list[str]] = {}
    for case in cases:
        by_split.setdefault(str(case.get("split")), []).append(str(case["case_id"]))
    if fmt == "nnunet":
        n_training = sum(len(by_split.get(s, [])) for s in NNUNET_TRAINING)
        index = nnunet_dataset_json(release_id, n_training, len(cases) - n_training)
        (root / "dataset.json").write_text(dumps_json(index), encoding="utf-8")
        folds = [{"train": by_split.get("train", []), "val": by_split.get("val", [])}]
        (root / "splits_final.json").write_text(dumps_json(folds), encoding="utf-8")
        return written + 2
    if fmt == "monai":
        datalist: dict[str, Any] = {
            "name": "ctcurate",
            "release_id": release_id,
            "modality": {"0": "CT"},
            "labels": {str(v): k for k, v in LABELS.items()},
            **{key: [] for key in DATALIST_KEYS.values()},
        }
        for case in cases:
            cid = str(case["case_id"])
            split = str(case.get("split"))
            datalist.setdefault(DATALIST_KEYS.get(split, split), []).append(
                {
                    "image": paths[cid][0],
                    "label": paths[cid][1],
                    "case_id": cid,
                    "typical": case.get("typical"),
                }
            )
        datalist["numTraining"] = len(datalist["training"])
        datalist["numTest"] = len(datalist["test"])
        (root / "datalist.json").write_text(dumps_json(datalist), encoding="utf-8")
        return written + 1
    rows = [
        {**case_row(c), "image": paths[str(c["case_id"])][0], "label": paths[str(c["case_id"])][1]}
        for c in cases
    ]
    columns = sorted({k for r in rows for k in r})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (root / "cases.csv").write_text(buffer.getvalue(), encoding="utf-8")
    return written + 1


def run(release: Path, out: Path, fmt: Format) -> str:
    """Export the verified ``release`` folder as ``fmt`` into the folder ``out``.

    Returns a one-line summary.

    Raises
    ------
    InputError
        When ``fmt`` is unknown.
    OutputError
        When ``out`` is not absent, an empty folder or an earlier export, or lies inside
        the release (:func:`ctcurate.io.outputs.check_output_dir`).
    VerifyError
        When the release does not match its manifest (nothing is written).
    """
    release, out = Path(release), Path(out)
    if fmt not in FORMATS:
        msg = f"unknown export format '{fmt}' (one of {', '.join(FORMATS)})"
        raise InputError(msg)
    check_output_dir(out, STAGE, [release])
    verify(release)  # never export damaged data
    manifest = read_manifest(release)
    cases = sorted(manifest["cases"], key=lambda c: str(c["case_id"]))
    release_id = str(manifest["release_id"])
    with publish_dir(out, STAGE, inputs=[release]) as tmp:
        written = _write(release, tmp, fmt, cases, release_id)
        marker = {"format": fmt, "release_id": release_id, "cases": len(cases), "files": written}
        (tmp / MARKER).write_text(dumps_json(marker), encoding="utf-8")
    log.info("exported %d cases as %s (%d files)", len(cases), fmt, written)
    return f"release {release_id[:16]} exported as {fmt}: {len(cases)} cases, {written} files"
