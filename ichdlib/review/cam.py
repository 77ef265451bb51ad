"""Class activation maps for the trained 2D CNNs, brought back to each slice's own geometry.

The maps come from pytorch-grad-cam (``GradCAM``, ``GradCAMPlusPlus``, ``HiResCAM``), one map per class per
slice, computed in batches over a study with the library's context-manager form so that its hooks are always
released. The target layer is chosen per backbone family (DenseNet ``features.norm5``, ResNet / SE-ResNeXt
``layer4``), or else found by a forward-hook probe: the last module with a 4-D output before global pooling.

Geometry: the network sees the validation preprocessing of a cached HU stack (centre crop, resize to the
model size, windows). :func:`undo_geometry` inverts it, so a map overlays the slice at its own rows x cols
(zero outside the crop the network never saw).

Notebook 06 uses :class:`CamEngine` (CAMs for catalog slices from a run's fold models),
:func:`review_table` / :func:`select_cases` (which slices to look at), :func:`gallery_figure`, and
:func:`pointing_game_run` (CAM peak inside the phantom's lesion masks, written to ``metrics.json``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ichdlib.labels import LABELS
from ichdlib.spec import ModelSpec
from ichdlib.windows import WINDOWS

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ichdlib.config import Params

log = logging.getLogger(__name__)

#: ``cam.method`` -> pytorch-grad-cam class name.
METHODS: dict[str, str] = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM"}
#: Target layers by backbone family, tried in order (matched as a dotted-name suffix, so wrapped models work).
FAMILY_LAYERS: tuple[str, ...] = ("features.norm5", "layer4")
#: The usual pointing-game tolerance (Zhang et al. 2016): 15 px at 224 px, as a fraction of the image side.
STANDARD_TOLERANCE: float = 15 / 224
#: Lesion outline colour in overlays.
OUTLINE_RGB: tuple[int, int, int] = (255, 0, 255)
#: Review groups: confident true positives, worst false positives, worst false negatives.
GROUPS: tuple[str, ...] = ("tp", "fp", "fn")


# --------------------------------------------------------------------------------------------------
# Target layer and hooks
# --------------------------------------------------------------------------------------------------
def cam_class(method: str) -> type:
    """The pytorch-grad-cam class for ``method`` (``gradcam``, ``gradcam++`` or ``hirescam``)."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, METHODS[method])


