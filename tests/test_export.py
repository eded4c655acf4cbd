"""ctcurate export: a release as nnU-Net v2, MONAI and plain NIfTI folders, read back."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from helpers.release import CANARY, PARAMS, Inputs

import ctcurate.release
import ctcurate.release.format
from ctcurate.errors import OutputError, VerifyError
from ctcurate.pipeline import export, pack

# An anisotropic grid with unequal sides, so that a swapped axis cannot go unnoticed.
GRID = PARAMS.model_copy(update={"spacing_mm": (3.0, 2.0, 2.5), "shape": (4, 6, 5)})


@pytest.fixture(scope="module")
def release(pack_inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs = pack_inputs
    out = tmp_path_factory.mktemp("exportrel") / "release"
    pack.run(inputs.cases, inputs.index_dir, inputs.archive, inputs.annotations, out, GRID)
    return out


def _manifest(release: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((release / "manifest.json").read_text())
    return data


def _arrays(
    release: Path, case: dict[str, Any]
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    with h5py.File(release / "shards" / case["shard"], "r") as h5:
        return ctcurate.release.format.read_arrays(h5, case["case_id"])


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _check_volume(path: Path, expected: npt.NDArray[Any], case: dict[str, Any]) -> None:
    """The NIfTI file holds the release's voxels, spacing and position."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    assert data.dtype == expected.dtype
    np.testing.assert_array_equal(data.transpose(2, 1, 0), expected)
    sz, sy, sx = case["spacing_mm"]
    assert img.header.get_zooms() == pytest.approx((sx, sy, sz))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    # The release's voxel [k, j, i] lies at LPS origin + (i sx, j sy, k sz); RAS negates x, y.
    ox, oy, oz = case["origin_mm"]
    i, j, k = 4, 5, 3
    lps = np.array([ox + i * sx, oy + j * sy, oz + k * sz])
    ras = img.affine @ np.array([i, j, k, 1.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1.0, -1.0, 1.0]))


def test_nnunet_export_is_a_v2_raw_dataset_with_the_release_voxels(
    release: Path, tmp_path: Path
) -> None:
    out = tmp_path / "Dataset501_Ctcurate"
    summary = export.run(release, out, "nnunet")
    manifest = _manifest(release)
    cases = manifest["cases"]
    assert summary.startswith(f"release {manifest['release_id'][:16]} exported as nnunet")
    dataset = json.loads((out / "dataset.json").read_text())
    training = [c for c in cases if c["split"] in ("train", "val")]
    test = [c for c in cases if c["split"] == "test"]
    assert training
    assert test
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["labels"] == {"background": 0, "normal_lung": 1, "ggo": 2, "consolidation": 3}
    assert dataset["numTraining"] == len(training)
    assert dataset["file_ending"] == ".nii.gz"
    images_tr = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert images_tr == sorted(f"{c['case_id']}_0000.nii.gz" for c in training)
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == sorted(
        f"{c['case_id']}.nii.gz" for c in training
    )
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == sorted(
        f"{c['case_id']}_0000.nii.gz" for c in test
    )
    assert all(re.fullmatch(r"[0-9a-f]{16}_0000\.nii\.gz", name) for name in images_tr)
    folds = json.loads((out / "splits_final.json").read_text())
    assert folds == [
        {
            "train": sorted(c["case_id"] for c in cases if c["split"] == "train"),
            "val": sorted(c["case_id"] for c in cases if c["split"] == "val"),
        }
    ]
    for case in cases:
        image, label = _arrays(release, case)
        part = "Ts" if case["split"] == "test" else "Tr"
        _check_volume(out / f"images{part}" / f"{case['case_id']}_0000.nii.gz", image, case)
        _check_volume(out / f"labels{part}" / f"{case['case_id']}.nii.gz", label, case)
    marker = json.loads((out / export.MARKER).read_text())
    assert marker["release_id"] == manifest["release_id"]
    assert marker["format"] == "nnunet"


def test_monai_export_has_a_decathlon_datalist_monai_can_load(
    release: Path, tmp_path: Path
) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    out = tmp_path / "monai"
    export.run(release, out, "monai")
    cases = {c["case_id"]: c for c in _manifest(release)["cases"]}
    loader = LoadImaged(keys=["image", "label"], image_only=True)
    seen = 0
    for key, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        items = load_decathlon_datalist(out / "datalist.json", True, key, base_dir=out)
        assert sorted(i["case_id"] for i in items) == sorted(
            c for c, v in cases.items() if v["split"] == split
        )
        for item in items:
            case = cases[item["case_id"]]
            assert item["typical"] == case["typical"]
            image, _ = _arrays(release, case)
            loaded = loader(item)
            np.testing.assert_array_equal(np.asarray(loaded["image"]).transpose(2, 1, 0), image)
            _check_volume(Path(item["label"]), _arrays(release, case)[1], case)
            seen += 1
    assert seen == len(cases)


def test_nifti_export_has_image_label_pairs_and_a_case_table(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "nifti"
    export.run(release, out, "nifti")
    cases = {c["case_id"]: c for c in _manifest(release)["cases"]}
    with (out / "cases.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["case_id"] for r in rows) == sorted(cases)
    for row in rows:
        case = cases[row["case_id"]]
        assert row["split"] == case["split"]
        assert row["site"] == case["site"]
        assert int(row["typical"]) == case["typical"]
        assert json.loads(row["spacing_mm"]) == case["spacing_mm"]
        assert "sha256" not in row
        image, label = _arrays(release, case)
        _check_volume(out / row["image"], image, case)
        _check_volume(out / row["label"], label, case)
    for path in out.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes()


def test_export_is_byte_reproducible(release: Path, tmp_path: Path) -> None:
    export.run(release, tmp_path / "a", "nnunet")
    export.run(release, tmp_path / "b", "nnunet")
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_export_replaces_an_earlier_export_only(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export.run(release, out, "nnunet")
    export.run(release, out, "nifti")  # an earlier export: replaced whole
    assert (out / "cases.csv").is_file()
    assert not (out / "imagesTr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary, no lock left

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"results: refusing to replace a folder that `export`"):
        export.run(release, foreign, "nifti")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"file: refusing to replace something that is not a"):
        export.run(release, tmp_path / "file", "nifti")
    with pytest.raises(OutputError, match=r"export: refusing to write an output over or inside"):
        export.run(release, release / "export", "nifti")
    assert not (release / "export").exists()
    (tmp_path / "empty").mkdir()
    export.run(release, tmp_path / "empty", "monai")  # an empty folder is fine
    assert (tmp_path / "empty" / "datalist.json").is_file()


def test_a_damaged_release_is_not_exported(release: Path, tmp_path: Path) -> None:
    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    shard = copy / "shards" / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"shard-00000.h5: sha256 does not match"):
        export.run(copy, tmp_path / "out", "nnunet")
    assert not (tmp_path / "out").exists()


def test_cli_export(release: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctcurate.cli import app

    out = tmp_path / "nn"
    args = ["export", "--release", str(release), "--format", "nnunet", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "exported as nnunet: 9 cases" in result.output
    bad = CliRunner().invoke(app, [*args[:4], "--format", "dicom", "--out", str(out)])
    assert bad.exit_code == 2
