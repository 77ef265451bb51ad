"""Pooled per-slice features and TTA probabilities from the fold models (notebook 03).

``extract_features(P, backbone_cfg)`` writes ``work/<run>/features/<key>/``:

- ``oof_feat.npy`` / ``test_feat.npy``: float16 ``(n_split_rows, D)`` aligned with
  ``catalog[catalog.split == split]`` in catalog order;
- ``oof_prob.parquet`` / ``test_prob.parquet``: ``sop_uid`` + six probabilities, same order;
- ``test_prob_folds.npy``: float64 ``(n_folds, n_test_rows, 6)``, each fold model's test probabilities
  (``test_prob`` is their mean), for the sequence stage's per-fold input normalisation;
- ``meta.json``: backbone, feature size, TTA views, folds.

Training rows come from the fold model that did not see them; test rows are the mean over fold models.
Each row is the mean over ``features.tta`` deterministic views (validation view, h-flip, slice-order swap,
both, then seeded random crops), so the arrays are identical on every run. Per-fold parts are kept until
the split arrays are written, so an interrupted extraction resumes at the next fold. Outputs made with
other settings or older fold models are recomputed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA

from ichdlib.cnn import distributed as D
from ichdlib.cnn.data import SliceDataset, TtaView
from ichdlib.cnn.infer import eval_augment, feature_views, fold_feature_mean, predict_sharded, probs_frame
from ichdlib.cnn.models import load_cnn
from ichdlib.cnn.train import _load_inputs, cnn_dir
from ichdlib.config import BackboneCfg, Params
from ichdlib.files import atomic_write, save_parquet
from ichdlib.ingest.native import open_slices
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS
from ichdlib.layout import FeaturesDir, ModelDir
from ichdlib.metrics import prior_baseline, weighted_log_loss
from ichdlib.runtime import amp_mode, cpu_threads, prepare_model
from ichdlib.stages import StageReport


def features_dir(P: Params, cfg: BackboneCfg) -> Path:
    """``work/<run>/features/<key>`` (:meth:`ichdlib.layout.RunLayout.features`)."""
    return P.layout.features(cfg.key).path


def _save_npy(arr: np.ndarray, path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    return atomic_write(path, write)


def extract_features(P: Params, backbone_cfg: BackboneCfg, force: bool = False, *,
                     catalog: pd.DataFrame | None = None, cache: np.ndarray | None = None) -> dict[str, Any]:
    """Features and TTA probabilities of every catalog slice for one backbone; returns a summary with the
    paths, the feature size, ``oof_wll`` of the TTA probabilities and per-fold timing. Skipped (summary
    read back) when the outputs exist with the same settings, unless ``force``."""
    t0 = time.perf_counter()
    if cache is None:  # the cache at the backbone's size, or the DICOM files above ingest.size (512 px)

        catalog = load_catalog(P.layout.work) if catalog is None else catalog
        cache = open_slices(P, backbone_cfg.size, catalog)
    cat, cache = _load_inputs(P, backbone_cfg, catalog, cache)
    out = features_dir(P, backbone_cfg)
    src = cnn_dir(P, backbone_cfg)
    train_cat = cat[cat["split"] == "train"]
    test_cat = cat[cat["split"] == "test"]
    folds = sorted(int(f) for f in train_cat["fold"].unique())
    models = ModelDir(src)
    missing = [k for k in folds if not models.checkpoint(k).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: no model for folds {missing} (fold<k>.pt); run notebook 02 "
                                f"(train_cnn) for backbone {backbone_cfg.key!r} on every fold first")
    views = feature_views(P)
    settings: Any = {"key": backbone_cfg.key, "tta": P.features.tta, "views": [asdict(v) for v in views],
                     "folds": folds, "n_train": len(train_cat), "n_test": len(test_cat),
                     "models": {k: models.checkpoint(k).stat().st_mtime_ns for k in folds}}
    meta_path = FeaturesDir(out).meta
    settings = json.loads(json.dumps(settings))
    stale = False
    if not force and all(f.is_file() for f in FeaturesDir(out).outputs()):
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            return {**meta["summary"], "status": "skipped"}
        stale = True
        print(f"{out}: made with other settings or older fold models; recomputing")
    with D.main_lock(out, what=f"features {backbone_cfg.key}"):  # rank 0 holds it for all ranks
        return _extract(P, backbone_cfg, cat, cache, out, src, train_cat, test_cat, folds, views, settings,
                        force or stale, t0)


def _extract(P: Params, backbone_cfg: BackboneCfg, cat: pd.DataFrame, cache: Any, out: Path, src: Path,
             train_cat: pd.DataFrame, test_cat: pd.DataFrame, folds: list[int], views: list[TtaView],
             settings: Any, clear: bool, t0: float) -> dict[str, Any]:
    fd = FeaturesDir(out)
    meta_path = fd.meta
    if clear and D.is_main():
        for f in fd.outputs():
            f.unlink(missing_ok=True)
        for p in fd.parts():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    D.barrier()

    ds_test = SliceDataset.from_catalog(test_cat, cache, labels=False)
    timing: dict[int, float] = {}
    with cpu_threads(P):
        for k in folds:
            timing.update(_fold_part(P, k, out, src, train_cat, ds_test, cache, views))
    if not D.is_main():  # under torchrun: rank 0 assembles and writes; the others get its summary
        return D.broadcast_object(None)

    # assemble in catalog order, streaming: one fold part's array in memory at a time
    dim, oof_prob, test_folds = assemble_parts(out, folds, train_cat["fold"].to_numpy(), len(test_cat))
    test_prob = test_folds.mean(axis=0)
    _save_npy(test_folds, fd.test_prob_folds)
    save_parquet(probs_frame(train_cat["sop_uid"], oof_prob), fd.oof_prob)
    save_parquet(probs_frame(test_cat["sop_uid"], test_prob.reshape(len(test_cat), len(LABELS))),
                 fd.test_prob)

    y = train_cat[list(LABELS)].to_numpy(dtype=np.float64)
    summary = {
        "key": backbone_cfg.key, "dir": str(out), "dim": dim, "tta": P.features.tta,
        "n_train": len(train_cat), "n_test": len(test_cat), "folds": folds,
        "oof_wll": weighted_log_loss(y, oof_prob),
        "prior_wll": weighted_log_loss(y, prior_baseline(y, len(y))),
        "fold_seconds": timing, "seconds": round(time.perf_counter() - t0, 1), "status": "computed",
    }
    atomic_write(meta_path, lambda t: t.write_text(json.dumps({"settings": settings, "summary": summary},
                                                              indent=1, default=str)))
    for k in folds:
        fd.part(k).unlink(missing_ok=True)
    return D.broadcast_object(summary)


def extract_all(P: Params, force: bool = False) -> list[dict[str, Any]]:
    """:func:`extract_features` for every backbone in ``P.cnn.backbones``."""
    return [extract_features(P, cfg, force=force) for cfg in P.cnn.backbones]


def run_stage(P: Params, force: bool = False, *, backbones: list[BackboneCfg] | None = None) -> StageReport:
    """Stage 03 (:data:`ichdlib.stages.STAGES`): :func:`extract_features` for ``backbones`` (default every
    one of ``cnn.backbones``); the report's ``result`` is the list of their summaries."""
    summaries = [extract_features(P, b, force=force) for b in (backbones or P.cnn.backbones)]
    rows = [{"backbone": s["key"], "status": s["status"], "dim": s["dim"], "TTA views": s["tta"],
             "oof wLL (TTA)": s["oof_wll"], "seconds": s["seconds"]} for s in summaries]
    return StageReport("features", rows, result=summaries)


