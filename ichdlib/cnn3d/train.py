"""Training the 3D CNN per fold (notebook 02b, ``ichd train --stage cnn3d``): resumable, seeded, DDP-ready.

``train_cnn3d(P)`` trains ``P.cnn3d`` on each fold of the catalog's patient folds and writes
``work/<run>/cnn3d/<key>/`` in the 2D stage's layout (so the blend, bundles and notebook 06 read it the same
way): ``fold<k>_last.pt`` (weights, optimizer, meta after every epoch; a rerun after a kill continues from it
with the same batches), ``fold<k>.pt`` (best epoch by validation weighted log loss; ``meta["spec"]`` is the
typed :class:`ichdlib.spec.VolumeSpec`), ``fold<k>_val.parquet`` / ``fold<k>_test.parquet`` /
``fold<k>_log.csv``, then ``oof.parquet`` (``sop_uid, fold`` + six labels, every training slice once) and
``test.parquet`` (mean over folds). The bookkeeping (fold files, resume checks, provenance, assembly) is the
2D stage's own (:mod:`ichdlib.cnn.train`); the loop differs in its batches (K-slice crops, padded slices
masked out of the loss) and its validation (whole studies, any length).

On CUDA: bf16 (or fp16) autocast like the 2D stage. Under torchrun: DDP, each rank takes its share of every
global batch; validation and test studies are sharded and gathered in catalog order; rank 0 writes.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch

from ichdlib.cnn import distributed as D
from ichdlib.cnn.data import make_loader
from ichdlib.cnn.infer import probs_frame
from ichdlib.cnn.train import (
    _Fold,
    _provenance,
    _val_metrics,
    complete_summary,
    data_digest,
    ddp_wrap,
    finish_fold,
    fold_numbers,
    fold_result,
    fold_split,
    lr_at,
    open_fold,
    optimizer_step,
    restore,
    save_epoch,
    weighted_bce,
)
from ichdlib.cnn3d.data import CropDataset, CropSampler, Studies, VolumeAugment, flip_z
from ichdlib.cnn3d.infer import predict_studies_sharded
from ichdlib.cnn3d.models import Net3d, build_net3d, load_medicalnet
from ichdlib.config import Params
from ichdlib.ingest.native import open_slices
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS
from ichdlib.progress import TrainingProgress
from ichdlib.runtime import amp_mode, derive_seed, torch_threads
from ichdlib.runtime import autocast as _autocast
from ichdlib.spec import VolumeSpec
from ichdlib.stages import StageReport

LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_wll", "val_bce", *[f"auc_{c}" for c in LABELS], "auc_mean",
               "slices_per_s", "seconds", "val_slices", "val_slices_per_s"]


def cnn3d_dir(P: Params) -> Path:
    """``work/<run>/cnn3d/<key>`` (:meth:`ichdlib.layout.RunLayout.cnn3d`)."""
    return P.layout.cnn3d(P.cnn3d.key).path


def run_config3d(P: Params, cache_size: int, train_rows: pd.DataFrame) -> dict[str, Any]:
    """Settings that define a fold's training; a checkpoint made with others is not resumed."""
    c = P.cnn3d
    return {"arch": c.arch, "depth": c.depth, "widen": c.widen, "size": c.size, "slices": c.slices,
            "crops_per_study": c.crops_per_study, "epochs": c.epochs, "batch": c.batch, "lr": c.lr,
            "weight_decay": c.weight_decay, "min_lr_ratio": c.min_lr_ratio, "pretrained": str(c.pretrained),
            "seed": P.seed, "recipe": P.windows.recipe, "single_window": list(P.windows.single_window),
            "class_weights": list(P.cnn.class_weights), "grad_clip": P.cnn.grad_clip, "amp_dtype": P.cnn.amp_dtype,
            "augment": json.dumps(P.cnn.augment.model_dump(mode="json"), sort_keys=True),
            "cache_size": cache_size, "n_train": len(train_rows), "data": data_digest(train_rows)}


def _schedule(P: Params) -> SimpleNamespace:
    """The 2D stage's per-step cosine (:func:`ichdlib.cnn.train.lr_at`) with the 3D floor."""
    return SimpleNamespace(schedule="cosine", min_lr_ratio=P.cnn3d.min_lr_ratio, flat_epochs=0, restart_epochs=1)


def build_for_training(P: Params, spec: VolumeSpec, fresh: bool) -> Net3d:
    """A fold's initial model: seeded random weights, optionally the MedicalNet trunk (fresh folds only)."""
    model = build_net3d(spec)
    if fresh and P.cnn3d.pretrained:
        info = load_medicalnet(model, P.cnn3d.pretrained)
        if D.is_main():
            extra = f" ({', '.join(info['adapted'])} spread over {spec.in_chans} window channels)" if info["adapted"] else ""
            print(f"cnn3d: trunk initialised from {P.cnn3d.pretrained}: {info['loaded']} tensors{extra}", flush=True)
    return model


