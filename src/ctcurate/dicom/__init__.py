"""DICOM reading and writing: headers (lean and pydicom paths), PHI policy, SEG, gzip."""
