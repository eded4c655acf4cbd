"""The synthetic archive: determinism, traps, anatomy, lesions, SEG alignment, annotations."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from helpers.synth import TINY_ARCHIVE as SMALL
from pydantic import ValidationError
from scipy import ndimage

from ctcurate.demo.anatomy import (
    BONE,
    FAT,
    LUNG,
    SOFT,
    Grid,
    make_chest,
    reconstruct,
    sample_body,
    scan_range,
)
from ctcurate.demo.annotations import grade_rows, pcr_rows, to_csv
from ctcurate.demo.cohort import CHEST_TRAPS as COHORT_CHEST_TRAPS
from ctcurate.demo.cohort import plan_cohort
from ctcurate.demo.dicomwrite import SeriesInfo, ct_series, encode_series
from ctcurate.demo.headerheavy import HH_MATRIX, SeriesTemplate, _study_instances, plan_header_heavy
from ctcurate.demo.lesions import add_pattern
from ctcurate.demo.vendors import SITE_BY_CODE, SITES
from ctcurate.dicom.seg import read_seg_labels
from ctcurate.labels import CONSOLIDATION, GGO, NORMAL
from ctcurate.params import SynthParams
from ctcurate.pipeline.synth import run, write_header_heavy

CHEST_TRAPS = {
    "duplicate_site",
    "shuffled_names",
    "missing_slice",
    "duplicate_slice",
    "rle_lossless",
    "jpeg2000_lossless",
    "jpegls_lossless",
    "truncated_pixels",
    "truncated_header",
    "phi_birth_date",
    "phi_institution",
    "phi_patient_name",
    "non_dicom_text",
    "non_dicom_zero_bytes",
    "non_dicom_thumbs_db",
}
KINDS = {
    "chest_ct",
    "chest_ct_soft",
    "localizer",
    "dose_report",
    "head_ct",
    "abdomen_ct",
    "mr",
    "cr",
}
RLE, J2K, JLS = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under root, by relative path."""
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tiny_archive: Path) -> Path:
    """The session's tiny archive, generated with ``SMALL``."""
    return tiny_archive


@pytest.fixture(scope="module")
def truth(small: Path) -> list[dict[str, object]]:
    return list(pq.read_table(small / "truth.parquet").to_pylist())


@pytest.fixture(scope="module")
def trap_files(small: Path) -> list[dict[str, object]]:
    return list(pq.read_table(small / "truth_files.parquet").to_pylist())


# -- determinism ----------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_gives_identical_tree(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run(again, SMALL)
    first, second = tree_digest(small), tree_digest(again)
    assert first == second
    assert len(first) > 100


@pytest.mark.slow
def test_other_seed_replaces_output_with_another_archive(tmp_path: Path) -> None:
    out = tmp_path / "out"
    params = SynthParams(patients=2, seed=12, matrix=32)
    run(out, params)
    first = tree_digest(out)
    (out / "stale.txt").write_text("old\n", encoding="utf-8")
    run(out, params.model_copy(update={"seed": 13}))
    second = tree_digest(out)
    assert "stale.txt" not in second
    assert first["truth.parquet"] != second["truth.parquet"]
    assert set(first) != set(second) or first != second
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- layout, sites, traps ---------------------------------------------------------------------


