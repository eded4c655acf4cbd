"""A 3D chest phantom in patient coordinates (LPS, millimetres).

The anatomy is analytic (ellipses, cylinders, a branching vessel tree) and evaluated on any
grid, so one patient can be reconstructed at several slice thicknesses. Axis order is
(z, y, x): z from head to feet in slice order, y anterior → posterior (image rows), x right
→ left (image columns). ``z`` is relative to the lung apex (0) and negative downwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Slices per slab of the elementwise steps on whole volumes (bounds their temporaries).
SLAB = 16

# Tissue classes of the truth tissue map.
AIR, FAT, SOFT, BONE, LUNG = 0, 1, 2, 3, 4

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 50.0
HU_SOFT = 40.0
HU_LIVER = 58.0
HU_BLOOD = 40.0
HU_LUNG = -870.0
HU_CORTEX = 900.0
HU_MARROW = 380.0
HU_RIB = 650.0


@dataclass(frozen=True)
class Body:
    """Per-patient anatomy (millimetres)."""

    half_width: float
    half_depth: float
    fat: float
    muscle: float
    lung_height: float
    dome: float
    heart: float
    rib_phase: float


@dataclass(frozen=True)
class Grid:
    """Voxel centres: ``z`` per slice (relative to the apex), square pixels of ``pixel`` mm."""

    z: np.ndarray
    matrix: int
    pixel: float

    @property
    def x(self) -> np.ndarray:
        """Column centres (mm, 0 at the body's midline)."""
        return (np.arange(self.matrix) - (self.matrix - 1) / 2.0) * self.pixel

    @property
    def y(self) -> np.ndarray:
        """Row centres (mm, 0 at the body's centre)."""
        return (np.arange(self.matrix) - (self.matrix - 1) / 2.0) * self.pixel


@dataclass(frozen=True)
class Chest:
    """A noiseless chest volume and the coordinates lesions are placed with."""

    hu: np.ndarray  # float32 (z, y, x)
    tissue: np.ndarray  # uint8 (z, y, x): AIR FAT SOFT BONE LUNG
    lung_side: np.ndarray  # int8: -1 right lung, +1 left lung, 0 elsewhere
    rho: np.ndarray  # float32: normalised lung radius (0 centre → 1 pleura)
    depth: np.ndarray  # float32: 0 apex → 1 lung base (per slice, broadcast)
    posterior: np.ndarray  # float32: -1 anterior → +1 posterior within the lung
    airway: np.ndarray  # bool: voxels more than 0.3 airway lumen
    grid: Grid
    body: Body


def sample_body(rng: np.random.Generator) -> Body:
    """Draw one patient's body size and shape."""
    half_width = float(rng.uniform(135.0, 172.0))
    return Body(
        half_width=half_width,
        half_depth=float(half_width * rng.uniform(0.62, 0.76)),
        fat=float(rng.uniform(6.0, 26.0)),
        muscle=float(rng.uniform(8.0, 14.0)),
        lung_height=float(rng.uniform(190.0, 235.0)),
        dome=float(rng.uniform(25.0, 45.0)),
        heart=float(rng.uniform(0.85, 1.15)),
        rib_phase=float(rng.uniform(0.0, 1.0)),
    )


def scan_range(body: Body) -> tuple[float, float]:
    """(top, bottom) z of a chest scan covering the lungs with a margin (mm)."""
    return 10.0, -(body.lung_height + 25.0)


def _smoothstep(v: np.ndarray) -> np.ndarray:
    c = np.clip(v, 0.0, 1.0)
    return np.asarray(c * c * (3.0 - 2.0 * c))


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]
) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma`` voxels.

    The normal draws are made slice by slice into float32 (the same numbers as one float64
    draw of the whole volume, without holding it)."""
    field = ndimage.gaussian_filter(standard_normal_f32(rng, shape), sigma)
    std = float(field.std())
    if std > 0:
        field /= np.float32(std)
    return np.asarray(field, dtype=np.float32)


def standard_normal_f32(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """``rng.standard_normal(shape).astype(np.float32)``, drawn one slice at a time."""
    out = np.empty(shape, np.float32)
    if len(shape) < 2:
        out[...] = rng.standard_normal(shape)
        return out
    for k in range(shape[0]):
        out[k] = rng.standard_normal(shape[1:])
    return out


def _segments(
    rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: float
) -> list[tuple[np.ndarray, np.ndarray, float, int]]:
    """Bifurcating tree, one generation at a time: (starts, ends, radius, generation)."""
    out: list[tuple[np.ndarray, np.ndarray, float, int]] = []
    p = start[None, :].astype(np.float64)
    d = direction[None, :].astype(np.float64)
    length = np.array([30.0])
    r = radius
    for g in range(8):
        end = p + d * length[:, None]
        out.append((p, end, r, g))
        if r * 0.74 < 0.8:
            break
        perp = np.cross(d, rng.standard_normal(d.shape))
        perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-9)
        children = []
        for sign in (1.0, -1.0):
            angle = np.deg2rad(rng.uniform(22.0, 40.0, size=(d.shape[0], 1)))
            child = np.cos(angle) * d + sign * np.sin(angle) * perp
            children.append(child / np.linalg.norm(child, axis=1, keepdims=True))
        d = np.concatenate(children)
        p = np.concatenate([end, end])
        length = np.concatenate([length, length]) * rng.uniform(0.68, 0.82, size=2 * length.size)
        r *= 0.74
    return out


def _tree_fields(
    rng: np.random.Generator,
    body: Body,
    grid: Grid,
    hila: list[np.ndarray],
    trees: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Vessel and airway lumen fractions (partial volume) from trees rooted at the hila:
    the four named roots per lung, then ``trees`` − 4 more in random lateral directions with
    root radii of 3.5–6.5 mm (none drawn for 4)."""
    shape = (grid.z.size, grid.matrix, grid.matrix)
    classes = (4.0, 1.6)  # representative radii (mm)
    points: list[list[np.ndarray]] = [[] for _ in classes]
    air_points: list[np.ndarray] = []
    for hilum in hila:
        side = np.sign(hilum[0])
        roots = [
            np.array([side * 0.45, -0.2, 0.85]),  # upper lobe
            np.array([side * 0.55, 0.25, -0.8]),  # lower lobe, posterior basal
            np.array([side * 0.5, -0.55, -0.55]),  # anterior / middle lobe
            np.array([side * 0.8, 0.35, -0.2]),  # lateral
        ]
        radii = [6.5] * len(roots)
        for _ in range(max(trees - len(roots), 0)):
            lateral = rng.uniform([0.3, -0.7, -0.9], [0.9, 0.7, 0.9])
            roots.append(np.array([side * lateral[0], lateral[1], lateral[2]]))
            radii.append(float(rng.uniform(3.5, 6.5)))
        for root, radius in zip(roots, radii, strict=True):
            d = root / float(np.linalg.norm(root))
            for p0, p1, r, g in _segments(rng, hilum, d, radius):
                n = max(
                    2, int(float(np.linalg.norm(p1 - p0, axis=1).max()) / (0.5 * grid.pixel)) + 1
                )
                f = np.linspace(0.0, 1.0, n)[None, :, None]
                pts = (p0[:, None, :] + f * (p1 - p0)[:, None, :]).reshape(-1, 3)
                points[0 if r > 2.6 else 1].append(pts)
                if g <= 2:
                    air_points.append(pts)
    z0 = float(grid.z[0])
    dz = float(grid.z[1] - grid.z[0]) if grid.z.size > 1 else -1.0
    half = (grid.matrix - 1) / 2.0

    def rasterize(chunks: list[np.ndarray]) -> np.ndarray:
        mark = np.zeros(shape, np.float32)
        if not chunks:
            return mark
        pts = np.concatenate(chunks)
        ix = np.rint(pts[:, 0] / grid.pixel + half).astype(np.int64)
        iy = np.rint(pts[:, 1] / grid.pixel + half).astype(np.int64)
        iz = np.rint((pts[:, 2] - z0) / dz).astype(np.int64)
        ok = (ix >= 0) & (ix < grid.matrix) & (iy >= 0) & (iy < grid.matrix)
        ok &= (iz >= 0) & (iz < shape[0])
        mark[iz[ok], iy[ok], ix[ok]] = 1.0
        return mark

    # one volume at a time, the elementwise steps by slabs: the same numbers, less memory
    vessel = np.zeros(shape, np.float32)
    slice_mm = abs(dz)
    for radius, chunk in zip(classes, points, strict=True):
        sigma = (max(0.6, 0.6 * radius / slice_mm), max(0.6, 0.6 * radius / grid.pixel))
        blurred = ndimage.gaussian_filter(rasterize(chunk), (sigma[0], sigma[1], sigma[1]))
        peak = min(1.0, 2.5 * radius / grid.pixel)
        scale = peak * np.sqrt(2.0 * np.pi) * sigma[1]
        for k in range(0, shape[0], SLAB):
            part = slice(k, k + SLAB)
            np.maximum(vessel[part], np.clip(blurred[part] * scale, 0.0, 1.0), out=vessel[part])
        del blurred
    air = ndimage.gaussian_filter(rasterize(air_points), (0.5, 0.6, 0.6))
    air *= 2.0
    np.clip(air, 0.0, 0.85, out=air)
    return vessel, air


