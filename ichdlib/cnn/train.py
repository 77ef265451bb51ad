"""Training the 2D CNN per fold (notebook 02): resumable, seeded, scored with the competition metric.

``train_cnn(P, backbone_cfg)`` trains one backbone on each fold of the catalog's patient folds and writes
``work/<run>/cnn/<key>/``:

- ``fold<k>_last.pt``: weights, optimizer state and meta after every epoch (atomic); a rerun after an
  interruption continues from it with the same batches and augmentations, so it ends where an
  uninterrupted run ends. A finished fold is skipped unless ``force``.
- ``fold<k>.pt``: the epoch with the lowest weighted log loss on the fold's validation slices
  (``{"state_dict", "meta"}``, loadable with ``torch.load(weights_only=True)``, see
  :func:`ichdlib.cnn.models.load_cnn`); ``fold<k>_val.parquet`` its validation probabilities and
  ``fold<k>_test.parquet`` its test probabilities.
- ``fold<k>_log.csv``: per epoch the learning rate, train loss, validation weighted log loss, BCE and
  per-class AUC, images/s and seconds.
- ``oof.parquet`` (every training slice once, from its fold's best model) and ``test.parquet`` (mean over
  folds), once all folds are done.

Same code on CPU and GPU; on CUDA with bf16 (or fp16 + GradScaler) autocast, channels_last and optionally
``torch.compile``. Under ``torchrun`` (see :mod:`ichdlib.cnn.distributed` and ``docs/distributed.md``) the loop
runs DistributedDataParallel: every rank takes its share of each global batch, validation and test
prediction are sharded and gathered in catalog order, and rank 0 writes the files. Each fold is written
under a lock (``fold<k>.lock``), so independent fold jobs can share one work folder; ``cnn.fold_jobs`` runs
the folds side by side in worker processes of one run (:mod:`ichdlib.foldjobs`, :func:`fold_job`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.ticker import MaxNLocator
from torch.nn.parallel import DistributedDataParallel as DDP

from ichdlib.cnn import distributed as D
from ichdlib.cnn.data import (
    DeviceAugment,
    SliceBatchSampler,
    SliceDataset,
    StudyBatchSampler,
    make_loader,
    mapped_ref,
    reopen_mapped,
    to_device,
)
from ichdlib.cnn.infer import eval_loader, predict, predict_sharded, probs_frame, subset
from ichdlib.cnn.models import CnnNet, build_cnn
from ichdlib.config import BackboneCfg, CnnCfg, Params
from ichdlib.files import atomic_write, save_parquet
from ichdlib.foldjobs import QueueProgress, run_fold_jobs
from ichdlib.ingest.native import open_slices
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS
from ichdlib.layout import ModelDir
from ichdlib.locks import output_lock
from ichdlib.metrics import per_class_auc, prior_baseline, weighted_log_loss
from ichdlib.progress import TrainingProgress
from ichdlib.resources import check_training_memory
from ichdlib.runtime import (
    amp_mode,
    cpu_threads,
    derive_seed,
    prepare_model,
    resolve_workers,
    save_torch,
    torch_threads,
)
from ichdlib.runtime import autocast as _autocast
from ichdlib.spec import ModelSpec
from ichdlib.stages import StageReport

LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_wll", "val_bce", *[f"auc_{c}" for c in LABELS], "auc_mean",
               "images_per_s", "seconds", "val_kind", "val_images", "val_images_per_s"]


# --------------------------------------------------------------------------------------------------
# Small shared pieces
# --------------------------------------------------------------------------------------------------
def cnn_dir(P: Params, cfg: BackboneCfg) -> Path:
    """``work/<run>/cnn/<key>`` (:meth:`ichdlib.layout.RunLayout.cnn`)."""
    return P.layout.cnn(cfg.key).path


def lr_at(cnn: CnnCfg, base_lr: float, epochs: int, epoch: int, step: int = 0, steps: int = 1) -> float:
    """Learning rate at ``step`` of ``epoch`` (0-based).

    ``seed_restarts`` (the original, defined explicitly; one value per epoch): ``base_lr`` for epochs
    ``< flat_epochs``, then cosine cycles of ``restart_epochs`` epochs from ``base_lr`` down toward
    ``base_lr * min_lr_ratio``; with the defaults 5e-4 for epochs 0-10, then 4.53e-4, 3.31e-4, 1.79e-4,
    5.7e-5, 5e-4, ... ``cosine``: per-step cosine from ``base_lr`` to ``base_lr * min_lr_ratio``.
    """
    lo = base_lr * cnn.min_lr_ratio
    if cnn.schedule == "seed_restarts":
        if epoch < cnn.flat_epochs:
            return base_lr
        t = (epoch - cnn.flat_epochs + 1) % cnn.restart_epochs
        return lo + (base_lr - lo) * (1 + math.cos(math.pi * t / cnn.restart_epochs)) / 2
    total = max(1, epochs * steps)
    frac = min(1.0, (epoch * steps + step) / total)
    return lo + (base_lr - lo) * (1 + math.cos(math.pi * frac)) / 2


def weighted_bce(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over images of Σ_c w_c·BCE / Σ_c w_c (the competition metric's form for [2,1,1,1,1,1])."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none")
    return (bce * weights).sum(1).mean() / weights.sum()


def init_bias(model: CnnNet, y: np.ndarray) -> None:
    """Start the classifier at the training label frequencies (logit of the prior), so the first steps
    learn the images rather than the base rates."""
    head = model.backbone.get_classifier()
    if getattr(head, "bias", None) is None or head.bias.shape[0] != y.shape[1]:
        return
    freq = np.clip(np.nanmean(y, axis=0), 1e-4, 1 - 1e-4)
    with torch.no_grad():
        head.bias.copy_(torch.from_numpy(np.log(freq / (1 - freq))).to(head.bias))


def ddp_wrap(model: CnnNet, P: Params, device: str) -> torch.nn.Module:
    """The training runner under torchrun: ``model`` (optionally with SyncBatchNorm, CUDA only) in
    DistributedDataParallel, compiled if asked for on CUDA. Call only when :func:`ichdlib.cnn.distributed.is_dist`."""

    cuda = torch.device(device).type == "cuda"
    if P.cnn.sync_bn:
        if cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif D.is_main():
            print("cnn.sync_bn: SyncBatchNorm needs CUDA; on the CPU each rank keeps its own BatchNorm statistics")
    ddp = DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None)
    return torch.compile(ddp) if cuda and P.cnn.compile else ddp


def _val_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:

    auc = per_class_auc(y, p)
    vals = [v for v in auc.values() if v is not None]
    pc = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    bce = float(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)).mean())
    out: dict[str, Any] = {"val_wll": weighted_log_loss(y, p), "val_bce": bce}
    out.update({f"auc_{c}": (None if v is None else float(v)) for c, v in auc.items()})
    out["auc_mean"] = float(np.mean(vals)) if vals else None
    return out


def data_digest(rows: pd.DataFrame) -> str:
    """A short digest of training rows' images and labels: regenerated or relabelled data gives another."""
    cols = ["sop_uid", *LABELS]
    return hashlib.sha256(pd.util.hash_pandas_object(rows[cols], index=False).to_numpy().tobytes()).hexdigest()[:16]