def test_outputs_and_sites(small: Path, truth: list[dict[str, object]]) -> None:
    for rel in ("annotations/pcr.csv", "annotations/grades.csv", "preview.png"):
        assert (small / rel).is_file(), rel
    assert (small / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sites = sorted(p.name for p in (small / "archive").iterdir())
    assert sites == ["H01", "H02", "H03", "H04", "H05"]
    assert {r["kind"] for r in truth} == KINDS
    keys = [(r["site"], r["series_instance_uid"]) for r in truth]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


def test_every_trap_is_present_and_recorded(
    small: Path, trap_files: list[dict[str, object]]
) -> None:
    traps = {str(r["trap"]) for r in trap_files}
    assert traps >= CHEST_TRAPS
    archive = small / "archive"
    for row in trap_files:
        path = archive / str(row["path"])
        if row["trap"] == "missing_slice":
            assert not path.exists()
        else:
            assert path.is_file(), row
    reasons = {str(r["trap"]): r["expected_reason"] for r in trap_files}
    assert reasons["truncated_pixels"] == "pixel_length_short"
    assert reasons["truncated_header"] == "no_pixel_data"
    assert reasons["phi_patient_name"] == "phi_present"
    assert reasons["non_dicom_zero_bytes"] == "not_dicom"


def _by_trap(trap_files: list[dict[str, object]], trap: str) -> list[str]:
    return sorted(str(r["path"]) for r in trap_files if r["trap"] == trap)


def test_file_traps_behave_as_recorded(small: Path, trap_files: list[dict[str, object]]) -> None:
    archive = small / "archive"
    for rel in _by_trap(trap_files, "truncated_pixels"):
        ds = pydicom.dcmread(archive / rel)
        expected = int(ds.Rows) * int(ds.Columns) * 2
        assert len(ds.PixelData) < expected
    for rel in _by_trap(trap_files, "truncated_header"):
        ds = pydicom.dcmread(archive / rel)
        assert "PixelData" not in ds
    for rel in _by_trap(trap_files, "non_dicom_zero_bytes"):
        assert (archive / rel).stat().st_size == 0
    for rel in _by_trap(trap_files, "non_dicom_text"):
        assert b"DICM" not in (archive / rel).read_bytes()[:132]
    for trap, syntax in (
        ("rle_lossless", RLE),
        ("jpeg2000_lossless", J2K),
        ("jpegls_lossless", JLS),
    ):
        paths = _by_trap(trap_files, trap)
        assert paths, trap
        for rel in paths[:3]:
            ds = pydicom.dcmread(archive / rel)
            assert ds.file_meta.TransferSyntaxUID == syntax
            assert ds.pixel_array.shape == (int(ds.Rows), int(ds.Columns))


def test_duplicate_site_copies_are_identical(
    small: Path, truth: list[dict[str, object]], trap_files: list[dict[str, object]]
) -> None:
    archive = small / "archive"
    copies = _by_trap(trap_files, "duplicate_site")
    assert copies
    dup_rows = [r for r in truth if r["duplicate_of"] is not None]
    assert len(dup_rows) == 1
    uid = dup_rows[0]["series_instance_uid"]
    originals = [r for r in truth if r["series_instance_uid"] == uid and r["duplicate_of"] is None]
    assert len(originals) == 1
    assert originals[0]["site"] != dup_rows[0]["site"]
    assert {c.split("/")[0] for c in copies} == {dup_rows[0]["site"]}
    by_sop: dict[str, set[str]] = defaultdict(set)
    for p in sorted(archive.rglob("*")):
        if p.is_file() and p.stat().st_size > 200:
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
            if ds.get("SeriesInstanceUID") == uid:
                by_sop[str(ds.SOPInstanceUID)].add(hashlib.sha256(p.read_bytes()).hexdigest())
    assert by_sop
    assert all(len(digests) == 1 for digests in by_sop.values())


def _headers(root: Path) -> list[tuple[str, pydicom.Dataset]]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size > 132 and p.read_bytes()[128:132] == b"DICM":
            out.append(
                (p.relative_to(root).as_posix(), pydicom.dcmread(p, stop_before_pixels=True))
            )
    return out


def test_phi_only_where_planted(small: Path, trap_files: list[dict[str, object]]) -> None:
    planted = {str(r["path"]) for r in trap_files if str(r["trap"]).startswith("phi_")}
    leaking = set()
    for rel, ds in _headers(small / "archive"):
        if any(
            str(ds.get(k, "") or "") for k in ("PatientName", "PatientBirthDate", "InstitutionName")
        ):
            leaking.add(rel)
    assert leaking == planted


def test_series_shapes_missing_and_duplicate_slices(
    small: Path, trap_files: list[dict[str, object]]
) -> None:
    positions: dict[str, list[float]] = defaultdict(list)
    kinds: Counter[str] = Counter()
    for rel, ds in _headers(small / "archive"):
        if rel.split("/")[0] == "H01" or "ImagePositionPatient" not in ds:
            pass
        if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and "LOCALIZER" not in ds.ImageType:
            positions[f"{rel.split('/')[0]}|{ds.SeriesInstanceUID}"].append(
                float(ds.ImagePositionPatient[2])
            )
        kinds[str(ds.SOPClassUID)] += 1
    assert kinds["1.2.840.10008.5.1.4.1.1.7"] >= 1  # dose-report screenshots
    missing = {str(r["series_instance_uid"]) for r in trap_files if r["trap"] == "missing_slice"}
    duplicate = {
        str(r["series_instance_uid"]) for r in trap_files if r["trap"] == "duplicate_slice"
    }
    truncated = {
        str(r["series_instance_uid"]) for r in trap_files if str(r["trap"]).startswith("truncated")
    }
    for key, zs in positions.items():
        series = key.split("|")[1]
        if series in truncated:
            continue
        steps = np.diff(sorted(set(zs)))
        gaps = int((steps > 1.5 * steps.min()).sum()) if steps.size else 0
        dups = len(zs) - len(set(zs))
        assert gaps == (1 if series in missing else 0), key
        assert dups == (1 if series in duplicate else 0), key


# -- anatomy and lesions ----------------------------------------------------------------------


def _chest(seed: int, thickness: float = 2.5, matrix: int = 96) -> tuple[np.ndarray, object]:
    rng = np.random.default_rng(seed)
    body = sample_body(rng)
    top, bottom = scan_range(body)
    grid = Grid(z=np.arange(top, bottom, -thickness), matrix=matrix, pixel=360.0 / matrix)
    return rng, make_chest(rng, body, grid, SynthParams().vessel_trees)


@pytest.mark.parametrize("seed", [1, 2])
def test_hu_statistics_per_tissue(seed: int) -> None:
    rng, chest = _chest(seed)
    image = reconstruct(rng, chest.hu, sharpness=0.85, noise_hu=18.0)  # type: ignore[attr-defined]
    tissue = chest.tissue  # type: ignore[attr-defined]

    def mean(cls: int, erode: int = 1) -> float:
        mask = tissue == cls
        if erode:
            mask = ndimage.binary_erosion(mask, iterations=erode)
        assert mask.sum() > 100
        return float(image[mask].mean())

    assert -900.0 <= mean(LUNG, 0) <= -750.0
    assert -130.0 <= mean(FAT) <= -70.0
    assert 20.0 <= mean(SOFT) <= 70.0
    assert mean(BONE, 0) > 300.0
    lung = image[tissue == LUNG]
    assert 15.0 < float(lung.std()) < 250.0  # textured, not flat


def test_patients_differ_in_size() -> None:
    sizes = [sample_body(np.random.default_rng(s)).half_width for s in range(8)]
    assert max(sizes) - min(sizes) > 10.0


def test_typical_pattern_is_bilateral_peripheral_and_basal() -> None:
    rng, chest = _chest(4)
    _, labels, _ = add_pattern(rng, chest, "typical", 0.7, False)  # type: ignore[arg-type]
    lesion = labels >= GGO
    assert lesion.any()
    side = chest.lung_side  # type: ignore[attr-defined]
    assert (lesion & (side < 0)).any()
    assert (lesion & (side > 0)).any()
    depth = chest.depth  # type: ignore[attr-defined]
    assert float(depth[lesion].mean()) > float(depth[labels == NORMAL].mean())
    rho = chest.rho  # type: ignore[attr-defined]
    assert float(rho[lesion].mean()) > float(rho[labels == NORMAL].mean())
    assert set(np.unique(labels[chest.tissue != LUNG])) <= {0}  # type: ignore[attr-defined]


def test_border_consolidation_hides_lung_from_a_threshold() -> None:
    rng, chest = _chest(5)
    hu, labels, _ = add_pattern(rng, chest, "atypical", 0.8, True)  # type: ignore[arg-type]
    cons = labels == CONSOLIDATION
    assert cons.sum() > 50
    assert float(np.median(hu[cons])) > -100.0  # a -400 HU lung threshold misses it


def test_pleural_consolidation_lies_against_the_chest_wall_anywhere() -> None:
    """With ``pleural`` 1 a pneumonia gets far more consolidation against non-lung tissue,
    in front as well as behind; with 0 the random stream (and the chest) is unchanged."""

    def wall_contact(seed: int, pleural: float) -> tuple[int, int]:
        rng, chest = _chest(seed)
        hu, labels, _ = add_pattern(rng, chest, "typical", 0.5, False, pleural=pleural)  # type: ignore[arg-type]
        cons = labels == CONSOLIDATION
        assert float(np.median(hu[cons])) > -100.0
        wall = ndimage.binary_dilation(chest.tissue != LUNG) & cons  # type: ignore[attr-defined]
        return int(wall.sum()), int((wall & (chest.posterior < 0)).sum())  # type: ignore[attr-defined]

    seeds = (4, 7, 9)
    on = np.sum([wall_contact(s, 1.0) for s in seeds], axis=0)
    off = np.sum([wall_contact(s, 0.0) for s in seeds], axis=0)
    assert on[0] > 3 * off[0]
    assert on[1] > 3 * off[1]  # anterior contact too
    for seed in seeds:
        rng0, chest0 = _chest(seed)
        plain = add_pattern(rng0, chest0, "typical", 0.5, False)  # type: ignore[arg-type]
        rng1, chest1 = _chest(seed)
        zero = add_pattern(rng1, chest1, "typical", 0.5, False, pleural=0.0)  # type: ignore[arg-type]
        np.testing.assert_array_equal(plain[0], zero[0])
        np.testing.assert_array_equal(plain[1], zero[1])
        assert rng0.random() == rng1.random()


def test_dependent_atelectasis_densifies_the_back_of_the_lower_lungs_labelled_normal() -> None:
    """With ``atelectasis`` 1 a clear chest gets dense lung at the back of its lower zones,
    still labelled normal lung; the front hardly changes, the apices not at all; with 0 the
    random stream (and the chest) is unchanged."""
    rng, chest = _chest(8)
    base = chest.hu.copy()
    hu, labels, _ = add_pattern(rng, chest, "negative", 0.0, False, atelectasis=1.0)  # type: ignore[arg-type]
    lung = chest.tissue == LUNG
    assert set(np.unique(labels[lung])) == {NORMAL}
    raised = hu - base
    back = lung & (chest.posterior > 0.6) & (chest.depth > 0.75)  # type: ignore[operator]
    front = lung & (chest.posterior < 0.0)  # type: ignore[operator]
    apex = lung & (chest.depth < 0.3)  # type: ignore[operator]
    assert float(raised[back].mean()) > 40.0
    assert float((hu[back] > -600.0).mean()) > 0.1  # dense enough to read as opacity
    assert float(raised[front].mean()) < 0.1 * float(raised[back].mean())  # thin bases only
    assert float(np.abs(raised[apex]).max()) == 0.0
    for seed in (3, 8):
        rng0, chest0 = _chest(seed)
        plain = add_pattern(rng0, chest0, "typical", 0.5, False)  # type: ignore[arg-type]
        rng1, chest1 = _chest(seed)
        zero = add_pattern(rng1, chest1, "typical", 0.5, False, atelectasis=0.0)  # type: ignore[arg-type]
        np.testing.assert_array_equal(plain[0], zero[0])
        assert rng0.random() == rng1.random()


def test_more_vessel_trees_put_more_vessels_in_the_lung() -> None:
    """``vessel_trees`` 12 gives clearly more vessel voxels in the lung than the demo's 4
    (``synth``'s default), and more cross-sections per slice."""

    def chest_with(trees: int) -> object:
        rng = np.random.default_rng(5)
        body = sample_body(rng)
        top, bottom = scan_range(body)
        grid = Grid(z=np.arange(top, bottom, -2.5), matrix=96, pixel=360.0 / 96)
        return make_chest(rng, body, grid, trees)

    assert SynthParams().vessel_trees == 4
    four, twelve = (chest_with(t) for t in (4, 12))
    lung = four.tissue == LUNG  # type: ignore[attr-defined]
    vessels = [int((c.hu[lung] > -500.0).sum()) for c in (four, twelve)]  # type: ignore[attr-defined]
    assert vessels[1] > 1.8 * vessels[0]
    mid = lung.shape[0] // 2
    sections = [
        ndimage.label(lung[mid] & (c.hu[mid] > -500.0))[1]  # type: ignore[attr-defined]
        for c in (four, twelve)
    ]
    assert sections[1] > sections[0]


def test_negative_has_only_normal_lung_and_patterns_are_checked() -> None:
    rng, chest = _chest(6)
    _, labels, _ = add_pattern(rng, chest, "negative", 0.0, False)  # type: ignore[arg-type]
    assert set(np.unique(labels)) == {0, 1}
    with pytest.raises(ValueError, match="unknown pattern 'viral'"):
        add_pattern(rng, chest, "viral", 0.5, False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"severity must be within 0\.\.1"):
        add_pattern(rng, chest, "typical", 1.5, False)  # type: ignore[arg-type]


# -- SEG alignment ----------------------------------------------------------------------------


@pytest.mark.slow
def test_seg_masks_align_with_their_images(small: Path, truth: list[dict[str, object]]) -> None:
    archive = small / "archive"
    thin = {
        str(r["series_instance_uid"]): r
        for r in truth
        if r["kind"] == "chest_ct" and r["duplicate_of"] is None
    }
    segs = sorted((small / "annotations" / "seg").glob("*.dcm"))
    assert {p.stem for p in segs} == set(thin)
    images: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for p in sorted(archive.rglob("*")):
        if p.is_file() and p.stat().st_size > 132 and p.read_bytes()[128:132] == b"DICM":
            ds = pydicom.dcmread(p)
            if (
                ds.SeriesInstanceUID in thin
                and p.relative_to(archive).parts[0] == thin[ds.SeriesInstanceUID]["site"]
            ):
                images[str(ds.SeriesInstanceUID)].append(ds)
    lesion_hu: list[float] = []
    checked = 0
    for uid, found in sorted(images.items()):
        datasets = [ds for ds in found if "PixelData" in ds]
        order = np.random.default_rng(0).permutation(len(datasets))
        shuffled = [datasets[i] for i in order]
        labels = read_seg_labels(
            small / "annotations" / "seg" / f"{uid}.dcm", [ds.SOPInstanceUID for ds in shuffled]
        )
        hu = np.stack(
            [
                ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                for ds in shuffled
            ]
        )
        assert labels.shape == hu.shape
        assert (labels == NORMAL).any(), uid
        # labelled lung lies on dark voxels; the same labels in reversed order do not
        aligned = float((hu[labels == NORMAL] < -500.0).mean())
        flipped = float((hu[labels[::-1] == NORMAL] < -500.0).mean())
        assert aligned > 0.85, uid
        assert flipped < aligned
        checked += 1
        if (labels == CONSOLIDATION).sum() > 20:
            lesion_hu.append(float(hu[labels == CONSOLIDATION].mean()))
        if thin[uid]["pattern"] == "negative":
            assert not (labels >= GGO).any()
    assert checked == len(thin)
    assert all(v > -300.0 for v in lesion_hu)


# -- eras, PCR, readers -------------------------------------------------------------------------


def test_eras_and_covid_only_in_pandemic(truth: list[dict[str, object]]) -> None:
    for r in truth:
        date = r["study_date"]
        assert isinstance(date, dt.date)
        assert dt.date(2018, 1, 1) <= date <= dt.date(2021, 12, 31)
        assert r["era"] == ("pandemic" if date >= SMALL.pandemic_start else "pre_pandemic")
        if r["covid"]:
            assert r["era"] == "pandemic"
            assert r["pneumonia"]


def _fleiss_kappa(rows: list[dict[str, str]]) -> float:
    by_study: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        by_study[row["study_instance_uid"]].append(int(row["category"]))
    p_i, totals = [], Counter[int]()
    for grades in by_study.values():
        n = len(grades)
        counts = Counter(grades)
        p_i.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
        totals.update(grades)
    p_bar = float(np.mean(p_i))
    n_all = sum(totals.values())
    p_e = sum((c / n_all) ** 2 for c in totals.values())
    return (p_bar - p_e) / (1.0 - p_e)


def _read_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def test_grades_csv_shape(small: Path, truth: list[dict[str, object]]) -> None:
    rows = _read_csv((small / "annotations" / "grades.csv").read_bytes())
    studies = {str(r["study_instance_uid"]) for r in truth if r["kind"] == "chest_ct"}
    per_study = Counter(r["study_instance_uid"] for r in rows)
    assert set(per_study) == studies
    assert set(per_study.values()) <= {2, 3}
    assert {int(r["category"]) for r in rows} <= {1, 2, 3, 4}


def test_reader_kappa_is_moderate() -> None:
    params = SynthParams(patients=400, seed=3)
    studies = plan_cohort(params, np.random.default_rng(params.seed))
    rows = grade_rows(studies, params.pandemic_start, np.random.default_rng(9))
    header = ("study_instance_uid", "reader_id", "category", "read_date")
    kappa = _fleiss_kappa(_read_csv(to_csv(header, list(rows))))
    assert 0.5 <= kappa <= 0.7


def test_pcr_is_noisy_like_a_real_lab(small: Path) -> None:
    params = SynthParams(patients=300, seed=4)
    studies = plan_cohort(params, np.random.default_rng(params.seed))
    rows = pcr_rows(studies, params.pandemic_start, np.random.default_rng(9))
    chest = {s.patient_id: s for s in studies if s.kind == "chest"}
    tests = defaultdict(list)
    for patient, _site, day, result in rows:
        tests[patient].append((dt.date.fromisoformat(day), result))
    assert any(len(t) > 1 for t in tests.values())  # repeated tests
    covid = [chest[p] for p in tests if chest[p].covid]
    near = [r for s in covid for d, r in tests[s.patient_id] if abs((d - s.study_date).days) <= 14]
    sensitivity = near.count("positive") / len(near)
    assert 0.6 <= sensitivity <= 0.9  # false negatives
    far = [d for p, t in tests.items() for d, _ in t if abs((d - chest[p].study_date).days) > 90]
    assert far  # tests far outside any window
    assert all(d >= params.pandemic_start for t in tests.values() for d, _ in t)
    pcr = _read_csv((small / "annotations" / "pcr.csv").read_bytes())
    assert list(pcr[0]) == ["patient_id", "site", "test_date", "result"] if pcr else True


def test_pandemic_start_is_range_checked() -> None:
    with pytest.raises(ValidationError, match="pandemic_start"):
        SynthParams(pandemic_start=dt.date(2023, 1, 1))


# -- sites: protocols, matrices, private tags -------------------------------------------------


def test_sites_differ_in_thickness_and_matrix() -> None:
    params = SynthParams(patients=400, seed=5, matrix=512)
    studies = plan_cohort(params, np.random.default_rng(params.seed))
    by_site: dict[str, set[float]] = defaultdict(set)
    for s in studies:
        if s.kind == "chest":
            by_site[s.site].add(s.thickness)
    for code, thicknesses in by_site.items():
        assert thicknesses <= set(SITE_BY_CODE[code].thin_mm), code
    every = set().union(*by_site.values())
    assert min(every) == 0.625
    assert max(every) <= 3.0  # thin recon; the soft-tissue recon is 5 mm
    assert len({frozenset(t) for t in by_site.values()}) >= 4
    matrices = {site.code: site.matrix(params.matrix) for site in SITES}
    assert max(matrices.values()) == 512
    assert len(set(matrices.values())) >= 2
    assert all(m % 2 == 0 and m >= 32 for m in matrices.values())
    assert {site.matrix(32) for site in SITES} == {32}


def test_vendor_private_blocks_and_thicknesses_in_headers(small: Path) -> None:
    seen: dict[str, set[str]] = defaultdict(set)
    thick: set[float] = set()
    for rel, ds in _headers(small / "archive"):
        site = SITE_BY_CODE[rel.split("/")[0]]
        if ds.Manufacturer != site.vendor.manufacturer:
            continue  # a series sent on by another hospital keeps its own scanner
        for group, creator, elements in site.vendor.private:
            block = ds.private_block(group, creator)
            offset, vr, _ = elements[0]
            assert vr == block[offset].VR, rel
            seen[site.code].add(creator)
        if "SliceThickness" in ds and ds.Modality == "CT":
            thick.add(float(ds.SliceThickness))
    assert set(seen) == {s.code for s in SITES}
    assert 5.0 in thick
    assert len(thick) >= 3


# -- header-heavy mode -------------------------------------------------------------------------


HH_N = 300


@pytest.fixture(scope="module")
def heavy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heavy") / "hh"
    write_header_heavy(out, HH_N, 3)
    return out


def test_header_heavy_plan_scales_and_spreads_traps() -> None:
    studies = plan_header_heavy(100_000, 1)
    assert sum(_study_instances(s) for s in studies) >= 100_000
    assert {s.kind for s in studies} == {"chest", "head", "abdomen", "mr", "cr"}
    assert {s.site for s in studies} == {s.code for s in SITES}
    traps = Counter(t for s in studies for t in s.traps)
    assert set(traps) >= set(COHORT_CHEST_TRAPS) | {"phi_institution", "phi_patient_name"}
    chest = [s for s in studies if s.kind == "chest"]
    assert sum(1 for s in chest if s.traps) / len(chest) < 0.1  # a small fraction
    assert {s.thickness for s in chest} >= {0.625, 3.0}
    assert plan_header_heavy(100_000, 1) == studies
    with pytest.raises(ValueError, match="at least one instance"):
        plan_header_heavy(0, 1)


def test_header_heavy_instances_are_valid_dicom(heavy: Path) -> None:
    files = sorted(p for p in (heavy / "archive").rglob("*") if p.is_file())
    traps = {
        str(r["path"]): str(r["trap"])
        for r in pq.read_table(heavy / "truth_files.parquet").to_pylist()
    }
    instances = 0
    series: set[str] = set()
    for p in files:
        rel = p.relative_to(heavy / "archive").as_posix()
        if traps.get(rel, "").startswith(("non_dicom", "truncated")):
            continue
        ds = pydicom.dcmread(p)
        instances += 1
        series.add(str(ds.SeriesInstanceUID))
        assert ds.pixel_array.shape == (int(ds.Rows), int(ds.Columns)), rel
        if (
            ds.Modality == "CT"
            and "LOCALIZER" not in ds.ImageType
            and ds.SOPClassUID.endswith(".2")
        ):
            assert int(ds.Rows) in (HH_MATRIX, 2 * HH_MATRIX)
            fov = float(ds.PixelSpacing[0]) * int(ds.Columns)
            assert 300.0 <= fov <= 400.0, rel
            assert str(ds.Manufacturer) == SITE_BY_CODE[rel.split("/")[0]].vendor.manufacturer or (
                traps.get(rel) == "duplicate_site"
            )
    assert instances >= HH_N
    truth = pq.read_table(heavy / "truth.parquet").to_pylist()
    assert {r["series_instance_uid"] for r in truth} == series
    assert {"localizer", "chest_ct", "dose_report"} <= {r["kind"] for r in truth}
    assert traps  # the first chest study carries a trap, plus the non-DICOM files


def test_header_heavy_template_bytes_equal_pydicom(small: Path) -> None:
    studies = plan_header_heavy(1, 9)
    study = studies[0]
    site = SITE_BY_CODE[study.site]
    info = SeriesInfo("1.2.3.4", "1.2.3.5", 2, "Chest", "LUNG", "ORIGINAL\\PRIMARY\\AXIAL")
    hu = np.random.default_rng(0).normal(-500, 300, (4, 16, 16)).astype(np.float32)
    z = np.array([0.0, -1.25, -2.5, -3.75])
    sops = [f"1.2.3.4.{i + 1}" for i in range(4)]
    expected = encode_series(ct_series(study, site, info, hu, z, 22.5, 1.25, sops, -100.0))
    template = SeriesTemplate(
        ct_series(study, site, info, hu[:2], z[:2], 22.5, 1.25, sops[:2], -100.0)[0]
    )
    stored = np.clip(np.rint(hu) - site.vendor.rescale_intercept, -32768, 32767).astype(np.int16)
    got = [
        template.encode(
            sop, k + 1, ["-168.750", "-168.750", f"{z[k] - 100.0:.3f}"], stored[k].tobytes()
        )
        for k, sop in enumerate(sops)
    ]
    assert got == expected
    broken = ct_series(study, site, info, hu[:1], z[:1], 22.5, 1.25, sops[:1], -100.0)[0]
    del broken.SliceLocation
    with pytest.raises(ValueError, match="lacks per-instance tags"):
        SeriesTemplate(broken)


def test_header_heavy_cli_is_deterministic_and_indexable(heavy: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctcurate.cli import app
    from ctcurate.params import IndexParams, SnapshotParams
    from ctcurate.pipeline.index import run as index_run
    from ctcurate.pipeline.snapshot import run as snapshot_run

    out = tmp_path / "again"
    result = CliRunner().invoke(
        app, ["synth", "--out", str(out), "--header-heavy", str(HH_N), "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert tree_digest(out) == tree_digest(heavy)
    snapshot_run(out / "archive", tmp_path / "listing.parquet", SnapshotParams())
    index_run(
        out / "archive",
        tmp_path / "listing.parquet",
        tmp_path / "index",
        IndexParams(workers=1),
        None,
    )
    index = tmp_path / "index"

    def rows(name: str) -> int:
        # a table is one Parquet file or a folder of shards
        found = [p for p in (index / name, index / f"{name}.parquet") if p.exists()]
        return pq.read_table(found[0]).num_rows if found else 0

    listed = pq.read_table(tmp_path / "listing.parquet").num_rows
    instances = rows("instances")
    assert instances >= HH_N - 5
    assert instances + rows("quarantine") + rows("skipped") == listed
