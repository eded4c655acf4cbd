"""pack core: series → volume geometry, splits, shard plan and the dataset card."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import numpy.typing as npt
import pytest
from helpers.ct import make_ct, make_series
from pydicom.dataset import Dataset

from ctcurate.imaging.volume import ExcludedSeries, series_to_volume
from ctcurate.params import PackParams
from ctcurate.pipeline.pack import OTHER_VENDOR, case_meta, plan_shards, vendor
from ctcurate.release import card
from ctcurate.release.splits import assign_splits, split_of, split_point


def identity_params(n: int = 6, size: int = 8, **overrides: object) -> PackParams:
    """Params whose grid equals the source grid of :func:`make_series`."""
    base: dict[str, object] = {"spacing_mm": (2.0, 2.0, 2.0), "shape": (n, size, size)}
    return PackParams.model_validate(base | overrides)


def full_lung(n: int = 6, size: int = 8) -> npt.NDArray[np.uint8]:
    return np.ones((n, size, size), dtype=np.uint8)


# --------------------------------------------------------------------------- geometry


def test_identity_grid_gives_hu_of_the_source() -> None:
    datasets, _, raw = make_series()
    image, label, geometry = series_to_volume(datasets, full_lung(), identity_params())
    assert image.dtype == np.int16
    assert label.dtype == np.uint8
    assert image.shape == (6, 8, 8)
    np.testing.assert_array_equal(image, raw.astype(np.int16) - 1024)
    assert geometry.origin_mm == (-7.0, -7.0, 0.0)
    assert geometry.spacing_mm == (2.0, 2.0, 2.0)
    assert geometry.source_shape == (6, 8, 8)
    assert geometry.duplicates_dropped == 0


def test_shuffled_files_and_reversed_instance_numbers_give_identical_bytes() -> None:
    datasets, labels, _ = make_series(n=7, seed=3)
    params = PackParams(spacing_mm=(3.0, 3.0, 3.0), shape=(5, 6, 6))
    image, label, geometry = series_to_volume(datasets, labels, params)

    order = np.random.default_rng(5).permutation(len(datasets))
    shuffled = [copy.deepcopy(datasets[i]) for i in order]
    for ds in shuffled:
        ds.InstanceNumber = 100 - int(ds.InstanceNumber)
    image2, label2, geometry2 = series_to_volume(shuffled, labels[order], params)
    assert image.tobytes() == image2.tobytes()
    assert label.tobytes() == label2.tobytes()
    assert geometry == geometry2


def test_z_spacing_comes_from_positions_not_slice_thickness() -> None:
    datasets, _, _ = make_series(dz=2.5)
    for ds in datasets:
        ds.SliceThickness = 5.0
    _, _, geometry = series_to_volume(datasets, full_lung(), identity_params())
    assert geometry.source_spacing_mm == (2.5, 2.0, 2.0)


def test_rescale_slope_and_intercept_then_clip() -> None:
    datasets, _, raw = make_series(slope=2.0, intercept=-1000.0)
    params = identity_params(hu_min=-900, hu_max=1000)
    image, _, _ = series_to_volume(datasets, full_lung(), params)
    expected = np.clip(raw.astype(np.int32) * 2 - 1000, -900, 1000)
    np.testing.assert_array_equal(image, expected)
    assert image.min() >= -900
    assert image.max() == 1000


def test_flipped_axes_land_on_the_same_lps_grid() -> None:
    datasets, labels, raw = make_series(n=5)
    reference = series_to_volume(datasets, labels, identity_params(n=5))
    # The same physical image stored with rows running -x, columns -y and the stack
    # ordered superior → inferior (normal along -z).
    flipped = []
    for i, ds in enumerate(datasets):
        pixels = raw[i][::-1, ::-1]
        z = float(ds.ImagePositionPatient[2])
        flipped.append(
            make_ct(
                np.ascontiguousarray(pixels),
                (-7.0 + 7 * 2.0, -7.0 + 7 * 2.0, z),
                series_uid="1.2.826.0.1.9",
                index=i,
                orientation=(-1, 0, 0, 0, -1, 0),
            )
        )
    flipped_labels = np.ascontiguousarray(labels[:, ::-1, ::-1])
    image, label, geometry = series_to_volume(flipped, flipped_labels, identity_params(n=5))
    np.testing.assert_array_equal(image, reference[0])
    np.testing.assert_array_equal(label, reference[1])
    assert geometry.origin_mm == reference[2].origin_mm


def test_transposed_rows_and_columns_are_reoriented() -> None:
    datasets, labels, raw = make_series(n=4)
    reference = series_to_volume(datasets, labels, identity_params(n=4))
    transposed = [
        make_ct(
            np.ascontiguousarray(raw[i].T),
            tuple(float(v) for v in ds.ImagePositionPatient),
            series_uid="1.2.826.0.1.8",
            index=i,
            orientation=(0, 1, 0, 1, 0, 0),
        )
        for i, ds in enumerate(datasets)
    ]
    t_labels = np.ascontiguousarray(labels.transpose(0, 2, 1))
    image, label, _ = series_to_volume(transposed, t_labels, identity_params(n=4))
    np.testing.assert_array_equal(image, reference[0])
    np.testing.assert_array_equal(label, reference[1])


def test_resample_and_crop_centre_on_the_lung() -> None:
    n, size = 20, 20
    datasets, _, _ = make_series(n=n, size=size, dz=1.0, spacing=(1.0, 1.0))
    labels = np.zeros((n, size, size), dtype=np.uint8)
    labels[2:10, 1:9, 10:18] = 1  # off-centre lung
    labels[5, 4:6, 13:15] = 3
    params = PackParams(spacing_mm=(2.0, 2.0, 2.0), shape=(6, 6, 6), hu_min=-1024)
    image, label, geometry = series_to_volume(datasets, labels, params)
    assert image.shape == label.shape == (6, 6, 6)
    assert set(np.unique(label).tolist()) <= {0, 1, 3}
    lung = np.argwhere(label > 0)
    centre = (lung.min(axis=0) + lung.max(axis=0)) / 2.0
    np.testing.assert_allclose(centre, [2.5, 2.5, 2.5], atol=0.5)
    # bbox centre (z 5.5, y 4.5, x 13.5 in source voxels) minus 2.5 output voxels of 2 mm
    assert geometry.origin_mm == pytest.approx((-7.0 + 13.5 - 5.0, -7.0 + 4.5 - 5.0, 0.5))


def test_padding_outside_the_series_uses_hu_min_and_background() -> None:
    datasets, _, _ = make_series(n=4, size=8)
    params = PackParams(spacing_mm=(2.0, 2.0, 2.0), shape=(8, 12, 12), hu_min=-1000)
    image, label, _ = series_to_volume(datasets, full_lung(4, 8), params)
    assert image.shape == (8, 12, 12)
    assert (image[0] == -1000).all()
    assert (image[:, 0, :] == -1000).all()
    assert (label[0] == 0).all()
    assert label.sum() == 4 * 8 * 8


def test_identical_duplicates_are_dropped() -> None:
    datasets, labels, _ = make_series()
    reference = series_to_volume(datasets, labels, identity_params())
    duplicate = copy.deepcopy(datasets[2])
    duplicate.SOPInstanceUID = "1.2.826.0.1.1.99"
    image, label, geometry = series_to_volume(
        [*datasets, duplicate], np.concatenate([labels, labels[2:3]]), identity_params()
    )
    assert geometry.duplicates_dropped == 1
    np.testing.assert_array_equal(image, reference[0])
    np.testing.assert_array_equal(label, reference[1])


def _exclusion(
    datasets: list[Dataset], labels: npt.NDArray[np.uint8], params: PackParams | None = None
) -> ExcludedSeries:
    with pytest.raises(ExcludedSeries) as info:
        series_to_volume(datasets, labels, params or identity_params())
    return info.value


def test_conflicting_duplicates_are_excluded() -> None:
    datasets, labels, _ = make_series()
    other = make_ct(
        np.zeros((8, 8), np.int16), (-7.0, -7.0, 4.0), series_uid="1.2.826.0.1.1", index=50
    )
    with pytest.raises(ExcludedSeries, match="duplicate_conflict: two slices share"):
        series_to_volume([*datasets, other], np.concatenate([labels, labels[:1]]), PackParams())


def test_missing_slice_is_a_gap() -> None:
    datasets, labels, _ = make_series(z_positions=[0, 2, 4, 8, 10, 12])
    exc = _exclusion(datasets, labels)
    assert exc.reason == "gap"
    assert "1.5x the median" in str(exc)


def test_varying_spacing_is_excluded() -> None:
    datasets, labels, _ = make_series(z_positions=[0, 2, 4, 6.6, 8.6, 10.6])
    assert _exclusion(datasets, labels).reason == "nonuniform_spacing"


def test_gantry_tilt_is_excluded() -> None:
    datasets, labels, _ = make_series()
    for i, ds in enumerate(datasets):
        ds.ImagePositionPatient = [-7.0, -7.0 + i * 0.5, i * 2.0]  # ~14 degrees
    exc = _exclusion(datasets, labels)
    assert exc.reason == "gantry_tilt"
    assert "deg off the normal" in exc.detail


def test_mixed_orientation_is_excluded() -> None:
    datasets, labels, _ = make_series()
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 0.99, 0.14]
    assert _exclusion(datasets, labels).reason == "mixed_orientation"


def test_oblique_and_coronal_series_are_excluded() -> None:
    datasets, labels, _ = make_series(orientation=(0.9, 0.436, 0, -0.436, 0.9, 0))
    with pytest.raises(ExcludedSeries, match="non_axial: orientation is oblique"):
        series_to_volume(datasets, labels, identity_params())
    datasets, labels, _ = make_series(orientation=(1, 0, 0, 0, 0, -1))
    with pytest.raises(ExcludedSeries, match="non_axial: slices are not axial"):
        series_to_volume(datasets, labels, identity_params())


def test_too_few_slices_are_excluded() -> None:
    datasets, labels, _ = make_series(n=2)
    with pytest.raises(ExcludedSeries, match="too_few_slices: 2 instances"):
        series_to_volume(datasets, labels, identity_params())
    datasets, labels, _ = make_series(n=3)
    dup = copy.deepcopy(datasets[0])
    dup.SOPInstanceUID = "1.2.826.0.1.1.77"
    with pytest.raises(ExcludedSeries, match="too_few_slices: 2 distinct positions"):
        series_to_volume([datasets[0], datasets[1], dup], labels, identity_params())


def test_localizers_and_screenshots_are_never_packed() -> None:
    datasets, labels, _ = make_series()
    datasets[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert _exclusion(datasets, labels).reason == "localizer"
    datasets, labels, _ = make_series()
    datasets[1].SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    assert _exclusion(datasets, labels).reason == "not_ct_image"
    datasets, labels, _ = make_series()
    datasets[1].BurnedInAnnotation = "YES"
    assert _exclusion(datasets, labels).reason == "burned_in_annotation"


def test_missing_geometry_and_bad_pixels_are_excluded() -> None:
    datasets, labels, _ = make_series()
    del datasets[2].ImagePositionPatient
    with pytest.raises(ExcludedSeries, match="missing_geometry: an instance has no Image"):
        series_to_volume(datasets, labels, identity_params())
    datasets, labels, _ = make_series()
    datasets[2].PixelData = datasets[2].PixelData[:10]
    with pytest.raises(ExcludedSeries, match="pixel_data: pixel data unreadable"):
        series_to_volume(datasets, labels, identity_params())
    datasets, labels, _ = make_series()
    with pytest.raises(ExcludedSeries, match=r"label_mismatch: labels \(5, 8, 8\)"):
        series_to_volume(datasets, labels[:5], identity_params())


# --------------------------------------------------------------------------- splits


def _cases(n_patients: int, per_site: int = 2) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for p in range(n_patients):
        site = f"H{p % per_site:02d}"
        for k in range(1 + p % 3 // 2):  # some patients have two cases
            rows.append(
                {
                    "case_id": f"c{p:03d}{k}",
                    "site": site,
                    "patient_id": f"p{p:03d}",
                    "typical": (p // per_site) % 2,
                }
            )
    return rows


def test_splits_are_patient_disjoint_and_order_independent() -> None:
    rows = _cases(30)
    splits = assign_splits(rows, (0.6, 0.2, 0.2), salt="s7")
    assert set(splits) == {str(r["case_id"]) for r in rows}
    by_patient: dict[object, set[str]] = {}
    for r in rows:
        by_patient.setdefault((r["site"], r["patient_id"]), set()).add(splits[str(r["case_id"])])
    assert all(len(s) == 1 for s in by_patient.values())
    assert any(len(r) > 1 for r in _patients(rows).values())  # the test has multi-case patients
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    assert assign_splits(shuffled, (0.6, 0.2, 0.2), salt="s7") == splits
    assert assign_splits(rows, (0.6, 0.2, 0.2), salt="s8") != splits


def _patients(rows: list[dict[str, object]]) -> dict[object, list[dict[str, object]]]:
    out: dict[object, list[dict[str, object]]] = {}
    for r in rows:
        out.setdefault((r["site"], r["patient_id"]), []).append(r)
    return out


def test_a_case_keeps_its_split_when_other_cases_come_or_go_or_labels_change() -> None:
    rows = _cases(90, per_site=3)
    full = assign_splits(rows, (0.6, 0.2, 0.2), salt="salt")
    rng = np.random.default_rng(0)
    for _ in range(5):
        kept = [rows[i] for i in sorted(rng.choice(len(rows), len(rows) * 2 // 3, replace=False))]
        relabelled = [{**r, "typical": 1 - int(str(r["typical"]))} for r in kept]
        for subset in (kept, relabelled):
            part = assign_splits(subset, (0.6, 0.2, 0.2), salt="salt")
            assert part == {c: full[c] for c in part}
    assert set(full.values()) == {"train", "val", "test"}


def test_split_depends_on_site_and_patient_only() -> None:
    a = split_point("salt", "H01", "p1")
    assert a == split_point("salt", "H01", "p1")
    assert 0.0 <= a < 1.0
    assert len({a, split_point("salt", "H02", "p1"), split_point("other", "H01", "p1")}) == 3
    # The separator keeps ("H0", "1p1") apart from ("H01", "p1").
    assert split_point("salt", "H0", "1p1") != a


def test_split_of_cuts_the_unit_interval_by_the_fractions() -> None:
    fractions = (0.6, 0.2, 0.2)
    assert [split_of(p, fractions) for p in (0.0, 0.59, 0.6, 0.79, 0.8, 0.999)] == [
        "train",
        "train",
        "val",
        "val",
        "test",
        "test",
    ]
    assert {split_of(p, (0.8, 0.2, 0.0)) for p in np.linspace(0, 0.9999, 50)} == {"train", "val"}
    assert {split_of(p, (0.0, 0.0, 1.0)) for p in np.linspace(0, 0.9999, 50)} == {"test"}


def test_splits_follow_fractions_within_each_stratum_in_expectation() -> None:
    rows = [
        {"case_id": f"c{s}{t}{i:04d}", "site": f"H{s}", "patient_id": f"p{t}{i}", "typical": t}
        for s in range(2)
        for t in range(2)
        for i in range(2000)
    ]
    splits = assign_splits(rows, (0.6, 0.2, 0.2), salt="ctcurate-split-1")
    for s in range(2):
        for t in range(2):
            counts = Counter(
                splits[str(r["case_id"])]
                for r in rows
                if r["site"] == f"H{s}" and r["typical"] == t
            )
            # 2000 patients per stratum: 4 binomial standard deviations (~44 and ~36)
            assert abs(counts["train"] - 1200) <= 4 * (2000 * 0.6 * 0.4) ** 0.5
            assert abs(counts["val"] - 400) <= 4 * (2000 * 0.2 * 0.8) ** 0.5
            assert abs(counts["test"] - 400) <= 4 * (2000 * 0.2 * 0.8) ** 0.5


def test_shards_hold_at_most_max_cases_in_sorted_order() -> None:
    plan = plan_shards(["e", "a", "d", "c", "b"], 2)
    assert plan == [
        ("shard-00000.h5", ["a", "b"]),
        ("shard-00001.h5", ["c", "d"]),
        ("shard-00002.h5", ["e"]),
    ]


def test_case_meta_has_the_documented_keys_and_no_patient_id() -> None:
    import datetime as dt

    from ctcurate.imaging.volume import VolumeGeometry

    geometry = VolumeGeometry((4.0, 4.0, 4.0), (-1.0, -2.0, -3.0), (2.0, 1.0, 1.0), (5, 8, 8), 0)
    case = {
        "case_id": "abc",
        "series_instance_uid": "1.2.3",
        "patient_id": "SECRET",
        "site": "H01",
        "study_date": dt.date(2019, 5, 1),
        "era": "pre_pandemic",
        "cohort": None,
        "exclusion": None,
        "pcr": "unlabeled",
        "consensus_grade": 4,
        "typical": 0,
    }
    meta = case_meta(case, "val", geometry, "Siemens", 1.25)
    assert "patient_id" not in meta
    assert "SECRET" not in repr(meta)
    assert meta["study_year"] == 2019
    assert meta["typical"] == 0
    assert meta["consensus_grade"] == 4
    assert meta["cohort"] is None
    assert meta["spacing_mm"] == [4.0, 4.0, 4.0]
    assert meta["origin_mm"] == [-1.0, -2.0, -3.0]
    assert meta["split"] == "val"


# --------------------------------------------------------------------------- card


def _meta_rows() -> list[dict[str, object]]:
    rows = []
    for i in range(12):
        rows.append(
            {
                "case_id": f"c{i:02d}",
                "typical": 1 if i < 6 else 0,
                "site": "H01" if i < 6 else "H02",  # site predicts the label perfectly
                "manufacturer": ["A", "B"][i % 2],  # vendor carries no signal
                "study_year": 2020,
                "slice_thickness_mm": 1.25,
                "split": "train",
                "era": "pandemic",
                "cohort": None,
            }
        )
    return rows


def test_shortcut_audit_flags_a_site_that_predicts_the_label() -> None:
    rows = _meta_rows()
    rows.append({**rows[0], "case_id": "c99", "typical": 0, "site": "H01"})
    site = card.shortcut_audit(rows, "site")  # type: ignore[arg-type]
    assert site["groups"] == 2
    assert site["accuracy"] == pytest.approx(12 / 13, abs=1e-4)
    assert site["baseline"] == pytest.approx(7 / 13, abs=1e-4)
    vendor = card.shortcut_audit(rows, "manufacturer")  # type: ignore[arg-type]
    assert vendor["lift"] < 0.1
    text = card.render_card(rows, [{"case_id": "x", "reason": "gap"}])  # type: ignore[arg-type]
    assert "| site | 2 | 0.923 | 0.538 | +0.385 | **shortcut risk** |" in text
    assert "| vendor |" in text
    assert "**shortcut risk**" not in text.split("| vendor |")[1].split("\n")[0]
    assert "| gap | 1 |" in text
    assert "| 1.25 | 7 | 6 | 13 |" in text


def test_count_table_counts_labels_per_group() -> None:
    rows = _meta_rows()
    rows[0]["manufacturer"] = None
    table = card.count_table(rows, "manufacturer")  # type: ignore[arg-type]
    assert table == [("A", 3, 2, 5), ("B", 3, 3, 6), ("unknown", 0, 1, 1)]


def test_montage_is_a_deterministic_png() -> None:
    rng = np.random.default_rng(0)
    cases = [
        (
            f"case{i}",
            i % 2,
            rng.integers(-1000, 400, size=(4, 8, 8)).astype(np.int16),
            rng.integers(0, 4, size=(4, 8, 8)).astype(np.uint8),
        )
        for i in range(3)
    ]
    first = card.render_montage(cases)
    assert first.startswith(b"\x89PNG")
    assert card.render_montage(cases) == first
    assert b"Software" not in first


@pytest.mark.parametrize(
    ("manufacturer", "expected"),
    [
        ("SIEMENS", "Siemens"),
        ("Siemens Healthineers QX7K2ZV9", "Siemens"),
        ("GE MEDICAL SYSTEMS", "GE"),
        ("Philips", "Philips"),
        ("TOSHIBA", "Toshiba"),
        ("Canon Medical Systems", "Canon"),
        ("ACME Hospital Scanner 3", OTHER_VENDOR),  # free text never reaches a release
        ("Gemini", OTHER_VENDOR),  # "ge" only as a word of its own
    ],
)
def test_a_release_names_the_vendor_from_a_fixed_list(manufacturer: str, expected: str) -> None:
    assert vendor(manufacturer) == expected
