"""The pneumonia scorer: lung masks, opacity features, the selector model, series volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from helpers.chest import chest, ct_slices

from ctcurate.imaging.lungmask import _hull_2d, lung_masks, threshold_lung_mask
from ctcurate.imaging.workgrid import resampling, working_volume
from ctcurate.models.metrics import dice
from ctcurate.selection.pneumonia import (
    FEATURES,
    ScoreTask,
    SelectorModel,
    fit_selector,
    model_bytes,
    model_inputs,
    model_version,
    opacity_features,
    read_model,
    score_series,
)

SPACING = (4.0, 4.0, 4.0)


def consolidate_border(
    hu: npt.NDArray[np.float32], lung: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float32]:
    """Dense consolidation (30 HU) in the lateral, posterior corner of the right lung."""
    out = hu.copy()
    n = hu.shape[1]
    region = np.zeros(lung.shape, dtype=bool)
    region[:, int(0.55 * n) : int(0.75 * n), : int(0.34 * n)] = True
    out[region & lung] = 30.0
    return out


# --- lung masks ----------------------------------------------------------------------------


def test_hull_of_a_triangle_is_filled_and_convex() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[2, 5] = mask[9, 1] = mask[9, 10] = True
    hull = _hull_2d(mask)
    assert hull[mask].all()
    assert hull[6, 5]
    assert hull[9, 5]
    assert not hull[2, 1]
    assert not hull[3, 9]
    for row in hull:  # one span per row: convex
        cols = np.flatnonzero(row)
        if len(cols):
            assert cols[-1] - cols[0] + 1 == len(cols)


def test_threshold_mask_finds_both_lungs_on_a_clean_chest() -> None:
    hu, lung = chest()
    mask = threshold_lung_mask(hu)
    score = dice(mask, lung)
    assert score is not None
    assert score > 0.99


def test_robust_mask_keeps_border_consolidation_the_threshold_loses() -> None:
    hu, lung = chest()
    sick = consolidate_border(hu, lung)
    consolidated = lung & (sick > 0)
    assert consolidated.sum() > 50
    thr, robust = lung_masks(sick)
    assert thr[consolidated].mean() < 0.05  # a plain threshold drops it
    assert robust[consolidated].mean() > 0.6
    d_thr, d_rob = dice(thr, lung), dice(robust, lung)
    assert d_thr is not None
    assert d_rob is not None
    assert d_rob > d_thr + 0.02
    # the body wall and the space between the lungs stay out
    assert not robust[:, :, :2].any()
    n = hu.shape[2]
    assert not robust[:, :, n // 2 - 1 : n // 2 + 1].any()


def test_masks_reject_a_non_volume() -> None:
    with pytest.raises(ValueError, match=r"expected a \(z, y, x\) volume"):
        threshold_lung_mask(np.zeros((4, 4), dtype=np.float32))


def test_dice_edge_cases() -> None:
    empty = np.zeros((2, 2, 2), dtype=bool)
    assert dice(empty, empty) is None
    full = ~empty
    assert dice(full, full) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice(empty, np.zeros((2, 2), dtype=bool))


# --- features ------------------------------------------------------------------------------


def features_of(hu: npt.NDArray[np.float32]) -> dict[str, float]:
    thr, robust = lung_masks(hu)
    return dict(zip(FEATURES, opacity_features(hu, SPACING, thr, robust), strict=True))


def test_features_of_a_clear_chest_show_no_opacity() -> None:
    hu, _ = chest()
    f = features_of(hu)
    assert f["ggo_fraction"] == 0.0
    assert f["consolidation_fraction"] == 0.0
    assert f["bilateral_share"] == 0.0
    assert f["posterior_basal_symmetry"] > 0.9  # both dependent lungs aerated


def test_ggo_in_both_lower_lungs_is_bilateral_and_lower_zone() -> None:
    n = 40
    hu, _ = chest(ggo=[(1, 20, 9), (1, 20, 30)])
    f = features_of(hu)
    assert f["ggo_fraction"] > 0.02
    assert f["consolidation_fraction"] == 0.0
    assert f["bilateral_share"] > 0.8
    assert f["lower_zone_share"] == 1.0
    one, _ = chest(ggo=[(6, 20, 9)], n=n)
    g = features_of(one)
    assert g["bilateral_share"] == 0.0  # one lung only
    assert g["lower_zone_share"] == 0.0  # upper slices


def test_border_consolidation_shows_in_the_features() -> None:
    hu, lung = chest()
    f = features_of(consolidate_border(hu, lung))
    assert f["border_fill_fraction"] > 0.03
    assert f["consolidation_fraction"] > 0.03
    assert f["peripheral_share"] > 0.5  # against the chest wall


def test_deep_opacity_counts_a_lesion_inside_aerated_lung_not_its_rim() -> None:
    spacing = (4.0, 2.0, 2.0)
    hu, lung = chest(n=80)
    z, y, x = np.mgrid[0 : hu.shape[0], 0:80, 0:80]
    centre = 39.5 - 16.0  # the left lung's middle column

    def ggo_disk(col: float) -> dict[str, float]:
        sick = hu.copy()
        disk = ((y - 40) ** 2 + (x - col) ** 2 <= 36) & (z >= 2) & (z <= 5) & lung
        sick[disk] = -600.0  # 12 mm wide, 16 mm tall
        thr, robust = lung_masks(sick, spacing)
        values = opacity_features(sick, spacing, thr, robust)
        return dict(zip(FEATURES, values, strict=True))

    clear = features_of(hu)
    inside = ggo_disk(centre)  # ≥ 10 mm from the lung surface all round
    rim = ggo_disk(centre - 6.0)  # touches the lateral surface
    assert clear["deep_opacity_fraction"] == 0.0
    assert inside["ggo_fraction"] > 0.02
    assert inside["deep_opacity_fraction"] == pytest.approx(inside["ggo_fraction"])
    assert rim["ggo_fraction"] > 0.02
    assert rim["deep_opacity_fraction"] < 0.8 * rim["ggo_fraction"]


def test_features_are_the_same_anatomy_at_a_finer_pixel_spacing() -> None:
    hu, _ = chest(ggo=[(2, 20, 9), (5, 20, 30)])
    hu[5:7, 14:16, 9:11] = -450.0  # a nodule of 8 x 8 x 8 mm
    coarse = features_of(hu)
    fine_hu = np.repeat(np.repeat(hu, 2, axis=1), 2, axis=2)
    thr, robust = lung_masks(fine_hu, (4.0, 2.0, 2.0))
    fine = dict(zip(FEATURES, opacity_features(fine_hu, (4.0, 2.0, 2.0), thr, robust), strict=True))
    assert coarse["ggo_fraction"] > 0.02
    assert fine["ggo_fraction"] == pytest.approx(coarse["ggo_fraction"], rel=0.25)
    assert coarse["small_opacity_density"] > 0.0
    assert fine["small_opacity_density"] == pytest.approx(coarse["small_opacity_density"], rel=0.05)


def test_a_small_nodule_counts_per_litre_of_lung() -> None:
    hu, lung = chest(nz=10)
    clear = features_of(hu)
    nodule = hu.copy()
    nodule[4:6, 20:22, 9:11] = -450.0  # 8 x 8 x 8 mm, a few pixels: no median may erase it
    f = features_of(nodule)
    litres = float(lung.sum()) * 64.0 / 1e6
    assert clear["nodule_density"] == 0.0
    assert f["nodule_density"] == pytest.approx(1.0 / litres, rel=0.3)
    assert f["small_opacity_density"] >= f["nodule_density"]


def test_model_inputs_put_fractions_on_a_log_scale() -> None:
    row = np.zeros(len(FEATURES))
    row[FEATURES.index("ggo_fraction")] = 0.099
    row[FEATURES.index("nodule_density")] = np.e - 1.0
    row[FEATURES.index("bilateral_share")] = 0.5
    out = model_inputs(row)[0]
    assert out[FEATURES.index("ggo_fraction")] == pytest.approx(-1.0)
    assert out[FEATURES.index("consolidation_fraction")] == pytest.approx(-3.0)
    assert out[FEATURES.index("deep_opacity_fraction")] == pytest.approx(-3.0)
    assert out[FEATURES.index("nodule_density")] == pytest.approx(1.0)
    assert out[FEATURES.index("bilateral_share")] == 0.5
    with pytest.raises(ValueError, match="expected 11 features"):
        model_inputs(np.zeros((2, 4)))


def test_an_empty_lung_gives_zero_features() -> None:
    hu = np.full((4, 8, 8), 40.0, dtype=np.float32)
    none = np.zeros(hu.shape, dtype=bool)
    assert not opacity_features(hu, SPACING, none, none).any()


# --- the model -----------------------------------------------------------------------------


def toy_data() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, len(FEATURES)))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return x, y


def test_fit_is_deterministic_and_versioned_by_its_bytes() -> None:
    x, y = toy_data()
    a = model_bytes(fit_selector(x, y, l2=0.1, threshold=0.5))
    b = model_bytes(fit_selector(x.copy(), y.copy(), l2=0.1, threshold=0.5))
    assert a == b
    assert model_version(a) == model_version(b)
    c = model_bytes(fit_selector(x, y, l2=1.0, threshold=0.5))
    assert model_version(c) != model_version(a)
    model = fit_selector(x, y, l2=0.1, threshold=0.5)
    accuracy = float(((model.predict_proba(x) >= 0.5) == (y == 1)).mean())
    assert accuracy > 0.9


def test_last_bit_differences_do_not_reach_the_model_file() -> None:
    # another CPU's BLAS kernels sum in another order: features and fit differ in their
    # last bits. Fitted on features one ulp away, the model file keeps the same bytes.
    x, y = toy_data()
    a = fit_selector(x, y, l2=0.1, threshold=0.5)
    for direction in (np.inf, -np.inf):
        moved = np.nextafter(x, direction)
        assert (moved != x).any()
        b = fit_selector(moved, y, l2=0.1, threshold=0.5)
        assert model_bytes(b) == model_bytes(a)
    # the coefficients keep ten significant digits, and a reread model predicts the same
    assert all(float(f"{w:.10g}") == w for w in a.weights)
    assert SelectorModel.from_json(a.to_json()).predict_proba(x).tolist() == (
        a.predict_proba(x).tolist()
    )


def test_one_class_gives_the_prior() -> None:
    x, _ = toy_data()
    model = fit_selector(x[:5], np.ones(5, dtype=np.int64), l2=0.1, threshold=0.5)
    assert not any(model.weights)
    assert model.bias == pytest.approx(np.log(6.0))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        fit_selector(x[:2], np.array([0, 2]), l2=0.1, threshold=0.5)


def test_model_file_round_trip_and_errors(tmp_path: Path) -> None:
    x, y = toy_data()
    model = fit_selector(x, y, l2=0.1, threshold=0.4)
    path = tmp_path / "selector.json"
    path.write_bytes(model_bytes(model))
    back, version = read_model(path)
    assert back == model
    assert version == model_version(path.read_bytes())
    with pytest.raises(ValueError, match="expected 11 features"):
        model.predict_proba(np.zeros((1, 3)))
    bad = model.to_json() | {"kind": "other"}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"selector\.json: not a pneumonia selector model"):
        read_model(path)
    path.write_text(json.dumps(model.to_json() | {"features": ["a"]}))
    with pytest.raises(ValueError, match="features differ"):
        read_model(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a JSON model file"):
        read_model(path)
    with pytest.raises(ValueError, match="model file unreadable"):
        read_model(tmp_path / "missing.json")
    assert isinstance(SelectorModel.from_json(model.to_json()), SelectorModel)


# --- series volume and the worker task -----------------------------------------------------


def test_working_volume_orders_slices_whatever_the_input_order() -> None:
    hu, _ = chest(nz=6, n=24)
    hu[2] += 5.0  # tell the slices apart
    slices = ct_slices(hu, "1.2.3")
    uids = tuple(str(s.SOPInstanceUID) for s in slices)
    volume = working_volume(iter(slices[::-1]), 4.0)  # the series' own spacing: no change
    np.testing.assert_allclose(volume.hu, hu, atol=1e-3)
    assert volume.source_uids == uids
    assert volume.spacing_mm == (4.0, 4.0, 4.0)
    assert all("PixelData" not in s for s in slices)  # dropped once resampled
    with pytest.raises(ValueError, match="too few for a volume"):
        working_volume(iter(ct_slices(hu, "1.2.3")[:2]), 4.0)


def test_score_series_reads_files_and_reports_errors(tmp_path: Path) -> None:
    hu, _ = chest(nz=6, n=32, ggo=[(2, 16, 8)])
    paths = []
    for i, ds in enumerate(ct_slices(hu, "1.2.3")):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    result = score_series(ScoreTask("H01", "1.2.3", tuple(paths), None))
    assert result.error is None
    assert result.features is not None
    assert dict(zip(FEATURES, result.features, strict=True))["ggo_fraction"] > 0.0
    (tmp_path / "junk.dcm").write_text("not dicom")
    broken = score_series(ScoreTask("H01", "1.2.3", (str(tmp_path / "junk.dcm"),), None))
    assert broken.features is None
    assert broken.error == "unreadable"
    assert pydicom.dcmread(paths[0]).Modality == "CT"


def test_resampling_is_anti_aliased_linear_and_centred() -> None:
    same = resampling(10, 2.0, 2.0)
    np.testing.assert_allclose(same.matrix(10), np.eye(10), atol=1e-6)
    down = resampling(512, 0.74, 2.0)
    weights = down.matrix(512)
    assert weights.shape == (189, 512)  # 379 mm at 2 mm
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(weights, weights[::-1, ::-1], atol=1e-6)  # symmetric grid
    ramp = weights @ np.arange(512.0)
    centres = 255.5 + (np.arange(189) - 94.0) * 2.0 / 0.74
    np.testing.assert_allclose(ramp[5:-5], centres[5:-5], atol=1e-3)  # linear data kept
    noise = np.random.default_rng(0).normal(size=512)
    assert np.std(weights @ noise) < 0.5  # the prefilter averages pixel noise away
    with pytest.raises(ValueError, match="positive steps"):
        resampling(4, 0.0, 2.0)


def test_working_volume_downsamples_fine_axes_and_keeps_coarse_ones() -> None:
    hu, lung = chest(nz=12, n=40)  # 4 mm pixels, 1 mm slices below
    slices = ct_slices(hu, "1.2.3", z_step=1.0)
    volume = working_volume(iter(slices), 2.0)
    assert volume.spacing_mm == (2.0, 4.0, 4.0)  # slices to 2 mm, pixels kept
    assert volume.hu.shape == (6, 40, 40)
    np.testing.assert_allclose(volume.hu[:, 20], hu[:6, 20], atol=1e-3)  # same every slice
    on_grid = volume.labels_onto(lung.astype(np.uint8))  # (slices, rows, columns) read
    assert on_grid.shape == volume.hu.shape
    np.testing.assert_array_equal(on_grid[3], lung[0])
    with pytest.raises(ValueError, match="do not match"):
        volume.labels_onto(np.zeros((2, 40, 40), np.uint8))


def test_median_network_matches_scipy() -> None:
    from scipy import ndimage

    from ctcurate.imaging.lungmask import median_in_plane

    img = np.random.default_rng(1).normal(size=(3, 17, 23)).astype(np.float32)
    np.testing.assert_array_equal(
        median_in_plane(img, (1, 3, 3)), ndimage.median_filter(img, size=(1, 3, 3))
    )
    np.testing.assert_array_equal(
        median_in_plane(img, (1, 5, 5)), ndimage.median_filter(img, size=(1, 5, 5))
    )
