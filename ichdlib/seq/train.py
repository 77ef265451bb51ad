"""Study-level sequence models (notebook 04): K-fold training on the catalog's patient folds, OOF and test
predictions, the notebook's plots. Inputs are built in :mod:`ichdlib.seq.inputs`; prediction with flip TTA is
:mod:`ichdlib.seq.infer`, which ``ichd predict`` uses too.

Level-2 inputs come from notebook 03 (``work/features/<key>/``): the pooled features and TTA probabilities
of every 2D backbone, out-of-fold for training slices and the fold mean for test slices. Each study is a
sequence of slices in z order (the catalog's order). Per slice:

- ``fea`` ``(F, D)``: each backbone's feature vector zero-padded to the widest backbone, stacked;
- ``X`` ``(2n+2, 6)``: [mean of the n backbones' probabilities, n cyclic differences ``p_i - p_{i+1 mod n}``,
  n raw probabilities] (seed_spec §4 ``get_X``) and the z-spacing channel: the z step to the next slice
  in units of the study's median spacing, negative when the slices run the other way (reversal).

Training uses the catalog's patient folds (the same split as the 2D stage), trains every fold, saves OOF
and test predictions, and averages probabilities over both slice directions on validation and test alike.

Off the critical path: each split is assembled once on the device (:class:`StudyTensors`, studies
contiguous, per-batch padding by index), an epoch's training crops are drawn vectorised
(:func:`epoch_plan`) and batches are gathered on the device, so the host work per epoch is milliseconds
even at RSNA's size (``benchmarks/scale.py``, stage ``seq_epoch_host``). :meth:`SeqInputs.item` +
:func:`collate` remain the reference the tensors are tested against.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ichdlib.cnn import distributed as D
from ichdlib.config import Params
from ichdlib.files import atomic_write, save_parquet
from ichdlib.foldjobs import QueueProgress, run_fold_jobs
from ichdlib.labels import LABELS, short_uid
from ichdlib.layout import ModelDir
from ichdlib.metrics import weighted_log_loss
from ichdlib.predictions import load_stage
from ichdlib.progress import TrainingProgress
from ichdlib.runtime import derive_seed, resolve_workers, save_torch, torch_threads
from ichdlib.seq.infer import load_seq_model, predict_studies
from ichdlib.seq.inputs import (
    MODELS,
    SeqInputs,
    _load_catalog,
    backbone_keys,
    epoch_plan,
    load_inputs,
    seq_arch,
)
from ichdlib.seq.models import build_seq_model, init_output_bias, masked_weighted_bce, model_logits
from ichdlib.stages import StageReport

# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
@dataclass
class SeqResult:
    """What :func:`train_seq` returns: OOF and test frames (``sop_uid`` [, ``fold``] + six labels) and the
    per-epoch log of every fold."""

    model: str
    oof: pd.DataFrame
    test: pd.DataFrame
    history: pd.DataFrame
    out_dir: Path


def check_level2_folds(inputs: SeqInputs) -> None:
    """Raise ValueError when a patient or a study has slices in two folds (leakage at level 2)."""
    frame = pd.DataFrame({"patient": inputs.patient_id, "study": inputs.study_uid, "fold": inputs.fold})
    for col in ("patient", "study"):
        n = frame.groupby(col)["fold"].nunique()
        if (n > 1).any():
            raise ValueError(f"catalog folds leak: {int((n > 1).sum())} {col}(s) in several folds, "
                             f"e.g. {n[n > 1].index[0]!r}; rebuild the catalog (notebook 01)")


def fold_split(inputs: SeqInputs, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Study indices for training (other folds) and validation (``fold``)."""
    sf = inputs.study_fold()
    return np.flatnonzero(sf != fold), np.flatnonzero(sf == fold)


def _signature(P: Params, model_name: str, inputs: SeqInputs) -> dict:
    cfg = P.seq.model_dump(mode="json", exclude={"models", "fold_jobs"})  # fold_jobs changes no result
    # the level-1 probabilities identify the inputs cheaply: retrained CNNs give other numbers
    digest = hashlib.sha256(np.ascontiguousarray(inputs.probs).tobytes()).hexdigest()[:16]
    return {"model": model_name, "seq": cfg, "backbones": inputs.keys, "dims": [f.shape[1] for f in inputs.feats],
            "seed": P.seed, "n_train": len(inputs.sop_uid), "inputs": digest}