def train_fold3d(P: Params, fold: int, cat: pd.DataFrame, cache: Any, force: bool = False,
                 origin: str = "train_cnn3d", progress: TrainingProgress | None = None) -> dict[str, Any]:
    """Train (or resume, or skip) one 3D fold; under torchrun every rank calls it and rank 0 writes."""
    c = P.cnn3d
    out = cnn3d_dir(P)
    out.mkdir(parents=True, exist_ok=True)
    files = _Fold(out, fold)
    tr, va, te = fold_split(cat, fold)
    config = run_config3d(P, int(cache.shape[-1]), tr)
    state, skipped = open_fold(files, config, fold, force, stage="02b")
    if skipped:
        return skipped

    device = P.torch_device()
    cuda = torch.device(device).type == "cuda"
    amp = amp_mode(P, device)
    rank, main, world = D.rank(), D.is_main(), D.world_size()
    if cuda:
        torch.backends.cudnn.benchmark = True
    spec = VolumeSpec.from_params(P)
    torch.manual_seed(derive_seed(P.seed, fold, 3 * 10**6))  # same initial weights on every rank
    model = build_for_training(P, spec, fresh=state is None)
    if state is None:
        freq = np.clip(np.nanmean(tr[list(LABELS)].to_numpy(np.float64), axis=0), 1e-4, 1 - 1e-4)
        with torch.no_grad():
            model.head.bias.copy_(torch.from_numpy(np.log(freq / (1 - freq))))
    else:
        model.load_state_dict(state["state_dict"])
    model = model.to(device)
    runner = ddp_wrap(model, P, device) if D.is_dist() else model
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp == torch.float16)
    aug = VolumeAugment.from_params(P)
    weights = torch.tensor(P.cnn.class_weights, dtype=torch.float32, device=device)

    s_tr, s_va = Studies.from_catalog(tr), Studies.from_catalog(va)
    y_va = np.concatenate(s_va.labels)
    sampler: Any = CropSampler(s_tr.lengths, c.slices, c.batch, c.crops_per_study, derive_seed(P.seed, fold))
    if D.is_dist():
        sampler = D.ShardedBatchSampler(sampler)
    loader = make_loader(CropDataset(cache, s_tr, c.slices), sampler, c.num_workers, pin_memory=cuda,
                         seed=derive_seed(P.seed, fold) + rank, persistent=c.num_workers > 0)

    meta: dict[str, Any] = {"spec": spec.to_dict(), "key": c.key, "fold": fold, "epochs": c.epochs, "config": config,
                            "epoch": -1, "best_epoch": -1, "best_wll": None, "metrics": {}, "history": [],
                            "finished": False, "provenance": _provenance(origin, device)}
    status = restore(state, opt, scaler, meta)
    start = int(meta["epoch"]) + 1
    if progress is None:
        progress = TrainingProgress(c.key) if main else TrainingProgress(c.key, live=False, stream=io.StringIO())
    progress.fold(fold, c.epochs, start, best=meta["best_wll"])
    sched = _schedule(P)
    for epoch in range(start, c.epochs):
        model.train()
        aug.train()
        extra = (rank,) if rank else ()
        aug.reseed(derive_seed(P.seed, fold, epoch, 1, *extra))
        zgen = torch.Generator().manual_seed(derive_seed(P.seed, fold, epoch, 4, *extra))
        torch.manual_seed(derive_seed(P.seed, fold, epoch, 2, *extra))
        sampler.set_epoch(epoch)
        steps = len(sampler)
        loss_sum, n_sl, t0 = torch.zeros((), device=device), 0, time.perf_counter()
        lr = c.lr
        for step, (x, y, mask) in enumerate(progress.batches(loader, steps) if main else loader):
            D.fault_point(epoch, step)
            lr = lr_at(sched, c.lr, c.epochs, epoch, step, steps)  # type: ignore[arg-type]
            for group in opt.param_groups:
                group["lr"] = lr
            x, y, mask = flip_z(x, y, mask, torch.rand(len(x), generator=zgen) < P.cnn.augment.slice_swap)
            x, y, mask = (t.to(device, non_blocking=cuda) for t in (x, y, mask))
            with torch.no_grad():
                inp = aug(x)
            with _autocast(device, amp):
                logits = runner(inp)
            loss = weighted_bce(logits[mask], y[mask], weights)
            share = len(x) * world / c.batch if world > 1 else 1.0
            optimizer_step(loss, share, opt, scaler, model, P.cnn.grad_clip)
            loss_sum += loss.detach() * (share / world)
            n_sl += int(mask.sum())
            if step == 0 and not torch.isfinite(loss):
                raise FloatingPointError(f"cnn3d fold {fold} epoch {epoch}: loss is not finite; lower cnn3d.lr")
        totals = D.all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(float(n_sl), device=device)]))
        train_loss = float(totals[0].item()) / max(1, steps)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"cnn3d fold {fold} epoch {epoch}: training loss became {train_loss}; "
                                     f"lower cnn3d.lr ({c.lr})")
        secs = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                               "slices_per_s": round(float(totals[1].item()) / max(secs, 1e-9), 2)}
        t1 = time.perf_counter()
        D.sync_buffers(model)
        p_va = predict_studies_sharded(model, aug, cache, s_va, device, amp)
        vsecs = time.perf_counter() - t1
        row.update({"val_slices": len(y_va), "val_slices_per_s": round(len(y_va) / max(vsecs, 1e-9), 2),
                    **_val_metrics(y_va, p_va)})
        if not np.isfinite(row["val_wll"]):
            raise FloatingPointError(f"cnn3d fold {fold} epoch {epoch}: validation loss is not finite")
        row["seconds"] = round(secs + vsecs, 3)
        meta["history"] = [*meta["history"], row]
        meta["epoch"], meta["metrics"] = epoch, row
        best = meta["best_wll"] is None or row["val_wll"] < meta["best_wll"]
        if best:
            meta["best_epoch"], meta["best_wll"] = epoch, float(row["val_wll"])
        save_epoch(files, model, opt, scaler, meta, best,
                   probs_frame(np.concatenate(s_va.sop), p_va) if best else None, LOG_COLUMNS)
        if main:
            progress.epoch(epoch, train_loss, row["val_wll"], row["slices_per_s"], row["seconds"])

    model.load_state_dict(torch.load(files.best, map_location="cpu", weights_only=True)["state_dict"])
    s_te = Studies.from_catalog(te)
    p_te = predict_studies_sharded(model, aug, cache, s_te, device, amp) if len(te) else \
        np.zeros((0, len(LABELS)), np.float32)
    if len(te):  # catalog order of the test slices (the 2D stage's test.parquet order)
        p_te = pd.DataFrame(p_te, index=np.concatenate(s_te.sop)).loc[te["sop_uid"].to_numpy(str)].to_numpy()
    finish_fold(files, meta, probs_frame(te["sop_uid"], p_te))
    return fold_result(fold, status, meta)


