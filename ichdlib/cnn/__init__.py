"""The 2D CNN stage: datasets and device-side augmentation, timm models, the training loop, features."""