def run_config(P: Params, cfg: BackboneCfg, size_of_cache: int, train_rows: pd.DataFrame) -> dict[str, Any]:
    """Settings that define a fold's training (its training rows included); a checkpoint made with others is
    not resumed."""
    c = P.cnn
    return {
        "name": cfg.name, "size": cfg.size, "batch": cfg.batch, "epochs": cfg.epochs, "lr": cfg.lr,
        "pretrained": str(cfg.pretrained), "seed": P.seed, "recipe": P.windows.recipe,
        "single_window": list(P.windows.single_window), "learnable": P.windows.learnable,
        "sampler": c.sampler, "study_sampler_k": c.study_sampler_k,
        "max_steps_per_epoch": c.max_steps_per_epoch,
        "schedule": c.schedule, "flat_epochs": c.flat_epochs, "restart_epochs": c.restart_epochs,
        "min_lr_ratio": c.min_lr_ratio, "class_weights": list(c.class_weights), "grad_clip": c.grad_clip,
        "weight_decay": c.weight_decay, "amp_dtype": c.amp_dtype, "sync_bn": c.sync_bn,
        "val_every": c.val_every, "val_subset": c.val_subset,
        "augment": json.dumps(c.augment.model_dump(mode="json"), sort_keys=True),
        "cache_size": size_of_cache, "n_train": len(train_rows), "data": data_digest(train_rows),
    }


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Settings that differ; keys an older checkpoint did not record yet (e.g. ``data``) are not compared."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if k in old and old[k] != new[k]]


# --------------------------------------------------------------------------------------------------
# One fold
# --------------------------------------------------------------------------------------------------
class _Fold:
    """File names of one fold."""

    def __init__(self, out: Path, fold: int) -> None:
        d = ModelDir(out)
        self.best, self.last, self.log = d.checkpoint(fold), d.last(fold), d.log(fold)
        self.val, self.test = d.val(fold), d.test_part(fold)

    def all(self) -> list[Path]:
        return [self.best, self.last, self.log, self.val, self.test]


