"""The 3D CNN member: a MONAI ResNet over whole studies with per-slice logits (notebook 02b)."""