def load_features(P: Params, cfg: BackboneCfg, split: str = "oof") -> tuple[np.ndarray, pd.DataFrame]:
    """``(features float16 (n, D), probabilities frame)`` of ``split`` (``oof`` or ``test``)."""
    d = P.layout.features(cfg.key)
    feat_path, prob_path = (d.oof_feat, d.oof_prob) if split == "oof" else (d.test_feat, d.test_prob)
    feat = np.load(feat_path, mmap_mode="r")
    return feat, pd.read_parquet(prob_path)


def feature_sample(feat: np.ndarray, y: np.ndarray, n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random rows (sorted) of a (memory-mapped) feature array as float32, and the same rows of ``y``:
    what a plot needs at full size (20,000 x 2048 float32 = 164 MB instead of 6 GB)."""
    idx = sample_rows(len(feat), n, seed)
    return np.asarray(feat[idx], dtype=np.float32), np.asarray(y)[idx]


def plot_feature_map(feat: np.ndarray, y_any: np.ndarray, title: str = "", max_points: int = 20000,
                     seed: int = 0) -> Any:
    """The OOF features in the plane of their first two principal components, coloured by ``any``; PCA on
    at most ``max_points`` random rows (:func:`feature_sample`), so a memory-mapped full-size array is fine."""

    feat, y_any = feature_sample(feat, y_any, max_points, seed)
    xy = PCA(n_components=2, random_state=0).fit_transform(feat)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    neg = y_any < 0.5
    ax.scatter(xy[neg, 0], xy[neg, 1], s=4, alpha=0.4, label="no hemorrhage")
    ax.scatter(xy[~neg, 0], xy[~neg, 1], s=6, alpha=0.7, label="any hemorrhage")
    ax.set(xlabel="PC 1", ylabel="PC 2", title=title or "pooled CNN features (PCA)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_study_trace(cat: pd.DataFrame, prob: pd.DataFrame, study_uid: str, label: str = "any") -> Any:
    """Predicted probability of ``label`` along z for one study of the training split, beside the truth."""

    train = cat[cat["split"] == "train"].reset_index(drop=True)
    sel = (train["study_uid"] == study_uid).to_numpy()
    if not sel.any():
        raise ValueError(f"study {study_uid!r} is not in the training split")
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.step(train.loc[sel, "slice_index"], train.loc[sel, label], where="mid", label="truth")
    ax.plot(train.loc[sel, "slice_index"], prob.loc[sel, label], marker=".", label="CNN (OOF, TTA)")
    ax.set(xlabel="slice index (z order)", ylabel=f"p({label})", ylim=(-0.05, 1.05),
           title=f"study {study_uid}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fold_part(P: Params, k: int, out: Path, src: Path, train_cat: pd.DataFrame, ds_test: SliceDataset,
               cache: np.ndarray, views: list) -> dict[int, float]:
    """Fold ``k``'s model over its validation rows and the test rows -> ``part_fold<k>.npz``; returns
    ``{k: seconds}`` (empty when the part exists)."""
    part = FeaturesDir(out).part(k)
    if part.is_file():
        return {}
    t0 = time.perf_counter()
    device = P.torch_device()
    model, meta = load_cnn(ModelDir(src).checkpoint(k), device)
    model, runner = prepare_model(model, P, device)
    aug = eval_augment(P, meta)
    cl = torch.device(device).type == "cuda" and P.cnn.channels_last
    run = dict(batch=P.features.batch, device=device, amp=amp_mode(P, device),
               num_workers=P.cnn.num_workers, pooled=True, views=views, channels_last=cl)
    va = SliceDataset.from_catalog(train_cat[train_cat["fold"] == k], cache)
    # under torchrun each rank predicts a block of the rows; rank 0 gathers them in order and writes
    p_va, f_va = predict_sharded(runner, aug, va, desc=f"fold {k} oof", to_all=False, **run)
    p_te, f_te = predict_sharded(runner, aug, ds_test, desc=f"fold {k} test", to_all=False, **run)
    if not D.is_main():
        D.barrier()
        return {}
    empty = np.zeros((0, model.feature_dim), np.float16)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, f_va=empty if f_va is None else f_va.astype(np.float16), p_va=p_va,
                     f_te=empty if f_te is None else f_te.astype(np.float16), p_te=p_te)

    atomic_write(part, write)
    D.barrier()
    return {k: round(time.perf_counter() - t0, 2)}


def _part_array(out: Path, k: int, name: str) -> np.ndarray:
    """One array of fold ``k``'s part (only that member is read)."""
    with np.load(FeaturesDir(out).part(k)) as z:
        return z[name]


def _new_npy(path: Path, shape: tuple[int, ...], dtype: Any) -> None:
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del mm


def assemble_parts(out: Path, folds: list[int], fold_of: np.ndarray,
                   n_test: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Fold parts ``part_fold<k>.npz`` -> ``oof_feat.npy`` and ``test_feat.npy`` in ``out``, streaming.

    OOF features go into a float16 ``.npy`` fold by fold (rows where ``fold_of == k``, through a memmap
    opened per fold, so its written pages leave memory with it); the test features are the fold mean,
    summed in float32. Memory holds one fold part's array and the test sum (``n_test x D`` float32: 1 GB
    at RSNA's size with D = 2048). Both files appear under their final names only when complete.
    Returns ``(dim, oof_prob (n_train, 6), test_folds (n_folds, n_test, 6))``.
    """
    fold_of = np.asarray(fold_of)
    dim = int(_part_array(out, folds[0], "f_va").shape[1])
    oof_prob = np.zeros((len(fold_of), len(LABELS)), dtype=np.float64)

    def fill_oof(tmp: Path) -> None:
        _new_npy(tmp, (len(fold_of), dim), np.float16)
        for k in folds:
            sel = np.flatnonzero(fold_of == k)
            f_va = _part_array(out, k, "f_va")
            if len(sel) != len(f_va) or (len(f_va) and f_va.shape[1] != dim):
                raise ValueError(f"{FeaturesDir(out).part(k)} does not match the catalog "
                                 f"({len(f_va)} rows for {len(sel)} fold-{k} slices); pass force=True")
            mm = np.load(tmp, mmap_mode="r+")
            mm[sel] = f_va
            del mm, f_va  # unmapped: the written pages are the page cache's, not this process's
            oof_prob[sel] = _part_array(out, k, "p_va")

    atomic_write(FeaturesDir(out).oof_feat, fill_oof)
    test_folds = np.stack([_part_array(out, k, "p_te").reshape(n_test, len(LABELS)) for k in folds])

    def test_parts():
        for k in folds:
            f_te = _part_array(out, k, "f_te").reshape(n_test, -1)
            if f_te.shape[1] != dim and n_test:
                raise ValueError(f"{FeaturesDir(out).part(k)}: test features of width {f_te.shape[1]}, not {dim}")
            yield f_te

    acc = fold_feature_mean(test_parts()).reshape(n_test, dim)

    def fill_test(tmp: Path) -> None:
        _new_npy(tmp, (n_test, dim), np.float16)
        mm = np.load(tmp, mmap_mode="r+")
        mm[:] = acc
        del mm

    atomic_write(FeaturesDir(out).test_feat, fill_test)
    return dim, oof_prob, test_folds


def sample_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    """``min(n, k)`` row indices drawn without replacement, sorted (memmap reads stay sequential)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
