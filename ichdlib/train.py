"""Training the 2D CNN per fold (notebook 02): resumable, seeded, scored with the competition metric.

``train_cnn(P, backbone_cfg)`` trains one backbone on each fold of the catalog's patient folds and writes
``work/<run>/cnn/<key>/``:

- ``fold<k>_last.pt``: weights, optimizer state and meta after every epoch (atomic); a rerun after an
  interruption continues from it with the same batches and augmentations, so it ends where an
  uninterrupted run ends. A finished fold is skipped unless ``force``.
- ``fold<k>.pt``: the epoch with the lowest weighted log loss on the fold's validation slices
  (``{"state_dict", "meta"}``, loadable with ``torch.load(weights_only=True)``, see
  :func:`ichdlib.models.load_cnn`); ``fold<k>_val.parquet`` its validation probabilities and
  ``fold<k>_test.parquet`` its test probabilities.
- ``fold<k>_log.csv``: per epoch the learning rate, train loss, validation weighted log loss, BCE and
  per-class AUC, images/s and seconds.
- ``oof.parquet`` (every training slice once, from its fold's best model) and ``test.parquet`` (mean over
  folds), once all folds are done.

Same code on CPU and GPU; on CUDA with bf16 autocast, channels_last and optionally ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ichdlib.config import BackboneCfg, CnnCfg, Params
from ichdlib.data import (
    DeviceAugment,
    SliceBatchSampler,
    SliceDataset,
    StudyBatchSampler,
    make_loader,
    to_device,
)
from ichdlib.files import atomic_write
from ichdlib.labels import LABELS
from ichdlib.models import CnnNet, build_cnn
from ichdlib.progress import TrainingProgress, track

LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_wll", "val_bce", *[f"auc_{c}" for c in LABELS], "auc_mean",
               "images_per_s", "seconds"]


# --------------------------------------------------------------------------------------------------
# Small shared pieces
# --------------------------------------------------------------------------------------------------
def cnn_dir(P: Params, cfg: BackboneCfg) -> Path:
    """``work/<run>/cnn/<key>``."""
    return P.work_dir / "cnn" / cfg.key


def save_torch(obj: Any, path: Path) -> Path:
    return atomic_write(path, lambda t: torch.save(obj, t))


def save_parquet(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda t: df.to_parquet(t, index=False))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams per fold / epoch / purpose)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def probs_frame(sop_uid: Iterable[str], probs: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(LABELS))
    df.insert(0, "sop_uid", np.asarray(list(sop_uid), dtype=object))
    return df


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


@contextlib.contextmanager
def torch_threads(n: int | None, device: str) -> Iterator[None]:
    """Run with ``n`` torch CPU threads on a CPU device (``None`` leaves torch's setting), then restore."""
    if n is None or torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads(P: Params) -> contextlib.AbstractContextManager[None]:
    """Use ``P.cnn.cpu_threads`` torch threads inside the block when running on the CPU."""
    return torch_threads(P.cnn.cpu_threads, P.torch_device())


def amp_enabled(P: Params, device: str) -> bool:
    """bf16 autocast only on CUDA (on the CPU float32 is as fast and simpler)."""
    return bool(P.cnn.amp) and torch.device(device).type == "cuda"


def prepare_model(model: CnnNet, P: Params, device: str) -> tuple[CnnNet, torch.nn.Module]:
    """``(model, runner)``: the model on ``device`` (channels_last on CUDA) and what to call (compiled if
    asked for on CUDA)."""
    model = model.to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda and P.cnn.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if cuda and P.cnn.compile else model
    return model, runner


@torch.no_grad()
def predict(runner: torch.nn.Module, aug: DeviceAugment, dataset: SliceDataset, batch: int, device: str,
            amp: bool = False, num_workers: int = 0, pooled: bool = False, desc: str | None = None,
            views: list | None = None, channels_last: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (and pooled features if ``pooled``) for every item of ``dataset`` in order.

    Without ``views``: the validation view. With ``views`` (a list of :class:`ichdlib.data.TtaView`):
    the mean over the views of probabilities and of features. ``channels_last`` as the model was prepared.
    """
    cuda = torch.device(device).type == "cuda"
    aug.eval()
    runner.eval()
    loader = make_loader(dataset, SliceBatchSampler(len(dataset), batch, shuffle=False), num_workers, cuda)
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
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
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


def _val_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    from ichdlib.metrics import per_class_auc, weighted_log_loss

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
        "weight_decay": c.weight_decay,
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
        self.best = out / f"fold{fold}.pt"
        self.last = out / f"fold{fold}_last.pt"
        self.log = out / f"fold{fold}_log.csv"
        self.val = out / f"fold{fold}_val.parquet"
        self.test = out / f"fold{fold}_test.parquet"

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


def train_fold(P: Params, cfg: BackboneCfg, fold: int, cat: pd.DataFrame, cache: np.ndarray,
               force: bool = False, progress: TrainingProgress | None = None) -> dict[str, Any]:
    """Train (or resume, or skip) one fold; returns its summary (``status``, ``best_epoch``, ``best_wll``)."""
    out = cnn_dir(P, cfg)
    out.mkdir(parents=True, exist_ok=True)
    files = _Fold(out, fold)
    train_cat = cat[cat["split"] == "train"]
    tr, va = train_cat[train_cat["fold"] != fold], train_cat[train_cat["fold"] == fold]
    te = cat[cat["split"] == "test"]
    if len(va) == 0 or len(tr) == 0:
        folds = sorted(train_cat["fold"].unique().tolist())
        raise ValueError(f"fold {fold}: {len(tr)} training and {len(va)} validation slices; the catalog's "
                         f"folds are {folds}")
    config = run_config(P, cfg, int(cache.shape[-1]), tr)
    if force:
        for f in files.all():
            f.unlink(missing_ok=True)
    state = _read_last(files.last)
    if state is not None:
        diff = _config_diff(state["meta"].get("config", {}), config)
        if diff:
            raise ValueError(
                f"{files.last} was trained with other settings ({'; '.join(diff)}). Pass force=True "
                f"(notebook: overrides={{'force': ['02']}}) to retrain, or give the backbone a new `tag`.")
        if _fold_finished(files):
            m = state["meta"]
            return {"fold": fold, "status": "skipped", "best_epoch": m["best_epoch"],
                    "best_wll": m["best_wll"], "epochs_run": m["epoch"] + 1}

    device = P.torch_device()
    cuda = torch.device(device).type == "cuda"
    amp = amp_enabled(P, device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(derive_seed(P.seed, fold, 10**6))
    # a resumed fold loads its own weights below: no need to fetch pretrained ones again
    model = build_cnn(cfg.name, pretrained=cfg.pretrained if state is None else False,
                      learnable_window=P.windows.recipe if P.windows.learnable else None,
                      recipe=P.windows.recipe, single_window=tuple(P.windows.single_window))
    if state is None:
        init_bias(model, tr[list(LABELS)].to_numpy(dtype=np.float64))
    model, runner = prepare_model(model, P, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=P.cnn.weight_decay)
    aug = DeviceAugment.from_params(P, cfg.size)
    weights = torch.tensor(P.cnn.class_weights, dtype=torch.float32, device=device)

    ds_tr = SliceDataset.from_catalog(tr, cache)
    ds_va = SliceDataset.from_catalog(va, cache)
    y_va = ds_va.labels
    sampler_seed = derive_seed(P.seed, fold)
    if P.cnn.sampler == "study":
        sampler: Any = StudyBatchSampler(tr["study_uid"].to_numpy(), cfg.batch, P.cnn.study_sampler_k,
                                         sampler_seed, P.cnn.max_steps_per_epoch)
    else:
        sampler = SliceBatchSampler(len(ds_tr), cfg.batch, sampler_seed, shuffle=True,
                                    max_steps=P.cnn.max_steps_per_epoch)
    loader = make_loader(ds_tr, sampler, P.cnn.num_workers, pin_memory=cuda, seed=sampler_seed,
                         persistent=True)

    meta: dict[str, Any] = {
        "name": cfg.name, "key": cfg.key, "size": cfg.size, "num_classes": len(LABELS),
        "labels": list(LABELS),
        "recipe": P.windows.recipe, "single_window": list(P.windows.single_window),
        "learnable_window": bool(P.windows.learnable),
        "windows": [list(w) for w in _recipe_windows(P)],
        "val_center_crop": float(P.cnn.augment.val_center_crop),
        "feature_dim": model.feature_dim, "fold": fold, "epochs": cfg.epochs, "config": config,
        "epoch": -1, "best_epoch": -1, "best_wll": None, "metrics": {}, "history": [], "finished": False,
    }
    status = "trained"
    if state is not None:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        meta.update({k: state["meta"][k] for k in ("epoch", "best_epoch", "best_wll", "metrics", "history")})
        status = "resumed"
    start = int(meta["epoch"]) + 1

    progress = progress or TrainingProgress(cfg.key)
    progress.fold(fold, cfg.epochs, start, best=meta["best_wll"])
    for epoch in range(start, cfg.epochs):
        row = run_epoch(P, cfg, fold, epoch, model, runner, opt, aug, loader, sampler, weights, device, amp,
                        progress=progress)
        t0 = time.perf_counter()
        p_va, _ = predict(runner, aug, ds_va, cfg.batch * 2, device, amp, P.cnn.num_workers,
                          channels_last=cuda and P.cnn.channels_last)
        row.update(_val_metrics(y_va, p_va))
        row["seconds"] = round(row["seconds"] + time.perf_counter() - t0, 3)
        if not np.isfinite(row["val_wll"]):
            raise FloatingPointError(f"fold {fold} epoch {epoch}: validation loss is not finite")
        meta["history"] = [*meta["history"], row]
        meta["epoch"], meta["metrics"] = epoch, row
        if meta["best_wll"] is None or row["val_wll"] < meta["best_wll"]:
            meta["best_epoch"], meta["best_wll"] = epoch, float(row["val_wll"])
            save_torch({"state_dict": model.state_dict(), "meta": dict(meta, history=[])}, files.best)
            save_parquet(probs_frame(va["sop_uid"], p_va), files.val)
        history = pd.DataFrame(meta["history"], columns=LOG_COLUMNS)
        atomic_write(files.log, lambda t, h=history: h.to_csv(t, index=False))
        save_torch({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "meta": meta},
                   files.last)
        progress.epoch(epoch, row["train_loss"], row["val_wll"], row["images_per_s"], row["seconds"])

    # test probabilities from the best epoch, then mark the fold finished
    best = torch.load(files.best, map_location="cpu", weights_only=True)
    model.load_state_dict(best["state_dict"])
    if len(te):
        ds_te = SliceDataset.from_catalog(te, cache, labels=False)
        p_te, _ = predict(runner, aug, ds_te, cfg.batch * 2, device, amp, P.cnn.num_workers,
                          channels_last=cuda and P.cnn.channels_last)
    else:
        p_te = np.zeros((0, len(LABELS)), dtype=np.float32)
    save_parquet(probs_frame(te["sop_uid"], p_te), files.test)
    meta["finished"] = True
    last = torch.load(files.last, map_location="cpu", weights_only=True)
    last["meta"] = meta
    save_torch(last, files.last)
    return {"fold": fold, "status": status, "best_epoch": meta["best_epoch"], "best_wll": meta["best_wll"],
            "epochs_run": meta["epoch"] + 1}


def _recipe_windows(P: Params) -> list[tuple[float, float]]:
    from ichdlib.windows import recipe_windows

    return recipe_windows(P.windows.recipe, tuple(P.windows.single_window))


def run_epoch(P: Params, cfg: BackboneCfg, fold: int, epoch: int, model: CnnNet, runner: torch.nn.Module,
                 opt: torch.optim.Optimizer, aug: DeviceAugment, loader: Any, sampler: Any,
                 weights: torch.Tensor, device: str, amp: bool,
                 progress: TrainingProgress | None = None) -> dict[str, Any]:
    """One training epoch; every random stream is seeded from (seed, fold, epoch) so a resume repeats it."""
    cuda = torch.device(device).type == "cuda"
    model.train()
    aug.train()
    aug.reseed(derive_seed(P.seed, fold, epoch, 1))
    torch.manual_seed(derive_seed(P.seed, fold, epoch, 2))
    sampler.set_epoch(epoch)
    steps = len(sampler)
    loss_sum = torch.zeros((), device=device)
    n_img, t0 = 0, time.perf_counter()
    lr = cfg.lr
    batches = progress.batches(loader, steps) if progress is not None else loader
    for step, batch in enumerate(batches):
        lr = lr_at(P.cnn, cfg.lr, cfg.epochs, epoch, step, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, _ = to_device(batch, device)
        with torch.no_grad():
            inp = aug(x)
        if cuda and P.cnn.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            logits = runner(inp)
        loss = weighted_bce(logits, y, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if P.cnn.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), P.cnn.grad_clip)
        opt.step()
        loss_sum += loss.detach()
        n_img += len(x)
        if step == 0 and not torch.isfinite(loss):
            raise FloatingPointError(f"fold {fold} epoch {epoch}: loss is not finite at the first step; "
                                     "check the cache and lower cnn lr")
    train_loss = float(loss_sum.item()) / max(1, steps)
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
        from ichdlib.catalog import load_catalog

        catalog = load_catalog(P.work_dir)
    if cache is None:
        from ichdlib.cache import ensure_cache

        cache = ensure_cache(P, cfg.size)
    if cache.shape[-1] != cfg.size:
        raise ValueError(f"cache images are {cache.shape[-1]} px but backbone {cfg.key} wants {cfg.size} px")
    return catalog, cache


def assemble_predictions(P: Params, cfg: BackboneCfg, cat: pd.DataFrame) -> dict[str, Any]:
    """Write ``oof.parquet`` (when every fold is done) and ``test.parquet`` (mean over the done folds)."""
    out = cnn_dir(P, cfg)
    train_cat = cat[cat["split"] == "train"]
    all_folds = sorted(int(f) for f in train_cat["fold"].unique())
    done = [k for k in all_folds if _fold_finished(_Fold(out, k))]
    result: dict[str, Any] = {"complete": done == all_folds, "folds_done": done}
    if not done:
        return result
    if result["complete"]:
        parts = [pd.read_parquet(out / f"fold{k}_val.parquet").assign(fold=k) for k in done]
        oof = pd.concat(parts, ignore_index=True)
        if oof["sop_uid"].duplicated().any():
            raise ValueError(f"{out}: a slice appears in the validation files of two folds")
        oof = train_cat[["sop_uid"]].merge(oof, on="sop_uid", how="left", validate="one_to_one")
        if oof[list(LABELS)].isna().any().any():
            raise ValueError(f"{out}: validation files miss {int(oof['any'].isna().sum())} training slices; "
                             "retrain with force=True")
        oof = oof[["sop_uid", "fold", *LABELS]]
        oof["fold"] = oof["fold"].astype(int)
        save_parquet(oof, out / "oof.parquet")
        result["oof"] = out / "oof.parquet"
    te = cat.loc[cat["split"] == "test", ["sop_uid"]].reset_index(drop=True)
    stack = []
    for k in done:
        t = pd.read_parquet(out / f"fold{k}_test.parquet")
        if not t["sop_uid"].reset_index(drop=True).equals(te["sop_uid"]):
            raise ValueError(f"{out / f'fold{k}_test.parquet'}: rows do not match the catalog's test slices; "
                             "retrain with force=True")
        stack.append(t[list(LABELS)].to_numpy())
    mean = np.mean(stack, axis=0) if stack else np.zeros((len(te), len(LABELS)))
    save_parquet(probs_frame(te["sop_uid"], mean), out / "test.parquet")
    result["test"] = out / "test.parquet"
    return result


def train_cnn(P: Params, backbone_cfg: BackboneCfg, folds: Iterable[int] | str | None = None,
              force: bool = False, *, catalog: pd.DataFrame | None = None,
              cache: np.ndarray | None = None) -> dict[str, Any]:
    """Train ``backbone_cfg`` on the given folds (default ``P.cnn.folds``) and assemble OOF/test tables.

    Returns a summary: per fold status/best epoch/best weighted log loss, and, once every fold is done,
    ``oof_wll`` beside ``prior_wll`` (label frequencies of the training slices) and per-class AUC.
    ``catalog``/``cache`` default to ``work/<run>/catalog.parquet`` and the cache at the backbone's size.
    """
    from ichdlib.metrics import per_class_auc, prior_baseline, weighted_log_loss

    t0 = time.perf_counter()
    cat, cache = _load_inputs(P, backbone_cfg, catalog, cache)
    summary: dict[str, Any] = {"key": backbone_cfg.key, "dir": str(cnn_dir(P, backbone_cfg)), "folds": {}}
    with cpu_threads(P), TrainingProgress(backbone_cfg.key) as progress:
        for k in fold_numbers(P, cat, folds):
            summary["folds"][k] = train_fold(P, backbone_cfg, k, cat, cache, force=force, progress=progress)
    summary.update(assemble_predictions(P, backbone_cfg, cat))
    if summary.get("oof"):
        oof = pd.read_parquet(summary["oof"])
        y = cat.loc[cat["split"] == "train", list(LABELS)].to_numpy(dtype=np.float64)
        p = oof[list(LABELS)].to_numpy()
        summary["oof_wll"] = weighted_log_loss(y, p)
        summary["prior_wll"] = weighted_log_loss(y, prior_baseline(y, len(y)))
        summary["oof_auc"] = per_class_auc(y, p)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def train_all(P: Params, force: bool = False) -> list[dict[str, Any]]:
    """:func:`train_cnn` for every backbone in ``P.cnn.backbones``."""
    return [train_cnn(P, cfg, force=force) for cfg in P.cnn.backbones]


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
    import matplotlib.pyplot as plt

    x = np.arange(cfg.epochs * steps_per_epoch) / steps_per_epoch
    lr = [lr_at(P.cnn, cfg.lr, cfg.epochs, int(e), int(round((e % 1) * steps_per_epoch)), steps_per_epoch)
          for e in x]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.plot(x, lr)
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"{cfg.key}: {P.cnn.schedule} schedule")
    fig.tight_layout()
    return fig


def plot_curves(logs: pd.DataFrame, prior_wll: float | None = None, title: str = "") -> Any:
    """Per-fold training loss and validation weighted log loss / mean AUC by epoch."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for fold, g in logs.groupby("fold"):
        axes[0].plot(g["epoch"], g["train_loss"], marker=".", label=f"fold {fold}")
        axes[1].plot(g["epoch"], g["val_wll"], marker=".", label=f"fold {fold}")
        axes[2].plot(g["epoch"], g["auc_mean"], marker=".", label=f"fold {fold}")
    if prior_wll is not None:
        axes[1].axhline(prior_wll, color="grey", ls="--", label="prior baseline")
        # early epochs of a from-scratch model can spike (BatchNorm statistics): keep the useful range
        axes[1].set_ylim(0, max(2.5 * prior_wll, float(logs["val_wll"].min()) * 1.2))
    axes[0].set(xlabel="epoch", ylabel="weighted BCE", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="weighted log loss", title="validation (competition metric)")
    axes[2].set(xlabel="epoch", ylabel="mean AUC", title="validation AUC (mean over labels)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
