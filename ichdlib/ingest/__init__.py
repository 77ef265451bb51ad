"""Ingest: DICOM reading, the slice catalog (z order, folds, quarantine) and the resized HU cache."""
