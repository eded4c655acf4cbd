"""Overlay images: label volumes over axial CT slices, as deterministic PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ctcurate import labels
from ctcurate.labels import GGO

#: Display window (HU) of the overlay images: a lung window.
OVERLAY_WINDOW = (-1350.0, 150.0)


#: RGBA of normal lung, GGO and consolidation in the overlays.
OVERLAY_COLOURS = labels.OVERLAY_RGBA


def overlay_slice(truth: npt.NDArray[np.uint8]) -> int:
    """The axial slice shown: most reference lesion voxels, else most lung, lowest index."""
    lesion = (truth >= GGO).sum(axis=(1, 2))
    counts = lesion if lesion.any() else (truth > 0).sum(axis=(1, 2))
    return int(np.argmax(counts))


def _rgba(label: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    out = np.zeros((*label.shape, 4), dtype=np.float64)
    for value, colour in OVERLAY_COLOURS.items():
        out[label == value] = colour
    return out


def overlay_panels_png(
    panels: Sequence[tuple[npt.NDArray[Any], npt.NDArray[np.uint8], str]],
    title: str,
    width_in: float = 6.4,
) -> bytes:
    """PNG bytes: labels over axial slices, one panel per (HU slice, label slice, name).

    Deterministic: Agg canvas, fixed size and dpi, no ``Software`` metadata.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(width_in, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    lo, hi = OVERLAY_WINDOW
    for ax, (hu, label, name) in zip(axes, panels, strict=True):
        ax.imshow(hu, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.imshow(_rgba(label), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=lab.overlay_rgba[:3], label=lab.short) for lab in labels.VOCABULARY]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def overlay_png(
    image_hu: npt.NDArray[np.floating[Any]],
    truth: npt.NDArray[np.uint8],
    pred: npt.NDArray[np.uint8],
    title: str,
) -> bytes:
    """PNG bytes: reference and predicted labels over one axial slice, side by side."""
    k = overlay_slice(truth)
    panels = [(image_hu[k], truth[k], "reference"), (image_hu[k], pred[k], "predicted")]
    return overlay_panels_png(panels, f"{title} (slice {k})")
