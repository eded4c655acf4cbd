"""The post-processed lung from HU (``train.lung_from: hu``): the threshold lung mask for the
outline, the network's lesions kept, the network's lung where the grid cuts the chest."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.chest import chest

from ctcurate.imaging.lungmask import threshold_lung_mask
from ctcurate.labels import CONSOLIDATION, GGO, NORMAL
from ctcurate.models.inference import lung_source
from ctcurate.models.nets import lung_from_hu, postprocess_label, remove_small_lesions


def network_like(lung: np.ndarray) -> np.ndarray:
    """A network's labels: the true lung grown by a pixel everywhere plus a spurious patch
    of lung below the left lung, a GGO blob inside, consolidation outside the HU lung
    against its side, and consolidation in the soft tissue between the lungs, touching
    neither (:data:`DETACHED`)."""
    label = np.zeros(lung.shape, dtype=np.uint8)
    grown = lung.copy()
    grown[:, 1:] |= lung[:, :-1]
    grown[:, :-1] |= lung[:, 1:]
    label[grown] = NORMAL
    label[:, 33:35, 14:20] = NORMAL  # spurious lung in the body behind the lungs
    label[2:4, 18:21, 12:15] = GGO
    label[4:6, 18:21, 4:7] = CONSOLIDATION  # outside the aerated lung, against its side
    label[DETACHED] = CONSOLIDATION  # in the soft tissue, touching no lung
    return label


DETACHED = (slice(4, 6), slice(5, 8), slice(20, 24))


def test_the_outline_is_the_threshold_mask_and_the_lesions_stay() -> None:
    hu, lung = chest(nz=8, n=40)
    label = network_like(lung)
    out = lung_from_hu(label, hu)
    hu_lung = threshold_lung_mask(hu)
    assert not (hu_lung[4:6, 18:21, 4:7]).any()  # that consolidation is not aerated lung
    assert not out[DETACHED].any()  # the lesion touching no lung is dropped
    label[DETACHED] = 0
    lesion = label >= GGO
    assert np.array_equal(out[lesion], label[lesion])  # every other lesion voxel as predicted
    assert np.array_equal(out == NORMAL, hu_lung & ~lesion)  # the outline from HU
    assert not out[:, 33:35, 14:20].any()  # the spurious patch is gone
    assert out.dtype == np.uint8


def test_a_lung_cut_at_the_grid_side_stays_the_network_lung() -> None:
    hu, lung = chest(nz=8, n=40)
    label = network_like(lung)
    # a grid narrower than the chest: its left side cuts through the body and the left lung
    hu, lung, label = hu[:, :, 10:], lung[:, :, 10:], label[:, :, 10:]
    hu_lung = threshold_lung_mask(hu)
    left = lung.copy()
    left[:, :, 9:] = False  # the cut left lung (the right lung starts at column 12)
    assert left[:, :, 0].any()  # it reaches the grid's side
    assert not (hu_lung & left).any()  # the HU mask takes it for air outside the body
    out = lung_from_hu(label, hu)
    near = np.zeros(lung.shape, dtype=bool)
    near[:, :33, :10] = True  # the cut lung's side (the spurious patch lies below row 33)
    assert np.array_equal(out[near], label[near])  # the cut lung: the network's, as predicted
    far = ~near
    label[4:6, 5:8, 10:14] = 0  # the detached consolidation (columns 20-23 before the cut)
    want = hu_lung | (label >= GGO)
    assert np.array_equal((out > 0)[far], want[far])  # the right lung and the rest: from HU
    assert not out[:, 33:35, 4:10].any()  # the spurious patch is still gone


def test_postprocess_applies_the_size_cut_then_the_lung_source() -> None:
    hu, lung = chest(nz=8, n=40)
    label = network_like(lung)
    spacing = (4.0, 4.0, 4.0)
    net = postprocess_label(label, hu, spacing, 1000.0, "network")
    assert np.array_equal(net, remove_small_lesions(label, 1000.0, spacing))
    fused = postprocess_label(label, hu, spacing, 1000.0, "hu")
    assert np.array_equal(fused, lung_from_hu(net, hu))
    with pytest.raises(ValueError, match="unknown lung source 'atlas'"):
        postprocess_label(label, hu, spacing, 0.0, "atlas")


def test_models_without_the_choice_keep_the_network_lung() -> None:
    assert lung_source({"postprocess": {"min_lesion_mm3": 0.0}}) == "network"
    assert lung_source({}) == "network"
    assert lung_source({"postprocess": {"lung_from": "hu"}}) == "hu"


def test_an_unknown_lung_source_in_a_model_card_is_refused() -> None:
    from ctcurate.errors import ParamsError

    with pytest.raises(ParamsError, match=r"model\.json: unknown postprocess lung_from 'atlas'"):
        lung_source({"postprocess": {"lung_from": "atlas"}})


def test_the_outline_in_plane_keeps_outside_air_out_and_a_cut_lung_in() -> None:
    """One slice: body tissue with a closed lung (left) and a lung the field of view cuts
    open at the right edge, so that it joins the air outside the body."""
    from ctcurate.models.nets import lung_outline_in_plane

    hu = np.full((1, 20, 30), 40.0)
    hu[:, :2, :] = -1000.0  # air outside the body, above it
    hu[:, 5:15, 3:10] = -850.0  # the closed lung, with a vessel
    hu[:, 9, 6] = 40.0
    hu[:, 5:15, 20:] = -850.0  # the cut lung, reaching the right edge
    hu[:, 2:5, 28:] = -1000.0  # ... and joined to the outside air along that edge
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[:, 6:14, 4:9] = NORMAL  # the coarse lung: inside the closed one, stepped
    label[:, 8:10, 4:6] = GGO
    label[:, 6:14, 22:29] = NORMAL  # the coarse lung of the cut side
    label[:, 2:4, 10:14] = NORMAL  # a step of the coarse lung over the chest wall
    covered = np.ones(hu.shape, dtype=bool)
    out = lung_outline_in_plane(label, hu, covered)
    closed = np.zeros(hu.shape, dtype=bool)
    closed[:, 5:15, 3:10] = True
    np.testing.assert_array_equal(out[:, :, :15] > 0, closed[:, :, :15])  # outline + vessel
    assert (out[:, 8:10, 4:6] == GGO).all()
    assert not out[:, :5, :15].any()  # neither the outside air nor the step is lung
    np.testing.assert_array_equal(out[:, :, 15:] > 0, label[:, :, 15:] > 0)  # cut: kept as is
    covered[:, 10:] = False
    assert not lung_outline_in_plane(label, hu, covered)[:, 10:].any()


def test_drop_detached_lesions_keeps_every_lesion_that_touches_lung() -> None:
    from ctcurate.models.nets import drop_detached_lesions

    label = np.zeros((3, 9, 9), dtype=np.uint8)
    label[1, 1:4, 1:4] = NORMAL
    label[1, 4, 4] = CONSOLIDATION  # touches the lung only at a corner
    label[1, 5, 5] = GGO  # one component with it
    label[1, 7:9, 7:9] = GGO  # a second component, two voxels from the first
    out = drop_detached_lesions(label)
    assert out[1, 4, 4] == CONSOLIDATION
    assert out[1, 5, 5] == GGO
    assert not out[1, 7:9, 7:9].any()  # touching no lung: background
    np.testing.assert_array_equal(out[label < GGO], label[label < GGO])
    no_lung = np.where(label == NORMAL, 0, label).astype(np.uint8)
    np.testing.assert_array_equal(drop_detached_lesions(no_lung), no_lung)
