"""Review figures: a CAM over its slice (windowed, lesion outline), the head's bounding box, galleries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colormaps

from ichdlib.labels import LABELS
from ichdlib.review.cam import GROUPS, OUTLINE_RGB
from ichdlib.review.pointing import class_mask, load_mask
from ichdlib.windows import WINDOWS
from ichdlib.windows import window as apply_window

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.review.engine import CamEngine


# --------------------------------------------------------------------------------------------------
# Display helpers
# --------------------------------------------------------------------------------------------------
def overlay(hu: np.ndarray, cam: np.ndarray | None, window: tuple[float, float] = WINDOWS["brain"],
            opacity: float = 0.5, cmap: str = "jet", outline: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 image: the windowed slice with the CAM blended in (weighted by the map) and the ``outline``
    mask's border in magenta (a colour neither the grey image nor the jet map uses)."""

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


