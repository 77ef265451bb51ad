"""Grad-CAM of the 3D member, per slice: pytorch-grad-cam on the 3D convolutions of its last stage.

One backward pass per class explains the whole study: the target is the class logit summed over the study's
slices, the map is computed on ``trunk.layer4`` (``(F, n, h, w)``: z is kept at slice resolution, see
:mod:`ichdlib.cnn3d.models`), scaled to [0, 1] over the volume by pytorch-grad-cam (so slices compare) and
resized to the input; slice ``j`` of the volume map is slice ``j``'s CAM, brought back to the slice's own
geometry like the 2D maps (:func:`ichdlib.review.cam.undo_geometry`). :class:`Cam3dEngine` gives the notebook-06
viewer these maps for catalog studies (training studies from the fold model that did not see them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ichdlib.checkpoints import load_checkpoint
from ichdlib.cnn3d.data import VolumeAugment, read_volume
from ichdlib.cnn3d.models import cam_target_layer3d
from ichdlib.config import AugmentCfg
from ichdlib.ingest.native import open_slices
from ichdlib.review.cam import _class_indices, cam_class, undo_geometry
from ichdlib.spec import VolumeSpec

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.config import Params


class _StudyClassTarget:
    """pytorch-grad-cam target: class ``k``'s logit summed over the slices of a ``(n, 6)`` output."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[..., self.k].sum()


def compute_cams3d(model: Any, spec: VolumeSpec, hu: np.ndarray, classes: Iterable[str | int] | None = None,
                   method: str = "gradcam", out_size: tuple[int, int] | None = None) -> np.ndarray:
    """``(n, H, W)`` HU slices of one study (z order) -> ``(n, n_classes, H0, W0)`` maps in [0, 1], one per slice
    and class (``out_size`` the slices' own rows x cols, default ``(H, W)``). The model's mode is restored."""
    cls = _class_indices(classes)
    aug = VolumeAugment.from_spec(spec, AugmentCfg()).eval()
    device = next(model.parameters()).device
    x = aug(torch.as_tensor(np.asarray(hu))[None].to(device))  # (1, C, n, s, s)
    n, s = x.shape[2], x.shape[-1]
    out = np.zeros((n, len(cls), s, s), dtype=np.float32)
    was = model.training
    model.eval()
    try:
        with torch.enable_grad(), cam_class(method)(model=model, target_layers=[cam_target_layer3d(model)]) as cam:
            for j, k in enumerate(cls):
                maps = cam(input_tensor=x.clone().requires_grad_(True), targets=[_StudyClassTarget(k)])
                out[:, j] = np.asarray(maps, dtype=np.float32).reshape(n, s, s)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return undo_geometry(np.nan_to_num(out, nan=0.0), tuple(np.shape(hu)[-2:]), spec.val_center_crop, out_size)


class Cam3dEngine:
    """3D CAMs for catalog studies from a run's 3D fold models (``work/<run>/cnn3d/<key>/fold<k>.pt``): a
    training study is explained by the fold model that did not see it, a test study by the first fold."""

    def __init__(self, P: Params, catalog: pd.DataFrame, device: str | None = None) -> None:
        self.P = P
        self.d = P.layout.cnn3d(P.cnn3d.key)
        self.folds = self.d.folds()
        if not self.folds:
            raise FileNotFoundError(f"{self.d.path}: no fold<k>.pt checkpoints; run notebook 02b first")
        self.device = device or P.torch_device()
        self.catalog = catalog
        self.cache = open_slices(P, P.cnn3d.size, catalog)
        self._models: dict[int, tuple[Any, VolumeSpec]] = {}

    def model(self, fold: int) -> tuple[Any, VolumeSpec]:
        if fold not in self.folds:
            fold = self.folds[0]
        if fold not in self._models:
            model = load_checkpoint(self.d.checkpoint(fold), self.device)
            if not isinstance(model.spec, VolumeSpec):
                raise ValueError(f"{self.d.checkpoint(fold)}: not a 3D checkpoint (spec kind {model.spec.kind!r})")
            self._models[fold] = (model, model.spec)
        return self._models[fold]

    def cams(self, rows: pd.DataFrame, classes: Iterable[str | int] | None = None) -> list[np.ndarray]:
        """One ``(n_classes, H, W)`` map per row of one study's catalog rows (z order), at each slice's own
        rows x cols."""
        rows = rows.sort_values("slice_index")
        if rows["study_uid"].nunique() != 1:
            raise ValueError("Cam3dEngine.cams: give the rows of one study")
        model, spec = self.model(int(rows["fold"].iloc[0]))
        hu = read_volume(self.cache, rows["row"].to_numpy(np.int64))
        maps = compute_cams3d(model, spec, hu, classes, self.P.cam.method)
        out = []
        for m, h, w in zip(maps, rows["rows"].astype(int), rows["cols"].astype(int), strict=True):
            out.append(undo_geometry(m[None], m.shape[-2:], 1.0, (h, w))[0] if m.shape[-2:] != (h, w) else m)
        return out
