"""Tests of ``ctcurate predict``: the models on DICOM CT series, one or a batch."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pytest
import torch
from helpers.ct import make_ct, make_series
from helpers.release import case_id, write_cases
from helpers.train import make_case, make_release, tiny_params
from scipy import ndimage

import ctcurate.release
from ctcurate.dicom.seg import LABELS, read_seg_labels, write_seg
from ctcurate.errors import InputError, OutputError, ParamsError
from ctcurate.imaging.volume import (
    assemble_series,
    centred_grid,
    label_to_stack,
    resample_image,
    resample_label,
)
from ctcurate.io.atomic import dumps_json
from ctcurate.io.tables import write_parquet
from ctcurate.models import checkpoint, inference
from ctcurate.params import EvaluateParams, PackParams
from ctcurate.pipeline import evaluate, pack, predict, predict_batch, train

ROOT = Path(__file__).resolve().parents[1]
#: The release grid of the tiny models (make_release: 16^3 voxels of 4 mm).
# the salt puts the five phantom patients into train / val / test as 3 / 1 / 1
PACK = PackParams(spacing_mm=(4.0, 4.0, 4.0), shape=(16, 16, 16), workers=1, split_salt="predict-0")
EVAL = EvaluateParams(device="cpu", threads=1)
#: Phantom series: 32 slices of 32 x 32 pixels of 2 mm, i.e. make_case's 16^3 at 4 mm.
SHAPE = (32, 32, 32)
SPACING = 2.0
PATTERNS = ("typical", "atypical", "negative", "typical", "atypical")
SITE = "H01"


def write_phantom(
    folder: Path, uid: str, pattern: str, seed: int
) -> tuple[list[Any], npt.NDArray[np.uint8]]:
    """A chest phantom (test_train.make_case) as one DICOM CT series folder, files in
    reverse slice order; its instances and per-instance labels."""
    hu, label = make_case(np.random.default_rng(seed), SHAPE, pattern)
    half = (SHAPE[1] - 1) * SPACING / 2
    datasets = [
        make_ct(
            (hu[k].astype(np.int32) + 1024).astype(np.int16),
            (-half, -half, k * SPACING),
            series_uid=uid,
            index=k,
            spacing=(SPACING, SPACING),
            patient_id=f"P{seed}",
        )
        for k in range(SHAPE[0])
    ]
    folder.mkdir(parents=True)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"IM{SHAPE[0] - k:04d}", enforce_file_format=True)
    return datasets, label


@dataclass(frozen=True)
class World:
    root: Path
    models: Path
    archive: Path
    index: Path
    release: Path
    uids: list[str]


def _uid(k: int) -> str:
    return f"1.2.826.0.1.3680043.77.{k + 1}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Tiny models, an archive of five phantom series with their SEGs, an index and a
    release packed from it (splits 3 / 1 / 1)."""
    root = tmp_path_factory.mktemp("predict")
    train_release = make_release(root / "train_release", n_cases=8)
    train.run(train_release, root / "models", root / "live", tiny_params(epochs=3))
    archive, seg_dir = root / "archive", root / "annotations" / "seg"
    seg_dir.mkdir(parents=True)
    instances, cases, uids = [], [], []
    for k, pattern in enumerate(PATTERNS):
        uid = _uid(k)
        uids.append(uid)
        datasets, label = write_phantom(archive / SITE / f"s{k}", uid, pattern, seed=k)
        write_seg(seg_dir / f"{uid}.dcm", datasets, label)
        instances += [
            {
                "path": f"{SITE}/s{k}/IM{SHAPE[0] - i:04d}",
                "site": SITE,
                "series_instance_uid": uid,
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "manufacturer": "ACME",
                "slice_thickness": 2.0,
            }
            for i, ds in enumerate(datasets)
        ]
        typical = int(pattern == "typical")
        cases.append(
            {
                "case_id": case_id(SITE, uid),
                "series_instance_uid": uid,
                "study_instance_uid": f"1.2.826.0.2.{k}",
                "patient_id": f"P{k}",
                "site": SITE,
                "study_date": dt.date(2020, 3, 1),
                "era": "pandemic",
                "cohort": "covid",
                "exclusion": None,
                "pcr": "positive" if typical else "negative",
                "consensus_grade": 1 if typical else 3,
                "typical": typical,
            }
        )
    write_cases(root / "cases.parquet", sorted(cases, key=lambda c: str(c["case_id"])))
    write_parquet(
        root / "index" / "instances" / "part-00000.parquet",
        pa.Table.from_pylist(sorted(instances, key=lambda r: str(r["path"]))),
    )
    pack.run(
        root / "cases.parquet",
        root / "index",
        archive,
        root / "annotations",
        root / "release",
        PACK,
    )
    return World(root, root / "models", archive, root / "index", root / "release", uids)


