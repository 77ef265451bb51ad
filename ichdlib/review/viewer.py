"""An interactive slice viewer for CT studies: windows, CAM overlays, per-slice probabilities.

The state lives in :class:`ViewerState`, a plain object whose methods the widgets call, so tests drive it
headless. :class:`SliceViewer` wraps it in ipywidgets (study picker sortable by predicted ``any`` or by
error, slice slider, window preset or custom level/width, class picker, CAM opacity, and a strip of the
per-slice probabilities with the current slice marked), rendering PNG bytes into ``ipywidgets.Image``.
CAMs are computed once per study and cached. Under papermill :func:`show` draws a static gallery instead.

Widgets carry stable CSS classes (``ichd-study-picker``, ``ichd-slice-slider``, ``ichd-window``,
``ichd-class-picker``, ``ichd-opacity``, ``ichd-image``, ``ichd-strip``, ``ichd-status``) for browser tests.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ichdlib.labels import LABELS, short_uid
from ichdlib.metrics import weighted_log_loss
from ichdlib.nb import interactive
from ichdlib.review.cases import study_summary
from ichdlib.review.explore import display_width
from ichdlib.review.plots import head_box, overlay
from ichdlib.review.pointing import class_mask, load_mask
from ichdlib.windows import WINDOWS

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.config import Params
    from ichdlib.review.engine import CamEngine

log = logging.getLogger(__name__)

#: Window presets offered by the viewer, plus ``custom`` (level/width sliders).
PRESETS: tuple[str, ...] = ("brain", "subdural", "bone", "custom")
SORT_KEYS: dict[str, str] = {"predicted any": "pred_any", "error": "error", "name": "study_uid"}
#: Line colours of the probability strip, by series name; truth is drawn as grey bars.
_STRIP_COLOURS = ("tab:orange", "tab:blue", "tab:green", "tab:purple")


@dataclass
class Study:
    """One study as the viewer needs it; slices in z order, one entry per slice.

    ``hu``: HU images (each ``(H, W)``; sizes may differ between slices). ``probs``: series name ->
    ``(n, 6)`` probabilities in label order, e.g. ``{"2D": ..., "final": ...}``. ``truth``: ``(n, 6)`` or
    None. ``masks``: per slice a lesion bitmask at the slice's geometry, or None.
    """

    uid: str
    hu: Sequence[np.ndarray]
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    truth: np.ndarray | None = None
    masks: Sequence[np.ndarray | None] | None = None
    sop_uids: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.hu)
        if n == 0:
            raise ValueError(f"study {self.uid}: no slices")
        for name, p in self.probs.items():
            if np.shape(p) != (n, len(LABELS)):
                raise ValueError(f"study {self.uid}: probabilities {name!r} have shape {np.shape(p)}, "
                                 f"expected ({n}, {len(LABELS)})")
        if self.truth is not None and np.shape(self.truth) != (n, len(LABELS)):
            raise ValueError(f"study {self.uid}: truth has shape {np.shape(self.truth)}, expected ({n}, 6)")

    @property
    def n(self) -> int:
        return len(self.hu)

    def final(self) -> np.ndarray | None:
        """The last probability series (by convention the final prediction), or None."""
        return list(self.probs.values())[-1] if self.probs else None


def summarize(study: Study) -> dict[str, Any]:
    """Study row for sorting: ``pred_any`` (max final ``any``) and ``error`` (weighted log loss)."""

    p = study.final()
    out: dict[str, Any] = {"study_uid": study.uid, "n_slices": study.n,
                           "pred_any": float(np.max(p[:, 0])) if p is not None else float("nan"),
                           "error": float("nan")}
    if p is not None and study.truth is not None:
        out["error"] = weighted_log_loss(np.asarray(study.truth, float), np.asarray(p, float))
    return out


def _png(rgb: np.ndarray) -> bytes:

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


class ViewerState:
    """Everything the viewer shows, changed only through its ``set_*`` methods.

    ``studies``: study UIDs; ``load(uid) -> Study``; ``cams(study) -> per slice (6, H, W)`` maps in [0, 1]
    (or None: no overlay); ``summary``: a table with ``study_uid``, ``pred_any``, ``error`` for sorting
    (computed from the loaded studies when omitted). Loaded studies and their maps are cached (LRU of
    ``keep`` studies); maps are stored as uint8.
    """

    def __init__(self, studies: Sequence[str], load: Callable[[str], Study],
                 cams: Callable[[Study], Sequence[np.ndarray]] | None = None,
                 summary: pd.DataFrame | None = None, keep: int = 3) -> None:
        if len(studies) == 0:
            raise ValueError("the viewer needs at least one study")
        self._load, self._cam_fn, self._keep = load, cams, max(1, keep)
        self._studies: OrderedDict[str, Study] = OrderedDict()
        self._cams: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self._strips: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, tuple[int, int]]] = {}
        self._boxes: dict[str, tuple[slice, slice] | None] = {}
        if summary is None:
            summary = pd.DataFrame([summarize(self.study_obj(u)) for u in studies])
        self.summary = summary.set_index("study_uid").reindex(list(studies))
        self.sort_by = "pred_any"
        self.study_ids: list[str] = self.sorted_studies("pred_any")
        self.uid: str = ""
        self.index = 0
        self.window_name = "brain"
        self.window: tuple[float, float] = WINDOWS["brain"]
        self.label = "any"
        self.opacity = 0.45
        self.cam_calls = 0
        self.set_study(self.study_ids[0])

    @classmethod
    def from_studies(cls, studies: Sequence[Study],
                     cams: dict[str, Sequence[np.ndarray]] | Callable[[Study], Sequence[np.ndarray]] | None = None,
                     **kw: Any) -> ViewerState:
        """A viewer over studies already in memory; ``cams`` maps study UID -> maps, or is a callable."""
        by_uid = {s.uid: s for s in studies}
        cam_fn = (lambda s: cams[s.uid]) if isinstance(cams, dict) else cams
        return cls(list(by_uid), by_uid.__getitem__, cam_fn, keep=max(3, len(by_uid)), **kw)

    # -- data --------------------------------------------------------------------------------------
    def study_obj(self, uid: str | None = None) -> Study:
        """The (cached) study ``uid``, default the current one."""
        uid = uid or self.uid
        if uid not in self._studies:
            self._studies[uid] = self._load(uid)
            while len(self._studies) > self._keep:
                self._studies.popitem(last=False)
        self._studies.move_to_end(uid)
        return self._studies[uid]

    def cams(self, uid: str | None = None) -> list[np.ndarray] | None:
        """Per slice ``(6, H, W)`` uint8 maps of a study, computed once and cached; None without a CAM source."""
        if self._cam_fn is None:
            return None
        uid = uid or self.uid
        if uid not in self._cams:
            study = self.study_obj(uid)
            maps = self._cam_fn(study)
            self.cam_calls += 1
            if len(maps) != study.n:
                raise ValueError(f"study {uid}: got {len(maps)} CAMs for {study.n} slices")
            self._cams[uid] = [np.clip(np.asarray(m, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
                               for m in maps]
            while len(self._cams) > self._keep:
                self._cams.popitem(last=False)
        self._cams.move_to_end(uid)
        return self._cams[uid]

    def sorted_studies(self, by: str = "pred_any") -> list[str]:
        """Study UIDs ordered by ``pred_any`` or ``error`` (highest first) or by ``study_uid``."""
        if by not in SORT_KEYS.values():
            raise ValueError(f"cannot sort studies by {by!r}; choose one of {', '.join(SORT_KEYS.values())}")
        if by == "study_uid":
            return sorted(self.summary.index)
        col = self.summary[by].fillna(-np.inf)
        return list(col.sort_values(ascending=False, kind="stable").index)

    # -- controls ------------------------------------------------------------------------------------
    def set_sort(self, by: str) -> list[str]:
        """Reorder the study list (the current study stays selected)."""
        self.study_ids = self.sorted_studies(by)
        self.sort_by = by
        return self.study_ids

    def set_study(self, uid: str) -> None:
        """Show study ``uid``, starting at its slice with the highest final probability of the class."""
        if uid not in self.summary.index:
            raise ValueError(f"unknown study {uid!r}")
        self.uid = uid
        study = self.study_obj(uid)
        p = study.final()
        self.index = int(np.argmax(p[:, LABELS.index(self.label)])) if p is not None else study.n // 2

    def set_slice(self, index: int) -> None:
        """Go to slice ``index`` (clipped to the study)."""
        self.index = int(np.clip(index, 0, self.study_obj().n - 1))

    def set_window(self, name: str, level: float | None = None, width: float | None = None) -> None:
        """A preset (``brain``, ``subdural``, ``bone``) or ``custom`` with ``level``/``width`` in HU."""
        if name == "custom":
            c, w = self.window
            c = float(level) if level is not None else c
            w = float(width) if width is not None else w
            if w <= 0:
                raise ValueError(f"window width must be positive, got {w}")
            self.window = (c, w)
        elif name in WINDOWS:
            self.window = WINDOWS[name]
        else:
            raise ValueError(f"unknown window {name!r}; choose one of {', '.join(PRESETS)}")
        self.window_name = name

    def set_label(self, label: str) -> None:
        """The class whose CAM and probabilities are shown."""
        if label not in LABELS:
            raise ValueError(f"unknown class {label!r}; choose one of {', '.join(LABELS)}")
        self.label = label

    def set_opacity(self, opacity: float) -> None:
        """CAM opacity in [0, 1] (0 hides the map)."""
        self.opacity = float(np.clip(opacity, 0.0, 1.0))

    # -- rendering -----------------------------------------------------------------------------------
    def _box(self) -> tuple[slice, slice]:
        """The part of the current slice shown: around the head, one box per study so slices line up."""

        study = self.study_obj()
        if self.uid not in self._boxes:
            shapes = {np.shape(h) for h in study.hu}
            self._boxes[self.uid] = head_box(np.max(np.stack(study.hu), axis=0)) if len(shapes) == 1 else None
        return self._boxes[self.uid] or head_box(study.hu[self.index])

    def image(self) -> np.ndarray:
        """The current slice as RGB uint8, cropped to the head: window, CAM of the class, lesion outline."""

        study = self.study_obj()
        maps = self.cams()
        cam = maps[self.index][LABELS.index(self.label)].astype(np.float32) / 255.0 if maps else None
        mask = study.masks[self.index] if study.masks is not None else None
        outline = class_mask(mask, self.label) if mask is not None else None
        img = overlay(np.asarray(study.hu[self.index], np.float32), cam, self.window, self.opacity, outline=outline)
        return img[self._box()]

    def image_png(self) -> bytes:
        return _png(self.image())

    def _strip_base(self) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        key = (self.uid, self.label)
        if key not in self._strips:

            study, k = self.study_obj(), LABELS.index(self.label)
            x = np.arange(1, study.n + 1)  # slices numbered 1..n, as on the slider and in the caption
            fig = Figure(figsize=(6.0, 1.5), dpi=80)
            canvas = FigureCanvasAgg(fig)
            ax = fig.add_axes((0.07, 0.22, 0.78, 0.7))
            if study.truth is not None:
                ax.bar(x, np.asarray(study.truth)[:, k], width=1.0, color="0.85", label="truth")
            for (name, p), colour in zip(study.probs.items(), _STRIP_COLOURS, strict=False):
                ax.plot(x, np.asarray(p)[:, k], ".-", color=colour, lw=1.2, ms=3, label=name)
            ax.set_xlim(0.5, study.n + 0.5)

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("slice", fontsize=7, labelpad=1)
            ax.set_ylabel(f"p({self.label})", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
            canvas.draw()
            rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
            h = rgb.shape[0]
            xs = ax.transData.transform(np.c_[x, np.zeros_like(x)])[:, 0]
            y0, y1 = ax.bbox.y0, ax.bbox.y1
            self._strips[key] = (rgb, np.round(xs).astype(int), (int(h - y1), int(h - y0)))
        return self._strips[key]

    def strip(self) -> np.ndarray:
        """The probability strip (truth bars, one line per series) with the current slice marked in red."""
        base, xs, (top, bottom) = self._strip_base()
        out = base.copy()
        x = int(np.clip(xs[self.index], 1, out.shape[1] - 2))
        out[top:bottom, x - 1:x + 2] = (220, 20, 20)
        return out

    def strip_png(self) -> bytes:
        return _png(self.strip())

    def caption(self) -> str:
        """One line about the current slice: position, window, class and the probabilities."""
        study, k = self.study_obj(), LABELS.index(self.label)
        parts = [f"study {self.uid}", f"slice {self.index + 1}/{study.n}",
                 f"window {self.window_name} {self.window[0]:g}/{self.window[1]:g}", f"class {self.label}"]
        parts += [f"{name} {np.asarray(p)[self.index, k]:.3f}" for name, p in study.probs.items()]
        truth = None if study.truth is None else np.asarray(study.truth, float)[self.index, k]
        parts.append("unlabelled" if truth is None or np.isnan(truth) else f"truth {int(truth)}")
        return " | ".join(parts)


class SliceViewer:
    """ipywidgets front end of a :class:`ViewerState` (display it, or its ``widget``, in a notebook)."""

    def __init__(self, state: ViewerState, width: int = 400) -> None:

        self.state = state
        self._busy = False
        self.max_width = width
        s = state
        wide = {"description_width": "initial"}
        self.sort = W.Dropdown(options=list(SORT_KEYS.items()), value=s.sort_by, description="sort by",
                               style=wide, layout=W.Layout(width="200px"))
        options = self._study_options()
        self.study = W.Dropdown(options=options, value=s.uid, description="study", style=wide,
                                layout=W.Layout(width=f"{min(700, 90 + 7 * max(len(o[0]) for o in options))}px"))
        # slices are numbered 1..n on the slider, in the caption and in notebook 01's browser
        self.slider = W.IntSlider(value=s.index + 1, min=1, max=s.study_obj().n, description="slice",
                                  continuous_update=True, style=wide, layout=W.Layout(width="440px"))
        self.window = W.ToggleButtons(options=list(PRESETS), value=s.window_name, description="window",
                                      style={"button_width": "84px", **wide})
        self.level = W.IntSlider(value=int(s.window[0]), min=-200, max=1000, step=5, description="level",
                                 disabled=True, style=wide, layout=W.Layout(width="250px"))
        self.width_ = W.IntSlider(value=int(s.window[1]), min=10, max=4000, step=10, description="width",
                                  disabled=True, style=wide, layout=W.Layout(width="250px"))
        self.label = W.Dropdown(options=list(LABELS), value=s.label, description="class", style=wide,
                                layout=W.Layout(width="230px"))
        self.opacity = W.FloatSlider(value=s.opacity, min=0.0, max=1.0, step=0.05, description="CAM opacity",
                                     style=wide, layout=W.Layout(width="270px"))
        self.image = W.Image(format="png", layout=W.Layout(margin="0 12px 0 0"))
        self.strip = W.Image(format="png", layout=W.Layout(width="480px"))
        self.status = W.HTML(layout=W.Layout(width="500px"))
        for w, css in [(self.sort, "ichd-sort"), (self.study, "ichd-study-picker"),
                       (self.slider, "ichd-slice-slider"), (self.window, "ichd-window"),
                       (self.level, "ichd-level"), (self.width_, "ichd-width"),
                       (self.label, "ichd-class-picker"), (self.opacity, "ichd-opacity"),
                       (self.image, "ichd-image"), (self.strip, "ichd-strip"), (self.status, "ichd-status")]:
            w.add_class(css)
        self.sort.observe(self._on_sort, "value")
        self.study.observe(self._on_study, "value")
        self.slider.observe(self._on_slice, "value")
        self.window.observe(self._on_window, "value")
        self.level.observe(self._on_custom, "value")
        self.width_.observe(self._on_custom, "value")
        self.label.observe(self._on_label, "value")
        self.opacity.observe(self._on_opacity, "value")
        # 1366x768: the study picker on top, then the image beside controls, caption and strip, so that
        # all of them are visible together without scrolling
        side = W.VBox([self.slider, self.window, W.HBox([self.level, self.width_]),
                       W.HBox([self.label, self.opacity]), self.status, self.strip],
                      layout=W.Layout(min_width="500px"))
        self.widget = W.VBox([W.HBox([self.sort, self.study]),
                              W.HBox([self.image, side], layout=W.Layout(align_items="flex-start"))])
        self.widget.add_class("ichd-viewer")
        self.refresh()

    def _ipython_display_(self) -> None:  # pragma: no cover - needs a front end

        display(self.widget)

    def _study_options(self) -> list[tuple[str, str]]:
        s = self.state
        out = []
        for uid in s.study_ids:
            r = s.summary.loc[uid]
            err = "" if pd.isna(r["error"]) else f"  err={r['error']:.3f}"
            out.append((f"{uid}  any={r['pred_any']:.2f}{err}", uid))
        return out

    def refresh(self, strip: bool = True) -> None:
        """Re-render the image (and the strip) from the state."""
        img = self.state.image()
        self.image.value = _png(img)

        self.image.layout.width = f"{display_width(img.shape[1], self.max_width)}px"
        if strip:
            self.strip.value = self.state.strip_png()
        self.status.value = f"<span style='font-family: monospace; font-size: 12px'>{self.state.caption()}</span>"

    def _sync_slider(self) -> None:
        self._busy = True
        try:
            self.slider.max = self.state.study_obj().n
            self.slider.value = self.state.index + 1
        finally:
            self._busy = False

    def _on_sort(self, ch: dict) -> None:
        self.state.set_sort(ch["new"])
        self._busy = True
        try:
            self.study.options = self._study_options()
            self.study.value = self.state.uid
        finally:
            self._busy = False

    def _on_study(self, ch: dict) -> None:
        if self._busy or ch["new"] is None:
            return
        self.state.set_study(ch["new"])
        self._sync_slider()
        self.refresh()

    def _on_slice(self, ch: dict) -> None:
        if self._busy:
            return
        self.state.set_slice(ch["new"] - 1)
        self.refresh()

    def _on_window(self, ch: dict) -> None:
        custom = ch["new"] == "custom"
        self.level.disabled = self.width_.disabled = not custom
        if custom:
            self.state.set_window("custom", self.level.value, self.width_.value)
        else:
            self.state.set_window(ch["new"])
            self._busy = True
            self.level.value, self.width_.value = int(self.state.window[0]), int(self.state.window[1])
            self._busy = False
        self.refresh(strip=False)

    def _on_custom(self, ch: dict) -> None:
        if self._busy or self.window.value != "custom":
            return
        self.state.set_window("custom", self.level.value, self.width_.value)
        self.refresh(strip=False)

    def _on_label(self, ch: dict) -> None:
        self.state.set_label(ch["new"])
        self.refresh()

    def _on_opacity(self, ch: dict) -> None:
        self.state.set_opacity(ch["new"])
        self.refresh(strip=False)


def static_figure(state: ViewerState, studies: Sequence[str] | None = None, slices: int = 3) -> Any:
    """A matplotlib gallery of what the viewer would show: per study, the ``slices`` slices with the highest
    final probability of the state's class (CAM overlay) and the probability strip."""

    studies = list(studies or state.study_ids)
    cur = (state.uid, state.index)
    fig, axes = plt.subplots(len(studies), slices + 1, figsize=(2.3 * slices + 4.6, 2.4 * len(studies)),
                             squeeze=False, gridspec_kw={"width_ratios": [1] * slices + [2]})
    k = LABELS.index(state.label)
    for r, uid in enumerate(studies):
        state.set_study(uid)
        study = state.study_obj()
        p = study.final()
        order = np.argsort(-p[:, k])[:slices] if p is not None else np.arange(min(slices, study.n))
        for c in range(slices):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(order):
                state.set_slice(int(order[c]))
                ax.imshow(state.image())
                txt = f"slice {state.index + 1}/{study.n}" + (f" p={p[state.index, k]:.2f}" if p is not None else "")
                ax.set_title(txt, fontsize=7)
        state.set_slice(int(order[0]) if len(order) else 0)
        axes[r, -1].imshow(state.strip())
        axes[r, -1].axis("off")
        axes[r, -1].set_title(f"study {short_uid(uid)}", fontsize=7)
    fig.suptitle(f"class {state.label}, CAM opacity {state.opacity:.2f}", fontsize=9)
    fig.tight_layout()
    state.set_study(cur[0])
    state.set_slice(cur[1])
    return fig


