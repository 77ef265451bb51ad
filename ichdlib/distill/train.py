"""Training the student (``ichd train PARAMS --stage distill``; see :mod:`ichdlib.distill`).

Targets: for each training slice ``(1 - hard_weight) * ensemble + hard_weight * label``, where ``ensemble``
is notebook 05's blend of the run's out-of-fold stage predictions (the members' OOF tables and the fitted
weights in ``reports/<run>/metrics.json``). The loop is the 2D stage's own epoch
(:func:`ichdlib.cnn.train.run_epoch`: same sampler, augmentation, schedule, class weights) on those soft
targets; each fold student is scored against the true labels of its held-out fold after its last epoch.
A fold resumes from its last finished epoch; a finished fold with the same settings is not retrained.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from ichdlib.cnn.data import DeviceAugment, SliceBatchSampler, SliceDataset, make_loader
from ichdlib.cnn.infer import predict, probs_frame
from ichdlib.cnn.models import build_cnn
from ichdlib.cnn.train import init_bias, run_config, run_epoch
from ichdlib.config import Params
from ichdlib.distill import student_cfg, student_dir
from ichdlib.ensemble.weights import apply_weights
from ichdlib.files import atomic_write, save_parquet
from ichdlib.ingest.native import open_slices
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS
from ichdlib.metrics import per_class_auc, prior_baseline, weighted_log_loss
from ichdlib.predictions import load_stage, resolve_members
from ichdlib.progress import TrainingProgress
from ichdlib.runtime import cpu_threads, derive_seed, save_torch
from ichdlib.spec import ModelSpec
from ichdlib.stages import StageReport


def ensemble_targets(P: Params, catalog: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The full ensemble's per-slice probabilities ``(N, 6)`` on the training slices (out-of-fold) and on the
    test slices, in catalog order: notebook 05's members blended with its weights (equal for ``mean``)."""
    cat = load_catalog(P.work_dir) if catalog is None else catalog
    members = resolve_members(P)
    fold_weights: dict[str, Any] = {}
    if P.ensemble.method == "mean":
        weights = {m: 1.0 / len(members) for m in members}
    else:
        path = P.layout.metrics
        sub = json.loads(path.read_text()).get("submission", {}) if path.is_file() else {}
        if sorted(sub.get("weights") or {}) != sorted(members):
            raise FileNotFoundError(f"{path}: no fitted ensemble weights for {members}; run notebook 05 first")
        weights = {m: float(sub["weights"][m]) for m in members}
        fold_weights = sub.get("fold_weights") or {}  # the cross-fitted OOF blend: weights fitted on other folds
    stages = {m: load_stage(P, m, cat) for m in members}
    train = cat[cat["split"] == "train"]
    probs = {m: s.oof.loc[train["sop_uid"], list(LABELS)].to_numpy(np.float64) for m, s in stages.items()}
    oof = apply_weights(probs, weights)
    fold_of = train["fold"].to_numpy()
    for k, w in fold_weights.items():
        sel = fold_of == int(k)
        oof[sel] = apply_weights({m: p[sel] for m, p in probs.items()}, {m: float(w[m]) for m in members})
    ids = cat.loc[cat["split"] == "test", "sop_uid"]
    test = apply_weights({m: s.test.loc[ids, list(LABELS)].to_numpy(np.float64) for m, s in stages.items()}, weights)
    return oof, test


def _signature(P: Params, cfg: Any, targets: np.ndarray, cache_size: int, rows: pd.DataFrame) -> dict[str, Any]:
    digest = hashlib.sha256(np.ascontiguousarray(targets, dtype=np.float32).tobytes()).hexdigest()[:16]
    return {**run_config(P, cfg, cache_size, rows), "targets": digest, "hard_weight": P.distill.hard_weight}


