"""Pneumonia patterns painted into a chest phantom, with their truth label volume.

Labels: 0 background, 1 normal lung, 2 ground-glass opacity (GGO), 3 consolidation.
Lesions are irregular ellipsoids in millimetres, clipped to the lung; patterns follow the
RSNA COVID-19 CT categories (typical, indeterminate, atypical, negative).
"""

from __future__ import annotations

import numpy as np

from ctcurate.demo.anatomy import LUNG, SLAB, SOFT, Chest, smooth_noise
from ctcurate.labels import BACKGROUND, CONSOLIDATION, GGO, NORMAL

PATTERNS = ("typical", "indeterminate", "atypical", "negative")

HU_GGO = (-640.0, -420.0)  # faint → dense ground glass
HU_CONSOLIDATION = 35.0
HU_EFFUSION = 12.0
_MAX_TRIES = 40


def _coords(chest: Chest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = chest.grid
    return (
        g.z.astype(np.float32)[:, None, None],
        g.y.astype(np.float32)[None, :, None],
        g.x.astype(np.float32)[None, None, :],
    )


def _lung_point(
    rng: np.random.Generator,
    chest: Chest,
    side: int,
    rho: tuple[float, float],
    depth: tuple[float, float],
) -> tuple[float, float, float] | None:
    """A random lung voxel centre (z, y, x mm) with rho and depth in the given ranges."""
    lung = chest.lung_side == side
    sel = lung & (chest.rho >= rho[0]) & (chest.rho <= rho[1])
    sel &= (chest.depth >= depth[0]) & (chest.depth <= depth[1])
    idx = np.flatnonzero(sel)
    if idx.size == 0:
        idx = np.flatnonzero(lung)
        if idx.size == 0:
            return None
    k, j, i = np.unravel_index(int(idx[rng.integers(idx.size)]), sel.shape)
    g = chest.grid
    return float(g.z[k]), float(g.y[j]), float(g.x[i])


def _blob(
    chest: Chest,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    rough: np.ndarray,
) -> np.ndarray:
    """Irregular ellipsoid mask (edge perturbed by the smooth field ``rough``)."""
    z, y, x = _coords(chest)
    out = np.empty(rough.shape, dtype=bool)
    for k in range(0, rough.shape[0], SLAB):  # by slabs: the same numbers, less memory
        part = slice(k, k + SLAB)
        d = ((z[part] - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
        d = d + ((x - centre[2]) / radii[2]) ** 2
        out[part] = (d + 0.35 * rough[part]) < 1.0
    return out


def _paint(
    hu: np.ndarray, labels: np.ndarray, region: np.ndarray, label: int, target: float
) -> None:
    """Raise HU inside ``region`` towards ``target`` and set its label (never lowers one)."""
    if label == GGO:
        region = region & (labels < CONSOLIDATION)
        hu[region] = hu[region] + 0.72 * (target - hu[region])
    else:
        hu[region] = target + 0.25 * (hu[region] - hu[region].mean() if region.any() else 0.0)
    labels[region] = label


def _radii(rng: np.random.Generator, size: float) -> tuple[float, float, float]:
    return (
        float(size * rng.uniform(0.7, 1.3)),
        float(size * rng.uniform(0.7, 1.3)),
        float(size * rng.uniform(0.7, 1.3)),
    )


def add_pattern(
    rng: np.random.Generator,
    chest: Chest,
    pattern: str,
    severity: float,
    border_consolidation: bool,
    copy: bool = True,
    pleural: float = 0.0,
    atelectasis: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint ``pattern`` at ``severity`` (0–1) into a copy of the chest (with ``copy`` False,
    into the chest's own HU and tissue arrays: for a caller that drops the chest).

    Returns
    -------
    (hu, labels, tissue)
        float32 HU volume, uint8 label volume (0–3) and the updated tissue map (an
        effusion turns lung into soft tissue).
    """
    if pattern not in PATTERNS:
        msg = f"unknown pattern {pattern!r}; expected one of {', '.join(PATTERNS)}"
        raise ValueError(msg)
    if not 0.0 <= severity <= 1.0:
        msg = f"severity must be within 0..1, got {severity}"
        raise ValueError(msg)
    hu = chest.hu.copy() if copy else chest.hu
    tissue = chest.tissue.copy() if copy else chest.tissue
    lung = tissue == LUNG
    labels = np.where(lung, NORMAL, BACKGROUND).astype(np.uint8)
    if atelectasis > 0 and rng.random() < atelectasis:
        _dependent_atelectasis(rng, chest, hu, lung)
    if pattern == "negative":
        return hu, labels, tissue
    rough = smooth_noise(rng, hu.shape, (1.2, 1.5, 1.5))
    ggo_hu = HU_GGO[0] + severity * (HU_GGO[1] - HU_GGO[0])
    grow = 0.6 + 0.9 * severity

    if pattern == "typical":
        # bilateral, peripheral, multifocal, lower-lobe predominant GGO ± consolidation
        n = 2 + round(severity * 12)
        for k in range(n):
            side = (-1, 1)[k % 2]
            depth = float(np.clip(rng.beta(3.0, 1.4), 0.25, 0.98))
            p = _lung_point(rng, chest, side, (0.72, 0.97), (depth - 0.08, depth + 0.08))
            if p is None:
                continue
            radii = _radii(rng, 9.0 + 30.0 * severity)
            region = _blob(chest, p, radii, rough) & lung
            _paint(hu, labels, region, GGO, ggo_hu)
            if severity > 0.35 and rng.random() < 0.5:
                half = (radii[0] * 0.5, radii[1] * 0.5, radii[2] * 0.5)
                core = _blob(chest, p, half, rough) & lung
                _paint(hu, labels, core, CONSOLIDATION, HU_CONSOLIDATION)
    elif pattern == "indeterminate":
        # perihilar / central or unilateral GGO without a peripheral, basal predominance
        n = 1 + round(severity * 4)
        sides = [int(rng.choice([-1, 1]))] if rng.random() < 0.5 else [-1, 1]
        for k in range(n):
            side = sides[k % len(sides)]
            p = _lung_point(rng, chest, side, (0.1, 0.55), (0.3, 0.8))
            if p is None:
                continue
            region = _blob(chest, p, _radii(rng, 12.0 + 28.0 * severity), rough) & lung
            _paint(hu, labels, region, GGO, ggo_hu - 40.0)
    else:
        _atypical(rng, chest, hu, labels, tissue, lung, rough, severity)

    if pleural > 0 and rng.random() < pleural:
        _pleural_consolidation(rng, chest, hu, labels, lung, rough, severity, ggo_hu)
    if border_consolidation:
        # dense consolidation against the posterior chest wall: a plain threshold misses it
        side = int(rng.choice([-1, 1]))
        sel = (chest.lung_side == side) & (chest.posterior > 0.6) & (chest.rho > 0.85)
        sel &= chest.depth > 0.55
        idx = np.flatnonzero(sel)
        if idx.size:
            kz, jy, ix = np.unravel_index(int(idx[rng.integers(idx.size)]), sel.shape)
            g = chest.grid
            centre = (float(g.z[kz]), float(g.y[jy]), float(g.x[ix]))
            region = _blob(chest, centre, _radii(rng, 22.0 * grow), rough) & lung
            _paint(hu, labels, region, CONSOLIDATION, HU_CONSOLIDATION)
    air = (labels == CONSOLIDATION) & chest.airway
    hu[air] = -900.0  # air bronchograms
    return hu, labels, tissue


def _dependent_atelectasis(
    rng: np.random.Generator, chest: Chest, hu: np.ndarray, lung: np.ndarray
) -> None:
    """Dependent (gravitational) density of a supine patient, no pneumonia: a band along the
    back of the lung in the lower zones, 5–30 mm deep, denser toward the back (up to
    -500..-100 HU at the pleura) with an irregular edge. Its label stays normal lung, as a
    reader leaves it out of ground glass and consolidation.

    The band's depth varies over the back (a smooth field over slices and columns), and the
    volume is painted in slabs of slices: no whole-volume temporary at clinical size."""
    width_mm = float(rng.uniform(5.0, 30.0))
    top = float(rng.uniform(0.3, 0.6))  # from this lung depth (0 apex .. 1 base) down
    target = float(rng.uniform(-500.0, -100.0))
    nz, ny, nx = hu.shape
    edge = smooth_noise(rng, (nz, nx), (1.5, 2.0))  # per slice and column
    reach = (width_mm * (1.0 + 0.3 * edge))[:, None, :]  # mm from the back, (z, 1, x)
    rows = np.arange(ny, dtype=np.float32)[None, :, None]
    depth = np.broadcast_to(chest.depth, hu.shape)
    pixel = np.float32(chest.grid.pixel)
    for k in range(0, nz, SLAB):
        part = slice(k, k + SLAB)
        one = lung[part]
        last = ny - 1 - np.argmax(one[:, ::-1, :], axis=1)  # the back, per (z, x)
        from_back = (last[:, None, :] - rows) * pixel
        into = 1.0 - from_back / reach[part]  # 1 at the back, 0 at the band's edge
        zone = np.clip((depth[part] - top) / 0.15, 0.0, 1.0)  # fades in downward
        weight = np.clip(into, 0.0, 1.0) ** 1.5 * zone
        band = one & (weight > 0)
        block = hu[part]
        block[band] = block[band] + weight[band] * (target - block[band])


def _pleural_consolidation(
    rng: np.random.Generator,
    chest: Chest,
    hu: np.ndarray,
    labels: np.ndarray,
    lung: np.ndarray,
    rough: np.ndarray,
    severity: float,
    ggo_hu: float,
) -> None:
    """One to three patches of consolidation against the pleura, anywhere around the lung
    (centred within the outer tenth of its radius, so a broad face lies on the chest wall
    or mediastinum and the pleura between them cannot be seen), each in a ground-glass rim."""
    for _ in range(1 + int(rng.integers(0, 3))):
        side = int(rng.choice([-1, 1]))
        p = _lung_point(rng, chest, side, (0.9, 0.99), (0.1, 0.95))
        if p is None:
            continue
        radii = _radii(rng, 10.0 + 25.0 * severity)
        rim = _blob(chest, p, (radii[0] * 1.4, radii[1] * 1.4, radii[2] * 1.4), rough) & lung
        _paint(hu, labels, rim, GGO, ggo_hu)
        core = _blob(chest, p, radii, rough) & lung
        _paint(hu, labels, core, CONSOLIDATION, HU_CONSOLIDATION)


def _atypical(
    rng: np.random.Generator,
    chest: Chest,
    hu: np.ndarray,
    labels: np.ndarray,
    tissue: np.ndarray,
    lung: np.ndarray,
    rough: np.ndarray,
    severity: float,
) -> None:
    """Lobar consolidation, centrilobular nodules, cavitation or effusion."""
    kind = str(rng.choice(["lobar", "nodules", "cavitation", "effusion"], p=[0.4, 0.25, 0.15, 0.2]))
    side = int(rng.choice([-1, 1]))
    one = chest.lung_side == side
    if kind == "lobar":
        # lower lobe behind an oblique fissure, extent by severity
        fissure = chest.depth + 0.45 * chest.posterior
        region = one & (fissure > 1.05 - 0.45 * severity)
        _paint(hu, labels, region, CONSOLIDATION, HU_CONSOLIDATION)
        rim = one & (fissure > 0.97 - 0.45 * severity) & ~region
        _paint(hu, labels, rim, GGO, -520.0)
    elif kind == "nodules":
        n = 12 + round(severity * 50)
        p0 = _lung_point(rng, chest, side, (0.2, 0.9), (0.2, 0.9))
        for _ in range(n):
            if p0 is None:
                break
            centre = (
                p0[0] + float(rng.normal(0, 25)),
                p0[1] + float(rng.normal(0, 20)),
                p0[2] + float(rng.normal(0, 20)),
            )
            size = float(rng.uniform(2.5, 4.5))
            region = _blob(chest, centre, (size, size, size), rough * 0.3) & lung
            _paint(hu, labels, region, GGO, -300.0)
    elif kind == "cavitation":
        p = _lung_point(rng, chest, side, (0.3, 0.8), (0.15, 0.6))
        if p is not None:
            size = 14.0 + 12.0 * severity
            region = _blob(chest, p, (size, size, size), rough) & lung
            _paint(hu, labels, region, CONSOLIDATION, HU_CONSOLIDATION)
            cavity = _blob(chest, p, (size * 0.5,) * 3, rough * 0.2) & region
            hu[cavity] = -980.0
    else:
        # pleural effusion: dependent fluid replaces lung; compressive atelectasis above it
        level = 0.55 - 0.6 * severity
        fluid = one & (chest.posterior > level + 0.9 * (1.0 - chest.depth))
        hu[fluid] = HU_EFFUSION
        labels[fluid] = BACKGROUND
        tissue[fluid] = SOFT
        lung &= ~fluid
        atel = one & ~fluid & (chest.posterior > level - 0.15 + 0.9 * (1.0 - chest.depth))
        _paint(hu, labels, atel & lung, CONSOLIDATION, HU_CONSOLIDATION)
