"""One series folder read as DICOM datasets, for the single-series tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctcurate.dicom.checks import DICOMDIR_SOP_CLASS, sop_class
from ctcurate.errors import InputError

#: Files of a series folder that are not instances.
IGNORED_NAMES = frozenset({"DICOMDIR", "THUMBS.DB", "DESKTOP.INI"})


#: What reading an instance file may raise besides InvalidDicomError.
READ_ERRORS = (OSError, EOFError, ValueError, TypeError, AttributeError)


def read_series_dir(folder: Path) -> list[Any]:
    """The instances of one series folder (sorted file names; hidden files and media storage
    directories skipped: a DICOMDIR, or Philips' DIRFILE in every series folder of an export,
    told by its SOP class whatever its name).

    Raises
    ------
    InputError
        When the folder is missing or empty, a file is not readable DICOM, or the folder
        holds more than one series.
    """
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        msg = f"{folder}: not a folder"
        raise InputError(msg)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.upper() not in IGNORED_NAMES
    )
    if not files:
        msg = f"{folder}: holds no files"
        raise InputError(msg)
    datasets = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, *READ_ERRORS) as exc:
            msg = f"{path}: not a readable DICOM file ({type(exc).__name__})"
            raise InputError(msg) from exc
        if sop_class(ds) != DICOMDIR_SOP_CLASS:
            datasets.append(ds)
    if not datasets:
        msg = f"{folder}: holds no DICOM instances (only media storage directories)"
        raise InputError(msg)
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        msg = f"{folder}: holds {len(series)} series; give the folder of one series"
        raise InputError(msg)
    return datasets
