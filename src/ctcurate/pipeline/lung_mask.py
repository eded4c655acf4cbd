"""``ctcurate lung-mask``: the pneumonia selector's lung mask of one CT series as a DICOM SEG.

The series is read and checked like ``predict`` reads one
(:func:`ctcurate.dicom.series_dir.read_series_dir`,
:func:`ctcurate.imaging.volume.assemble_series`), then
measured the way the selector's scorer
measures it: onto the working grid of ``select.working_spacing_mm``
(:func:`ctcurate.imaging.workgrid.working_volume`), where the consolidation-robust lung mask is
computed (:func:`ctcurate.imaging.lungmask.lung_masks`). The mask is brought back to the series'
own pixel grid by trilinear interpolation of the mask as 0/1, kept where ≥ 0.5
(:meth:`ctcurate.imaging.workgrid.WorkingVolume.mask_onto_source`), and written as a BINARY SEG of
one segment ``lung`` (SNOMED CT 39607008 Lung), each frame referencing its CT instance
(:func:`ctcurate.dicom.seg.write_seg`). Every UID derives from the series UID: reruns give
the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctcurate.dicom.seg import LUNG_SEGMENTS, SegAlgorithm, write_seg
from ctcurate.errors import InputError
from ctcurate.io.outputs import check_output_file, publish_file
from ctcurate.log import get_logger
from ctcurate.params import SelectParams

log = get_logger("lung-mask")

#: The SEG's algorithm identification; ``uid_salt`` keeps its UIDs apart from other SEGs
#: of the same series.
ALGORITHM = SegAlgorithm(
    name="ctcurate robust lung mask",
    version="1",
    family=("123104", "DCM", "Morphological Operations"),
    automatic=True,
    series_description="lung mask (pneumonia selector)",
    uid_salt="lung-mask",
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def lung_labels(
    datasets: Sequence[Any], working_spacing_mm: float
) -> tuple[npt.NDArray[np.uint8], float]:
    """Per-instance lung labels (n_instances, rows, columns; 1 lung) and the lung volume
    (mL, on the series' own grid) of an assembled series' instances.

    Drops the instances' pixel data (the working grid reads each once).

    Raises
    ------
    ValueError
        When the instances do not make a working volume (the caller checked them first).
    """
    from ctcurate.imaging.lungmask import lung_masks
    from ctcurate.imaging.workgrid import working_volume

    volume = working_volume(iter(datasets), working_spacing_mm)
    _, robust = lung_masks(volume.hu, volume.spacing_mm)
    source = volume.mask_onto_source(robust)
    slot = {uid: k for k, uid in enumerate(volume.source_uids)}
    labels = np.stack([source[slot[str(ds.get("SOPInstanceUID", ""))]] for ds in datasets])
    voxel_ml = float(np.prod(volume.source_spacing_mm)) / 1000.0
    return labels.astype(np.uint8), float(np.count_nonzero(source)) * voxel_ml


def run(series: Path, out: Path, params: SelectParams) -> float:
    """Write the lung mask SEG of the series folder ``series`` to the file ``out``.

    Returns the lung volume in mL.

    Raises
    ------
    InputError
        When the folder is not one readable DICOM series, the series cannot be assembled
        (naming the reason), or no lung is found in it.
    """
    from ctcurate.dicom.seg import SegWriteError
    from ctcurate.dicom.series_dir import read_series_dir
    from ctcurate.imaging.volume import PIXEL_ERRORS, ExcludedSeries, assemble_series

    series, out = Path(series), Path(out)
    check_output_file(out, [series])
    start = time.monotonic()
    datasets = read_series_dir(series)
    try:
        # the checks of pack and predict; of the stack only the distinct positions are kept
        kept = list(assemble_series(datasets).kept)
        labels, volume_ml = lung_labels(datasets, params.working_spacing_mm)
    except ExcludedSeries as exc:
        msg = f"{series}: cannot assemble the series: {exc.reason} ({_one_line(exc.detail)})"
        raise InputError(msg) from exc
    except PIXEL_ERRORS as exc:
        msg = f"{series}: cannot assemble the series: pixel_data ({type(exc).__name__})"
        raise InputError(msg) from exc
    if not labels.any():
        msg = f"{series}: no lung found in the series; no mask written"
        raise InputError(msg)
    # the SEG derives from the instances at distinct positions (a duplicate slice is
    # represented by its twin), as predict's SEG does
    source, frames = [datasets[i] for i in kept], labels[kept]
    with publish_file(out, inputs=[series]) as tmp:
        try:
            write_seg(tmp, source, frames, algorithm=ALGORITHM, segments=LUNG_SEGMENTS)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            why = type(exc).__name__
            msg = f"{series}: the SEG could not be derived from the instances ({why})"
            raise SegWriteError(msg) from exc
    log.info(
        "lung-mask: 1 series of %d instances, lung %.1f mL on %d slices, %.1f s",
        len(datasets),
        volume_ml,
        int(labels.any(axis=(1, 2)).sum()),
        time.monotonic() - start,
    )
    return volume_ml