def _write_params(path: Path) -> Path:
    """A params.yaml with the pack grid of :data:`PACK` and the evaluate section of EVAL."""
    path.write_text(
        "pack:\n  spacing_mm: [4.0, 4.0, 4.0]\n  shape: [16, 16, 16]\n  split_salt: predict-0\n"
        "evaluate:\n  device: cpu\n  threads: 1\n"
    )
    return path


def _predict_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``ctcurate predict ARGS --params`` (the params of :func:`_write_params`) run in ``cwd``."""
    params = _write_params(cwd / "params.yaml")
    return subprocess.run(
        [sys.executable, "-m", "ctcurate", "predict", *args, "--params", str(params)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        cwd=cwd,
    )


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- the grid


@pytest.mark.parametrize(
    "orientation", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, -1, 0), (0, 1, 0, 1, 0, 0)]
)
def test_labels_map_back_onto_every_instance(orientation: tuple[int, ...]) -> None:
    """On a release grid equal to the series grid the round trip instance → grid →
    instance is exact, whatever the orientation, file order and duplicate slices."""
    datasets, labels, _ = make_series(6, 8, orientation=orientation)
    labels[2, 1, 5] = 3  # break the symmetry
    datasets = [*reversed(datasets), datasets[2]]  # shuffled, one duplicate
    labels = np.concatenate([labels[::-1], labels[2:3]])
    stack = assemble_series(datasets)
    assert len(stack.kept) == 6
    params = PackParams(spacing_mm=(2.0, 2.0, 2.0), shape=(6, 8, 8))
    grid = centred_grid(stack, (np.asarray(stack.image.shape) - 1) / 2.0, params)
    np.testing.assert_array_equal(grid.origin_mm, stack.origin_mm)
    on_grid = resample_label(stack, grid, stack.orient(labels))
    back = stack.unorient(label_to_stack(stack, grid, on_grid))
    np.testing.assert_array_equal(back, labels)
    image = resample_image(stack, grid, params)
    hu = np.stack([ds.pixel_array.astype(np.int16) - 1024 for ds in datasets])
    np.testing.assert_array_equal(stack.unorient(image), hu)


def test_labels_outside_the_release_grid_are_background() -> None:
    datasets, _, _ = make_series(6, 8)
    stack = assemble_series(datasets)
    params = PackParams(spacing_mm=(2.0, 2.0, 2.0), shape=(2, 8, 8))  # 2 of the 6 slices
    grid = centred_grid(stack, np.array([0.5, 3.5, 3.5]), params)
    back = label_to_stack(stack, grid, np.full(grid.shape, 2, dtype=np.uint8))
    assert back[:2].min() == 2
    assert not back[2:].any()


def test_lung_centre_finds_the_phantom_lungs(tmp_path: Path) -> None:
    datasets, label = write_phantom(tmp_path / "s", "1.2.3.9", "negative", seed=3)
    stack = assemble_series(datasets)
    lung = np.argwhere(label > 0)
    truth = (lung.min(axis=0) + lung.max(axis=0)) / 2.0
    assert np.abs(inference.lung_centre(stack, PACK) - truth).max() <= 2.0  # one 4 mm step


def _phantom_on_grid(folder: Path, pattern: str, seed: int) -> tuple[Any, Any, Any, Any]:
    """A phantom series' stack, its release grid (centred as predict centres it), its
    truth labels on the stack and those labels on the grid (a network right on its grid)."""
    datasets, label = write_phantom(folder, f"1.2.3.{seed}", pattern, seed)
    stack = assemble_series(datasets)
    truth = stack.orient(label)
    grid = centred_grid(stack, inference.lung_centre(stack, PACK), PACK)
    return stack, grid, truth, resample_label(stack, grid, truth)


@pytest.mark.parametrize(("pattern", "seed"), [("typical", 1), ("negative", 3)])
def test_lung_from_hu_outlines_the_lung_at_the_series_resolution(
    pattern: str, seed: int, tmp_path: Path
) -> None:
    """With the lung from HU, the native SEG's lung follows the series' own pixels (2 mm
    here) rather than the 4 mm release grid's steps; the lesions stay those of the grid,
    and nothing outside the grid is labelled."""
    from ctcurate.models.metrics import dice

    stack, grid, truth, on_grid = _phantom_on_grid(tmp_path / "s", pattern, seed)
    stepped = inference.native_labels(stack, grid, on_grid, "network")
    outlined = inference.native_labels(stack, grid, on_grid, "hu")
    assert dice(stepped > 0, truth > 0) < 0.9
    assert dice(outlined > 0, truth > 0) > 0.98
    np.testing.assert_array_equal(outlined >= 2, stepped >= 2)
    # a grid that holds only the lower slices labels nothing above them
    low = PackParams(spacing_mm=PACK.spacing_mm, shape=(4, 16, 16))
    part = centred_grid(stack, np.array([7.5, 15.5, 15.5]), low)
    partial = inference.native_labels(stack, part, resample_label(stack, part, truth), "hu")
    assert partial[:16].any()
    assert not partial[16:].any()


def test_native_lesions_follow_the_series_pixels_within_the_growth_reach(tmp_path: Path) -> None:
    """With the card's lesion growth, the native SEG's lesions are drawn again from HU
    within that reach of the grid's lesions: their borders follow the series' 2 mm pixels
    instead of the 4 mm grid's steps; without growth they stay the grid's."""
    from ctcurate.models.metrics import dice

    stack, grid, truth, on_grid = _phantom_on_grid(tmp_path / "s", "typical", 1)
    stepped = inference.native_labels(stack, grid, on_grid, "hu")
    redrawn = inference.native_labels(stack, grid, on_grid, "hu", grow_mm=4.0)
    before, after = dice(stepped >= 2, truth >= 2), dice(redrawn >= 2, truth >= 2)
    assert after > before + 0.15, (before, after)
    np.testing.assert_array_equal(redrawn > 0, stepped > 0)  # the lung is the same
    # far from any lesion nothing changes
    far = ndimage.distance_transform_edt(stepped < 2, sampling=stack.spacing_mm) > 4.0
    np.testing.assert_array_equal(redrawn[far], stepped[far])


def test_the_native_outline_does_not_depend_on_the_slices_per_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stack, grid, _, on_grid = _phantom_on_grid(tmp_path / "s", "typical", 5)
    results = []
    for step in (1, 5, 1000):
        monkeypatch.setattr(inference, "NATIVE_SLICES", step)
        results.append(inference.native_labels(stack, grid, on_grid, "hu", grow_mm=8.0))
    # the lesions were drawn again (the halo of slices matters)
    assert not np.array_equal(results[0], inference.native_labels(stack, grid, on_grid, "hu"))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_native_labels_on_real_ct() -> None:
    """On a real chest CT (TCIA Lung-PET-CT-Dx, patient A0001, 64 slices of 5 mm at 512²;
    Li et al. 2020, doi:10.7937/TCIA.2020.NNC20461, CC BY 4.0), grid labels that hold the
    series' own threshold lung and one lesion come back on the series' pixels as that lung,
    and the redrawn lesion holds only lung at ground-glass density or denser, within the
    reach of the grid's lesion."""
    from helpers.realdata import TCIA

    from ctcurate.dicom.series_dir import read_series_dir
    from ctcurate.imaging.lungmask import threshold_lung_mask
    from ctcurate.models.metrics import dice
    from ctcurate.models.nets import GROW_HU_MIN

    folders = sorted({p.parent for p in TCIA.rglob("*.dcm") if "A0001" in str(p)})
    if not folders:
        pytest.skip("../shared/realct is absent")
    stack = assemble_series(read_series_dir(folders[0]))
    grid_params = PackParams(spacing_mm=(4.0, 4.0, 4.0), shape=(48, 96, 96))
    grid = centred_grid(stack, inference.lung_centre(stack, grid_params), grid_params)
    lung = threshold_lung_mask(stack.image)
    on_grid = resample_label(stack, grid, lung.astype(np.uint8))
    z, y, x = (int(np.median(v)) for v in np.nonzero(on_grid))
    on_grid[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = 2  # a 12 mm lesion in the lung
    covered = label_to_stack(stack, grid, np.ones(grid.shape, dtype=np.uint8)) > 0
    outlined = inference.native_labels(stack, grid, on_grid, "hu")
    redrawn = inference.native_labels(stack, grid, on_grid, "hu", grow_mm=8.0)
    assert dice(outlined[covered] > 0, lung[covered]) > 0.97
    np.testing.assert_array_equal(redrawn > 0, outlined > 0)  # the redraw keeps the lung
    lesion = redrawn >= 2
    assert lesion.any()
    assert (stack.image[lesion] >= GROW_HU_MIN).all()
    reach = ndimage.distance_transform_edt(outlined < 2, sampling=stack.spacing_mm)
    assert reach[lesion].max() <= 8.0
    assert not redrawn[~covered].any()


# --------------------------------------------------------------------------- one series


def test_predict_equals_evaluate_on_a_released_case(world: World, tmp_path: Path) -> None:
    """On the grid the release recorded, predict builds the release's image bit for bit
    and gives evaluate's labels and probability (JSON rounds it to 1e-6)."""
    test_set = ctcurate.release.open(world.release, split="test")
    sample = test_set[0]
    uid = str(sample["meta"]["series_instance_uid"])
    net, classifier, card = checkpoint.load_models(world.models)
    expected_label, expected_p = evaluate.predict_case(
        net,
        classifier,
        sample["image"],
        card["input"]["shape"],
        torch.device("cpu"),
        evaluate.lesion_cut_mm3(card),
        train.spacing_of(sample["meta"]),
        evaluate.lung_source(card),
        evaluate.lesion_grow_mm(card),
    )
    series = world.archive / SITE / f"s{world.uids.index(uid)}"
    models = predict.load(world.models, PACK.spacing_mm, torch.device("cpu"))
    pack_params, origins = predict.release_origins(world.release)
    got = predict.predict_series(
        predict.read_series_dir(series), models, pack_params, origins[(SITE, uid)]
    )
    np.testing.assert_array_equal(got.grid_image, sample["image"][0].numpy().astype(np.int16))
    np.testing.assert_array_equal(got.grid_label, expected_label)
    assert got.probability == pytest.approx(expected_p, abs=1e-5)

    out = tmp_path / "out"
    content = predict.run_series(series, world.models, out, PACK, EVAL, release=world.release)
    assert content["grid"]["centred_on"] == "release_case"
    assert content["typicality"]["probability"] == pytest.approx(expected_p, abs=1e-5)
    # and the evaluate stage itself called the case the same way
    evaluate.run(world.release, world.models, tmp_path / "eval.json", tmp_path / "plots", EVAL)
    confusion = json.loads((tmp_path / "plots" / "confusion.json").read_text())["confusion"]
    assert [row["predicted"] for row in confusion] == [content["typicality"]["label"]]
    test_set.close()


def test_outputs_seg_json_png(world: World, tmp_path: Path) -> None:
    import highdicom as hd

    series = world.archive / SITE / "s0"
    out = tmp_path / "out"
    content = predict.run_series(series, world.models, out, PACK, EVAL)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".ctcurate-output", inference.SEG_FILE, inference.JSON_FILE, inference.PNG_FILE]
    )
    assert (out / inference.JSON_FILE).read_text() == dumps_json(content)  # canonical
    assert json.loads(dumps_json(content)) == content
    model_json = (world.models / "model.json").read_bytes()
    assert content["model"]["id"] == hashlib.sha256(model_json).hexdigest()
    assert content["code_version"] == ctcurate.__version__
    assert content["grid"]["centred_on"] == "lung_estimate"
    assert 0.0 <= content["typicality"]["probability"] <= 1.0
    volumes = content["volumes_ml"]
    assert volumes["lung"] == pytest.approx(
        volumes["normal_lung"] + volumes["ground_glass_opacity"] + volumes["consolidation"],
        abs=1e-2,
    )
    assert volumes["lung"] > 0

    # the SEG read back with highdicom: segments, frames, referenced instances
    seg = hd.seg.segread(out / inference.SEG_FILE)
    descriptions = {n: seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    assert descriptions == LABELS
    datasets = predict.read_series_dir(series)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    labels = read_seg_labels(out / inference.SEG_FILE, uids)
    assert labels.any()
    present = sum(int((labels == s).any(axis=(1, 2)).sum()) for s in LABELS)
    assert int(seg.NumberOfFrames) == present  # empty frames are left out
    referenced = {sop for _, _, sop in seg.get_source_image_uids()}
    assert referenced == set(uids)
    assert (seg.Rows, seg.Columns) == (datasets[0].Rows, datasets[0].Columns)
    assert str(seg.SeriesInstanceUID) != str(datasets[0].SeriesInstanceUID)
    truth = hd.seg.segread(world.root / "annotations" / "seg" / f"{world.uids[0]}.dcm")
    assert str(seg.SeriesInstanceUID) != str(truth.SeriesInstanceUID)
    voxel_ml = SPACING**3 / 1000
    assert volumes["lung"] == pytest.approx(float((labels > 0).sum()) * voxel_ml, abs=1e-3)
    assert (out / inference.PNG_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_is_deterministic(world: World, tmp_path: Path) -> None:
    series = world.archive / SITE / "s1"
    for name in ("a", "b"):
        predict.run_series(series, world.models, tmp_path / name, PACK, EVAL)
    first = _hashes(tmp_path / "a")
    assert first == _hashes(tmp_path / "b")
    assert inference.SEG_FILE in first


def test_models_of_another_spacing_are_refused(world: World, tmp_path: Path) -> None:
    other = PackParams(spacing_mm=(2.0, 2.0, 2.0), shape=(16, 16, 16))
    with pytest.raises(ParamsError, match=r"model\.json: trained at spacing \[4\.0, 4\.0, 4\.0\]"):
        predict.run_series(world.archive / SITE / "s0", world.models, tmp_path / "o", other, EVAL)
    assert not (tmp_path / "o").exists()


def test_a_foreign_output_folder_is_refused(world: World, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"did not write"):
        predict.run_series(world.archive / SITE / "s0", world.models, out, PACK, EVAL)
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_duplicate_slice_is_represented_by_its_twin(world: World, tmp_path: Path) -> None:
    """An identical duplicate instance is dropped as pack drops it (the first of the two by
    SOPInstanceUID is kept); highdicom refuses two frames at one position, so the SEG
    references the kept one only."""
    import pydicom

    folder = tmp_path / "dup"
    folder.mkdir()
    for path in sorted((world.archive / SITE / "s0").iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
    ds = pydicom.dcmread(sorted(folder.iterdir())[7])
    twin = str(ds.SOPInstanceUID)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.save_as(folder / "ZZ0001")
    content = predict.run_series(folder, world.models, tmp_path / "out", PACK, EVAL)
    assert content["n_instances"] == SHAPE[0] + 1
    assert content["duplicates_dropped"] == 1
    seg = pydicom.dcmread(tmp_path / "out" / inference.SEG_FILE)
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert len(referenced) == SHAPE[0]
    assert len(referenced & {twin, "1.2.3.4.5.6.7"}) == 1  # the first by SOPInstanceUID
    single = predict.run_series(
        world.archive / SITE / "s0", world.models, tmp_path / "o2", PACK, EVAL
    )
    assert content["volumes_ml"] == single["volumes_ml"]


def _broken_copy(world: World, tmp_path: Path, how: str) -> Path:
    import pydicom

    folder = tmp_path / how
    folder.mkdir()
    for path in sorted((world.archive / SITE / "s2").iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
    victim = sorted(folder.iterdir())[5]
    if how == "not_ct":
        ds = pydicom.dcmread(victim)
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        ds.save_as(victim)
    elif how == "pixels":
        ds = pydicom.dcmread(victim)
        ds.PixelData = ds.PixelData[:100]
        ds.save_as(victim)
    elif how == "few":
        for path in sorted(folder.iterdir())[2:]:
            path.unlink()
    elif how == "text":
        victim.write_text("not dicom")
    elif how == "head":  # every header that could name a region names the head
        for path in sorted(folder.iterdir()):
            ds = pydicom.dcmread(path)
            ds.BodyPartExamined = "HEAD"
            ds.StudyDescription = "CT HEAD"
            ds.SeriesDescription = "Brain 5mm"
            ds.ProtocolName = "Routine Head"
            for keyword in ("AnatomicRegionSequence", "RequestedProcedureDescription"):
                if keyword in ds:
                    delattr(ds, keyword)
            ds.save_as(path)
    elif how == "dirfile":  # Philips writes a media storage directory into each series folder
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
        meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        directory = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        directory.FileSetID = "EXPORT"
        directory.DirectoryRecordSequence = []
        directory.save_as(folder / "DIRFILE", enforce_file_format=True)
    return folder


def test_a_media_storage_directory_in_the_folder_is_not_an_instance(
    world: World, tmp_path: Path
) -> None:
    folder = _broken_copy(world, tmp_path, "dirfile")
    plain = predict.run_series(
        world.archive / SITE / "s2", world.models, tmp_path / "a", PACK, EVAL
    )
    with_dir = predict.run_series(folder, world.models, tmp_path / "b", PACK, EVAL)
    assert with_dir == plain


def test_a_series_whose_headers_name_the_head_is_refused(world: World, tmp_path: Path) -> None:
    from ctcurate.selection.region import VOCABULARY_FILE, read_vocabulary

    regions = read_vocabulary(ROOT / "stages" / "select" / VOCABULARY_FILE)
    folder = _broken_copy(world, tmp_path, "head")
    with pytest.raises(InputError, match=r"headers name the head, not the chest \(BodyPart"):
        predict.run_series(folder, world.models, tmp_path / "out", PACK, EVAL, regions=regions)
    assert not (tmp_path / "out").exists()
    # the chest series of the same world pass the same check
    predict.run_series(
        world.archive / SITE / "s2", world.models, tmp_path / "chest", PACK, EVAL, regions=regions
    )
    # without the check (--any-region) the head series is predicted
    predict.run_series(folder, world.models, tmp_path / "any", PACK, EVAL)
    assert (tmp_path / "any" / "prediction.json").is_file()


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("pixels", r"cannot assemble the series: pixel_data \(pixel data"),
        ("few", r"cannot assemble the series: too_few_slices \(2 instances\)"),
        ("text", r"IM\d{4}: not a readable DICOM file \(InvalidDicomError\)"),
    ],
)
def test_a_broken_series_is_one_error_naming_why(
    world: World, tmp_path: Path, how: str, message: str
) -> None:
    folder = _broken_copy(world, tmp_path, how)
    with pytest.raises(InputError, match=message):
        predict.run_series(folder, world.models, tmp_path / "out", PACK, EVAL)
    assert not (tmp_path / "out").exists()


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a refused command (exit code of an input error)."""
    assert proc.returncode == InputError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_non_ct_series_is_one_line_and_non_zero_exit(world: World, tmp_path: Path) -> None:
    folder = _broken_copy(world, tmp_path, "not_ct")
    proc = _predict_cli(
        tmp_path,
        *("--series", str(folder), "--models", str(world.models), "--out", str(tmp_path / "out")),
    )
    line = _one_line_error(proc)
    assert line.startswith(f"ctcurate: error: {folder}: cannot assemble the series: ")
    assert "not_ct_image" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_head_series_is_one_line_unless_any_region(world: World, tmp_path: Path) -> None:
    folder = _broken_copy(world, tmp_path, "head")
    common = ("--series", str(folder), "--models", str(world.models))
    rules = ("--rules", str(ROOT / "stages" / "select"))
    proc = _predict_cli(tmp_path, *common, "--out", str(tmp_path / "out"), *rules)
    line = _one_line_error(proc)
    assert line.startswith(f"ctcurate: error: {folder}: its headers name the head")
    assert "--any-region" in line
    assert not (tmp_path / "out").exists()
    anyway = _predict_cli(tmp_path, *common, "--out", str(tmp_path / "out"), *rules, "--any-region")
    assert anyway.returncode == 0, anyway.stderr
    assert (tmp_path / "out" / "prediction.json").is_file()


# --------------------------------------------------------------------------- batch


@pytest.mark.slow
def test_batch_accounts_for_every_selected_series(world: World, tmp_path: Path) -> None:
    """Six selected series (one with a truncated instance, one not indexed, one a second
    site's copy of a series UID) and one not selected: three predicted, three failed with
    their reasons, the other one not seen."""
    import pyarrow.parquet as pq
    import pydicom

    archive = tmp_path / "archive"
    for path in sorted(world.archive.rglob("*")):
        if path.is_file():
            target = archive / path.relative_to(world.archive)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    broken = sorted((archive / SITE / "s3").iterdir())[4]
    ds = pydicom.dcmread(broken)
    ds.PixelData = ds.PixelData[:64]
    ds.save_as(broken)
    instances = pq.read_table(world.index / "instances" / "part-00000.parquet").to_pylist()
    copies = [r | {"site": "H02"} for r in instances if r["series_instance_uid"] == world.uids[1]]
    write_parquet(
        tmp_path / "index" / "instances" / "part-00000.parquet",
        pa.Table.from_pylist(instances + copies),
    )
    rows = [
        {"site": SITE, "series_instance_uid": uid, "selected": k != 4}
        for k, uid in enumerate(world.uids)
    ]
    rows.append({"site": SITE, "series_instance_uid": "1.2.3.404", "selected": True})
    rows.append({"site": "H02", "series_instance_uid": world.uids[1], "selected": True})
    write_parquet(tmp_path / "series.parquet", pa.Table.from_pylist(rows))
    out = tmp_path / "out"
    report = predict_batch.run_batch(
        tmp_path / "series.parquet", tmp_path / "index", archive, world.models, out, PACK, EVAL
    )
    assert report["series_seen"] == 6
    assert report["series_predicted"] == 3
    assert report["series_failed"] == 3
    assert report["failed_reasons"] == {
        "duplicate_series_uid": 1,
        "no_instances": 1,
        "pixel_data": 1,
    }
    outcome = {(r["site"], r["series_instance_uid"]): r["status"] for r in report["series"]}
    assert outcome == {
        (SITE, world.uids[0]): "predicted",
        (SITE, world.uids[1]): "predicted",
        (SITE, world.uids[2]): "predicted",
        (SITE, world.uids[3]): "failed",
        (SITE, "1.2.3.404"): "failed",
        ("H02", world.uids[1]): "failed",
    }
    assert json.loads((out / inference.REPORT).read_text()) == report
    for uid in world.uids[:3]:
        assert sorted(p.name for p in (out / uid).iterdir()) == sorted(
            [inference.JSON_FILE, inference.PNG_FILE, inference.SEG_FILE]
        )
    assert not (out / world.uids[3]).exists()
    grid = json.loads((out / world.uids[0] / inference.JSON_FILE).read_text())["grid"]
    assert grid["centred_on"] == "lung_estimate"
    # the batch gives the bytes of a single-series run
    predict.run_series(archive / SITE / "s0", world.models, tmp_path / "one", PACK, EVAL)
    single = _hashes(tmp_path / "one")
    batch = _hashes(out / world.uids[0])
    assert {k: v for k, v in single.items() if not k.startswith(".")} == batch


@pytest.mark.slow  # two pool processes each import torch and MONAI: ~25 s on 2 CPU cores
def test_cli_batch_on_a_local_pool_logs_progress(world: World, tmp_path: Path) -> None:
    """The CLI's batch on a pool of 2 workers: progress lines, no UIDs in the log, and the
    bytes of an in-process single-series run."""
    rows = [{"site": SITE, "series_instance_uid": uid, "selected": True} for uid in world.uids[:2]]
    write_parquet(tmp_path / "series.parquet", pa.Table.from_pylist(rows))
    proc = _predict_cli(
        tmp_path,
        *("--selected", "series.parquet", "--index", str(world.index)),
        *("--archive", str(world.archive), "--models", str(world.models)),
        *("--out", "out", "--workers", "2"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "ctcurate.predict: predict: done, 2 series" in proc.stderr
    assert "predicted 2 of 2 selected series (0 failed: none)" in proc.stderr
    for uid in world.uids[:2]:
        assert uid not in proc.stderr  # logs carry counts, never header values
    report = json.loads((tmp_path / "out" / inference.REPORT).read_text())
    assert report["series_predicted"] == 2
    predict.run_series(world.archive / SITE / "s1", world.models, tmp_path / "one", PACK, EVAL)
    one = (tmp_path / "one" / inference.SEG_FILE).read_bytes()
    assert (tmp_path / "out" / world.uids[1] / inference.SEG_FILE).read_bytes() == one


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], r"give either --series DIR or --selected F"),
        (["--series", "s", "--selected", "f"], r"give either --series DIR or --selected F"),
        (["--selected", "f"], r"--selected needs --index and --archive"),
    ],
)
def test_cli_needs_one_input(tmp_path: Path, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from ctcurate.cli import app

    result = CliRunner().invoke(
        app, ["predict", "--models", str(tmp_path), "--out", str(tmp_path / "o"), *args]
    )
    assert isinstance(result.exception, InputError)
    assert re.search(message, str(result.exception))


def test_batch_on_a_release_uses_its_recorded_grids(world: World, tmp_path: Path) -> None:
    manifest = json.loads((world.release / "manifest.json").read_text())
    origins = {c["series_instance_uid"]: c["origin_mm"] for c in manifest["cases"]}
    rows = [{"site": SITE, "series_instance_uid": uid, "selected": True} for uid in world.uids[:2]]
    write_parquet(tmp_path / "series.parquet", pa.Table.from_pylist(rows))
    report = predict_batch.run_batch(
        tmp_path / "series.parquet",
        world.index,
        world.archive,
        world.models,
        tmp_path / "out",
        PackParams(),  # the release's own pack params are used instead
        EVAL,
        release=world.release,
    )
    assert report["series_predicted"] == 2
    for uid in world.uids[:2]:
        grid = json.loads((tmp_path / "out" / uid / inference.JSON_FILE).read_text())["grid"]
        assert grid["centred_on"] == "release_case"
        assert grid["origin_mm"] == origins[uid]
        assert grid["shape"] == list(PACK.shape)


def test_gpu_predict_check_dry_run_agrees_and_cuda_is_refused_without_it(
    world: World, tmp_path: Path
) -> None:
    import torch

    params = _write_params(tmp_path / "params.yaml")
    script = ROOT / "scripts" / "gpu_predict_check.py"
    base = [sys.executable, str(script), "--series", str(world.archive / SITE / "s0")]
    base += ["--models", str(world.models), "--params", str(params)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    dry = subprocess.run(
        [*base, "--device", "cpu"], check=False, capture_output=True, text=True, env=env
    )
    assert dry.returncode == 0, dry.stderr
    result = json.loads(dry.stdout)
    assert result["ok"] is True
    assert result["seg_agreement"] == 1.0
    assert result["probability"]["test"] == result["probability"]["cpu"]
    assert result["volumes_ml"]["test"] == result["volumes_ml"]["cpu"]
    assert result["seg_frames"][1:] == list(SHAPE[1:])  # frames in the series' pixel grid
    if not torch.cuda.is_available():
        cuda = subprocess.run(
            [*base, "--device", "cuda"], check=False, capture_output=True, text=True, env=env
        )
        assert cuda.returncode == 2
        assert cuda.stderr.strip().count("\n") == 0
        assert "CUDA is not available" in cuda.stderr


def test_label_counts_match_a_bincount_of_the_whole_volume() -> None:
    from ctcurate.models.inference import label_counts

    rng = np.random.default_rng(2)
    label = rng.integers(0, 4, size=(7, 9, 11), dtype=np.uint8)
    assert label_counts(label, 4).tolist() == np.bincount(label.ravel(), minlength=4).tolist()
    label[3, 2, 1] = 6  # a value past minlength is counted, not dropped
    assert label_counts(label, 4).tolist() == np.bincount(label.ravel(), minlength=4).tolist()
    empty = np.zeros((2, 3, 3), dtype=np.uint8)
    assert label_counts(empty, 4).tolist() == [18, 0, 0, 0]
