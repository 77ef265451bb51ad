"""Inference with trained 2D fold models: the evaluation and TTA views, batched prediction of probabilities
and pooled features (sharded over torchrun ranks where there are several), in catalog order.

Notebooks 02 (validation, OOF and test), 03 (features with TTA) and ``ichd predict`` all run their 2D models
through :func:`predict`, so a slice gets the same numbers wherever it is scored.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch

from ichdlib.cnn import distributed as D
from ichdlib.cnn.data import (
    DeviceAugment,
    SliceBatchSampler,
    SliceDataset,
    TtaView,
    make_loader,
    to_device,
    tta_views,
)
from ichdlib.config import AugmentCfg, Params
from ichdlib.labels import LABELS
from ichdlib.progress import track
from ichdlib.runtime import autocast, derive_seed
from ichdlib.spec import CnnSpec


def probs_frame(sop_uid: Iterable[str], probs: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(LABELS))
    df.insert(0, "sop_uid", np.asarray(list(sop_uid), dtype=object))
    return df


def subset(dataset: SliceDataset, sel: slice | np.ndarray) -> SliceDataset:
    """The items ``sel`` of ``dataset`` (same cache)."""
    return SliceDataset(dataset.cache, dataset.rows[sel], None if dataset.labels is None else dataset.labels[sel])


def eval_loader(dataset: SliceDataset, batch: int, num_workers: int = 0, cuda: bool = False,
                persistent: bool = False, prefetch: int = 4) -> torch.utils.data.DataLoader:
    """A loader over ``dataset`` in order (``persistent`` keeps its workers for the next pass; ``prefetch``
    batches ready per worker)."""
    return make_loader(dataset, SliceBatchSampler(len(dataset), batch, shuffle=False), num_workers, cuda,
                       persistent=persistent, prefetch=prefetch)


@torch.no_grad()
def predict(runner: torch.nn.Module, aug: DeviceAugment, dataset: SliceDataset, batch: int, device: str,
            amp: bool | torch.dtype = False, num_workers: int = 0, pooled: bool = False,
            desc: str | None = None, views: list | None = None, channels_last: bool = False,
            loader: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (and pooled features if ``pooled``) for every item of ``dataset`` in order.

    Without ``views``: the validation view. With ``views`` (a list of :class:`ichdlib.cnn.data.TtaView`):
    the mean over the views of probabilities and of features. ``channels_last`` as the model was prepared.
    ``amp``: an autocast dtype, or True for bf16. ``loader``: an :func:`eval_loader` over ``dataset`` to
    reuse (persistent workers); else one is made.
    """
    cuda = torch.device(device).type == "cuda"
    aug.eval()
    runner.eval()
    if loader is None:
        loader = eval_loader(dataset, batch, num_workers, cuda)
    probs = np.zeros((len(dataset), len(LABELS)), dtype=np.float32)
    feats: np.ndarray | None = None
    model = getattr(runner, "_orig_mod", runner)
    for x, _, pos in track(loader, desc, mininterval=2):
        x, pos = to_device((x, pos), device)
        p_sum, f_sum = 0.0, 0.0
        for view in views or [None]:
            inp = aug(x) if view is None else aug.tta(x, view)
            if channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                if pooled:
                    f, logits = model.forward_both(inp)
                    f_sum = f_sum + f.float()
                else:
                    logits = runner(inp)
            p_sum = p_sum + torch.sigmoid(logits.float())
        n = len(views or [None])
        idx = pos.cpu().numpy()
        probs[idx] = (p_sum / n).cpu().numpy()
        if pooled:
            fs = (f_sum / n).cpu().numpy()
            if feats is None:
                feats = np.zeros((len(dataset), fs.shape[1]), dtype=np.float32)
            feats[idx] = fs
    return probs, feats


def predict_sharded(runner: torch.nn.Module, aug: DeviceAugment, dataset: SliceDataset, batch: int,
                    device: str, to_all: bool = True, **kw: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """:func:`predict` with the rows split into one contiguous block per rank and gathered back in order
    (on every rank, or on rank 0 only with ``to_all=False``; others then get ``(None, None)``). One process:
    :func:`predict` itself. ``runner`` must not be the DDP wrapper (ranks run different numbers of batches)."""
    if not D.is_dist():
        return predict(runner, aug, dataset, batch, device, **kw)
    if kw.get("desc") and not D.is_main():
        kw["desc"] = None
    p, f = predict(runner, aug, subset(dataset, D.shard_slice(len(dataset))), batch, device, **kw)
    return D.gather_rows(p, len(dataset), to_all), D.gather_rows(f, len(dataset), to_all)


def feature_views(P: Params) -> list[TtaView]:
    """The ``features.tta`` deterministic views every feature extraction (and prediction) uses."""
    return tta_views(P.features.tta, tuple(P.cnn.augment.crop_range), derive_seed(P.seed, 3))


def spec_augment(spec: CnnSpec, augment: AugmentCfg) -> DeviceAugment:
    """The evaluation view (windows + validation centre crop) a model's :class:`CnnSpec` asks for."""
    cfg = augment.model_copy(update={"val_center_crop": spec.val_center_crop})
    return DeviceAugment(spec.size, cfg, spec.recipe, spec.single_window, spec.learnable_window)


def eval_augment(P: Params, meta: dict[str, Any] | CnnSpec) -> DeviceAugment:
    """The evaluation view (windows + validation centre crop) of a fold model, from its spec (``model.spec``)
    or its checkpoint meta."""
    spec = meta if isinstance(meta, CnnSpec) else CnnSpec.from_meta(meta)
    return spec_augment(spec, P.cnn.augment)


def fold_feature_mean(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The test-row features notebook 03 stores and ``ichd predict`` feeds the sequence models: each fold
    model's features as float16, summed in float32 one fold at a time (only one fold's array in memory),
    divided by the number of folds, stored as float16."""
    acc, n = None, 0
    for part in parts:
        f = np.asarray(part).astype(np.float16).astype(np.float32)
        acc = f if acc is None else acc + f
        n += 1
    if acc is None:
        raise ValueError("no fold features to average")
    return (acc / n).astype(np.float16)