def train_student_fold(P: Params, fold: int, cat: pd.DataFrame, cache: Any, targets: np.ndarray,
                       force: bool = False, progress: TrainingProgress | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) the fold-``fold`` student; returns its held-out scores and file."""
    cfg = student_cfg(P)
    d = student_dir(P)
    d.path.mkdir(parents=True, exist_ok=True)
    final, last = d.checkpoint(fold), d.last(fold)
    train = cat[cat["split"] == "train"].reset_index(drop=True)
    tr = np.flatnonzero(train["fold"].to_numpy() != fold)
    va = np.flatnonzero(train["fold"].to_numpy() == fold)
    signature = _signature(P, cfg, targets[tr], int(cache.shape[-1]), train.iloc[tr])
    device = P.torch_device()
    if not force and final.is_file():
        meta = torch.load(final, map_location="cpu", weights_only=True)["meta"]
        if meta.get("signature") == signature:
            return meta["result"]
    torch.manual_seed(derive_seed(P.seed, fold, 10**6, 77))
    model = build_cnn(cfg.name, pretrained=cfg.pretrained,
                      learnable_window=P.windows.recipe if P.windows.learnable else None,
                      recipe=P.windows.recipe, single_window=tuple(P.windows.single_window))
    init_bias(model, targets[tr])
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=P.cnn.weight_decay)
    start = 0
    if not force and last.is_file():
        ck = torch.load(last, map_location=device, weights_only=True)
        if ck["signature"] == signature:
            model.load_state_dict(ck["state_dict"])
            opt.load_state_dict(ck["optimizer"])
            start = int(ck["epoch"]) + 1
    rows = train[["prev_row", "row", "next_row"]].to_numpy(np.int64)
    ds = SliceDataset(cache, rows[tr], targets[tr].astype(np.float32))
    sampler = SliceBatchSampler(len(ds), cfg.batch, derive_seed(P.seed, fold, 77), shuffle=True,
                                max_steps=P.cnn.max_steps_per_epoch)
    loader = make_loader(ds, sampler, P.cnn.num_workers, seed=derive_seed(P.seed, fold, 77))
    aug = DeviceAugment.from_params(P, cfg.size)
    weights = torch.tensor(P.cnn.class_weights, dtype=torch.float32, device=device)
    progress = progress or TrainingProgress(f"student {cfg.key}")
    progress.fold(fold, cfg.epochs, start)
    for epoch in range(start, cfg.epochs):
        row = run_epoch(P, cfg, fold, epoch, model, model, opt, aug, loader, sampler, weights, device, False,
                        global_batch=min(cfg.batch, len(ds)), progress=progress)
        progress.epoch(epoch, row["train_loss"], None, row["images_per_s"], row["seconds"])
        save_torch({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                    "signature": signature}, last)
    y = train[list(LABELS)].to_numpy(np.float64)
    p_va, _ = predict(model, aug, SliceDataset(cache, rows[va]), cfg.batch * 2, device)
    prior = prior_baseline(y[tr], len(va))
    result = {"fold": fold, "val_wll": weighted_log_loss(y[va], p_va),
              "val_wll_vs_prior": weighted_log_loss(y[va], p_va) / weighted_log_loss(y[va], prior),
              "val_auc_any": per_class_auc(y[va], p_va)["any"], "file": final.name}
    meta = {"spec": ModelSpec.from_params(P, cfg, model.feature_dim).to_dict(), "key": cfg.key, "fold": fold,
            "config": {"cache_size": int(cache.shape[-1])}, "student": True, "signature": signature,
            "result": result, "metrics": {"val_wll": result["val_wll"]}}
    save_torch({"state_dict": model.state_dict(), "meta": meta}, final)
    save_parquet(probs_frame(train["sop_uid"].iloc[va], p_va), d.val(fold))
    last.unlink(missing_ok=True)
    return result


def distill(P: Params, force: bool = False) -> dict[str, Any]:
    """Train every fold student, write ``oof.parquet``, pick the deployed fold (lowest held-out loss
    relative to the prior), write its ``test.parquet`` and ``done.json``; returns ``done.json``'s content."""
    t0 = time.perf_counter()
    cfg = student_cfg(P)
    d = student_dir(P)
    cat = load_catalog(P.work_dir)
    oof_t, _ = ensemble_targets(P, cat)  # test rows stay unseen: the student's test score is honest
    train = cat[cat["split"] == "train"].reset_index(drop=True)
    y = train[list(LABELS)].to_numpy(np.float64)
    h = P.distill.hard_weight
    targets = (1 - h) * oof_t + h * y
    cache = open_slices(P, cfg.size, cat)
    folds = sorted(int(k) for k in train["fold"].unique())
    with cpu_threads(P), TrainingProgress(f"student {cfg.key}") as progress:
        results = [train_student_fold(P, k, cat, cache, targets, force, progress) for k in folds]
    oof = pd.concat([pd.read_parquet(d.val(k)) for k in folds]).set_index("sop_uid")
    oof = oof.loc[train["sop_uid"]].reset_index()
    save_parquet(oof, d.oof)
    deploy = min(results, key=lambda r: r["val_wll_vs_prior"])["fold"]
    ck = torch.load(d.checkpoint(deploy), map_location="cpu", weights_only=True)
    model = build_cnn(cfg.name, learnable_window=P.windows.recipe if P.windows.learnable else None,
                      recipe=P.windows.recipe, single_window=tuple(P.windows.single_window))
    model.load_state_dict(ck["state_dict"])
    test = cat[cat["split"] == "test"]
    aug = DeviceAugment.from_params(P, cfg.size)
    p_te, _ = predict(model.eval(), aug, SliceDataset.from_catalog(test, cache, labels=False), cfg.batch * 2, "cpu")
    save_parquet(probs_frame(test["sop_uid"], p_te), d.test)
    p_oof = oof[list(LABELS)].to_numpy(np.float64)
    done = {"key": cfg.key, "deploy_fold": deploy, "folds": results, "hard_weight": h,
            "oof_wll": weighted_log_loss(y, p_oof), "oof_auc_any": per_class_auc(y, p_oof)["any"],
            "ensemble_oof_wll": weighted_log_loss(y, oof_t), "seconds": round(time.perf_counter() - t0, 1)}
    done["summary"] = (f"student {cfg.key}: OOF wLL {done['oof_wll']:.4f} (ensemble {done['ensemble_oof_wll']:.4f}), "
                       f"deployed fold {deploy}, {done['seconds']:.0f} s; export it with ichd export --profile student")
    atomic_write(d.done, lambda t: t.write_text(json.dumps(done, indent=1)))
    return done


def run_stage(P: Params, force: bool = False) -> StageReport:
    """Stage 07 (:data:`ichdlib.stages.STAGES`): :func:`distill`; one row per fold student, the report's
    ``result`` is ``done.json``'s content."""
    done = distill(P, force=force)
    rows = [{**r, "deployed": r["fold"] == done["deploy_fold"]} for r in done["folds"]]
    return StageReport("distill", rows, seconds=done["seconds"], result=done)
