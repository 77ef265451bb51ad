"""The blend of stages, the Kaggle submission and metrics.json."""
