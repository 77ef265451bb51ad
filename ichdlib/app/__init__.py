"""The application layer: commands that compose the stage sub-packages (``ichd train``); it sits above every
stage, so no stage sub-package imports another one above it."""
