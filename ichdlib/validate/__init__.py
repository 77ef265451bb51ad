"""External validation (``ichd validate``, notebook 07): readers for CQ500, PhysioNet CT-ICH and DICOM + labels,
study-level metrics, the report. Serve level: it may import ``serve/``; nothing in the library imports it."""
