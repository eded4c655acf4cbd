"""File formats: the only code that knows DICOM, HDF5, Parquet and JSON layouts."""
