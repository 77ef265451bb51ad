"""Sequence-model inference: flip-TTA prediction of whole studies, and loading a fold checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ichdlib.checkpoints import load_checkpoint
from ichdlib.labels import LABELS
from ichdlib.seq.inputs import SeqInputs
from ichdlib.seq.models import model_logits
from ichdlib.spec import SeqSpec


@torch.no_grad()
def predict_studies(models: list[torch.nn.Module], inputs: SeqInputs, studies: np.ndarray | None = None, *,
                    device: str = "cpu", batch: int = 32) -> np.ndarray:
    """Flip-TTA probabilities ``(N, 6)``: the mean over ``models`` and both slice directions of the sigmoid
    of the final head. Rows of studies not in ``studies`` are NaN. The same function serves validation
    (one fold model) and test (every fold model)."""
    if studies is None:
        studies = np.arange(len(inputs.study_rows))
    acc = np.zeros((len(inputs.sop_uid), len(LABELS)), dtype=np.float64)
    seen = np.zeros(len(inputs.sop_uid), dtype=bool)
    for m in models:
        m.eval()
    st = inputs.tensors(device)
    studies = np.asarray(studies, dtype=np.int64)
    for reverse in (False, True):
        for a in range(0, len(studies), batch):
            idx, lens = st.whole(studies[a:a + batch], reverse=reverse)
            b = st.batch(idx, lens)
            for m in models:
                p = torch.sigmoid(model_logits(m, b)[0]).double().cpu().numpy()
                for j, rows in enumerate(b["rows"]):
                    acc[rows] += p[j, : len(rows)]
                    seen[rows] = True
    out = acc / (2 * len(models))
    out[~seen] = np.nan
    return out


def load_seq_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """A trained sequence model from ``fold<k>.pt`` (``weights_only`` load), in eval mode, and its meta; the
    model carries ``.spec`` (:func:`ichdlib.checkpoints.load_checkpoint`)."""
    model = load_checkpoint(path, device)
    if not isinstance(model.spec, SeqSpec):
        raise ValueError(f"{path}: a {model.spec.kind} checkpoint, not a sequence model")
    return model, model.meta
