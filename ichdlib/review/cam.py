"""Class activation maps for the trained 2D CNNs, brought back to each slice's own geometry.

The maps come from pytorch-grad-cam (``GradCAM``, ``GradCAMPlusPlus``, ``HiResCAM``), one map per class per
slice, computed in batches over a study with the library's context-manager form so that its hooks are always
released. The target layer is chosen per backbone family (DenseNet ``features.norm5``, ResNet / SE-ResNeXt
``layer4``), or else found by a forward-hook probe: the last module with a 4-D output before global pooling.

Geometry: the network sees the validation preprocessing of a cached HU stack (centre crop, resize to the
model size, windows). :func:`undo_geometry` inverts it, so a map overlays the slice at its own rows x cols
(zero outside the crop the network never saw).

The rest of the review lives beside it: :mod:`ichdlib.review.engine` (:class:`CamEngine`, CAMs for catalog
slices from a run's fold models), :mod:`ichdlib.review.cases` (which slices to look at),
:mod:`ichdlib.review.plots` (overlays and galleries) and :mod:`ichdlib.review.pointing` (the pointing game
against the phantom's lesion masks, written to ``metrics.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from ichdlib.cnn.data import center_crop_box, eval_view
from ichdlib.labels import LABELS
from ichdlib.registry import CAM_METHODS
from ichdlib.windows import WINDOWS, stack_channels_torch

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.config import CamCfg

log = logging.getLogger(__name__)

#: ``cam.method`` -> pytorch-grad-cam class (the registry :data:`ichdlib.registry.CAM_METHODS`).
METHODS = CAM_METHODS
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
    """The pytorch-grad-cam class registered for ``method`` in :data:`ichdlib.registry.CAM_METHODS`."""
    return CAM_METHODS[method].cls()


def _input_channels(model: nn.Module) -> int:

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def spatial_outputs(model: nn.Module, size: int = 128) -> list[tuple[str, tuple[int, int]]]:
    """``(module name, (h, w))`` of every module with a 4-D output, in completion order, for one dummy
    ``size`` x ``size`` input (forward hooks, all removed before returning; the model's mode is kept)."""

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


def explain(model: nn.Module, stack_hu: np.ndarray | torch.Tensor, classes: Iterable[str | int] | None,
            cam: CamCfg, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """The one way slices are explained (notebook 06, ``ichd predict --cam``, the DICOM outputs): the
    preprocessing the model was trained with, from the spec it carries (``model.spec``, see
    :func:`ichdlib.checkpoints.load_checkpoint`), and the method, batch, target layer and coarsest map of the
    ``cam`` params section. Returns :func:`compute_cams`' ``(B, n_classes, H, W)`` maps."""
    return compute_cams(model, stack_hu, classes, method=cam.method, out_size=out_size, **model.spec.cam_kwargs(),
                        batch=cam.batch, target_layer=cam.target_layer, min_map=cam.min_map)
