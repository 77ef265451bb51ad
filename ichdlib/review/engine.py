"""CAMs for catalog slices from a run's fold models: each training slice explained by the fold model that
did not see it (notebook 06)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from ichdlib.cnn.models import load_cnn
from ichdlib.ingest.dicom import read_hu
from ichdlib.ingest.native import open_slices
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS
from ichdlib.review.cam import explain, find_target_layer
from ichdlib.runtime import cpu_threads

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.config import Params

log = logging.getLogger(__name__)


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

        self.P = P
        backbones = {b.key: b for b in P.cnn.backbones}
        if key is None:
            key = P.cnn.backbones[0].key
        if key not in backbones:
            raise ValueError(f"backbone {key!r} is not in cnn.backbones ({', '.join(backbones)})")
        self.key, self.backbone = key, backbones[key]
        self.models_dir = P.layout.cnn(key)
        self.model_dir = self.models_dir.path
        self.device = device or P.torch_device()
        self.catalog = catalog if catalog is not None else load_catalog(P.layout.work)
        self.cache = open_slices(P, self.backbone.size, self.catalog)
        self._models: dict[int, tuple[Any, dict]] = {}
        self.folds = self.models_dir.folds()
        if not self.folds:
            raise FileNotFoundError(f"{self.model_dir}: no fold<k>.pt checkpoints; run notebook 02 first")

    def model(self, fold: int) -> tuple[Any, dict]:
        """``(model, meta)`` of a fold (test slices, fold -1, use the first available fold)."""
        if fold not in self.folds:
            fold = self.folds[0]
        if fold not in self._models:
            self._models[fold] = load_cnn(self.models_dir.checkpoint(fold), self.device)
        return self._models[fold]

    def target_layer(self) -> str:
        """Name of the layer the maps come from (``cam.target_layer``, or chosen as in :func:`compute_cams`)."""
        model, _ = self.model(self.folds[0])
        size = model.spec.size
        return find_target_layer(model, self.P.cam.target_layer, size, self.P.cam.min_map)[0]

    def stacks(self, rows: pd.DataFrame) -> np.ndarray:
        """``(n, 3, S, S)`` int16 HU stacks (s-1, s, s+1) of catalog rows from the cache."""
        idx = rows[["prev_row", "row", "next_row"]].to_numpy(dtype=np.int64)
        return np.asarray(self.cache[idx.ravel()]).reshape(len(rows), 3, *self.cache.shape[1:])

    def hu(self, rows: pd.DataFrame) -> list[np.ndarray]:
        """The slices' HU images at their own geometry (rows x cols), read from the DICOM files; for a file
        that cannot be read now, its cache row resized to that geometry (a warning says which)."""

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
            model, _ = self.model(int(fold))
            with cpu_threads(self.P):  # cnn.cpu_threads on the CPU, as in training
                maps = explain(model, self.stacks(rows.iloc[pos]), cls, cfg, out_size=tuple(hw))
            for j, p in enumerate(pos):
                result[p] = maps[j]
        return result  # type: ignore[return-value]


