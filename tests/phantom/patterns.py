"""Pneumonia patterns painted into a :class:`~phantom.chest.Chest`, with their truth labels.

Lesions are thresholded smooth noise fields: a Gaussian-filtered random field plus a log
weight that says where the pattern prefers to be (a peripheral shell, the lower zones, the
hilum, one lobe); the threshold is chosen per lung so the lesion takes a drawn share of it.
The HU blend follows the field through a soft ramp, so edges are textured, not hard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from phantom.chest import BOOL, F32, Chest, Grid

PATTERNS = ("typical", "indeterminate", "atypical", "negative")
#: GGO and consolidation target HU ranges (the value a lesion core blends toward).
GGO_HU = (-700.0, -450.0)
CONSOLIDATION_HU = (-60.0, 40.0)
#: Label values of the truth volume.
BACKGROUND, LUNG, GGO, CONSOLIDATION = 0, 1, 2, 3


@dataclass(frozen=True)
class Lesions:
    """The chest's HU with lesions and the truth label volume (uint8, 0..3)."""

    hu: F32
    labels: npt.NDArray[np.uint8]
    variant: str  # e.g. "peripheral", "lobar", "nodules", "diffuse", "central", "none"
    atelectasis: bool  # a dependent dense band (not pneumonia, labelled normal lung)


