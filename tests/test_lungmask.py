"""Lung masks on a phantom chest with a bony cage, at two pixel spacings."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from ctcurate.imaging.lungmask import lung_masks, robust_lung_mask
from ctcurate.models.metrics import dice

SLICE_MM = 5.0


def cage_chest(
    pixel_mm: float, band: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(HU, true lung, consolidated lung) of a 12-slice chest sampled at ``pixel_mm``.

    Body 240 x 180 mm, a 9 mm rib ring inside the body wall, a spine, a mediastinum 40 mm
    wide; the lungs fill the cavity beside it. With ``band`` the posterior 30 mm of the
    patient's left lung is consolidated (30 HU) against the chest wall.
    """
    n = round(280.0 / pixel_mm)
    c = (n - 1) / 2.0
    y, x = (np.mgrid[0:n, 0:n].astype(np.float64) - c) * pixel_mm  # mm, y posterior
    body = (x / 120.0) ** 2 + (y / 90.0) ** 2 <= 1.0
    cavity = (x / 100.0) ** 2 + (y / 72.0) ** 2 <= 1.0
    ribs = ((x / 109.0) ** 2 + (y / 81.0) ** 2 <= 1.0) & ~cavity
    spine = x**2 + (y - 60.0) ** 2 <= 18.0**2
    lung2d = cavity & (np.abs(x) > 20.0) & ~(x**2 + (y - 60.0) ** 2 <= 24.0**2)
    hu2d = np.full((n, n), -1000.0)
    hu2d[body] = 40.0
    hu2d[ribs | spine] = 650.0
    hu2d[lung2d] = -850.0
    hu = np.repeat(hu2d[None], 12, axis=0)
    lung = np.repeat(lung2d[None], 12, axis=0)
    consolidated = np.zeros_like(lung)
    if band:
        consolidated[2:10] = lung2d & (y > 72.0 - 30.0) & (x > 0)
        hu[consolidated] = 30.0
    noise = np.random.default_rng(0).normal(0.0, 15.0, hu.shape)
    return (hu + noise).astype(np.float32), lung, consolidated


@pytest.mark.parametrize("pixel_mm", [2.0, 4.0])
def test_clear_chest_masks_agree_with_the_true_lung(pixel_mm: float) -> None:
    hu, lung, _ = cage_chest(pixel_mm, band=False)
    thr, robust = lung_masks(hu, (SLICE_MM, pixel_mm, pixel_mm))
    d_thr, d_rob = dice(thr, lung), dice(robust, lung)
    assert d_thr is not None
    assert d_rob is not None
    assert d_thr > 0.98
    assert d_rob > 0.97  # no chest wall or mediastinum taken in