def train_cnn3d(P: Params, folds: Iterable[int] | str | None = None, force: bool = False, *,
                catalog: pd.DataFrame | None = None, cache: Any = None, origin: str = "train_cnn3d") -> dict[str, Any]:
    """Train ``P.cnn3d`` on the given folds (default ``cnn3d.folds``), then assemble OOF/test tables.

    Returns per fold status / best epoch / best weighted log loss / provenance and, once every fold is done,
    ``oof_wll`` beside ``prior_wll`` and per-class AUC. ``catalog``/``cache`` default to the run's catalog and
    its HU cache at ``cnn3d.size`` (memory-mapped: studies are read one crop or one study at a time)."""
    t0 = time.perf_counter()
    cat = catalog if catalog is not None else load_catalog(P.layout.work)
    if cache is None:
        cache = open_slices(P, P.cnn3d.size, cat)
    if cache.shape[-1] != P.cnn3d.size:
        raise ValueError(f"cache images are {cache.shape[-1]} px but cnn3d.size is {P.cnn3d.size}")
    key = P.cnn3d.key
    d = P.layout.cnn3d(key)
    summary: dict[str, Any] = {"key": key, "dir": str(d.path), "folds": {}}
    want = P.cnn3d.folds if folds is None else folds
    with torch_threads(P.cnn3d.cpu_threads, P.torch_device()), TrainingProgress(f"3D {key}") as progress:
        for k in fold_numbers(P, cat, want):
            with D.main_lock(d.fold_lock(k), what=f"train cnn3d {key} fold {k}"):
                summary["folds"][k] = train_fold3d(P, k, cat, cache, force=force, origin=origin, progress=progress)
    return complete_summary(P, cat, d, summary, t0)


def run_stage(P: Params, force: bool = False, *, folds: Iterable[int] | str | None = None,
              origin: str = "train_cnn3d") -> StageReport:
    """Stage 02b (:data:`ichdlib.stages.STAGES`): :func:`train_cnn3d`; the report's ``result`` is its summary
    (nothing to do when ``cnn3d.enabled`` is false: an empty report)."""
    if not P.cnn3d.enabled:
        return StageReport("cnn3d", [], result=None)
    s = train_cnn3d(P, folds=folds, force=force, origin=origin)
    rows = [{"model": s["key"], "folds done": len(s.get("folds_done", s["folds"])), "oof wLL": s.get("oof_wll"),
             "prior wLL": s.get("prior_wll"), "seconds": s["seconds"]}]
    return StageReport("cnn3d", rows, result=s)


def read_logs3d(P: Params) -> pd.DataFrame:
    """Every fold's per-epoch log with a ``fold`` column (empty if none yet)."""
    d = P.layout.cnn3d(P.cnn3d.key)
    frames = [pd.read_csv(d.log(k)).assign(fold=k) for k in range(P.ingest.folds) if d.log(k).is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*LOG_COLUMNS, "fold"])
