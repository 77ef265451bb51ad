"""Whole-study prediction of the 3D CNN: one forward pass per study, any number of slices, per-slice
probabilities in the study's z order. Shared by validation, test prediction, notebook 06 and ``ichd predict``
(no training code here)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ichdlib.cnn import distributed as D
from ichdlib.cnn3d.data import Studies, VolumeAugment, read_volume
from ichdlib.labels import LABELS
from ichdlib.progress import track
from ichdlib.runtime import autocast


@torch.no_grad()
def predict_volume(model: torch.nn.Module, aug: VolumeAugment, hu: np.ndarray | torch.Tensor, device: str,
                   amp: bool | torch.dtype = False) -> np.ndarray:
    """``(n, 6)`` probabilities of one study's ``(n, H, W)`` HU slices (z order; the evaluation view)."""
    aug.eval()
    model.eval()
    x = torch.as_tensor(np.asarray(hu))[None].to(device)
    with autocast(device, amp):
        logits = model(aug(x))
    return torch.sigmoid(logits.float())[0].cpu().numpy()


def predict_studies(model: torch.nn.Module, aug: VolumeAugment, cache: Any, studies: Studies, device: str,
                    amp: bool | torch.dtype = False, desc: str | None = None) -> np.ndarray:
    """Probabilities ``(sum of lengths, 6)`` of every study, studies in order, slices in z order; one study's
    volume in memory at a time."""
    out = np.zeros((studies.n_slices(), len(LABELS)), dtype=np.float32)
    at = 0
    for rows in track(studies.rows, desc, total=len(studies), mininterval=2):
        out[at:at + len(rows)] = predict_volume(model, aug, read_volume(cache, rows), device, amp)
        at += len(rows)
    return out


def predict_studies_sharded(model: torch.nn.Module, aug: VolumeAugment, cache: Any, studies: Studies, device: str,
                            amp: bool | torch.dtype = False, desc: str | None = None) -> np.ndarray:
    """:func:`predict_studies` with the studies split into one contiguous block per rank and the slice rows
    gathered back in order on every rank (one process: the plain call). ``model`` is not the DDP wrapper."""
    if not D.is_dist():
        return predict_studies(model, aug, cache, studies, device, amp, desc)
    mine = studies.subset(D.shard_slice(len(studies)))
    p = predict_studies(model, aug, cache, mine, device, amp, desc if D.is_main() else None)
    return D.gather_rows(p, studies.n_slices())
