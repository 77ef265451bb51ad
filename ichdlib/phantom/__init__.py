"""The synthetic head-CT phantom in the exact RSNA/Kaggle layout (demo and tests)."""