def _fold_finished(files: _Fold) -> bool:
    if not all(f.is_file() for f in files.all()):
        return False
    return bool((_read_last(files.last) or {}).get("meta", {}).get("finished"))


def _read_last(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); delete it or pass "
                         "force=True to retrain this fold") from exc


def _provenance(origin: str, device: str) -> dict[str, Any]:
    """Where a fold's weights come from: the tool, the number of processes, host, device and time."""
    return {"by": origin, "world_size": D.world_size(), "host": socket.gethostname(), "device": device,
            "torch": str(torch.__version__), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def describe_provenance(prov: dict[str, Any] | None) -> str:
    """One line for a fold's ``meta["provenance"]`` ("unknown" for checkpoints that predate it)."""
    if not prov:
        return "trained by an earlier version (provenance not recorded)"
    n = int(prov.get("world_size", 1))
    procs = f"{n} processes (torchrun/DDP)" if n > 1 else "1 process"
    return f"trained by {prov.get('by')} on {prov.get('host')} ({prov.get('device')}, {procs}) at {prov.get('time')}"


def _one_based(epoch: int | None) -> int | None:
    """A 0-based epoch index as people count epochs (None when no epoch finished)."""
    return None if epoch is None or epoch < 0 else int(epoch) + 1


def fold_split(cat: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(training rows, validation rows, test rows)`` of a fold of the catalog's patient folds."""
    train_cat = cat[cat["split"] == "train"]
    tr, va = train_cat[train_cat["fold"] != fold], train_cat[train_cat["fold"] == fold]
    if len(va) == 0 or len(tr) == 0:
        folds = sorted(train_cat["fold"].unique().tolist())
        raise ValueError(f"fold {fold}: {len(tr)} training and {len(va)} validation slices; the catalog's "
                         f"folds are {folds}")
    return tr, va, cat[cat["split"] == "test"]


def open_fold(files: _Fold, config: dict[str, Any], fold: int, force: bool, stage: str = "02"
              ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A fold's resume state: ``(last checkpoint or None, skip summary when the fold is finished)``. ``force``
    deletes its files first (rank 0); a checkpoint trained with other settings is refused, naming them.
    Shared by the 2D and 3D loops."""
    if force:
        if D.is_main():
            for f in files.all():
                f.unlink(missing_ok=True)
        D.barrier()
    state = _read_last(files.last)
    if state is None:
        return None, None
    diff = _config_diff(state["meta"].get("config", {}), config)
    if diff:
        raise ValueError(
            f"{files.last} was trained with other settings ({'; '.join(diff)}). Pass force=True "
            f"(notebook {stage}: force = True) to retrain, or give the model a new `tag`.")
    if _fold_finished(files):
        return state, fold_result(fold, "skipped", state["meta"])
    return state, None


def fold_result(fold: int, status: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The summary a fold returns (``status``, best epoch and loss, epochs run, provenance)."""
    return {"fold": fold, "status": status, "best_epoch": _one_based(meta["best_epoch"]), "best_wll": meta["best_wll"],
            "epochs_run": meta["epoch"] + 1, "provenance": meta.get("provenance")}


def restore(state: dict[str, Any] | None, opt: torch.optim.Optimizer, scaler: Any, meta: dict[str, Any]) -> str:
    """Load a resumed fold's optimizer/scaler state and history into ``opt``/``scaler``/``meta``; its status."""
    if state is None:
        return "trained"
    opt.load_state_dict(state["optimizer"])
    if "scaler" in state and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    meta.update({k: state["meta"][k] for k in ("epoch", "best_epoch", "best_wll", "metrics", "history")})
    return "resumed"


def save_epoch(files: _Fold, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: Any, meta: dict[str, Any],
               best: bool, val: pd.DataFrame | None, columns: list[str]) -> None:
    """Rank 0 writes an epoch: the best checkpoint and its validation table (when ``best``), the log, the
    resume checkpoint; every rank then waits."""
    if D.is_main():
        if best:
            save_torch({"state_dict": model.state_dict(), "meta": dict(meta, history=[])}, files.best)
            save_parquet(val, files.val)
        history = pd.DataFrame(meta["history"], columns=columns)
        atomic_write(files.log, lambda t, h=history: h.to_csv(t, index=False))
        last = {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "meta": meta}
        if scaler.is_enabled():
            last["scaler"] = scaler.state_dict()
        save_torch(last, files.last)
    D.barrier()


def finish_fold(files: _Fold, meta: dict[str, Any], test: pd.DataFrame) -> None:
    """Rank 0 writes the fold's test table and marks its resume checkpoint finished."""
    meta["finished"] = True
    if D.is_main():
        save_parquet(test, files.test)
        last = torch.load(files.last, map_location="cpu", weights_only=True)
        last["meta"] = meta
        save_torch(last, files.last)
    D.barrier()


def add_oof_scores(summary: dict[str, Any], cat: pd.DataFrame) -> None:
    """Once ``oof.parquet`` exists: its weighted log loss beside the prior's, and per-class AUC."""
    if not summary.get("oof"):
        return
    oof = pd.read_parquet(summary["oof"])
    y = cat.loc[cat["split"] == "train", list(LABELS)].to_numpy(dtype=np.float64)
    p = oof[list(LABELS)].to_numpy()
    summary["oof_wll"] = weighted_log_loss(y, p)
    summary["prior_wll"] = weighted_log_loss(y, prior_baseline(y, len(y)))
    summary["oof_auc"] = per_class_auc(y, p)


def train_fold(P: Params, cfg: BackboneCfg, fold: int, cat: pd.DataFrame, cache: np.ndarray,
               force: bool = False, origin: str = "train_cnn",
               progress: TrainingProgress | None = None) -> dict[str, Any]:
    """Train (or resume, or skip) one fold; returns its summary (``status``, ``best_epoch`` (1-based, as the log
    lines; the checkpoint meta keeps the 0-based index), ``best_wll``, ``provenance``). Under torchrun every rank calls it; rank 0 writes the files."""
    out = cnn_dir(P, cfg)
    out.mkdir(parents=True, exist_ok=True)
    files = _Fold(out, fold)
    tr, va, te = fold_split(cat, fold)
    config = run_config(P, cfg, int(cache.shape[-1]), tr)
    state, skipped = open_fold(files, config, fold, force)
    if skipped:
        return skipped

    device = P.torch_device()
    cuda = torch.device(device).type == "cuda"
    amp = amp_mode(P, device)
    rank, main = D.rank(), D.is_main()
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_training_memory(P, cfg, cuda)  # /dev/shm and pinned memory for the loaders, before any worker starts
    torch.manual_seed(derive_seed(P.seed, fold, 10**6))  # same initial weights on every rank
    # a resumed fold loads its own weights below: no need to fetch pretrained ones again
    model = build_cnn(cfg.name, pretrained=cfg.pretrained if state is None else False,
                      learnable_window=P.windows.recipe if P.windows.learnable else None,
                      recipe=P.windows.recipe, single_window=tuple(P.windows.single_window))
    if state is None:
        init_bias(model, tr[list(LABELS)].to_numpy(dtype=np.float64))
    else:
        model.load_state_dict(state["state_dict"])
    model, runner = prepare_model(model, P, device)  # runner: evaluation (never the DDP wrapper)
    train_runner = ddp_wrap(model, P, device) if D.is_dist() else runner
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=P.cnn.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp == torch.float16)
    aug = DeviceAugment.from_params(P, cfg.size)
    weights = torch.tensor(P.cnn.class_weights, dtype=torch.float32, device=device)

    ds_tr = SliceDataset.from_catalog(tr, cache)
    ds_va = SliceDataset.from_catalog(va, cache)
    y_va = ds_va.labels
    sampler_seed = derive_seed(P.seed, fold)
    if P.cnn.sampler == "study":
        sampler: Any = StudyBatchSampler(tr["study_uid"].to_numpy(), cfg.batch, P.cnn.study_sampler_k,
                                         sampler_seed, P.cnn.max_steps_per_epoch)
        global_batch = cfg.batch
    else:
        sampler = SliceBatchSampler(len(ds_tr), cfg.batch, sampler_seed, shuffle=True,
                                    max_steps=P.cnn.max_steps_per_epoch)
        global_batch = min(cfg.batch, len(ds_tr))
    if D.is_dist():
        sampler = D.ShardedBatchSampler(sampler)
    loader = make_loader(ds_tr, sampler, P.cnn.num_workers, pin_memory=cuda, seed=sampler_seed + rank,
                         persistent=True, prefetch=P.cnn.prefetch)
    # validation: this rank's block of the fold (and of the fixed subset), loaders kept across epochs
    val_sets = {"full": np.arange(len(ds_va))}
    if P.cnn.val_subset and P.cnn.val_subset < len(ds_va):
        rng = np.random.default_rng(derive_seed(P.seed, fold, 5))
        val_sets["subset"] = np.sort(rng.choice(len(ds_va), size=P.cnn.val_subset, replace=False))
    val_loaders = {}
    for kind, sel in val_sets.items():
        mine = subset(ds_va, sel[D.shard_slice(len(sel))])
        val_loaders[kind] = (mine, eval_loader(mine, cfg.batch * 2, P.cnn.num_workers, cuda, persistent=True,
                                              prefetch=P.cnn.prefetch))

    def validate(kind: str) -> tuple[np.ndarray, dict[str, Any]]:
        t0 = time.perf_counter()
        mine, ld = val_loaders[kind]
        p_mine, _ = predict(runner, aug, mine, cfg.batch * 2, device, amp, channels_last=cuda and P.cnn.channels_last,
                            loader=ld)
        sel = val_sets[kind]
        p = D.gather_rows(p_mine, len(sel))
        secs = time.perf_counter() - t0
        info = {"val_kind": kind, "val_images": len(sel), "val_images_per_s": round(len(sel) / max(secs, 1e-9), 2),
                **_val_metrics(y_va[sel], p)}
        return p, info

    meta: dict[str, Any] = {
        "spec": ModelSpec.from_params(P, cfg, model.feature_dim).to_dict(),
        "key": cfg.key, "fold": fold, "epochs": cfg.epochs, "config": config,
        "epoch": -1, "best_epoch": -1, "best_wll": None, "metrics": {}, "history": [], "finished": False,
        "provenance": _provenance(origin, device),
    }
    status = restore(state, opt, scaler, meta)
    start = int(meta["epoch"]) + 1

    if progress is None:  # under torchrun only rank 0 reports
        progress = TrainingProgress(cfg.key) if main else TrainingProgress(cfg.key, live=False, stream=io.StringIO())
    progress.fold(fold, cfg.epochs, start, best=meta["best_wll"])
    for epoch in range(start, cfg.epochs):
        row = run_epoch(P, cfg, fold, epoch, model, train_runner, opt, aug, loader, sampler, weights, device,
                        amp, scaler=scaler, global_batch=global_batch, progress=progress if main else None)
        t0 = time.perf_counter()
        full = (epoch + 1) % P.cnn.val_every == 0 or epoch == cfg.epochs - 1
        kind = "full" if full else ("subset" if "subset" in val_sets else None)
        p_va = None
        if kind is None:
            row.update({"val_kind": "none", "val_images": 0})
        else:
            D.sync_buffers(model)  # every rank scores with the BatchNorm statistics rank 0 saves
            p_va, info = validate(kind)
            row.update(info)
            if not np.isfinite(row["val_wll"]):
                raise FloatingPointError(f"fold {fold} epoch {epoch}: validation loss is not finite")
        row["seconds"] = round(row["seconds"] + time.perf_counter() - t0, 3)
        meta["history"] = [*meta["history"], row]
        meta["epoch"], meta["metrics"] = epoch, row
        best = full and (meta["best_wll"] is None or row["val_wll"] < meta["best_wll"])
        if best:
            meta["best_epoch"], meta["best_wll"] = epoch, float(row["val_wll"])
        save_epoch(files, model, opt, scaler, meta, best, probs_frame(va["sop_uid"], p_va) if best else None,
                   LOG_COLUMNS)
        if main:  # the subset score between full validations is not comparable with the best: not shown
            progress.epoch(epoch, row["train_loss"], row["val_wll"] if row["val_kind"] == "full" else None,
                           row["images_per_s"], row["seconds"])

    # test probabilities from the best epoch, then mark the fold finished
    best_state = torch.load(files.best, map_location="cpu", weights_only=True)
    model.load_state_dict(best_state["state_dict"])
    if len(te):
        ds_te = SliceDataset.from_catalog(te, cache, labels=False)
        p_te, _ = predict_sharded(runner, aug, ds_te, cfg.batch * 2, device, amp=amp,
                                  num_workers=P.cnn.num_workers, channels_last=cuda and P.cnn.channels_last)
    else:
        p_te = np.zeros((0, len(LABELS)), dtype=np.float32)
    finish_fold(files, meta, probs_frame(te["sop_uid"], p_te))
    return fold_result(fold, status, meta)


def optimizer_step(loss: torch.Tensor, share: float, opt: torch.optim.Optimizer, scaler: Any, model: torch.nn.Module,
                   grad_clip: float | None) -> None:
    """Backward of ``loss`` scaled by this rank's share of the global batch (DDP averages the gradients),
    gradient clipping (after unscaling), the optimizer and GradScaler steps."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * share if share != 1.0 else loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()


def run_epoch(P: Params, cfg: BackboneCfg, fold: int, epoch: int, model: CnnNet, runner: torch.nn.Module,
              opt: torch.optim.Optimizer, aug: DeviceAugment, loader: Any, sampler: Any,
              weights: torch.Tensor, device: str, amp: bool | torch.dtype, *, scaler: Any = None,
              global_batch: int | None = None, progress: TrainingProgress | None = None) -> dict[str, Any]:
    """One training epoch; every random stream is seeded from (seed, fold, epoch[, rank]) so a resume
    repeats it. Under DDP each rank's loss is scaled by its share of the global batch (``global_batch``),
    so the averaged gradient is the one-process gradient; loss and image counts are all-reduced."""
    cuda = torch.device(device).type == "cuda"
    rank, world = D.rank(), D.world_size()
    model.train()
    aug.train()
    extra = (rank,) if rank else ()  # rank 0 keeps the one-process streams
    aug.reseed(derive_seed(P.seed, fold, epoch, 1, *extra))
    torch.manual_seed(derive_seed(P.seed, fold, epoch, 2, *extra))
    sampler.set_epoch(epoch)
    steps = len(sampler)
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    loss_sum = torch.zeros((), device=device)
    n_img, t0 = 0, time.perf_counter()
    lr = cfg.lr
    batches = progress.batches(loader, steps) if progress is not None else loader
    for step, batch in enumerate(batches):
        D.fault_point(epoch, step)
        lr = lr_at(P.cnn, cfg.lr, cfg.epochs, epoch, step, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, _ = to_device(batch, device)
        with torch.no_grad():
            inp = aug(x)
        if cuda and P.cnn.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = runner(inp)
        loss = weighted_bce(logits, y, weights)
        share = len(x) * world / global_batch if world > 1 and global_batch else 1.0
        optimizer_step(loss, share, opt, scaler, model, P.cnn.grad_clip)
        loss_sum += loss.detach() * (share / world)
        n_img += len(x)
        if step == 0 and not torch.isfinite(loss):
            raise FloatingPointError(f"fold {fold} epoch {epoch}: loss is not finite at the first step; "
                                     "check the cache and lower cnn lr")
    totals = D.all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(float(n_img), device=device)]))
    train_loss = float(totals[0].item()) / max(1, steps)
    n_img = int(totals[1].item())
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"fold {fold} epoch {epoch}: training loss became {train_loss}; lower the "
                                 f"learning rate (lr={cfg.lr}) or enable grad_clip")
    secs = time.perf_counter() - t0
    return {"epoch": epoch, "lr": lr, "train_loss": train_loss,
            "images_per_s": round(n_img / max(secs, 1e-9), 2),
            "seconds": secs}


# --------------------------------------------------------------------------------------------------
# All folds
# --------------------------------------------------------------------------------------------------
def fold_numbers(P: Params, cat: pd.DataFrame, folds: Iterable[int] | str | None = None) -> list[int]:
    """The folds to train: ``folds`` or ``P.cnn.folds`` (``all`` = every fold in the catalog)."""
    available = sorted(int(f) for f in cat.loc[cat["split"] == "train", "fold"].unique() if f >= 0)
    want = P.cnn.folds if folds is None else folds
    if want == "all":
        return available
    want = sorted({int(f) for f in want})  # type: ignore[union-attr]
    bad = [f for f in want if f not in available]
    if bad:
        raise ValueError(f"folds {bad} are not in the catalog (folds {available})")
    return want


def _load_inputs(P: Params, cfg: BackboneCfg, catalog: pd.DataFrame | None,
                 cache: np.ndarray | None) -> tuple[pd.DataFrame, np.ndarray]:
    if catalog is None:

        catalog = load_catalog(P.work_dir)
    if cache is None:  # the HU cache up to ingest.size; above it (512 px) the DICOM files themselves
        cache = open_slices(P, cfg.size, catalog)
    if cache.shape[-1] != cfg.size:
        raise ValueError(f"cache images are {cache.shape[-1]} px but backbone {cfg.key} wants {cfg.size} px")
    return catalog, cache


def assemble_predictions(P: Params, d: ModelDir, cat: pd.DataFrame) -> dict[str, Any]:
    """Write ``oof.parquet`` (when every fold is done) and ``test.parquet`` (mean over the done folds) in the
    model folder ``d`` (a backbone's ``P.layout.cnn(key)``, or the 3D member's ``P.layout.cnn3d(key)``)."""
    out = d.path
    train_cat = cat[cat["split"] == "train"]
    all_folds = sorted(int(f) for f in train_cat["fold"].unique())
    done = [k for k in all_folds if _fold_finished(_Fold(out, k))]
    result: dict[str, Any] = {"complete": done == all_folds, "folds_done": done}
    if not done:
        return result
    if result["complete"]:
        parts = [pd.read_parquet(d.val(k)).assign(fold=k) for k in done]
        oof = pd.concat(parts, ignore_index=True)
        if oof["sop_uid"].duplicated().any():
            raise ValueError(f"{out}: a slice appears in the validation files of two folds")
        oof = train_cat[["sop_uid"]].merge(oof, on="sop_uid", how="left", validate="one_to_one")
        if oof[list(LABELS)].isna().any().any():
            raise ValueError(f"{out}: validation files miss {int(oof['any'].isna().sum())} training slices; "
                             "retrain with force=True")
        oof = oof[["sop_uid", "fold", *LABELS]]
        oof["fold"] = oof["fold"].astype(int)
        save_parquet(oof, d.oof)
        result["oof"] = d.oof
    te = cat.loc[cat["split"] == "test", ["sop_uid"]].reset_index(drop=True)
    stack = []
    for k in done:
        t = pd.read_parquet(d.test_part(k))
        if not t["sop_uid"].reset_index(drop=True).equals(te["sop_uid"]):
            raise ValueError(f"{d.test_part(k)}: rows do not match the catalog's test slices; "
                             "retrain with force=True")
        stack.append(t[list(LABELS)].to_numpy())
    mean = np.mean(stack, axis=0) if stack else np.zeros((len(te), len(LABELS)))
    save_parquet(probs_frame(te["sop_uid"], mean), d.test)
    result["test"] = d.test
    return result


def train_cnn(P: Params, backbone_cfg: BackboneCfg, folds: Iterable[int] | str | None = None,
              force: bool = False, *, catalog: pd.DataFrame | None = None,
              cache: np.ndarray | None = None, origin: str = "train_cnn") -> dict[str, Any]:
    """Train ``backbone_cfg`` on the given folds (default ``P.cnn.folds``) and assemble OOF/test tables.

    Returns a summary: per fold status/best epoch/best weighted log loss/provenance, ``provenance`` (one
    line: where each fold's model came from, e.g. loaded from an ``ichd train`` run), and, once every fold
    is done, ``oof_wll`` beside ``prior_wll`` (label frequencies of the training slices) and per-class AUC.
    Finished folds (same settings and data) are loaded, not retrained. ``origin`` is recorded in new
    checkpoints' provenance. Under torchrun every rank calls it (DDP); fold jobs may run side by side. With
    ``cnn.fold_jobs`` > 1 (one process, not torchrun) the folds still to train run in that many worker
    processes at a time, with the same results; their epochs are reported here.
    ``catalog``/``cache`` default to ``work/<run>/catalog.parquet`` and the cache at the backbone's size.
    """

    t0 = time.perf_counter()
    given = (catalog, cache)
    cat, cache = _load_inputs(P, backbone_cfg, catalog, cache)
    d = P.layout.cnn(backbone_cfg.key)
    out = d.path
    summary: dict[str, Any] = {"key": backbone_cfg.key, "dir": str(out), "folds": {}}
    numbers = fold_numbers(P, cat, folds)
    # cnn.fold_jobs: the folds still to train side by side in worker processes (not under torchrun)
    todo = [] if D.is_dist() else [k for k in numbers if force or not _fold_finished(_Fold(out, k))]
    jobs = min(P.cnn.fold_jobs, len(todo))
    if jobs > 1:
        threads = P.cnn.cpu_threads or max(1, resolve_workers(0) // jobs)  # the cores shared out
        args = {k: (P, backbone_cfg, k, force, origin, given[0], mapped_ref(given[1]), threads) for k in todo}
        summary["folds"].update(run_fold_jobs(
            fold_job, args, jobs, lambda k: TrainingProgress(backbone_cfg.key, curve=False),
            what=f"train {backbone_cfg.key} ({jobs} fold jobs)"))
    with cpu_threads(P), TrainingProgress(backbone_cfg.key) as progress:
        for k in numbers:
            if k not in summary["folds"]:
                summary["folds"][k] = _locked_fold(P, backbone_cfg, k, cat, cache, force, origin, progress)
    summary["folds"] = {k: summary["folds"][k] for k in numbers}
    return complete_summary(P, cat, d, summary, t0)


def _locked_fold(P: Params, cfg: BackboneCfg, fold: int, cat: pd.DataFrame, cache: np.ndarray, force: bool,
                 origin: str, progress: TrainingProgress) -> dict[str, Any]:
    """:func:`train_fold` under the fold's lock: a second job on the same fold stops at once and names the
    holder."""
    with D.main_lock(P.layout.cnn(cfg.key).fold_lock(fold), what=f"train {cfg.key} fold {fold}"):
        return train_fold(P, cfg, fold, cat, cache, force=force, origin=origin, progress=progress)


def fold_job(P: Params, cfg: BackboneCfg, fold: int, force: bool, origin: str, catalog: pd.DataFrame | None,
             cache_ref: Any, threads: int, events: Any) -> dict[str, Any]:
    """One fold of :func:`train_cnn` in a worker process (``cnn.fold_jobs``, :mod:`ichdlib.foldjobs`): opens
    the catalog and the cache itself (mapped read-only), trains with ``threads`` torch threads and reports
    its epochs to ``events``; returns the fold's summary."""
    cat, cache = _load_inputs(P, cfg, catalog, reopen_mapped(cache_ref))
    with torch_threads(threads, P.torch_device()):
        return _locked_fold(P, cfg, fold, cat, cache, force, origin, QueueProgress(cfg.key, events))


def complete_summary(P: Params, cat: pd.DataFrame, d: ModelDir, summary: dict[str, Any], t0: float) -> dict[str, Any]:
    """After the folds (2D or 3D, in the model folder ``d``): assemble the OOF/test tables, one provenance
    line, OOF scores, seconds since ``t0``."""
    # fold jobs sharing the folder assemble one at a time; the one that sees every fold writes oof.parquet
    assembled = None
    if D.is_main():
        with output_lock(d.oof, what=f"assemble {summary['key']}", wait=600):
            assembled = assemble_predictions(P, d, cat)
    summary.update(D.broadcast_object(assembled))
    summary["provenance"] = "; ".join(
        f"fold {k}: {f['status']}, {describe_provenance(f.get('provenance'))}" for k, f in summary["folds"].items())
    add_oof_scores(summary, cat)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def train_all(P: Params, force: bool = False) -> list[dict[str, Any]]:
    """:func:`train_cnn` for every backbone in ``P.cnn.backbones``."""
    return [train_cnn(P, cfg, force=force) for cfg in P.cnn.backbones]


def run_stage(P: Params, force: bool = False, *, backbones: list[BackboneCfg] | None = None,
              folds: Iterable[int] | str | None = None, origin: str = "train_cnn") -> StageReport:
    """Stage 02 (:data:`ichdlib.stages.STAGES`): :func:`train_cnn` for ``backbones`` (default every one of
    ``cnn.backbones``); the report's ``result`` is the list of their summaries."""
    summaries = [train_cnn(P, b, folds=folds, force=force, origin=origin) for b in (backbones or P.cnn.backbones)]
    rows = [{"backbone": s["key"], "folds done": len(s.get("folds_done", s["folds"])), "oof wLL": s.get("oof_wll"),
             "prior wLL": s.get("prior_wll"), "seconds": s["seconds"]} for s in summaries]
    return StageReport("cnn", rows, result=summaries)


def read_logs(P: Params, cfg: BackboneCfg) -> pd.DataFrame:
    """Every fold's per-epoch log of a backbone, with a ``fold`` column (empty if none yet)."""
    out = cnn_dir(P, cfg)
    frames = [pd.read_csv(p).assign(fold=int(p.name[4:].split("_")[0]))
              for p in sorted(out.glob("fold*_log.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*LOG_COLUMNS, "fold"])


# --------------------------------------------------------------------------------------------------
# Figures for notebook 02
# --------------------------------------------------------------------------------------------------
def plot_schedule(P: Params, cfg: BackboneCfg, steps_per_epoch: int = 20) -> Any:
    """The learning rate over training (per step) for ``cfg``'s epochs and ``P.cnn.schedule``."""

    x = np.arange(cfg.epochs * steps_per_epoch) / steps_per_epoch
    lr = [lr_at(P.cnn, cfg.lr, cfg.epochs, int(e), int(round((e % 1) * steps_per_epoch)), steps_per_epoch)
          for e in x]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.plot(x, lr)
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"{cfg.key}: {P.cnn.schedule} schedule")
    fig.tight_layout()
    return fig


def plot_curves(logs: pd.DataFrame, prior_wll: float | None = None, title: str = "") -> Any:
    """Per-fold training loss and validation weighted log loss / mean AUC by epoch (1-based, as the log lines).

    Every validation point is shown: when early epochs of a from-scratch model spike (BatchNorm statistics) far
    above the later ones, the loss axis is logarithmic instead of cut."""

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for fold, g in logs.groupby("fold"):
        e = g["epoch"] + 1
        axes[0].plot(e, g["train_loss"], marker=".", label=f"fold {fold}")
        axes[1].plot(e, g["val_wll"], marker=".", label=f"fold {fold}")
        axes[2].plot(e, g["auc_mean"], marker=".", label=f"fold {fold}")
    if prior_wll is not None:
        axes[1].axhline(prior_wll, color="grey", ls="--", label="prior baseline")
    val = pd.to_numeric(logs["val_wll"], errors="coerce").dropna()
    if len(val) and val.min() > 0 and val.max() / val.min() > 4:
        axes[1].set_yscale("log")
    axes[0].set(xlabel="epoch", ylabel="weighted BCE", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="weighted log loss", title="validation (competition metric)")
    axes[2].set(xlabel="epoch", ylabel="mean AUC", title="validation AUC (mean over labels)")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
