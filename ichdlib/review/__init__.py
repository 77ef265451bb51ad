"""Review: Grad-CAM, the slice viewer, exploration plots and run comparison."""
