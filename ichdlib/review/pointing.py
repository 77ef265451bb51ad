"""The pointing game: does a CAM's peak fall inside the lesion? Per class, against the phantom's masks,
with the strict rule and the usual 15 px at 224 px tolerance; notebook 06 writes it to ``metrics.json``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from ichdlib.ensemble.outputs import update_metrics
from ichdlib.labels import LABELS
from ichdlib.layout import RunLayout
from ichdlib.progress import track
from ichdlib.review.cam import STANDARD_TOLERANCE

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.config import Params
    from ichdlib.review.engine import CamEngine

log = logging.getLogger(__name__)


def cam_peak(cam: np.ndarray) -> tuple[int, int]:
    """``(row, col)`` of a map's maximum."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))  # type: ignore[return-value]


def peak_distances(cams: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per map: Euclidean distance in pixels from its peak to the nearest mask pixel (0 inside the mask;
    ``inf`` for an all-zero map, which has no peak, or an empty mask)."""

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
    path = RunLayout(Path(), Path(), Path(data_root)).mask(sop_uid)
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

    threshold, tolerance = P.cam.threshold, P.cam.tolerance_px
    L = P.layout
    metrics_path = L.metrics
    if not L.masks.is_dir():
        log.info("%s: no lesion masks; pointing game skipped", L.masks)
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
        log.warning("pointing game: %d positive slices have no mask file under %s", missing, L.masks)
    result = {**settings, **_rates({c: hits[c][tp[c]] for c in LABELS}),
              "standard_tolerance": _rates({c: hits_std[c][tp[c]] for c in LABELS}),
              "positives": _rates(hits), "chance": _rates(chance), "missing_masks": missing}
    update_metrics(P, {"pointing_game": result})
    return result
