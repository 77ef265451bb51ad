"""The one device resolver: which torch device a run uses (no torch import until asked)."""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; asking for ``cuda`` without one is an error."""
    import torch  # noqa: PLC0415  (torch stays out of light modules)

    device = device or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available here (use cpu or auto)")
    return device