def _input_channels(model: nn.Module) -> int:
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def spatial_outputs(model: nn.Module, size: int = 128) -> list[tuple[str, tuple[int, int]]]:
    """``(module name, (h, w))`` of every module with a 4-D output, in completion order, for one dummy
    ``size`` x ``size`` input (forward hooks, all removed before returning; the model's mode is kept)."""
    import torch

    events: list[tuple[str, tuple[int, int]]] = []

    def record(name: str, _m: Any, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            events.append((name, (int(out.shape[-2]), int(out.shape[-1]))))

    handles = [m.register_forward_hook(partial(record, name)) for name, m in model.named_modules() if name]
    was_training = model.training
    try:
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, _input_channels(model), size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return events


def probe_target_layer(model: nn.Module, size: int = 128) -> tuple[str, nn.Module]:
    """The last module with a 4-D spatial output before global pooling, found with forward hooks.

    Modules report in completion order; once global pooling has run nothing spatial follows, so the last
    spatial output is the trunk's (squeeze-excite pools inside blocks are followed by spatial outputs again).
    Containers finish after their children, so for ``blocks -> global_pool`` this returns ``blocks``.
    """
    spatial = [name for name, (h, w) in spatial_outputs(model, size) if h * w > 1]
    if not spatial:
        raise ValueError(f"{type(model).__name__}: found no module with a 4-D spatial output; "
                         "pass target_layer= explicitly")
    return spatial[-1], model.get_submodule(spatial[-1])


def _feature_stages(model: nn.Module) -> list[str]:
    """Full names of a timm backbone's feature stages (``feature_info``), shallow to deep; [] if none."""
    for prefix, m in model.named_modules():
        info = getattr(m, "feature_info", None)
        if isinstance(info, list) and info and isinstance(info[0], dict) and "module" in info[0]:
            return [f"{prefix}.{f['module']}" if prefix else f["module"] for f in info]
    return []


def find_target_layer(model: nn.Module, name: str | None = None, size: int | None = None,
                      min_map: int = 0) -> tuple[str, nn.Module]:
    """The layer whose activations the CAM uses.

    ``name`` if given; else by backbone family (DenseNet ``features.norm5``, ResNet / SE-ResNeXt ``layer4``),
    else the last spatial module before global pooling (:func:`probe_target_layer`). With ``min_map`` and
    the input ``size``: when that layer's map is coarser than ``min_map`` x ``min_map`` at this input size
    (e.g. ``layer4`` gives 3 x 3 at 96 px), the deepest earlier timm feature stage (``feature_info``) whose
    map is at least that fine is used instead (``layer3``, 6 x 6): a peak on a 3 x 3 grid cannot point at a
    lesion covering 1% of the slice.
    """
    named = dict(model.named_modules())
    if name:
        if name not in named:
            raise ValueError(f"{type(model).__name__} has no module {name!r} (cam.target_layer)")
        return name, named[name]
    chosen: str | None = None
    for suffix in FAMILY_LAYERS:
        hits = [n for n in named if n == suffix or n.endswith("." + suffix)]
        if hits:
            chosen = hits[-1]
            break
    if chosen is None:
        chosen = probe_target_layer(model, size or 128)[0]
    if min_map and size:
        shapes = dict(spatial_outputs(model, size))
        if chosen in shapes and min(shapes[chosen]) < min_map:
            finer = [n for n in _feature_stages(model) if n in shapes and n != chosen and min(shapes[n]) >= min_map]
            if finer:
                chosen = finer[-1]
            else:
                log.info("CAM layer %s gives a %s map; no earlier timm stage is finer", chosen, shapes[chosen])
    return chosen, named[chosen]


def count_hooks(model: nn.Module) -> int:
    """Number of module hooks registered anywhere in ``model`` (forward, pre-forward and backward)."""
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, a, {})) for m in model.modules() for a in attrs)


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------
def preprocess(
    stack_hu: np.ndarray | torch.Tensor,
    size: int,
    crop: float = 0.8,
    recipe: str = "seed_3window",
    single_window: tuple[float, float] = WINDOWS["brain"],
    learnable: bool = False,
) -> torch.Tensor:
    """Validation input of the 2D CNN: ``(B, 3, H, W)`` HU (s-1, s, s+1) -> ``(B, 3, size, size)`` float.

    :func:`ichdlib.cnn.data.eval_view` (centre crop, bilinear resize to the model size), then the recipe's
    windows (skipped when the model windows its own input with a learnable first layer), as in training.
    """
    import torch

    from ichdlib.cnn.data import eval_view
    from ichdlib.windows import stack_channels_torch

    x = stack_hu if isinstance(stack_hu, torch.Tensor) else torch.from_numpy(np.asarray(stack_hu))
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) HU stack (s-1, s, s+1), got shape {tuple(x.shape)}")
    x = eval_view(x, size, crop)
    return x if learnable else stack_channels_torch(x, recipe, single_window)


