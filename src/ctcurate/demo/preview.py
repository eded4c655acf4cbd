"""A PNG montage of middle slices with the truth masks overlaid (deterministic bytes)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

MAX_TILES = 16
_COLS = 4


@dataclass(frozen=True)
class Tile:
    """One montage tile: a title, an HU slice and its label slice."""

    title: str
    hu: np.ndarray
    labels: np.ndarray


def render_montage(tiles: list[Tile]) -> bytes:
    """PNG bytes of up to :data:`MAX_TILES` tiles: lung window, GGO yellow, consolidation red."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    tiles = tiles[:MAX_TILES]
    n_rows = max(1, -(-len(tiles) // _COLS))
    fig = Figure(figsize=(3.0 * _COLS, 3.2 * n_rows), dpi=80)
    for i in range(n_rows * _COLS):
        ax = fig.add_subplot(n_rows, _COLS, i + 1)
        ax.set_axis_off()
        if i >= len(tiles):
            continue
        tile = tiles[i]
        ax.imshow(tile.hu, cmap="gray", vmin=-1200, vmax=300, interpolation="nearest")
        overlay = np.zeros((*tile.labels.shape, 4), np.float32)
        overlay[tile.labels == 1] = (0.2, 0.6, 1.0, 0.15)
        overlay[tile.labels == 2] = (1.0, 0.9, 0.0, 0.55)
        overlay[tile.labels == 3] = (1.0, 0.1, 0.1, 0.6)
        ax.imshow(overlay, interpolation="nearest")
        ax.set_title(tile.title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
