"""A geometric chest in Hounsfield units: superellipse body, superquadric lungs, vessel trees.

Every shape is defined in millimetres (patient coordinates, LPS: x toward the patient's left,
y posterior, z toward the head) and sampled on the voxel centres of the series, so the same
patient looks the same at any matrix. Arrays are (z, y, x) float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

F32 = npt.NDArray[np.float32]
BOOL = npt.NDArray[np.bool_]

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_HU = 40.0
VESSEL_HU = 40.0
BONE_HU = 550.0
MARROW_HU = 230.0


@dataclass(frozen=True)
class Grid:
    """Voxel centres of one series: ``z`` (slices), ``y`` (rows), ``x`` (columns), in mm."""

    z: F32
    y: F32
    x: F32

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice interval, row spacing, column spacing) in mm."""
        dz = float(self.z[1] - self.z[0]) if self.z.size > 1 else 1.0
        return dz, float(self.y[1] - self.y[0]), float(self.x[1] - self.x[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return self.z.size, self.y.size, self.x.size


@dataclass(frozen=True)
class Chest:
    """One patient's chest sampled on a grid."""

    hu: F32  # noiseless HU, vessels included, no lesions
    lung: BOOL  # both lungs (parenchyma and the vessels inside them)
    side: npt.NDArray[np.int8]  # 0 outside the lungs, 1 patient right, 2 patient left
    body: BOOL
    vessel_radius: F32  # radius (mm) of the nearest vessel where a vessel is, else 0
    lung_top_mm: float  # z of the highest lung voxel (apex)
    lung_bottom_mm: float  # z of the lowest lung voxel (costophrenic recess)


def _smooth_field(
    shape: tuple[int, ...], sigma_vox: tuple[float, ...], rng: np.random.Generator
) -> F32:
    """Gaussian-filtered white noise, zero mean, unit standard deviation."""
    white = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma_vox, mode="reflect")
    std = float(field.std())
    return ((field - field.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def _superellipse(dx: F32, dy: F32, a: float | F32, b: float | F32, p: float) -> F32:
    """|dx/a|^p + |dy/b|^p (< 1 inside)."""
    return np.abs(dx / a) ** p + np.abs(dy / b) ** p  # type: ignore[no-any-return]


def build_chest(grid: Grid, fov_mm: float, rng: np.random.Generator) -> Chest:
    """Draw one patient's anatomy and sample it on ``grid``."""
    dz, dy, dx = grid.spacing
    z = grid.z[:, None, None]
    y = grid.y[None, :, None]
    x = grid.x[None, None, :]
    z_lo, z_hi = float(grid.z[0]), float(grid.z[-1])
    t = (z - z_lo) / max(z_hi - z_lo, 1.0)  # 0 at the lowest slice, 1 at the highest

    # body: a superellipse whose width and depth change slowly along z
    a_body = rng.uniform(0.36, 0.44) * fov_mm
    b_body = a_body * rng.uniform(0.62, 0.78)
    p_body = rng.uniform(2.2, 3.2)
    y_body = rng.uniform(-0.04, 0.04) * fov_mm
    a_z = a_body * (1.0 - rng.uniform(0.04, 0.14) * t**2)
    b_z = b_body * (1.0 - rng.uniform(0.0, 0.10) * t)
    body = _superellipse(x, y - y_body, a_z, b_z, p_body) <= 1.0
    fat = rng.uniform(6.0, 24.0)
    muscle = _superellipse(x, y - y_body, a_z - fat, b_z - fat, p_body) <= 1.0
    wall = rng.uniform(11.0, 18.0)  # muscle and ribs between the fat and the pleura
    cavity = _superellipse(x, y - y_body, a_z - fat - wall, b_z - fat - wall, p_body) <= 1.0

    hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
    hu[body] = FAT_HU
    hu[muscle] = SOFT_HU + rng.uniform(-10.0, 10.0)

    # table: a shallow arc under the back
    table_y = y_body + b_body + rng.uniform(4.0, 16.0)
    table_thick = rng.uniform(4.0, 8.0)
    curve = rng.uniform(0.0, 4e-4)
    arc = table_y - curve * x**2
    table = (y >= arc) & (y <= arc + table_thick) & (np.abs(x) <= 0.46 * fov_mm)
    hu[np.broadcast_to(table, grid.shape) & ~body] = rng.uniform(80.0, 250.0)

    # spine: a round vertebral body with a cortical ring, just in front of the back muscles
    spine_r = rng.uniform(13.0, 19.0)
    spine_y = y_body + b_z - fat - wall - spine_r - rng.uniform(10.0, 22.0)
    spine_d = np.sqrt(x**2 + (y - spine_y) ** 2)
    spine = np.broadcast_to(spine_d <= spine_r, grid.shape)

    # ribs: small bony cross-sections on a ring in the chest wall, drifting with z
    # (ribs lie just outside the parietal pleura, the big muscles outside them)
    rib_r = rng.uniform(3.5, 5.5)
    rib_gap = rib_r + rng.uniform(0.5, 2.0)
    rib_ring_a, rib_ring_b = a_z - fat - wall + rib_gap, b_z - fat - wall + rib_gap
    n_ribs = int(rng.integers(7, 11))
    phase = rng.uniform(0.0, 2 * np.pi)
    pitch = rng.uniform(28.0, 40.0)  # mm of z per rib spacing along the ring
    for k in range(n_ribs):
        for side in (-1.0, 1.0):
            ang = 0.25 * np.pi + 0.5 * np.pi * k / (n_ribs - 1)  # from front to back, lateral
            ang_z = ang + 0.18 * np.sin(phase + 2 * np.pi * grid.z / pitch)
            # a point of the superellipse (the cavity's shape) at this angle
            sin, cos = np.sin(ang_z), np.cos(ang_z)
            cx = side * np.abs(sin) ** (2 / p_body) * rib_ring_a[:, 0, 0]
            cy = y_body - np.sign(cos) * np.abs(cos) ** (2 / p_body) * rib_ring_b[:, 0, 0]
            d2 = (x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2
            hu[d2 <= rib_r**2] = BONE_HU

    # mediastinum: a column between the lungs and a heart blob low and to the left
    med_half = rng.uniform(16.0, 26.0)
    sternum_y = y_body - b_body + fat + wall
    col_c = 0.5 * (sternum_y + spine_y + spine_r)
    col_b = 0.5 * (spine_y + spine_r - sternum_y)
    column = _superellipse(x - rng.uniform(-4.0, 4.0), y - col_c, med_half, col_b, 1.6) <= 1.0
    heart_c = (rng.uniform(5.0, 20.0), y_body - rng.uniform(0.05, 0.25) * b_body)
    heart_z = z_lo + rng.uniform(0.18, 0.32) * (z_hi - z_lo)
    heart_ax = (
        rng.uniform(0.28, 0.38) * a_body,
        rng.uniform(0.38, 0.50) * b_body,
        rng.uniform(50.0, 75.0),
    )
    heart = (
        ((x - heart_c[0]) / heart_ax[0]) ** 2
        + ((y - heart_c[1]) / heart_ax[1]) ** 2
        + ((z - heart_z) / heart_ax[2]) ** 2
    ) <= 1.0
    mediastinum = np.broadcast_to(column, grid.shape) | heart
    hu[mediastinum & cavity] = SOFT_HU + rng.uniform(-5.0, 15.0)

    hu[spine] = MARROW_HU
    hu[spine & np.broadcast_to(spine_d >= spine_r - 2.5, grid.shape)] = BONE_HU

    # lungs: two superquadrics of their own proportions, a diaphragm dome underneath
    lung = np.zeros(grid.shape, dtype=bool)
    side_of = np.zeros(grid.shape, dtype=np.int8)
    # the lungs fill the pleural cavity against the chest wall: each superquadric reaches
    # past the cavity laterally, in front and behind, and is cut by it; its own rounded
    # shape (and the heart) bounds it medially
    cav_a, cav_b = a_body - fat - wall, b_body - fat - wall
    extent = z_hi - z_lo
    for label, side in ((1, -1.0), (2, 1.0)):
        medial = med_half + rng.uniform(0.0, 12.0) + (0.0 if side < 0 else rng.uniform(0, 10))
        lateral = cav_a * rng.uniform(1.03, 1.15)
        ax = 0.5 * (lateral - medial)
        cx = side * (medial + ax)
        ay = cav_b * rng.uniform(1.02, 1.15)
        cy = y_body + rng.uniform(-0.03, 0.06) * b_body
        p = rng.uniform(2.0, 2.8)
        base = z_lo + rng.uniform(0.02, 0.08) * extent + (rng.uniform(5.0, 20.0) if side < 0 else 0)
        apex = z_lo + rng.uniform(0.90, 0.98) * extent
        u = (z - base) / max(apex - base, 1.0)
        taper = np.sqrt(np.clip(1.0 - ((u - 0.55) / 0.45).clip(0, None) ** 2, 0.0, 1.0))
        taper = np.where((u >= 0) & (u <= 1), np.maximum(taper, 0.05), 0.0).astype(np.float32)
        wobble = _smooth_field(grid.shape, (25.0 / dz, 25.0 / dy, 25.0 / dx), rng)
        f = _superellipse(x - cx, y - cy, ax * taper + 1e-3, ay * taper + 1e-3, p)
        f = f + 0.07 * wobble
        dome_h = rng.uniform(20.0, 45.0)
        r2 = ((x - cx) / ax) ** 2 + ((y - cy + 0.3 * ay) / ay) ** 2
        dome = base + dome_h * np.clip(1.0 - r2, 0.0, None)
        this = (f <= 1.0) & (z >= dome) & cavity
        lung |= this
        side_of[this] = label
    near_med = ndimage.binary_dilation(mediastinum | spine, iterations=1)
    lung &= ~near_med
    side_of[~lung] = 0

    # airways: trachea down to the carina (outside the lung labels)
    carina = z_lo + rng.uniform(0.55, 0.68) * extent
    tr_r = rng.uniform(7.0, 10.0)
    tr_y = spine_y - spine_r - rng.uniform(12.0, 22.0)
    trachea = ((x**2 + (y - tr_y) ** 2) <= tr_r**2) & (z >= carina)
    hu[np.broadcast_to(trachea, grid.shape) & body] = AIR_HU + 10.0

    # parenchyma: about -850 HU, denser toward the back (dependent lung), fine texture
    base_hu = rng.uniform(-885.0, -835.0)
    gradient = rng.uniform(40.0, 120.0)
    yy = np.broadcast_to(y, grid.shape)
    y_front = float(yy[lung].min()) if lung.any() else 0.0
    y_back = float(yy[lung].max()) if lung.any() else 1.0
    dep = np.clip((yy - y_front) / max(y_back - y_front, 1.0), 0.0, 1.0)
    texture = _smooth_field(grid.shape, (1.5 / dz, 1.5 / dy, 1.5 / dx), rng)
    parenchyma = base_hu + gradient * dep**1.5 + 12.0 * texture
    hu[lung] = parenchyma[lung]

    vessel_radius = np.zeros(grid.shape, dtype=np.float32)
    trees = _vessel_trees(grid, lung, side_of, rng)
    if trees is not None:
        radius_map, dist = trees
        # partial volume: a vessel thinner than a pixel fills only pi r^2 / pixel^2 of it
        thin = np.minimum(np.pi * radius_map**2 / max(dy, 0.5) ** 2, 1.0)
        occupancy = np.clip((radius_map - dist) / max(dy, 0.5) + 0.5, 0.0, 1.0) * thin
        occupancy[~lung] = 0.0
        hu = np.where(occupancy > 0, hu * (1 - occupancy) + VESSEL_HU * occupancy, hu)
        vessel_radius[occupancy > 0.5] = radius_map[occupancy > 0.5]

    zz = np.broadcast_to(z, grid.shape)
    return Chest(
        hu=hu.astype(np.float32),
        lung=lung,
        side=side_of,
        body=np.asarray(body, dtype=bool),
        vessel_radius=vessel_radius,
        lung_top_mm=float(zz[lung].max()) if lung.any() else z_hi,
        lung_bottom_mm=float(zz[lung].min()) if lung.any() else z_lo,
    )


def _vessel_trees(
    grid: Grid, lung: BOOL, side_of: npt.NDArray[np.int8], rng: np.random.Generator
) -> tuple[F32, F32] | None:
    """Random branching tubes from each hilum: (radius of the nearest centre line, distance
    to it) per voxel in mm, or None when there is no lung."""
    if not lung.any():
        return None
    spacing = np.asarray(grid.spacing, dtype=np.float64)
    origin = np.asarray([grid.z[0], grid.y[0], grid.x[0]], dtype=np.float64)
    shape = np.asarray(grid.shape)
    centre = np.zeros(grid.shape, dtype=bool)
    radius_at = np.zeros(grid.shape, dtype=np.float32)
    for label in (1, 2):
        idx = np.argwhere(side_of == label)
        if idx.size == 0:
            continue
        mid = idx.mean(axis=0) * spacing + origin
        medial = idx[:, 2] * spacing[2] + origin[2]
        hilum_x = float(np.quantile(medial, 0.2 if label == 2 else 0.8))
        height = float(np.ptp(idx[:, 0])) * spacing[0]
        hilum = np.asarray([mid[0], mid[1], hilum_x])
        stack: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, int]] = []
        lateral = 1.0 if label == 2 else -1.0
        for _ in range(int(rng.integers(9, 14))):
            root = hilum + np.asarray([rng.uniform(-0.2, 0.2) * height, rng.uniform(-8, 8), 0])
            outward = np.asarray([rng.uniform(-1.2, 1.2), rng.uniform(-0.8, 0.8), lateral])
            stack.append((root, outward / np.linalg.norm(outward), rng.uniform(2.5, 4.5), 0))
        while stack:
            start, direction, r, depth = stack.pop()
            length = rng.uniform(14.0, 30.0) * (0.85**depth)
            steps = max(int(length / 1.0), 2)
            seg = start[None, :] + np.linspace(0, length, steps)[:, None] * direction[None, :]
            vox = np.round((seg - origin) / spacing).astype(int)
            inside = np.all((vox >= 0) & (vox < shape), axis=1)
            if not inside.all():
                seg, vox = seg[inside], vox[inside]
            if len(vox) == 0:
                continue
            keep = lung[vox[:, 0], vox[:, 1], vox[:, 2]] | (depth == 0)
            if not keep.any():
                continue
            for v in vox[keep]:
                centre[v[0], v[1], v[2]] = True
                radius_at[v[0], v[1], v[2]] = max(radius_at[v[0], v[1], v[2]], r)
            end = seg[-1]
            if r * 0.75 < 0.5 or depth >= 8 or not keep[-1]:
                continue
            for _ in range(2):
                away = end - start if depth == 0 else end - hilum
                away /= max(float(np.linalg.norm(away)), 1e-6)
                child = direction + 0.6 * away + rng.normal(0.0, 0.45, size=3)
                child /= np.linalg.norm(child)
                stack.append((end, child, r * rng.uniform(0.68, 0.82), depth + 1))
    if not centre.any():
        return None
    dist, nearest = ndimage.distance_transform_edt(~centre, sampling=spacing, return_indices=True)
    radius_map = radius_at[nearest[0], nearest[1], nearest[2]]
    return radius_map.astype(np.float32), dist.astype(np.float32)