def undo_geometry(
    maps: np.ndarray, in_hw: tuple[int, int], crop: float, out_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Maps at the network input ``(B, C, s, s)`` -> ``(B, C, H0, W0)`` in the slice's own geometry.

    ``in_hw`` is the size of the HU stack given to :func:`preprocess` (before its centre crop), ``out_hw``
    the slice's rows x cols (default ``in_hw``). The map is resized into the crop's footprint and left at
    zero outside it.
    """
    import torch
    import torch.nn.functional as F

    from ichdlib.cnn.data import center_crop_box

    h, w = in_hw
    h0, w0 = out_hw or in_hw
    top, left, ch, cw = center_crop_box(h, w, crop)
    # the crop box in output pixels (same normalised coordinates as in the input stack)
    t0, l0 = int(round(top * h0 / h)), int(round(left * w0 / w))
    ch0, cw0 = max(1, int(round(ch * h0 / h))), max(1, int(round(cw * w0 / w)))
    ch0, cw0 = min(ch0, h0 - t0), min(cw0, w0 - l0)
    m = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    lead = m.shape[:-2]
    m = m.reshape(-1, 1, *m.shape[-2:])
    inner = F.interpolate(m, size=(ch0, cw0), mode="bilinear", align_corners=False)
    out = torch.zeros(m.shape[0], 1, h0, w0)
    out[..., t0:t0 + ch0, l0:l0 + cw0] = inner.clamp_(0.0, 1.0)
    return out.reshape(*lead, h0, w0).numpy()


# --------------------------------------------------------------------------------------------------
# CAMs
# --------------------------------------------------------------------------------------------------
def _class_indices(classes: Iterable[str | int] | None) -> list[int]:
    if classes is None:
        return list(range(len(LABELS)))
    out = []
    for c in classes:
        if isinstance(c, str):
            if c not in LABELS:
                raise ValueError(f"unknown class {c!r}; choose from {', '.join(LABELS)}")
            out.append(LABELS.index(c))
        elif 0 <= int(c) < len(LABELS):
            out.append(int(c))
        else:
            raise ValueError(f"class index {c} out of range 0..{len(LABELS) - 1}")
    return out


def compute_cams(
    model: nn.Module,
    stack_hu: np.ndarray | torch.Tensor,
    classes: Iterable[str | int] | None = None,
    method: str = "gradcam",
    recipe: str = "seed_3window",
    crop: float = 0.8,
    size: int | None = None,
    out_size: tuple[int, int] | None = None,
    single_window: tuple[float, float] = WINDOWS["brain"],
    learnable: bool = False,
    batch: int = 16,
    target_layer: str | None = None,
    min_map: int = 0,
) -> np.ndarray:
    """One CAM per class per slice: ``(B, 3, H, W)`` HU stack -> ``(B, n_classes, H0, W0)`` float32 in [0, 1].

    ``size`` is the model's input size (default ``H``), ``out_size`` the slice's own rows x cols (default
    ``(H, W)``); ``classes`` are label names or indices (default all six, in label order). ``batch`` bounds
    the number of (slice, class) maps per forward/backward pass. Each map is scaled to [0, 1] by
    pytorch-grad-cam (an all-zero map stays zero). The model's mode and hooks are left as they were.
    ``target_layer`` / ``min_map``: see :func:`find_target_layer`.
    """
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = _class_indices(classes)
    x = preprocess(stack_hu, size or int(np.shape(stack_hu)[-2]), crop, recipe, single_window, learnable)
    n, s = x.shape[0], x.shape[-1]
    in_hw = (int(np.shape(stack_hu)[-2]), int(np.shape(stack_hu)[-1]))
    out = np.zeros((n, len(cls), s, s), dtype=np.float32)
    if n == 0:
        return undo_geometry(out, in_hw, crop, out_size)
    _, layer = find_target_layer(model, target_layer, s, min_map)
    per = max(1, batch // len(cls))
    was_training = model.training
    done = False
    try:
        with torch.enable_grad(), cam_class(method)(model=model, target_layers=[layer]) as cam:
            for i in range(0, n, per):
                xb = x[i:i + per]
                rep = xb.repeat_interleave(len(cls), dim=0).requires_grad_(True)
                targets = [ClassifierOutputTarget(k) for _ in range(len(xb)) for k in cls]
                maps = cam(input_tensor=rep, targets=targets)
                out[i:i + len(xb)] = np.asarray(maps, dtype=np.float32).reshape(len(xb), len(cls), s, s)
            done = True
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not done:  # pytorch-grad-cam's __exit__ swallows IndexError (e.g. a model with fewer outputs)
        raise RuntimeError(f"CAM computation failed for {type(model).__name__} (an IndexError inside "
                           "pytorch-grad-cam; does the model output one logit per label?)")
    return undo_geometry(np.nan_to_num(out, nan=0.0), in_hw, crop, out_size)


def cam_peak(cam: np.ndarray) -> tuple[int, int]:
    """``(row, col)`` of a map's maximum."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))  # type: ignore[return-value]


def peak_distances(cams: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per map: Euclidean distance in pixels from its peak to the nearest mask pixel (0 inside the mask;
    ``inf`` for an all-zero map, which has no peak, or an empty mask)."""
    import cv2

    if len(cams) != len(masks):
        raise ValueError(f"pointing game: {len(cams)} maps but {len(masks)} masks")
    out = np.full(len(cams), np.inf)
    for i, (c, m) in enumerate(zip(cams, masks, strict=True)):
        c, m = np.asarray(c), np.asarray(m).astype(bool)
        if c.shape != m.shape:
            raise ValueError(f"pointing game: map {i} has shape {c.shape} but its mask {m.shape}")
        if not np.any(c > 0) or not m.any():
            continue
        r, k = cam_peak(c)
        if m[r, k]:
            out[i] = 0.0
        else:
            out[i] = float(cv2.distanceTransform((~m).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[r, k])
    return out


def pointing_hits(cams: Sequence[np.ndarray], masks: Sequence[np.ndarray], tolerance: float = 0) -> np.ndarray:
    """Per map: whether its peak falls inside the mask, or within ``tolerance`` pixels of it (Euclidean).

    An all-zero map has no peak and counts as a miss.
    """
    return peak_distances(cams, masks) <= tolerance


def pointing_game(cams: Sequence[np.ndarray], masks: Sequence[np.ndarray], tolerance: float = 0) -> float:
    """Fraction of maps whose peak falls inside the lesion mask (NaN when there are no maps)."""
    hits = pointing_hits(cams, masks, tolerance)
    return float(hits.mean()) if len(hits) else float("nan")


def load_mask(data_root: str | Path, sop_uid: str) -> np.ndarray | None:
    """The phantom's lesion bitmask for one slice (bit ``k-1`` = ``LABELS[k]``), or None when absent."""
    path = Path(data_root) / "masks" / f"{sop_uid}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return np.asarray(z["mask"], dtype=np.uint8)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable lesion mask ({exc})") from exc


def class_mask(bitmask: np.ndarray, label: str) -> np.ndarray:
    """Boolean lesion mask of ``label`` from a bitmask (``any`` = every subtype)."""
    k = LABELS.index(label)
    return bitmask > 0 if k == 0 else (bitmask & (1 << (k - 1))) > 0


# --------------------------------------------------------------------------------------------------
# A run's models over the catalog
# --------------------------------------------------------------------------------------------------
class CamEngine:
    """CAMs for catalog slices from one backbone's fold models of a run.

    Each training slice is explained by the fold model that did not see it (the one behind its OOF
    prediction); test slices by the first available fold model. Stacks are read from the HU cache at the
    backbone's size; maps come back at the slice's own rows x cols.
    """

    def __init__(self, P: Params, key: str | None = None, catalog: pd.DataFrame | None = None,
                 device: str | None = None) -> None:
        from ichdlib.ingest.catalog import load_catalog
        from ichdlib.ingest.native import open_slices

        self.P = P
        backbones = {b.key: b for b in P.cnn.backbones}
        if key is None:
            key = P.cnn.backbones[0].key
        if key not in backbones:
            raise ValueError(f"backbone {key!r} is not in cnn.backbones ({', '.join(backbones)})")
        self.key, self.backbone = key, backbones[key]
        self.model_dir = P.work_dir / "cnn" / key
        self.device = device or P.torch_device()
        self.catalog = catalog if catalog is not None else load_catalog(P.work_dir)
        self.cache = open_slices(P, self.backbone.size, self.catalog)
        self._models: dict[int, tuple[Any, dict]] = {}
        self.folds = sorted(int(p.stem[4:]) for p in self.model_dir.glob("fold*.pt") if p.stem[4:].isdigit())
        if not self.folds:
            raise FileNotFoundError(f"{self.model_dir}: no fold<k>.pt checkpoints; run notebook 02 first")

    def model(self, fold: int) -> tuple[Any, dict]:
        """``(model, meta)`` of a fold (test slices, fold -1, use the first available fold)."""
        if fold not in self.folds:
            fold = self.folds[0]
        if fold not in self._models:
            from ichdlib.cnn.models import load_cnn

            self._models[fold] = load_cnn(self.model_dir / f"fold{fold}.pt", self.device)
        return self._models[fold]

    def target_layer(self) -> str:
        """Name of the layer the maps come from (``cam.target_layer``, or chosen as in :func:`compute_cams`)."""
        model, meta = self.model(self.folds[0])
        size = ModelSpec.from_meta(meta).size
        return find_target_layer(model, self.P.cam.target_layer, size, self.P.cam.min_map)[0]

    def stacks(self, rows: pd.DataFrame) -> np.ndarray:
        """``(n, 3, S, S)`` int16 HU stacks (s-1, s, s+1) of catalog rows from the cache."""
        idx = rows[["prev_row", "row", "next_row"]].to_numpy(dtype=np.int64)
        return np.asarray(self.cache[idx.ravel()]).reshape(len(rows), 3, *self.cache.shape[1:])

    def hu(self, rows: pd.DataFrame) -> list[np.ndarray]:
        """The slices' HU images at their own geometry (rows x cols), read from the DICOM files; for a file
        that cannot be read now, its cache row resized to that geometry (a warning says which)."""
        import cv2

        from ichdlib.ingest.dicom import read_hu

        out = []
        for _, r in rows.iterrows():
            path = Path(r["path"])
            path = path if path.is_absolute() else self.P.data_root / path
            try:
                out.append(read_hu(path)[0])
            except (ValueError, OSError) as exc:
                log.warning("%s: showing the cached image instead (%s)", path, exc)
                out.append(cv2.resize(np.asarray(self.cache[int(r["row"])], np.float32),
                                      (int(r["cols"]), int(r["rows"])), interpolation=cv2.INTER_LINEAR))
        return out

    def cams(self, rows: pd.DataFrame, classes: Iterable[str | int] | None = None,
             out: str = "original") -> list[np.ndarray]:
        """One ``(n_classes, H, W)`` array per catalog row, in row order.

        ``out="original"``: at the slice's rows x cols (to overlay the DICOM or a lesion mask);
        ``out="cache"``: at the cache size (to overlay the cached HU).
        """
        from ichdlib.runtime import cpu_threads

        cfg = self.P.cam
        cls = list(classes) if classes is not None else list(LABELS)
        result: list[np.ndarray | None] = [None] * len(rows)
        rows = rows.reset_index(drop=True)
        s = self.cache.shape[-1]
        if out == "original":
            geo = list(zip(rows["rows"].astype(int), rows["cols"].astype(int), strict=True))
        else:
            geo = [(s, s)] * len(rows)
        groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for i, key in enumerate(zip(rows["fold"].astype(int), geo, strict=True)):
            groups.setdefault(key, []).append(i)
        for (fold, hw), pos in groups.items():
            model, meta = self.model(int(fold))
            with cpu_threads(self.P):  # cnn.cpu_threads on the CPU, as in training
                maps = compute_cams(
                    model, self.stacks(rows.iloc[pos]), cls, method=cfg.method, out_size=tuple(hw),
                    **ModelSpec.from_meta(meta).cam_kwargs(), batch=cfg.batch, target_layer=cfg.target_layer, min_map=cfg.min_map,
                )
            for j, p in enumerate(pos):
                result[p] = maps[j]
        return result  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Which slices to review
# --------------------------------------------------------------------------------------------------
def _read_probs(path: Path, prefix: str) -> pd.DataFrame:
    df = pd.read_parquet(path, columns=["sop_uid", *LABELS])
    return df.rename(columns={c: f"{prefix}{c}" for c in LABELS})


def final_oof(P: Params, catalog: pd.DataFrame) -> pd.DataFrame | None:
    """The final OOF prediction (wide, by ``sop_uid``): notebook 05's blend of ``ensemble.members``, or
    None while a member's predictions are missing."""
    from ichdlib.ensemble.blend import blend, load_stage, read_truth, resolve_members

    try:
        stages = [load_stage(P, m) for m in resolve_members(P)]
    except FileNotFoundError as exc:
        log.warning("final prediction unavailable (%s); showing the 2D CNN's as final", exc)
        return None
    y_oof, _ = read_truth(P, catalog)
    return blend(stages, P.ensemble.method, y_oof).oof[list(LABELS)]


def review_table(P: Params, key: str | None = None, catalog: pd.DataFrame | None = None) -> pd.DataFrame:
    """Training slices with truth ``y_<label>``, 2D CNN OOF ``p2d_<label>`` and final OOF ``p_<label>``.

    The final prediction is notebook 05's blend of ``ensemble.members`` (the 2D CNN's while the sequence
    models have not run). Rows in catalog order with ``study_uid``, ``slice_index``, ``fold``, ``rows``,
    ``cols``, ``path``, ``row``, ``prev_row``, ``next_row``.
    """
    if catalog is None:
        from ichdlib.ingest.catalog import load_catalog

        catalog = load_catalog(P.work_dir)
    key = key or P.cnn.backbones[0].key
    cnn_path = P.work_dir / "cnn" / key / "oof.parquet"
    if not cnn_path.is_file():
        raise FileNotFoundError(f"{cnn_path}: no 2D CNN OOF predictions; run notebook 02 first")
    cols = ["sop_uid", "study_uid", "slice_index", "n_slices", "fold", "rows", "cols", "path", "row",
            "prev_row", "next_row", *LABELS]
    tab = catalog.loc[catalog["split"] == "train", cols].rename(columns={c: f"y_{c}" for c in LABELS})
    tab = tab.merge(_read_probs(cnn_path, "p2d_"), on="sop_uid", how="left", validate="one_to_one")
    final = final_oof(P, catalog)
    if final is not None:
        final = final.rename(columns={c: f"p_{c}" for c in LABELS}).rename_axis("sop_uid").reset_index()
        tab = tab.merge(final, on="sop_uid", how="left", validate="one_to_one")
    else:
        for c in LABELS:
            tab[f"p_{c}"] = tab[f"p2d_{c}"]
    need = [f"p2d_{c}" for c in LABELS] + [f"p_{c}" for c in LABELS]
    missing = int(tab[need].isna().any(axis=1).sum())
    if missing:
        log.warning("%d training slices lack an OOF prediction; left out of the review", missing)
        tab = tab.dropna(subset=need)
    return tab.reset_index(drop=True)


def select_cases(table: pd.DataFrame, k: int, prob: str = "p2d_", labels: Sequence[str] = LABELS,
                 threshold: float = 0.5) -> pd.DataFrame:
    """Per label, the ``k`` most confident true positives, worst false positives and worst false negatives.

    Judged on the probabilities with column prefix ``prob`` (default the 2D CNN, whose decisions the CAMs
    explain) at ``threshold``. A group with fewer than ``k`` slices keeps what there is. Returns the
    table's rows plus ``label``, ``group``, ``prob``, ``truth``.
    """
    parts = []
    for lab in labels:
        p, y = table[f"{prob}{lab}"], table[f"y_{lab}"]
        picks = {
            "tp": p[(y == 1) & (p >= threshold)].nlargest(k),
            "fp": p[(y == 0) & (p >= threshold)].nlargest(k),
            "fn": p[(y == 1) & (p < threshold)].nsmallest(k),
        }
        for g, sel in picks.items():
            parts.append(table.loc[sel.index].assign(label=lab, group=g, prob=sel.to_numpy(),
                                                     truth=y.loc[sel.index].to_numpy()))
    cols = [*table.columns, "label", "group", "prob", "truth"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


def study_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per study: ``pred_any`` (max final ``any``), ``true_any`` and ``error`` (weighted log loss), by study."""
    from ichdlib.metrics import weighted_log_loss

    rows = []
    for uid, g in table.groupby("study_uid", sort=False):
        y = g[[f"y_{c}" for c in LABELS]].to_numpy(float)
        p = g[[f"p_{c}" for c in LABELS]].to_numpy(float)
        rows.append({"study_uid": uid, "n_slices": len(g), "pred_any": float(p[:, 0].max()),
                     "true_any": float(y[:, 0].max()), "error": weighted_log_loss(y, p)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Display helpers
# --------------------------------------------------------------------------------------------------
def overlay(hu: np.ndarray, cam: np.ndarray | None, window: tuple[float, float] = WINDOWS["brain"],
            opacity: float = 0.5, cmap: str = "jet", outline: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 image: the windowed slice with the CAM blended in (weighted by the map) and the ``outline``
    mask's border in magenta (a colour neither the grey image nor the jet map uses)."""
    from matplotlib import colormaps

    from ichdlib.windows import window as apply_window

    gray = apply_window(hu, *window)[..., None].repeat(3, axis=-1)
    img = gray
    if cam is not None and opacity > 0:
        if cam.shape != hu.shape:
            raise ValueError(f"CAM shape {cam.shape} does not match the slice {hu.shape}")
        heat = colormaps[cmap](np.clip(cam, 0, 1))[..., :3].astype(np.float32)
        a = (float(opacity) * np.clip(cam, 0, 1))[..., None]
        img = (1 - a) * gray + a * heat
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if outline is not None and outline.any():
        import cv2

        m = outline.astype(np.uint8)
        edge = m - cv2.erode(m, np.ones((3, 3), np.uint8))
        out[edge > 0] = OUTLINE_RGB
    return out


def head_box(hu: np.ndarray, margin: int = 4, threshold: float = -500.0) -> tuple[slice, slice]:
    """Row and column slices around the non-air part of a slice (the whole image when it is all air)."""
    rows, cols = np.nonzero(np.asarray(hu) > threshold)
    if not len(rows):
        return slice(None), slice(None)
    h, w = np.shape(hu)
    return (slice(max(0, rows.min() - margin), min(h, rows.max() + margin + 1)),
            slice(max(0, cols.min() - margin), min(w, cols.max() + margin + 1)))


def gallery_figure(cases: pd.DataFrame, hu: Sequence[np.ndarray], cams: Sequence[np.ndarray],
                   masks: Sequence[np.ndarray | None] | None = None, window: tuple[float, float] = WINDOWS["brain"],
                   title: str = "") -> Any:
    """Review cases as a grid, one row per group (TP, FP, FN): for each case the windowed slice and its CAM
    overlay with the lesion outline where known, both cropped to the head.

    ``hu[i]``, ``cams[i]`` (the map of ``cases.label[i]``) and ``masks[i]`` (bitmask or None) belong to the
    ``i``-th row of ``cases`` and share its geometry.
    """
    import matplotlib.pyplot as plt

    cases = cases.reset_index(drop=True)
    # only the groups that have cases get a row: no large empty panels; the others are named in the title
    groups = [g for g in GROUPS if (cases["group"] == g).any()] or [GROUPS[0]]
    none = [g.upper() for g in GROUPS if g not in groups or not (cases["group"] == g).any()]
    k = max([1, *cases.groupby("group").size().tolist()])
    fig, axes = plt.subplots(len(groups), 2 * k, figsize=(2.1 * 2 * k, 2.3 * len(groups) + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for gi, group in enumerate(groups):
        sel = cases.index[cases["group"] == group]
        for j, i in enumerate(sel):
            r = cases.loc[i]
            box = head_box(hu[i])
            mask = class_mask(masks[i], r["label"]) if masks is not None and masks[i] is not None else None
            ax_img, ax_cam = axes[gi, 2 * j], axes[gi, 2 * j + 1]
            ax_img.imshow(overlay(hu[i], None, window)[box])
            ax_cam.imshow(overlay(hu[i], cams[i], window, opacity=0.6, outline=mask)[box])
            ax_img.set_title(f"{group.upper()} p={r['prob']:.2f}", fontsize=8)
            ax_cam.set_title(f"…{str(r['study_uid'])[-6:]} slice {int(r['slice_index']) + 1}", fontsize=8)
    if none:
        title = f"{title}  (no {', '.join(none)} cases)" if title else f"no {', '.join(none)} cases"
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def gallery(engine: CamEngine, cases: pd.DataFrame, labels: Sequence[str] = LABELS) -> dict[str, Any]:
    """One :func:`gallery_figure` per label with cases (its TP / FP / FN rows of ``cases``), maps from
    ``engine``; labels without any case get no figure (the notebook names them)."""
    figs = {}
    for lab in labels:
        sel = cases[cases["label"] == lab].reset_index(drop=True)
        if not len(sel):
            continue
        maps = [m[0] for m in engine.cams(sel, [lab])]
        masks = [load_mask(engine.P.data_root, u) for u in sel["sop_uid"]]
        figs[lab] = gallery_figure(sel, engine.hu(sel), maps, masks,
                                   title=f"{lab}: {engine.key}, {engine.P.cam.method}")
    return figs


# --------------------------------------------------------------------------------------------------
# Notebook 06 stage: pointing game on the phantom, merged into metrics.json
# --------------------------------------------------------------------------------------------------
def _rates(values: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-label means, counts, and pooled means over all labels and over the five subtypes."""
    def mean(v: np.ndarray) -> float | None:
        return float(np.mean(v)) if len(v) else None

    subtypes = [values[c] for c in LABELS[1:] if c in values]
    return {"per_class": {c: mean(v) for c, v in values.items()}, "n": {c: int(len(v)) for c, v in values.items()},
            "overall": mean(np.concatenate(list(values.values()))) if values else None,
            "subtypes": mean(np.concatenate(subtypes)) if subtypes else None}


def pointing_game_run(P: Params, engine: CamEngine, table: pd.DataFrame, force: bool = False,
                      max_per_class: int | None = None) -> dict | None:
    """Pointing game: the fraction of slices whose CAM peak (for the slice's label) falls inside that
    label's lesion (within ``cam.tolerance_px``; ``any``: inside any lesion).

    Headline (``per_class``, ``overall``, ``subtypes``): the true-positive slices, 2D CNN OOF probability
    >= ``cam.threshold``. Also reported: ``standard_tolerance`` (the same slices with the usual pointing-game
    tolerance of 15 px at 224 px, scaled to the slice), ``positives`` (every slice with the lesion, whatever
    the model said; strict) and ``chance`` (the mean share of the image the lesion covers: what a randomly
    placed peak would hit). Needs lesion masks (``<data_root>/masks/<sop_uid>.npz``, the phantom); returns None
    without them. The result goes to ``reports/<run>/metrics.json`` under ``pointing_game`` (other keys
    kept); an existing result for the same settings is reused unless ``force``.
    """
    from ichdlib.ensemble.blend import update_metrics
    from ichdlib.progress import track

    threshold, tolerance = P.cam.threshold, P.cam.tolerance_px
    metrics_path = P.reports_dir / "metrics.json"
    if not (P.data_root / "masks").is_dir():
        log.info("%s: no lesion masks; pointing game skipped", P.data_root / "masks")
        return None
    settings = {"method": P.cam.method, "backbone": engine.key, "target_layer": engine.target_layer(),
                "threshold": threshold, "tolerance_px": tolerance}
    if not force and max_per_class is None and metrics_path.is_file():
        old = json.loads(metrics_path.read_text()).get("pointing_game")
        if old and "positives" in old and all(old.get(k) == v for k, v in settings.items()):
            return old
    hits: dict[str, np.ndarray] = {}
    hits_std: dict[str, np.ndarray] = {}
    tp: dict[str, np.ndarray] = {}
    chance: dict[str, np.ndarray] = {}
    missing = 0
    for lab in track(LABELS, desc="pointing game"):
        pos = table[table[f"y_{lab}"] == 1]
        if max_per_class is not None:
            pos = pos.head(max_per_class)
        masks, keep = [], []
        for i, uid in enumerate(pos["sop_uid"]):
            m = load_mask(P.data_root, uid)
            if m is None:
                missing += 1
                continue
            masks.append(class_mask(m, lab))
            keep.append(i)
        pos = pos.iloc[keep]
        maps = [c[0] for c in engine.cams(pos, [lab])] if len(pos) else []
        dist = peak_distances(maps, masks)
        hits[lab] = dist <= tolerance
        hits_std[lab] = dist <= np.array([STANDARD_TOLERANCE * max(m.shape) for m in masks])
        tp[lab] = (pos[f"p2d_{lab}"] >= threshold).to_numpy()
        chance[lab] = np.array([m.mean() for m in masks], dtype=float)
    if missing:
        log.warning("pointing game: %d positive slices have no mask file under %s", missing, P.data_root / "masks")
    result = {**settings, **_rates({c: hits[c][tp[c]] for c in LABELS}),
              "standard_tolerance": _rates({c: hits_std[c][tp[c]] for c in LABELS}),
              "positives": _rates(hits), "chance": _rates(chance), "missing_masks": missing}
    update_metrics(P, {"pointing_game": result})
    return result
