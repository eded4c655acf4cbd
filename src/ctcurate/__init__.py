"""ctcurate: curated, versioned AI datasets from a multi-hospital archive of CT DICOM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctcurate")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