@pytest.mark.parametrize("pixel_mm", [2.0, 4.0])
def test_robust_mask_keeps_subpleural_consolidation_the_threshold_drops(pixel_mm: float) -> None:
    hu, lung, consolidated = cage_chest(pixel_mm, band=True)
    assert consolidated.sum() > 50
    thr, robust = lung_masks(hu, (SLICE_MM, pixel_mm, pixel_mm))
    assert thr[consolidated].mean() < 0.05
    assert robust[consolidated].mean() > 0.6
    d_thr, d_rob = dice(thr, lung), dice(robust, lung)
    assert d_thr is not None
    assert d_rob is not None
    assert d_rob > d_thr + 0.01
    # the ribs, the spine and the mediastinum stay out
    n = hu.shape[2]
    assert not robust[:, :, n // 2].any()
    assert not robust[hu >= 200.0].any()


def test_sizes_are_millimetres_not_pixels() -> None:
    kept = []
    for pixel_mm in (2.0, 4.0):
        hu, _, consolidated = cage_chest(pixel_mm, band=True)
        robust = robust_lung_mask(hu, (SLICE_MM, pixel_mm, pixel_mm))
        kept.append(float(robust[consolidated].mean()))
    assert abs(kept[0] - kept[1]) < 0.15


def test_bad_spacing_is_refused() -> None:
    hu, _, _ = cage_chest(4.0, band=False)
    with pytest.raises(ValueError, match="spacing must be positive"):
        lung_masks(hu, (0.0, 4.0, 4.0))


def test_fast_opening_and_hole_filling_match_scipy() -> None:
    from scipy import ndimage

    from ctcurate.imaging.lungmask import fill_slices, opening

    rng = np.random.default_rng(0)
    for _ in range(6):
        mask = ndimage.binary_dilation(rng.random((6, 24, 20)) < 0.08, iterations=2)
        for structure in (np.ones((3, 5, 5), bool), ndimage.generate_binary_structure(3, 1)):
            assert np.array_equal(opening(mask, structure), ndimage.binary_opening(mask, structure))
        assert np.array_equal(
            opening(mask[0], np.ones((5, 3), bool)),
            ndimage.binary_opening(mask[0], np.ones((5, 3))),
        )
        holes = rng.random(mask.shape) < 0.6
        filled = np.stack([ndimage.binary_fill_holes(s) for s in holes])
        assert np.array_equal(fill_slices(holes), filled)
    assert not opening(np.zeros((3, 4, 4), bool), np.ones((3, 3, 3), bool)).any()


@pytest.mark.parametrize("pixel_mm", [2.0, 4.0])
def test_muscle_outside_the_ribs_stays_out_of_the_robust_mask(pixel_mm: float) -> None:
    """A 40 mm wall of muscle (+40 HU) outside a rib cage with gaps, scapulae beyond it."""
    n = round(340.0 / pixel_mm)
    c = (n - 1) / 2.0
    y, x = (np.mgrid[0:n, 0:n].astype(np.float64) - c) * pixel_mm
    body = (x / 150.0) ** 2 + (y / 120.0) ** 2 <= 1.0
    cavity = (x / 100.0) ** 2 + (y / 72.0) ** 2 <= 1.0
    ring = ((x / 109.0) ** 2 + (y / 81.0) ** 2 <= 1.0) & ~cavity
    ribs = ring & (np.cos(8.0 * np.arctan2(y, x)) > 0.0)  # a slice cuts ribs with gaps
    scapulae = ((np.abs(x) - 75.0) / 32.0) ** 2 + ((y - 100.0) / 5.0) ** 2 <= 1.0
    spine = x**2 + (y - 60.0) ** 2 <= 18.0**2
    lung2d = cavity & (np.abs(x) > 20.0) & ~(x**2 + (y - 60.0) ** 2 <= 24.0**2)
    hu2d = np.full((n, n), -1000.0)
    hu2d[body] = 40.0
    hu2d[ribs | spine | scapulae] = 650.0
    hu2d[lung2d] = -850.0
    noise = np.random.default_rng(1).normal(0.0, 15.0, (12, n, n))
    hu = (np.repeat(hu2d[None], 12, axis=0) + noise).astype(np.float32)
    _, robust = lung_masks(hu, (SLICE_MM, pixel_mm, pixel_mm))
    outside = np.repeat((body & ~cavity & ~ring)[None], 12, axis=0)
    assert robust[outside].sum() == 0
    d_rob = dice(robust, np.repeat(lung2d[None], 12, axis=0))
    assert d_rob is not None
    assert d_rob > 0.97


def basal_chest(pixel_mm: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """(HU, true lung) of a lung base: each lung a crescent cupped round the diaphragm's
    dome (liver and spleen, +40 HU), open toward the middle of the body."""
    n = round(280.0 / pixel_mm)
    c = (n - 1) / 2.0
    y, x = (np.mgrid[0:n, 0:n].astype(np.float64) - c) * pixel_mm  # mm, y posterior
    body = (x / 120.0) ** 2 + (y / 90.0) ** 2 <= 1.0
    cavity = (x / 100.0) ** 2 + (y / 72.0) ** 2 <= 1.0
    ribs = ((x / 109.0) ** 2 + (y / 81.0) ** 2 <= 1.0) & ~cavity
    spine = x**2 + (y - 60.0) ** 2 <= 18.0**2
    domes = ((np.abs(x) - 50.0) / 42.0) ** 2 + ((y + 5.0) / 52.0) ** 2 <= 1.0
    lung2d = cavity & (np.abs(x) > 20.0) & ~(x**2 + (y - 60.0) ** 2 <= 24.0**2) & ~domes
    lung2d &= y > -20.0  # the front of the base is below the lung
    hu2d = np.full((n, n), -1000.0)
    hu2d[body] = 40.0
    hu2d[ribs | spine] = 650.0
    hu2d[lung2d] = -850.0
    noise = np.random.default_rng(2).normal(0.0, 15.0, (12, n, n))
    hu = (np.repeat(hu2d[None], 12, axis=0) + noise).astype(np.float32)
    return hu, np.repeat(lung2d[None], 12, axis=0)


@pytest.mark.parametrize("pixel_mm", [2.0, 4.0])
def test_the_dome_under_a_basal_crescent_stays_out_of_the_robust_mask(pixel_mm: float) -> None:
    """The hull of a crescent of lung spans the dome; consolidation fills the lung from the
    chest wall (aerated lung between it and the middle of the body), the dome does not."""
    hu, lung = basal_chest(pixel_mm)
    thr, robust = lung_masks(hu, (SLICE_MM, pixel_mm, pixel_mm))
    added = robust & ~thr
    assert added.sum() <= 0.02 * thr.sum()
    d_rob = dice(robust, lung)
    assert d_rob is not None
    assert d_rob > 0.97
