"""Serving a trained run: model bundles and prediction on new DICOM folders (CSV, JSON, DICOM)."""