def _field(grid: Grid, sigma_mm: float, rng: np.random.Generator) -> F32:
    dz, dy, dx = grid.spacing
    white = rng.standard_normal(grid.shape, dtype=np.float32)
    f = ndimage.gaussian_filter(white, (sigma_mm / dz, sigma_mm / dy, sigma_mm / dx))
    std = float(f.std())
    return ((f - f.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def _ramp(value: F32, threshold: float, width: float) -> F32:
    """0 well below ``threshold``, 0.5 at it, 1 well above (smoothstep over ±``width``)."""
    s = np.clip((value - threshold) / (2 * width) + 0.5, 0.0, 1.0)
    return (s * s * (3 - 2 * s)).astype(np.float32)


def _blend(hu: F32, alpha: F32, target: F32 | float, where: BOOL) -> None:
    a = np.where(where, alpha, 0.0).astype(np.float32)
    hu += a * (target - hu)


def _per_lung_threshold(score: F32, region: BOOL, share: float) -> float | None:
    vals = score[region]
    if vals.size == 0 or share <= 0:
        return None
    return float(np.quantile(vals, 1.0 - min(share, 0.98)))


def _coords(grid: Grid) -> tuple[F32, F32]:
    """z and y of every voxel (read-only broadcast views, no copies)."""
    z = np.broadcast_to(grid.z[:, None, None], grid.shape)
    y = np.broadcast_to(grid.y[None, :, None], grid.shape)
    return z, y


def _thresholded(
    chest: Grid,
    lung_side: npt.NDArray[np.int8],
    score: F32,
    sides: tuple[int, ...],
    shares: dict[int, float],
) -> tuple[BOOL, F32]:
    """Mask where ``score`` exceeds each side's threshold; the soft alpha around it."""
    mask = np.zeros(chest.shape, dtype=bool)
    alpha = np.zeros(chest.shape, dtype=np.float32)
    for side in sides:
        region = lung_side == side
        thr = _per_lung_threshold(score, region, shares[side])
        if thr is None:
            continue
        mask |= region & (score > thr)
        alpha = np.where(region, _ramp(score, thr, 0.25), alpha)
    return mask, alpha


def paint(
    chest: Chest, grid: Grid, pattern: str, severity: float, rng: np.random.Generator
) -> Lesions:
    """Paint ``pattern`` of ``severity`` (0..1) into a copy of ``chest``."""
    if pattern not in PATTERNS:
        msg = f"unknown pattern {pattern!r}"
        raise ValueError(msg)
    hu = chest.hu.copy()
    labels = np.where(chest.lung, LUNG, BACKGROUND).astype(np.uint8)
    dz, dy, dx = grid.spacing
    depth = ndimage.distance_transform_edt(chest.lung, sampling=(dz, dy, dx)).astype(np.float32)
    z, y = _coords(grid)
    span = max(chest.lung_top_mm - chest.lung_bottom_mm, 1.0)
    height = np.clip((z - chest.lung_bottom_mm) / span, 0.0, 1.0)  # 0 base .. 1 apex
    texture = _field(grid, 1.2, rng)

    # dependent atelectasis (any pattern, not pneumonia): a thin dense band at the back
    atelectasis = bool(rng.random() < 0.35 and chest.lung.any())
    if atelectasis:
        y_back = float(y[chest.lung].max())
        band = chest.lung & (depth < rng.uniform(3.0, 7.0)) & (y > y_back - rng.uniform(30, 60))
        band &= height < 0.6
        _blend(hu, np.full(hu.shape, 0.8, np.float32), rng.uniform(-450.0, -200.0), band)

    variant = "none"
    if pattern == "typical":
        variant = "peripheral"
        field = _field(grid, rng.uniform(5.0, 9.0), rng)
        shell = np.exp(-depth / rng.uniform(9.0, 16.0))
        lower = np.exp(-height / rng.uniform(0.3, 0.5))
        score = field + 1.2 * np.log(shell * lower + 1e-6)
        total = 0.03 + 0.32 * severity
        tilt = rng.uniform(0.35, 0.65)
        shares = {1: 2 * total * tilt, 2: 2 * total * (1 - tilt)}
        ggo, alpha = _thresholded(grid, chest.side, score, (1, 2), shares)
        target = rng.uniform(*GGO_HU) + 60.0 * texture
        _blend(hu, alpha, target, chest.lung)
        cons_share = rng.uniform(0.05, 0.15) + 0.3 * severity
        cons, alpha_c = _thresholded(
            grid,
            np.where(ggo, chest.side, 0).astype(np.int8),
            score,
            (1, 2),
            {1: cons_share, 2: cons_share},
        )
        _blend(hu, alpha_c, rng.uniform(*CONSOLIDATION_HU) + 15.0 * texture, ggo)
        labels[ggo] = GGO
        labels[cons] = CONSOLIDATION
    elif pattern == "indeterminate":
        variant = "diffuse" if rng.random() < 0.5 else "central"
        field = _field(grid, rng.uniform(4.0, 8.0), rng)
        if variant == "diffuse":
            score = field
            total = 0.15 + 0.4 * severity
            level = rng.uniform(-720.0, -600.0)
        else:
            core = 1.0 - np.exp(-depth / rng.uniform(8.0, 14.0))
            mid_band = np.exp(-(((height - 0.5) / 0.3) ** 2))
            score = field + 1.2 * np.log(core * mid_band + 1e-6)
            total = 0.05 + 0.25 * severity
            level = rng.uniform(-680.0, -500.0)
        ggo, alpha = _thresholded(grid, chest.side, score, (1, 2), {1: total, 2: total})
        _blend(hu, alpha, level + 40.0 * texture, chest.lung)
        labels[ggo] = GGO
    elif pattern == "atypical":
        variant = "lobar" if rng.random() < 0.5 else "nodules"
        side = int(rng.integers(1, 3))
        if variant == "lobar":
            region = chest.side == side
            ys = y[region]
            y_mid = float(np.median(ys)) if ys.size else 0.0
            z_fiss = chest.lung_bottom_mm + rng.uniform(0.35, 0.6) * span
            slope = rng.uniform(0.6, 1.2)  # the fissure rises toward the back
            plane = z - (z_fiss + slope * (y - y_mid))
            lobe = region & ((plane < 0) if rng.random() < 0.6 else (plane > 0))
            field = _field(grid, rng.uniform(8.0, 14.0), rng)
            fill = 0.35 + 0.6 * severity
            thr = _per_lung_threshold(field, lobe, fill)
            if thr is not None:
                cons = lobe & (field > thr)
                alpha = np.where(lobe, _ramp(field, thr, 0.15), 0.0).astype(np.float32)
                _blend(hu, alpha, rng.uniform(*CONSOLIDATION_HU) + 15.0 * texture, lobe)
                labels[cons] = CONSOLIDATION
        else:
            _nodules(hu, labels, chest, grid, depth, height, side, severity, rng)
    return Lesions(hu=hu, labels=labels, variant=variant, atelectasis=atelectasis)


def _nodules(
    hu: F32,
    labels: npt.NDArray[np.uint8],
    chest: Chest,
    grid: Grid,
    depth: F32,
    height: F32,
    side: int,
    severity: float,
    rng: np.random.Generator,
) -> None:
    """Centrilobular nodules in clusters, sparing the pleura (depth > 4 mm)."""
    dz, dy, dx = grid.spacing
    sides = (side,) if rng.random() < 0.6 else (1, 2)
    allowed = chest.lung & (depth > 4.0) & (height > 0.2)
    n_total = int(15 + 60 * severity)
    for s in sides:
        cand = np.argwhere(allowed & (chest.side == s))
        if len(cand) == 0:
            continue
        centres = cand[rng.integers(0, len(cand), size=int(rng.integers(1, 4)))]
        for _ in range(n_total // len(sides)):
            c = centres[int(rng.integers(0, len(centres)))]
            offset_mm = rng.normal(0.0, 18.0, size=3)
            p = c + np.round(offset_mm / np.asarray([dz, dy, dx])).astype(int)
            if np.any(p < 0) or np.any(p >= np.asarray(grid.shape)) or not allowed[tuple(p)]:
                continue
            r = rng.uniform(2.5, 5.0)
            solid = rng.random() < 0.3
            level = rng.uniform(-40.0, 40.0) if solid else rng.uniform(-500.0, -300.0)
            lo = np.maximum(p - np.ceil(r / np.asarray([dz, dy, dx])).astype(int) - 1, 0)
            hi = np.minimum(p + np.ceil(r / np.asarray([dz, dy, dx])).astype(int) + 2, grid.shape)
            zz, yy, xx = np.meshgrid(
                (np.arange(lo[0], hi[0]) - p[0]) * dz,
                (np.arange(lo[1], hi[1]) - p[1]) * dy,
                (np.arange(lo[2], hi[2]) - p[2]) * dx,
                indexing="ij",
            )
            d = np.sqrt(zz**2 + yy**2 + xx**2)
            box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
            inside = chest.lung[box]
            alpha = np.clip((r - d) / max(dy, 0.5) + 0.5, 0.0, 1.0).astype(np.float32)
            sub = hu[box]
            sub += np.where(inside, alpha, 0.0) * (level - sub)
            core = inside & (alpha >= 0.5)
            lab = labels[box]
            lab[core & (lab < (CONSOLIDATION if solid else GGO))] = CONSOLIDATION if solid else GGO
