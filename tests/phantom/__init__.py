"""A second synthetic chest CT generator, independent of ``ctcurate.pipeline.synth``: held-out data
for the selector and the lung masks (never used to choose a ctcurate constant).

    from phantom import PhantomParams, build_archive
    truth = build_archive(tmp_path, PhantomParams(seed=1, patients=4))

Geometric chest (superellipse body, superquadric lungs, branching vessels, ribs, spine,
table), pneumonia patterns as thresholded smooth noise fields with truth labels
(0 background, 1 lung, 2 GGO, 3 consolidation), DICOM archive + ``truth.parquet``.
"""

from phantom.archive import (
    PhantomParams,
    Series,
    build_archive,
    make_series,
    write_annotations,
    write_series,
)
from phantom.chest import Chest, Grid, build_chest
from phantom.patterns import CONSOLIDATION, GGO, LUNG, PATTERNS, Lesions, paint

__all__ = [
    "CONSOLIDATION",
    "GGO",
    "LUNG",
    "PATTERNS",
    "Chest",
    "Grid",
    "Lesions",
    "PhantomParams",
    "Series",
    "build_archive",
    "build_chest",
    "make_series",
    "paint",
    "write_annotations",
    "write_series",
]