def show(state: ViewerState, studies: Sequence[str] | None = None, slices: int = 3) -> Any:
    """The interactive viewer in a live notebook; a static gallery figure under papermill / headless."""

    if interactive():

        viewer = SliceViewer(state)
        display(viewer.widget)
        return viewer
    return static_figure(state, studies, slices)


# --------------------------------------------------------------------------------------------------
# A run's studies (notebook 06)
# --------------------------------------------------------------------------------------------------
def run_state(P: Params, engine: CamEngine, table: pd.DataFrame, studies: Sequence[str] | None = None,
              summary: pd.DataFrame | None = None, cams: Any = None,
              series: dict[str, pd.DataFrame] | None = None) -> ViewerState:
    """A viewer over a run's training studies: the review table's probabilities (2D, final, truth),
    HU from the DICOM files at each slice's own geometry (:meth:`CamEngine.hu`), the phantom's lesion
    masks when present, and CAMs from ``engine`` (computed on first view). ``cams``: another CAM source
    with ``cams(rows)`` (e.g. :class:`ichdlib.review.cam3d.Cam3dEngine`, the 3D member's maps per slice);
    ``series``: more probability strips (name -> table by ``sop_uid``, e.g. the 3D member's OOF)."""

    if summary is None:
        summary = study_summary(table)
    studies = list(studies) if studies is not None else list(summary["study_uid"])
    summary = summary[summary["study_uid"].isin(studies)]
    by_study = {u: g.sort_values("slice_index") for u, g in table.groupby("study_uid", sort=False)}

    def load(uid: str) -> Study:
        g = by_study[uid]
        hu = engine.hu(g)
        masks = [load_mask(P.data_root, s) for s in g["sop_uid"]]
        return Study(
            uid=uid, hu=hu, sop_uids=list(g["sop_uid"]),
            probs={"2D": g[[f"p2d_{c}" for c in LABELS]].to_numpy(float),
                   **{k: t.reindex(g["sop_uid"])[list(LABELS)].to_numpy(float) for k, t in (series or {}).items()},
                   "final": g[[f"p_{c}" for c in LABELS]].to_numpy(float)},
            truth=g[[f"y_{c}" for c in LABELS]].to_numpy(float),
            masks=masks if any(m is not None for m in masks) else None,
        )

    source = cams or engine
    return ViewerState(studies, load, lambda study: source.cams(by_study[study.uid]), summary=summary)
