"""The second synthetic generator (tests/phantom): determinism, valid DICOM the index
ingests, truth labels consistent with the HU written, pattern geometry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from phantom import CONSOLIDATION, GGO, PhantomParams, build_archive, make_series
from phantom.archive import PANDEMIC_START, PRE_PANDEMIC_END
from scipy import ndimage

from ctcurate.demo.audit import TRUTH_COLUMNS
from ctcurate.dicom.seg import read_seg_labels
from ctcurate.params import IndexParams, SnapshotParams
from ctcurate.pipeline import index, snapshot

TINY = PhantomParams(seed=3, patients=4, matrix=(128, 128), slices=(10, 12), write_seg=True)
#: Series for the per-pattern checks: small, but thin enough in z for shapes to hold.
SHAPES = PhantomParams(seed=11, matrix=(128, 128), slices=(28, 28))


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    build_archive(out, TINY)
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tiny: Path, tmp_path: Path) -> None:
    build_archive(tmp_path / "again", TINY)
    first = digests(tiny)
    assert any(k.startswith("annotations/seg/") for k in first)
    assert first == digests(tmp_path / "again")
    other = PhantomParams(**{**TINY.__dict__, "seed": 4})
    build_archive(tmp_path / "other", other)
    assert set(first.values()).isdisjoint(digests(tmp_path / "other").values())


def test_every_file_is_valid_ct_dicom(tiny: Path) -> None:
    files = sorted((tiny / "archive").rglob("*.dcm"))
    assert len(files) >= 4 * 10
    for path in files:
        ds = pydicom.dcmread(path)  # no force: preamble, file meta and VRs must be right
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert len(ds.ImagePositionPatient) == 3
        assert 0.6 * 4 <= float(ds.PixelSpacing[0]) <= 0.9 * 4  # 0.6–0.9 mm at 512
        assert 1.0 <= float(ds.SliceThickness) <= 2.5
        assert ds.PatientName == ds.PatientID
        assert ds.BodyPartExamined in ("CHEST", "")
        assert ds.StudyDescription == "THORAX"
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        site, patient = path.relative_to(tiny / "archive").parts[:2]
        assert site in TINY.sites
        assert patient == ds.PatientID


def test_truth_table_has_what_the_select_audit_reads(tiny: Path) -> None:
    truth = pq.read_table(tiny / "truth.parquet")
    assert set(TRUTH_COLUMNS) <= set(truth.column_names)
    rows = truth.to_pylist()
    assert len(rows) == TINY.patients
    assert sum(r["pneumonia"] for r in rows) == TINY.patients // 2
    for r in rows:
        assert r["kind"] == "chest_ct"
        assert r["pneumonia"] == (r["pattern"] != "negative")
        assert r["covid_typicality"] == int(r["pattern"] in ("typical", "indeterminate"))
        if r["era"] == "pandemic":
            assert r["study_date"] >= PANDEMIC_START
        else:
            assert r["study_date"] <= PRE_PANDEMIC_END
        assert (r["lesion_volume_ml"] > 0) == r["pneumonia"] or r["pattern"] == "atypical"
        assert len(list((tiny / "archive" / r["path"]).glob("*.dcm"))) == r["slices"]


def test_seg_holds_the_truth_labels(tiny: Path) -> None:
    row = pq.read_table(tiny / "truth.parquet").to_pylist()[0]
    files = sorted((tiny / "archive" / row["path"]).glob("*.dcm"))
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    labels = read_seg_labels(
        tiny / "annotations" / "seg" / f"{row['series_instance_uid']}.dcm", uids
    )
    patient = int(next(i for i in range(TINY.patients) if _uid_of(i) == row["series_instance_uid"]))
    expected = make_series(TINY, patient, row["pneumonia"]).labels
    np.testing.assert_array_equal(labels, expected)


def _uid_of(i: int) -> str:
    return str(make_series(TINY, i, False).truth["series_instance_uid"])


def _index(tiny: Path, out: Path) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    snapshot.run(tiny / "archive", out / "listing.parquet", SnapshotParams())
    index.run(
        tiny / "archive", out / "listing.parquet", out / "index", IndexParams(workers=1), None
    )
    series = pq.read_table(out / "index" / "series.parquet").to_pylist()
    quarantine = pq.read_table(out / "index" / "quarantine.parquet").to_pylist()
    return series, quarantine


def test_index_ingests_the_archive_without_patient_names(tmp_path: Path) -> None:
    params = PhantomParams(**{**TINY.__dict__, "patient_name": "empty", "write_seg": False})
    build_archive(tmp_path, params)
    series, quarantine = _index(tmp_path, tmp_path / "run")
    assert quarantine == []
    assert len(series) == params.patients
    assert {s["orientation"] for s in series} == {"axial"}
    assert all(not s["flags"] for s in series)
    truth = {
        r["series_instance_uid"]: r for r in pq.read_table(tmp_path / "truth.parquet").to_pylist()
    }
    for s in series:
        assert s["slice_count"] == truth[s["series_instance_uid"]]["slices"]


def test_pseudonym_names_are_indexed_or_only_named_as_patient_name(
    tiny: Path, tmp_path: Path
) -> None:
    # PatientName == PatientID: indexed where the PHI policy accepts a pseudonym name;
    # under a policy that does not, the only reason may be the PatientName attribute
    series, quarantine = _index(tiny, tmp_path)
    n_files = len(list((tiny / "archive").rglob("*.dcm")))
    indexed = sum(int(s["slice_count"]) for s in series)
    assert indexed + len(quarantine) == n_files
    assert {(q["reason"], q["detail"]) for q in quarantine} <= {("phi_present", "PatientName")}


def _written_hu(folder: Path) -> np.ndarray:
    slices = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append(hu)
    return np.stack(slices)


@pytest.mark.parametrize("pattern", ["typical", "indeterminate", "atypical", "negative"])
def test_labels_match_the_hu_written(pattern: str, tmp_path: Path) -> None:
    from phantom import write_series

    series = make_series(SHAPES, 1, True, pattern=pattern)
    write_series(series, tmp_path, SHAPES)
    hu = _written_hu(tmp_path / series.truth["path"])
    lab = series.labels
    assert (hu[lab > 0] < -600).mean() > (0.5 if pattern != "negative" else 0.7)
    assert hu[lab == 0].mean() > -700  # body, table and air outside the lungs
    if pattern == "negative":
        assert not np.isin(lab, [GGO, CONSOLIDATION]).any()
        return
    assert np.isin(lab, [GGO, CONSOLIDATION]).any()
    if (lab == GGO).sum() > 50:
        assert -750 < hu[lab == GGO].mean() < -350
    if (lab == CONSOLIDATION).sum() > 50:
        assert hu[lab == CONSOLIDATION].mean() > -300
    normal = hu[lab == 1]
    assert np.median(normal) < -700


def _surface_depth(lung: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    return np.asarray(ndimage.distance_transform_edt(lung, sampling=spacing))


@pytest.mark.parametrize("patient", [1, 2, 3])
def test_typical_is_bilateral_peripheral_and_basal(patient: int) -> None:
    series = make_series(SHAPES, patient, True, pattern="typical")
    lab, z = series.labels, series.grid.z
    lung, lesion = lab > 0, lab >= GGO
    side = np.zeros(lab.shape, dtype=np.int8)
    mid = lab.shape[2] // 2
    side[..., :mid], side[..., mid:] = 1, 2
    per_side = [int((lesion & (side == s)).sum()) for s in (1, 2)]
    assert min(per_side) > 0.15 * sum(per_side)  # both lungs
    depth = _surface_depth(lung, series.grid.spacing)
    near = depth <= 15.0
    assert near[lesion].mean() > near[lung].mean() + 0.15  # peripheral
    zz = np.broadcast_to(z[:, None, None], lab.shape)
    assert zz[lesion].mean() < zz[lung].mean()  # lower zones


@pytest.mark.parametrize("patient", [1, 2, 3, 4])
def test_lobar_atypical_is_one_sided_and_indeterminate_less_peripheral(patient: int) -> None:
    atypical = make_series(SHAPES, patient, True, pattern="atypical")
    lesion = atypical.labels >= GGO
    if atypical.truth["variant"] == "lobar":
        mid = lesion.shape[2] // 2
        per_side = sorted([int(lesion[..., :mid].sum()), int(lesion[..., mid:].sum())])
        assert per_side[0] <= 0.05 * max(per_side[1], 1)
    indeterminate = make_series(SHAPES, patient, True, pattern="indeterminate")
    typical = make_series(SHAPES, patient, True, pattern="typical")

    def near_share(s: object) -> float:
        lab = s.labels  # type: ignore[attr-defined]
        depth = _surface_depth(lab > 0, s.grid.spacing)  # type: ignore[attr-defined]
        return float((depth[lab >= GGO] <= 15.0).mean())

    assert near_share(indeterminate) < near_share(typical)


def test_unknown_pattern_and_bad_sites_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown pattern 'viral'"):
        make_series(SHAPES, 1, True, pattern="viral")
    with pytest.raises(ValueError, match="2 or 3 sites"):
        build_archive(tmp_path, PhantomParams(sites=("A",)))