def _epoch_seed(seed: int, fold: int, epoch: int, model_name: str) -> int:
    return derive_seed(seed, fold, epoch + 1, MODELS.index(model_name), 0x5E0) % 2**63


def train_fold(P: Params, model_name: str, inputs: SeqInputs, fold: int, out_dir: Path, *,
               force: bool = False, signature: dict | None = None,
               progress: TrainingProgress | None = None) -> pd.DataFrame:
    """Train one fold (resuming from ``fold<k>_last.pt``; skipped when ``fold<k>.pt`` is finished and
    current). Writes ``fold<k>.pt`` (``{"state_dict", "meta"}``), ``fold<k>_last.pt`` each epoch and
    ``fold<k>_log.csv``. Returns the per-epoch log."""
    with torch_threads(P.seq.cpu_threads, P.torch_device()):
        return _train_fold(P, model_name, inputs, fold, out_dir, force, signature, progress)


def _train_fold(P: Params, model_name: str, inputs: SeqInputs, fold: int, out_dir: Path, force: bool,
                signature: dict | None, progress: TrainingProgress | None = None) -> pd.DataFrame:
    cfg, device = P.seq, P.torch_device()
    signature = signature or _signature(P, model_name, inputs)
    d = ModelDir(out_dir)
    final, last, log_path = d.checkpoint(fold), d.last(fold), d.log(fold)
    if not force and final.is_file() and log_path.is_file():
        meta = torch.load(final, map_location="cpu", weights_only=True)["meta"]
        if meta.get("signature") == signature:
            return pd.read_csv(log_path)
        print(f"{final}: trained with other settings; retraining fold {fold}")
    tr, va = fold_split(inputs, fold)
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"fold {fold}: {len(tr)} training and {len(va)} validation studies; need both")
    arch = seq_arch(P)
    meta = {"model": model_name, "in_dim": inputs.dim, "n_cnn": inputs.n_cnn, "x_channels": inputs.x_channels,
            "arch": arch, "fold": fold, "backbones": inputs.keys, "signature": signature,
            "input_norm": inputs.norm}
    torch.manual_seed(_epoch_seed(P.seed, fold, -1, model_name))
    model = build_seq_model(model_name, inputs.dim, inputs.n_cnn, inputs.x_channels, **arch)
    tr_rows = np.concatenate([inputs.study_rows[s] for s in tr])
    init_output_bias(model, inputs.y[tr_rows].mean(axis=0))
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    history: list[dict] = []
    start, best = 0, (float("inf"), None)
    if not force and last.is_file():
        ck = torch.load(last, map_location=device, weights_only=True)
        if ck["meta"].get("signature") == signature:
            model.load_state_dict(ck["state_dict"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            history, start = list(ck["history"]), ck["epoch"] + 1
            best = (ck["best_wll"], ck["best_state"])
    y_va = inputs.y
    st = inputs.tensors(device)  # pre-assembled once: an epoch's host work is drawing the crops
    progress = progress or TrainingProgress(model_name)
    progress.fold(fold, cfg.epochs, start, best=best[0] if history else None)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        eseed = _epoch_seed(P.seed, fold, epoch, model_name)
        torch.manual_seed(eseed)
        idx, lens = epoch_plan(st, tr, np.random.default_rng(eseed), crop=cfg.crop, subsample_p=cfg.subsample_p,
                               reverse_p=cfg.reverse_p)
        model.train()
        losses = []
        lr = opt.param_groups[0]["lr"]
        starts = range(0, len(idx), cfg.batch)
        for a in progress.batches(starts, total=len(starts)):
            b = st.batch(idx[a:a + cfg.batch], lens[a:a + cfg.batch])
            loss = sum(masked_weighted_bce(lg, b["y"], b["mask"]) for lg in model_logits(model, b))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        p = predict_studies([model], inputs, va, device=device, batch=cfg.batch)
        rows = np.concatenate([inputs.study_rows[s] for s in va])
        wll = weighted_log_loss(y_va[rows], p[rows])
        history.append({"fold": fold, "epoch": epoch, "lr": lr, "train_loss": float(np.mean(losses)),
                        "val_wll": wll, "seconds": time.time() - t0})
        progress.epoch(epoch, float(np.mean(losses)), wll, seconds=history[-1]["seconds"])
        if cfg.select == "best" and wll < best[0]:
            best = (wll, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        save_torch({"state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                    "best_wll": best[0], "best_state": best[1], "meta": meta}, last)
    if not history:
        raise ValueError(f"{last}: nothing trained for fold {fold} (epochs={cfg.epochs})")
    state = best[1] if cfg.select == "best" and best[1] is not None else model.state_dict()
    chosen = min(history, key=lambda h: h["val_wll"]) if cfg.select == "best" else history[-1]
    meta = {**meta, "epoch": chosen["epoch"], "metrics": {"val_wll": chosen["val_wll"]}}
    log = pd.DataFrame(history)
    atomic_write(log_path, lambda t: log.to_csv(t, index=False))
    save_torch({"state_dict": state, "meta": meta}, final)
    return log


def _outputs_current(out_dir: Path, signature: dict) -> bool:
    d = ModelDir(out_dir)
    done = d.done
    if not (done.is_file() and d.oof.is_file() and d.test.is_file()):
        return False
    return json.loads(done.read_text()).get("signature") == signature


def _frame(inputs: SeqInputs, probs: np.ndarray, with_fold: bool) -> pd.DataFrame:
    df = pd.DataFrame({"sop_uid": inputs.sop_uid})
    if with_fold:
        df["fold"] = inputs.fold
    for k, c in enumerate(LABELS):
        df[c] = probs[:, k].astype(np.float64)
    return df


def train_seq(P: Params, model_name: str, force: bool = False, *, fresh: Iterable[int] = ()) -> SeqResult:
    """Train ``seq1`` or ``seq2`` on every catalog fold and write ``work/seq/<model>/{oof,test}.parquet``.

    OOF: each training slice from the fold model that did not see its patient (flip TTA). Test: the mean
    over all fold models and both directions. Finished outputs are reused unless ``force`` (or unless the
    settings changed); an interrupted fold resumes from its last epoch. ``fresh``: folds just trained
    (by :func:`train_side_by_side`), not retrained even with ``force``.
    """
    MODELS.check(model_name)
    with D.main_lock(P.layout.seq(model_name).path, what=f"seq {model_name}"), \
            torch_threads(P.seq.cpu_threads, P.torch_device()):
        return _train_seq(P, model_name, force, set(fresh))


def _fold_current(d: ModelDir, fold: int, signature: dict) -> bool:
    """Whether a fold's final checkpoint and log exist and were trained with ``signature``."""
    final = d.checkpoint(fold)
    if not (final.is_file() and d.log(fold).is_file()):
        return False
    return torch.load(final, map_location="cpu", weights_only=True)["meta"].get("signature") == signature


def train_side_by_side(P: Params, models: list[str], force: bool = False) -> dict[str, list[int]]:
    """``seq.fold_jobs``: train the (model, fold) pairs that need it in up to that many worker processes at
    a time (:mod:`ichdlib.foldjobs`; the models' folders locked meanwhile); returns the folds trained per
    model. :func:`train_seq` then assembles each model's OOF and test tables as usual."""
    tr_in = load_inputs(P, "train", _load_catalog(P))
    check_level2_folds(tr_in)
    folds = sorted(set(tr_in.study_fold().tolist()))
    todo = {(m, k): (P, m, k, force, P.seq.cpu_threads or max(1, resolve_workers(0) // P.seq.fold_jobs))
            for m in models for k in folds
            if force or not _fold_current(P.layout.seq(m), k, _signature(P, m, tr_in))}
    if len(todo) < 2:  # nothing to share out: train_seq trains it here
        return {}
    with contextlib.ExitStack() as locks:
        for m in models:
            P.layout.seq(m).path.mkdir(parents=True, exist_ok=True)
            locks.enter_context(D.main_lock(P.layout.seq(m).path, what=f"seq {m}"))
        run_fold_jobs(fold_job, todo, P.seq.fold_jobs,
                      lambda key: TrainingProgress(key[0], lines_per_fold=0, curve=False),
                      what=f"seq models ({P.seq.fold_jobs} fold jobs)")
    return {m: [k for mm, k in todo if mm == m] for m in models}


def fold_job(P: Params, model_name: str, fold: int, force: bool, threads: int, events: Any) -> int:
    """One (model, fold) of :func:`train_side_by_side` in a worker process: loads the level-2 inputs itself
    (features mapped read-only), trains the fold with ``threads`` torch threads, reports its epochs to
    ``events``; returns the number of epochs logged."""
    tr_in = load_inputs(P, "train", _load_catalog(P))
    with torch_threads(threads, P.torch_device()):
        log = train_fold(P, model_name, tr_in, fold, P.layout.seq(model_name).path, force=force,
                         signature=_signature(P, model_name, tr_in),
                         progress=QueueProgress(model_name, events, key=(model_name, fold)))
    return len(log)


def run_stage(P: Params, force: bool = False) -> StageReport:
    """Stage 04 (:data:`ichdlib.stages.STAGES`): :func:`train_seq` for every model of ``seq.models``; the
    report's ``result`` is ``{model: SeqResult}``. With ``seq.fold_jobs`` > 1 (not under torchrun) the folds
    of all models train side by side first (:func:`train_side_by_side`), with the same results."""
    fresh = train_side_by_side(P, list(P.seq.models), force) if P.seq.fold_jobs > 1 and not D.is_dist() else {}
    results = {m: train_seq(P, m, force=force, fresh=fresh.get(m, ())) for m in P.seq.models}
    rows = [{"model": m, "oof rows": len(r.oof), "test rows": len(r.test), "folder": str(r.out_dir)}
            for m, r in results.items()]
    return StageReport("seq", rows, result=results)


def _train_seq(P: Params, model_name: str, force: bool, fresh: frozenset[int] | set[int] = frozenset()) -> SeqResult:
    d = P.layout.seq(model_name)
    out_dir = d.path
    out_dir.mkdir(parents=True, exist_ok=True)
    cat = _load_catalog(P)
    tr_in = load_inputs(P, "train", cat)
    te_in = load_inputs(P, "test", cat)
    check_level2_folds(tr_in)
    signature = _signature(P, model_name, tr_in)
    test_digest = hashlib.sha256(np.ascontiguousarray(te_in.probs).tobytes()).hexdigest()[:16]
    out_signature = {**signature, "test_inputs": test_digest}
    folds = sorted(set(tr_in.study_fold().tolist()))
    if not force and not fresh and _outputs_current(out_dir, out_signature):
        hist = pd.concat([pd.read_csv(d.log(k)) for k in folds], ignore_index=True)
        return SeqResult(model_name, pd.read_parquet(d.oof), pd.read_parquet(d.test), hist, out_dir)
    with TrainingProgress(model_name, lines_per_fold=0) as progress:
        for k in D.shard_list(folds):  # under torchrun the folds fan out across ranks (all of them alone)
            train_fold(P, model_name, tr_in, k, out_dir, force=force and k not in fresh, signature=signature,
                       progress=progress)
    D.barrier()
    logs = [train_fold(P, model_name, tr_in, k, out_dir, signature=signature) for k in folds]  # read back
    device = P.torch_device()
    models = [load_seq_model(d.checkpoint(k), device)[0] for k in folds]
    oof = np.full((len(tr_in.sop_uid), len(LABELS)), np.nan)
    for k, m in zip(folds, models, strict=True):
        va = fold_split(tr_in, k)[1]
        p = predict_studies([m], tr_in, va, device=device, batch=P.seq.batch)
        rows = np.concatenate([tr_in.study_rows[s] for s in va])
        oof[rows] = p[rows]
    if np.isnan(oof).any():
        raise ValueError(f"{out_dir}: {int(np.isnan(oof).any(axis=1).sum())} training slices got no OOF prediction")
    test = (predict_studies(models, te_in, device=device, batch=P.seq.batch) if len(te_in.sop_uid)
            else np.zeros((0, len(LABELS))))
    oof_df, test_df = _frame(tr_in, oof, True), _frame(te_in, test, False)
    if D.is_main():
        save_parquet(oof_df, d.oof)
        save_parquet(test_df, d.test)
        done = json.dumps({"signature": out_signature, "folds": folds}, indent=1)
        atomic_write(d.done, lambda t: t.write_text(done))
    D.barrier()
    return SeqResult(model_name, oof_df, test_df, pd.concat(logs, ignore_index=True), out_dir)


# ----------------------------------------------------------------------------------------------------
# Notebook helpers
# ----------------------------------------------------------------------------------------------------
def inputs_summary(train: SeqInputs, test: SeqInputs) -> pd.DataFrame:
    """Studies, slices, slices per study, backbones and input widths of both splits."""
    rows = []
    for name, inp in (("train", train), ("test", test)):
        lens = np.array([len(r) for r in inp.study_rows]) if inp.study_rows else np.zeros(1, int)
        rows.append({"split": name, "studies": len(inp.study_rows), "slices": len(inp.sop_uid),
                     "slices/study (min-median-max)": f"{lens.min()}-{int(np.median(lens))}-{lens.max()}",
                     "backbones": ", ".join(inp.keys), "feature width D": inp.dim,
                     "X channels": inp.x_channels})
    return pd.DataFrame(rows).set_index("split")


def plot_history(histories: dict[str, pd.DataFrame]):
    """Training loss and validation weighted log loss (flip TTA) per epoch (1-based): one colour per model, one
    line style per fold, both named in the legend."""

    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    folds: list[int] = []
    for i, h in enumerate(histories.values()):
        for j, (fold, g) in enumerate(h.groupby("fold")):
            kw = {"color": f"C{i}", "alpha": 0.85, "lw": 1.2, "ls": styles[j % len(styles)]}
            axes[0].plot(g.epoch + 1, g.train_loss, **kw)
            axes[1].plot(g.epoch + 1, g.val_wll, **kw)
            if int(fold) not in folds:
                folds.append(int(fold))
    axes[0].set(title="training loss (both heads for seq2)", ylabel="weighted BCE (training batches)")
    axes[1].set(title="validation weighted log loss (flip TTA)", ylabel="weighted log loss (OOF fold)")
    handles = [Line2D([], [], color=f"C{i}", lw=2, label=name) for i, name in enumerate(histories)]
    handles += [Line2D([], [], color="grey", ls=styles[j % len(styles)], label=f"fold {f}")
                for j, f in enumerate(sorted(folds))]
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(handles=handles, fontsize=8, ncols=2)
    fig.tight_layout()
    return fig


def plot_studies(inputs: SeqInputs, preds: dict[str, pd.DataFrame], n: int = 3, label: str = "any"):
    """``label`` probability along the slices of the ``n`` training studies with the most positive slices:
    the truth, the backbones' mean and each model's OOF prediction."""

    k = LABELS.index(label)
    pos = [float(inputs.y[r, k].sum()) for r in inputs.study_rows]
    chosen = np.argsort(pos)[::-1][:n]
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.2), squeeze=False)
    for ax, s in zip(axes[0], chosen, strict=True):
        rows = inputs.study_rows[s]
        x = np.arange(1, len(rows) + 1)  # slices numbered 1..n, as in notebooks 01 and 06
        ax.fill_between(x, inputs.y[rows, k], step="mid", color="0.85", label="truth")
        ax.plot(x, inputs.probs[rows, :, k].mean(1), "k--", lw=1, label="2D CNN (mean)")
        for name, df in preds.items():
            ax.plot(x, df[label].to_numpy()[rows], lw=1.4, label=name)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("slice (1..n in z order)")
        ax.set_title(f"study {short_uid(inputs.study_uid[rows[0]])}", fontsize=9)
    axes[0, 0].set_ylabel(f"P({label})")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def oof_comparison(P: Params, results: dict[str, SeqResult]) -> pd.DataFrame:
    """OOF weighted log loss of each 2D backbone (its OOF as fed to this stage) and each sequence model."""

    cat = _load_catalog(P)
    y = cat[cat["split"] == "train"].set_index("sop_uid")[list(LABELS)].astype(float)
    rows = []
    for key in backbone_keys(P):
        oof = load_stage(P, f"cnn:{key}").oof
        rows.append({"stage": f"cnn:{key}", "oof_wll": weighted_log_loss(y.to_numpy(), oof.loc[y.index, list(LABELS)])})
    for name, r in results.items():
        oof = r.oof.set_index("sop_uid")
        rows.append({"stage": name, "oof_wll": weighted_log_loss(y.to_numpy(), oof.loc[y.index, list(LABELS)])})
    t = pd.DataFrame(rows).set_index("stage")
    t["vs best 2D"] = t["oof_wll"] / t.loc[[i for i in t.index if i.startswith("cnn:")], "oof_wll"].min()
    return t