def make_chest(rng: np.random.Generator, body: Body, grid: Grid, vessel_trees: int) -> Chest:
    """Evaluate a noiseless chest on ``grid``: HU, tissue classes and lung coordinates
    (``vessel_trees`` vessel trees per lung)."""
    z = grid.z.astype(np.float32)[:, None, None]
    y = grid.y.astype(np.float32)[None, :, None]
    x = grid.x.astype(np.float32)[None, None, :]
    shape = (grid.z.size, grid.matrix, grid.matrix)
    height = body.lung_height
    t = -z / height  # 0 apex → 1 base
    widen = 0.86 + 0.14 * _smoothstep((t + 0.1) / 0.45)
    a, b = body.half_width * widen, body.half_depth * widen
    yb = np.where(y > 0, y / 0.93, y)  # flatter back
    r_body = np.sqrt((x / a) ** 2 + (yb / b) ** 2)
    body_mask = r_body <= 1.0
    a_f, b_f = a - body.fat, b - body.fat
    in_fat = np.sqrt((x / a_f) ** 2 + (yb / b_f) ** 2) > 1.0
    a_c, b_c = a_f - body.muscle, b_f - body.muscle * 1.6
    r_cav = np.sqrt((x / a_c) ** 2 + (yb / b_c) ** 2)
    cavity = r_cav <= 1.0

    hu = np.full(shape, HU_AIR, np.float32)
    tissue = np.zeros(shape, np.uint8)
    hu[np.broadcast_to(body_mask, shape)] = HU_MUSCLE
    tissue[np.broadcast_to(body_mask, shape)] = SOFT
    fat = np.broadcast_to(body_mask & in_fat, shape)
    hu[fat] = HU_FAT
    tissue[fat] = FAT
    del r_body, in_fat, fat

    # ribs: oblique bands just outside the cavity
    band = (r_cav > 1.0) & (r_cav < 1.0 + 9.0 / a_c)
    phase = (z + 0.18 * y) / 24.0 + body.rib_phase
    ribs = band & ((phase - np.floor(phase)) < 0.38) & (t < 1.15) & (t > -0.05)
    ribs = np.broadcast_to(ribs & body_mask, shape)
    hu[ribs] = HU_RIB
    tissue[ribs] = BONE
    del band, ribs, r_cav

    # spine: vertebral body, canal, posterior elements
    cy_spine = b_c * 0.93
    r_v = np.sqrt(x**2 + (y - cy_spine) ** 2)
    disc = ((z / 28.0) - np.floor(z / 28.0)) < 0.2
    vert = np.broadcast_to(r_v < 17.0, shape)
    cortex = np.broadcast_to((r_v >= 14.0) & (r_v < 17.0), shape)
    near_spine = r_v < 21.0
    del r_v
    r_canal = np.sqrt(x**2 + (y - cy_spine - 26.0) ** 2)
    post = np.broadcast_to((r_canal < 15.0) & (r_canal >= 8.0), shape)
    canal = np.broadcast_to(r_canal < 8.0, shape)
    del r_canal
    bone = (vert & ~np.broadcast_to(disc, shape)) | post
    hu[vert] = HU_MARROW
    hu[cortex | post] = HU_CORTEX
    hu[vert & np.broadcast_to(disc, shape)] = 80.0
    tissue[vert | post] = SOFT
    tissue[bone] = BONE
    hu[canal] = 20.0
    tissue[canal] = SOFT

    # mediastinum default inside the cavity; anterior fat; heart; aorta
    inner = np.broadcast_to(cavity, shape) & ~(vert | post | canal)
    hu[inner] = HU_SOFT
    tissue[inner] = SOFT
    heart_c = (18.0, -0.28 * b_c, -0.74 * height)
    r_heart = np.sqrt(
        ((x - heart_c[0]) / (58.0 * body.heart)) ** 2
        + ((y - heart_c[1]) / (46.0 * body.heart)) ** 2
        + ((z - heart_c[2]) / (52.0 * body.heart)) ** 2
    )
    peri = inner & (r_heart > 1.0) & (r_heart < 1.12)
    near_heart = r_heart < 1.15
    del r_heart
    hu[peri] = -90.0
    tissue[peri] = FAT
    r_ao = np.sqrt((x - 22.0) ** 2 + (y - (cy_spine - 30.0)) ** 2)
    aorta = inner & np.broadcast_to((r_ao < 12.0) & (t > 0.18), shape)
    near_aorta = r_ao < 15.0
    del r_ao
    hu[aorta] = HU_BLOOD

    # lungs
    side = np.where(x < 0, -1, 1).astype(np.int8)  # -1 patient right, +1 patient left
    grow = _smoothstep(t / 0.32) ** 0.7
    cx = side * a_c * 0.5
    cy = 0.04 * b_c
    ax = a_c * 0.47 * np.maximum(grow, 1e-3)
    ay = b_c * 0.9 * np.maximum(grow, 1e-3)
    rho = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    base = np.where(side < 0, height - 14.0, height)
    # above the diaphragm (a float64 surface: computed by slabs, kept as a mask)
    above_dia = np.empty(shape, dtype=bool)
    for k in range(0, shape[0], SLAB):
        part = slice(k, k + SLAB)
        z_dia = (
            -base
            + body.dome * (1.0 - np.clip(rho[part], 0, 1) ** 2)
            - 18.0 * np.clip(y / b_c[part], -1, 1)
        )
        above_dia[part] = z[part] > z_dia
    del z_dia
    mediastinum = (np.abs(x - 6.0) < 14.0 + 26.0 * _smoothstep((t - 0.25) / 0.3)) & (y < cy_spine)
    lung = (
        (rho < 1.0)
        & (t >= 0.0)
        & above_dia
        & np.broadcast_to(cavity, shape)
        & ~near_heart
        & ~mediastinum
        & ~np.broadcast_to(near_spine, shape)
        & ~np.broadcast_to(near_aorta, shape)
    )
    liver = inner & ~above_dia & (x < 20.0) & ~lung
    hu[liver] = HU_LIVER
    del liver, above_dia, near_heart, peri, aorta, mediastinum, near_spine, near_aorta
    del vert, cortex, post, canal, bone, inner, cavity, body_mask

    texture = smooth_noise(rng, shape, (1.0, 1.2, 1.2))
    posterior = np.clip((y - cy) / np.maximum(ay, 1e-3), -1.0, 1.0)
    lung_hu = HU_LUNG + 22.0 * texture + 35.0 * posterior
    del texture
    hu = np.where(lung, lung_hu, hu)
    del lung_hu
    tissue[lung] = LUNG

    # trachea and vessel / airway trees from the hila
    r_tr = np.sqrt(x**2 + (y + 0.12 * b_c) ** 2)
    trachea = np.broadcast_to((r_tr < 8.0) & (z > -0.38 * height) & (z < 40.0), shape)
    wall = np.broadcast_to((r_tr >= 8.0) & (r_tr < 10.5) & (z > -0.38 * height), shape)
    hu[wall & ~lung] = HU_SOFT
    hu[trachea] = -990.0
    tissue[trachea] = AIR
    a_hilum = body.half_width - body.fat - body.muscle
    hila = [
        np.array([s * a_hilum * 0.3, 0.0, -0.42 * height], dtype=np.float64) for s in (-1.0, 1.0)
    ]
    del r_tr, trachea, wall
    vessel, airway = _tree_fields(rng, body, grid, hila, vessel_trees)
    vessel = np.where(lung, vessel, 0.0)
    airway = np.where(lung, airway, 0.0).astype(np.float32, copy=False)
    for k in range(0, shape[0], SLAB):
        part = slice(k, k + SLAB)
        hu[part] = hu[part] + vessel[part] * (HU_BLOOD - hu[part])
        hu[part] = hu[part] + airway[part] * (-990.0 - hu[part])
    del vessel
    return Chest(
        hu=hu.astype(np.float32, copy=False),
        tissue=tissue,
        lung_side=np.where(lung, side, 0).astype(np.int8),
        rho=np.where(lung, rho, 2.0).astype(np.float32, copy=False),
        # functions of (z) and (z, y): read-only broadcast views, not whole volumes
        depth=np.broadcast_to(t.astype(np.float32, copy=False), shape),
        posterior=np.broadcast_to(posterior.astype(np.float32, copy=False), shape),
        airway=airway > 0.3,
        grid=grid,
        body=body,
    )


def reconstruct(
    rng: np.random.Generator, hu: np.ndarray, sharpness: float, noise_hu: float
) -> np.ndarray:
    """Simulate a reconstruction kernel: in-plane blur plus correlated quantum noise."""
    blur = max(0.2, 1.0 - sharpness)
    image = ndimage.gaussian_filter(hu, (0.0, blur, blur))
    noise = ndimage.gaussian_filter(
        standard_normal_f32(rng, hu.shape), (0.0, 0.5 * blur, 0.5 * blur)
    )
    std = float(noise.std()) or 1.0
    noise *= noise_hu / std
    image += noise
    return np.asarray(image, dtype=np.float32)


def thick_average(
    volume: np.ndarray, z: np.ndarray, z_thick: np.ndarray, width: float
) -> np.ndarray:
    """Average thin slices (centres ``z``) within ±width/2 of each thick centre."""
    out = np.empty((z_thick.size, *volume.shape[1:]), np.float32)
    for k, zc in enumerate(z_thick):
        sel = np.abs(z - zc) <= width / 2.0
        if not sel.any():
            sel = np.abs(z - zc) == np.abs(z - zc).min()
        out[k] = volume[sel].mean(axis=0)
    return out
