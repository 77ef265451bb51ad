"""Building a bundle's members: a finished run's checkpoints (or untrained models of its architectures), read
by the one checkpoint loader, and the manifest that describes them (see :mod:`ichdlib.serve.bundle`)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ichdlib.checkpoints import build_model, read_checkpoint
from ichdlib.cnn.models import build_cnn
from ichdlib.config import Params
from ichdlib.ensemble.optional import blended_members
from ichdlib.labels import LABELS
from ichdlib.layout import ModelDir
from ichdlib.predictions import resolve_members, stage_files
from ichdlib.seq.inputs import backbone_keys, seq_arch
from ichdlib.seq.models import build_seq_model
from ichdlib.serve.bundle_schema import FORMAT, FORMAT_VERSION, BundleError
from ichdlib.serve.inplane import inplane_section
from ichdlib.serve.operating import internal_oof_studies, operating_points
from ichdlib.spec import ModelSpec, VolumeSpec
from ichdlib.windows import WINDOWS


def _jsonable(obj: Any) -> Any:
    """Checkpoint meta -> plain JSON (tuples as lists, numpy/torch scalars as numbers, paths as text)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalar
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (recorded in the manifest, compared at load)."""

    out = {"python": platform.python_version()}
    for name in ("ichdlib", "torch", "timm", "numpy", "pydicom", "safetensors", "opencv-python-headless"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fold_files(folder: Path) -> dict[int, Path]:
    """``fold<k>.pt`` files of a stage folder (:meth:`ichdlib.layout.ModelDir.folds`)."""
    d = ModelDir(folder)
    return {k: d.checkpoint(k) for k in d.folds()}


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        return read_checkpoint(path)
    except (ValueError, FileNotFoundError) as exc:
        raise BundleError(str(exc)) from exc


@dataclass
class Member:
    """One trained stage: a 2D backbone or a sequence model, with one model per fold."""

    kind: str  # "cnn" | "seq" | "cnn3d"
    key: str  # backbone key (``BackboneCfg.key``) or sequence model name
    folds: list[int]
    metas: list[dict[str, Any]]
    states: list[dict[str, torch.Tensor]]
    models: list[torch.nn.Module] = field(default_factory=list)

    def build(self, device: str) -> list[torch.nn.Module]:
        """The fold models in eval mode on ``device``, each carrying ``.spec`` (built once by the one loader,
        :func:`ichdlib.checkpoints.build_model`; moved when the device changes)."""
        if not self.models:
            self.models = [build_model(m, s, device) for m, s in zip(self.metas, self.states, strict=True)]
        else:
            self.models = [m.to(device) for m in self.models]
        return self.models


def collect_run(P: Params) -> tuple[dict[str, Any], dict[str, Member], dict[str, Member], dict[str, Member]]:
    """A finished run's checkpoints, recipe and blend as ``(manifest, cnn members, seq members, cnn3d member)``
    (nothing is written; :meth:`ichdlib.serve.bundle.Bundle.from_run`). The 3D member is in the bundle whenever
    the run trained one (``cnn3d.enabled``); the blend weights say whether it counts."""

    L = P.layout
    seq_keys = backbone_keys(P)
    members = list(P.ensemble.members)
    want_cnn = list(seq_keys)
    for m in members:
        if m.startswith("cnn:"):
            name = m[4:]
            for k in ([b.key for b in P.cnn.backbones] if name == "*" else [name]):
                if k not in want_cnn:
                    want_cnn.append(k)
    by_key = {b.key: b for b in P.cnn.backbones}
    cnn: dict[str, Member] = {}
    for key in want_cnn:
        if key not in by_key:
            raise BundleError(f"backbone {key!r} is not among cnn.backbones ({', '.join(by_key)})")
        cnn[key] = _collect(L.cnn(key).path, "cnn", key, P.cnn.folds, "run notebook 02 (2D CNN) first")
    seq: dict[str, Member] = {}
    seq_models = [m for m in members if not m.startswith("cnn:") and m != "cnn3d"]
    for name in seq_models:
        seq[name] = _collect(L.seq(name).path, "seq", name, "all", "run notebook 04 (sequence models) first")
        used = seq[name].metas[0].get("backbones")
        if used is not None and list(used) != seq_keys:
            raise BundleError(f"{L.seq(name).path}: trained on backbones {used}, but the params name "
                              f"{seq_keys}; rerun notebook 04")
    cnn3d: dict[str, Member] = {}
    if P.cnn3d.enabled:
        cnn3d["cnn3d"] = _collect(L.cnn3d(P.cnn3d.key).path, "cnn3d", "cnn3d", P.cnn3d.folds,
                                  "run notebook 02b (3D CNN) first")
    manifest = _manifest(P, cnn, seq, seq_keys, cnn3d=cnn3d)
    manifest["training"] = training_section(P)
    manifest["operating_point"] = operating_point_section(P, manifest["ensemble"]["weights"])
    return manifest, cnn, seq, cnn3d


def untrained_members(P: Params, folds: int | None = None
                      ) -> tuple[dict[str, Any], dict[str, Member], dict[str, Member], dict[str, Member]]:
    """``(manifest, cnn members, seq members, cnn3d member)`` of randomly initialised models with the architectures, sizes and folds of ``P`` (every backbone,
    every sequence model, an equal-weight blend): for timing and smoke checks, never for predictions."""
    n_folds = folds or (len(P.cnn.folds) if P.cnn.folds != "all" else P.ingest.folds)
    torch.manual_seed(P.seed)
    cnn: dict[str, Member] = {}
    for cfg in P.cnn.backbones:
        metas, states = [], []
        for k in range(n_folds):
            model = build_cnn(cfg.name, learnable_window=P.windows.recipe if P.windows.learnable else None,
                              recipe=P.windows.recipe, single_window=tuple(P.windows.single_window))
            states.append(model.state_dict())
            metas.append({"spec": ModelSpec.from_params(P, cfg, model.feature_dim).to_dict(), "key": cfg.key,
                          "fold": k, "config": {"cache_size": cfg.size}, "untrained": True})
        cnn[cfg.key] = Member("cnn", cfg.key, list(range(n_folds)), metas, states)
    keys = backbone_keys(P)
    dims = [ModelSpec.from_meta(cnn[k].metas[0]).feature_dim for k in keys]
    arch = seq_arch(P)  # the same architecture notebook 04 trains (slice_input, residual included)
    seq: dict[str, Member] = {}
    for name in P.seq.models:
        meta = {"model": name, "in_dim": max(dims), "n_cnn": len(keys), "x_channels": 2 * len(keys) + 2,
                "arch": arch, "backbones": keys, "untrained": True}
        states = [build_seq_model(name, meta["in_dim"], meta["n_cnn"], meta["x_channels"], **arch).state_dict()
                  for _ in range(n_folds)]
        seq[name] = Member("seq", name, list(range(n_folds)), [dict(meta, fold=k) for k in range(n_folds)], states)
    cnn3d: dict[str, Member] = {}
    if P.cnn3d.enabled:
        spec3 = VolumeSpec.from_params(P)
        states = [build_model(spec3).state_dict() for _ in range(n_folds)]
        metas = [{"spec": spec3.to_dict(), "key": spec3.key, "fold": k, "untrained": True} for k in range(n_folds)]
        cnn3d["cnn3d"] = Member("cnn3d", "cnn3d", list(range(n_folds)), metas, states)
    members = (list(P.seq.models) or [f"cnn:{k}" for k in cnn]) + list(cnn3d)
    ensemble = {"method": "mean", "members": members, "weights": {m: 1.0 / len(members) for m in members},
                "sources": {m: "features" if m.startswith("cnn:") else "cnn3d" if m == "cnn3d" else "seq"
                            for m in members}}
    manifest = _manifest(P, cnn, seq, keys, ensemble, cnn3d)
    return manifest, cnn, seq, cnn3d


def _collect(folder: Path, kind: str, key: str, folds: Any, advice: str) -> Member:
    files = _fold_files(folder)
    if folds != "all":
        missing = [k for k in folds if k not in files]
        if missing:
            raise BundleError(f"{folder}: no checkpoint for fold(s) {missing}; {advice}")
        files = {k: files[k] for k in folds}
    if not files:
        raise BundleError(f"{folder}: no fold<k>.pt checkpoints; {advice}")
    states, metas = [], []
    for path in files.values():
        state, meta = _read_checkpoint(path)
        states.append(state)
        metas.append(_jsonable(meta))
    return Member(kind, key, list(files), metas, states)


def _manifest(P: Params, cnn: dict[str, Member], seq: dict[str, Member], seq_keys: list[str],
              ensemble: dict[str, Any] | None = None, cnn3d: dict[str, Member] | None = None) -> dict[str, Any]:

    backbones = []
    for key, m in cnn.items():
        meta = m.metas[0]
        spec = ModelSpec.from_meta(meta)
        dim = spec.feature_dim
        if dim is None:  # older checkpoints: build one model to read it
            dim = m.build("cpu")[0].feature_dim
            m.models = []
        size = spec.size
        backbones.append({"key": key, "name": spec.name, "size": size, "spec": spec.with_feature_dim(dim).to_dict(),
                          "cache_size": int(meta.get("config", {}).get("cache_size", size)),
                          "folds": m.folds, "feature_dim": int(dim), "metas": m.metas})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "run": P.run,
        "labels": list(LABELS),
        "windows": {"recipe": P.windows.recipe, "single_window": list(P.windows.single_window),
                    "learnable": P.windows.learnable, "presets": {k: list(v) for k, v in WINDOWS.items()}},
        "val_center_crop": float(P.cnn.augment.val_center_crop),
        "tta": int(P.features.tta),
        "backbones": backbones,
        "seq": {"backbones": seq_keys,
                "models": [{"key": k, "folds": m.folds, "metas": m.metas} for k, m in seq.items()]},
        "cnn3d": [{"key": k, "size": VolumeSpec.from_meta(m.metas[0]).size, "spec": m.metas[0]["spec"],
                   "folds": m.folds, "metas": m.metas} for k, m in (cnn3d or {}).items()],
        "ensemble": ensemble or ensemble_spec(P),
        "params": {**json.loads(json.dumps(P.model_dump(mode="json"))), "root": None},  # a bundle travels
        "versions": library_versions(),
    }


def training_section(P: Params) -> dict[str, Any] | None:
    """``training``: the training studies' slice thickness (the median over studies of their z spacing: RSNA
    files carry no SliceThickness and their slices are contiguous), z spacing, pixel spacing and in-plane field of
    view (``inplane``, :func:`ichdlib.serve.inplane.inplane_section`)."""
    try:
        cat = pd.read_parquet(P.layout.catalog, columns=["study_uid", "split", "spacing_z", "pixel_spacing"])
    except (OSError, ValueError, KeyError):
        return None
    train = cat[cat["split"] == "train"].groupby("study_uid")[["spacing_z", "pixel_spacing"]].median()
    dz = pd.to_numeric(train["spacing_z"], errors="coerce").dropna()
    dz = dz[dz > 0]
    if dz.empty:
        return None
    ps = pd.to_numeric(train["pixel_spacing"], errors="coerce").dropna()
    out = {"slice_thickness_mm": round(float(dz.median()), 3), "spacing_z_mm": round(float(dz.median()), 3),
           "pixel_spacing_mm": round(float(ps.median()), 4) if len(ps) else None, "n_studies": int(len(dz)),
           "source": "median z spacing of the training studies (the catalog)"}
    try:  # the in-plane field of view (ichdlib.serve.inplane); a catalog without rows/cols leaves it out
        inplane = inplane_section(pd.read_parquet(P.layout.catalog, columns=[
            "study_uid", "split", "pixel_spacing", "rows", "cols"]))
    except (OSError, ValueError, KeyError):
        inplane = None
    if inplane is not None:
        out["inplane"] = inplane
    return out


def operating_point_section(P: Params, weights: dict[str, float]) -> dict[str, Any]:
    """``operating_point``: thresholds by ``P.ensemble.operating_point`` on the internal OOF study-level
    predictions (:mod:`ichdlib.serve.operating`)."""
    try:
        y, p = internal_oof_studies(P, weights)
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{P.layout.work}: cannot choose the operating point on the out-of-fold predictions "
                          f"({type(exc).__name__}: {exc}); run notebooks 02-05 first") from exc
    return operating_points(y, p, P.ensemble.operating_point)


def ensemble_spec(P: Params) -> dict[str, Any]:
    """Blend method, members and weights: equal for ``mean``; for ``fit`` the weights notebook 05 fitted
    (``reports/<run>/metrics.json``, ``submission.weights``)."""

    members = blended_members(P, resolve_members(P))  # the 3D member when notebook 05 took it
    # which table notebook 05 blended for each 2D member: notebook 03's TTA probabilities ("features") or
    # notebook 02's validation-view probabilities ("cnn")
    sources = {m: ("cnn3d" if m == "cnn3d" else "seq" if not m.startswith("cnn:")
                   else stage_files(P, m)[1].parent.parent.name) for m in members}
    if P.ensemble.method == "mean":
        weights = {m: 1.0 / len(members) for m in members}
    else:
        path = P.layout.metrics
        sub = json.loads(path.read_text()).get("submission", {}) if path.is_file() else {}
        weights = sub.get("weights") or {}
        if sorted(weights) != sorted(members) or sub.get("method") != P.ensemble.method:
            raise BundleError(f"{path}: no fitted ensemble weights for members {members}; run notebook 05 "
                              "(ensemble) first")
        weights = {m: float(weights[m]) for m in members}
    return {"method": P.ensemble.method, "members": members, "weights": weights, "sources": sources}
