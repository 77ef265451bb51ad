"""Exploration helpers behind notebook 01: catalog summary, HU histograms, windows, composites, a browser."""

from __future__ import annotations

from typing import Any

import cv2
import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ichdlib.labels import LABELS, SUBTYPES
from ichdlib.windows import WINDOWS, channels, window

#: Typical HU ranges of head-CT tissues, drawn as bands on the histogram.
TISSUES: dict[str, tuple[float, float]] = {
    "air": (-1100, -900),
    "fat": (-120, -60),
    "CSF": (0, 15),
    "white matter": (20, 30),
    "grey matter": (35, 45),
    "acute blood": (50, 90),
    "bone": (700, 2000),
}


def catalog_summary(cat: pd.DataFrame, quarantine: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Tables describing a catalog: counts per split, label prevalence, geometry, quarantine reasons."""
    counts = cat.groupby("split").agg(
        patients=("patient_id", "nunique"), studies=("study_uid", "nunique"), slices=("sop_uid", "size"))
    train = cat[cat.split == "train"]
    prev = pd.DataFrame({
        "slice %": train[list(LABELS)].mean() * 100,
        "study %": train.groupby("study_uid")[list(LABELS)].max().mean() * 100,
        "positive slices": train[list(LABELS)].sum().astype(int),
    })
    per_study = cat.groupby("study_uid").agg(n_slices=("n_slices", "first"), spacing=("spacing_z", "median"))
    geometry = pd.DataFrame({
        "slices per study": per_study.n_slices.describe(),
        "z spacing (mm)": per_study.spacing.describe(),
    }).T[["min", "50%", "mean", "max"]]
    sizes = cat.groupby(["rows", "cols"]).size().rename("slices").reset_index()
    out = {"counts": counts, "prevalence": prev.round(2), "geometry": geometry.round(2), "sizes": sizes}
    if quarantine is not None:
        reasons = quarantine["reason"].str.split(":").str[0] if len(quarantine) else quarantine["reason"]
        out["quarantine"] = reasons.value_counts().rename_axis("reason").rename("files").reset_index()
    if "fold" in cat:
        out["folds"] = train.groupby("fold").agg(
            patients=("patient_id", "nunique"), slices=("sop_uid", "size"), any_pct=("any", "mean"))
    return out


def sample_rows(cat: pd.DataFrame, n: int, seed: int = 0) -> np.ndarray:
    """Cache rows of ``n`` random catalog slices (sorted, for memmap-friendly reads)."""
    rng = np.random.default_rng(seed)
    take = rng.choice(len(cat), size=min(n, len(cat)), replace=False)
    return np.sort(cat["row"].to_numpy()[take])


def plot_hu_histogram(cache: np.ndarray, rows: np.ndarray, ax: Any = None) -> Any:
    """HU histogram over some cache rows with tissue bands and the three windows marked."""

    ax = ax or plt.subplots(figsize=(10, 4))[1]
    hu = np.asarray(cache[rows], dtype=np.float32).ravel()
    ax.hist(hu, bins=np.arange(-1100, 2100, 10), color="0.3", log=True)
    colors = plt.cm.tab10(np.linspace(0, 1, len(TISSUES)))
    for (name, (lo, hi)), col in zip(TISSUES.items(), colors, strict=True):
        ax.axvspan(lo, hi, color=col, alpha=0.25, label=name)
    for name in ("brain", "subdural"):
        c, w = WINDOWS[name]
        ax.axvline(c - w / 2, ls="--", lw=0.8, color="k")
        ax.axvline(c + w / 2, ls="--", lw=0.8, color="k")
    ax.set(xlabel="HU", ylabel="pixels (log)", title="HU histogram over sampled slices (dashed: brain and subdural windows)")
    ax.legend(ncol=4, fontsize=8)
    return ax


def zoom_hu_histogram(cache: np.ndarray, rows: np.ndarray, ax: Any = None) -> Any:
    """The brain range (-20..120 HU) of the histogram, where grey/white matter, CSF and blood separate."""

    ax = ax or plt.subplots(figsize=(10, 3))[1]
    hu = np.asarray(cache[rows], dtype=np.float32).ravel()
    hu = hu[(hu > -20) & (hu < 120)]
    ax.hist(hu, bins=140, color="0.3")
    for name in ("CSF", "white matter", "grey matter", "acute blood"):
        lo, hi = TISSUES[name]
        ax.axvspan(lo, hi, alpha=0.2, label=name, color=plt.cm.Set1(list(TISSUES).index(name) % 9))
    ax.set(xlabel="HU", ylabel="pixels", title="brain range")
    ax.legend(fontsize=8)
    return ax


def neighbours(cat: pd.DataFrame, i: int, cache: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU of slice ``i`` (catalog position) and its z-neighbours (s-1, s, s+1)."""
    r = cat.iloc[i]
    return (np.asarray(cache[int(r.prev_row)], np.float32), np.asarray(cache[int(r.row)], np.float32),
            np.asarray(cache[int(r.next_row)], np.float32))


def plot_windows(hu: np.ndarray, title: str = "") -> Any:
    """One slice as raw HU and under each window preset."""

    fig, axes = plt.subplots(1, len(WINDOWS) + 1, figsize=(3 * (len(WINDOWS) + 1), 3.2))
    axes[0].imshow(hu, cmap="gray", vmin=-1000, vmax=2000)
    axes[0].set_title("HU -1000..2000")
    for ax, (name, (c, w)) in zip(axes[1:], WINDOWS.items(), strict=True):
        ax.imshow(window(hu, c, w), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{name} {c:g}/{w:g}")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def plot_composite(prev: np.ndarray, cur: np.ndarray, nxt: np.ndarray, recipe: str = "seed_3window",
                   single_window: tuple[float, float] = WINDOWS["brain"], title: str = "") -> Any:
    """The three channels the network sees, and their RGB composite."""

    ch = channels(prev, cur, nxt, recipe, single_window)
    names = {"seed_3window": ["brain(s-1)", "subdural(s)", "bone(s+1)"],
             "adjacent_header": ["s-1", "s", "s+1"],
             "three_window": ["brain(s)", "subdural(s)", "bone(s)"]}[recipe]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for k in range(3):
        axes[k].imshow(ch[k], cmap="gray", vmin=0, vmax=1)
        axes[k].set_title(f"channel {k}: {names[k]}")
    axes[3].imshow(np.moveaxis(ch, 0, -1))
    axes[3].set_title(f"RGB composite ({recipe})")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def subtype_examples(cat: pd.DataFrame, per_subtype: int = 2) -> pd.DataFrame:
    """For each subtype, training slices from the middle of positive runs (the clearest examples)."""
    train = cat[cat.split == "train"]
    picks = []
    for sub in SUBTYPES:
        pos = train[train[sub] == 1]
        for study, g in list(pos.groupby("study_uid"))[:per_subtype]:
            mid = g.iloc[len(g) // 2]
            picks.append({"subtype": sub, "study_uid": study, "position": int(cat.index.get_loc(mid.name)),
                          "sop_uid": mid.sop_uid, "slice_index": int(mid.slice_index)})
    return pd.DataFrame(picks)


def plot_subtype_examples(cat: pd.DataFrame, cache: np.ndarray, picks: pd.DataFrame) -> Any:
    """Grid of example slices per subtype under the brain and subdural windows."""

    n = max(len(picks), 1)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.6), squeeze=False)
    for j, p in enumerate(picks.itertuples()):
        hu = np.asarray(cache[int(cat.iloc[p.position].row)], np.float32)
        axes[0, j].imshow(window(hu, *WINDOWS["brain"]), cmap="gray")
        axes[1, j].imshow(window(hu, *WINDOWS["subdural"]), cmap="gray")
        axes[0, j].set_title(f"{p.subtype}\nslice {p.slice_index}", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].text(-0.1, 0.5, "brain", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "subdural", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    return fig


def slice_caption(row: Any, n: int) -> str:
    """How every view names a slice: ``slice k/n`` (1-based, z order), z, and its labels.

    A test (or otherwise unlabelled) slice is captioned ``unlabelled``, never "no hemorrhage"."""
    labelled = row.get("split", "train") != "test" and pd.notna(row.get("any", np.nan))
    if not labelled:
        what = "unlabelled (test split)" if row.get("split") == "test" else "unlabelled"
    else:
        what = ", ".join(s for s in SUBTYPES if row.get(s, 0) == 1) or "no hemorrhage"
    return f"slice {int(row['slice_index']) + 1}/{n}, z = {float(row['z']):.1f} mm: {what}"


def display_width(native: int, max_px: int = 400, max_zoom: int = 4) -> int:
    """On-screen width of an image ``native`` pixels wide: at most ``max_zoom`` x, at most ``max_px``."""
    return int(min(max_px, max_zoom * max(1, native)))


def study_montage(cat: pd.DataFrame, cache: np.ndarray, study_uid: str, window_name: str = "brain",
                  max_slices: int = 16) -> Any:
    """Static view of a study: evenly spaced slices in z order with their labels (the headless browser).

    Slices are numbered 1..n as in the interactive browser and in notebook 06's viewer."""

    g = cat[cat.study_uid == study_uid]
    idx = np.unique(np.linspace(0, len(g) - 1, min(max_slices, len(g))).round().astype(int))
    cols = min(8, len(idx))
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.3 * rows + 0.3), squeeze=False)
    c, w = WINDOWS[window_name]
    test = bool((g["split"] == "test").all()) if "split" in g else False
    for ax, k in zip(axes.ravel(), idx, strict=False):
        r = g.iloc[k]
        ax.imshow(window(np.asarray(cache[int(r.row)], np.float32), c, w), cmap="gray")
        labs = [] if test else [s for s in SUBTYPES if r.get(s, 0) == 1]
        ax.set_title(f"{k + 1}/{len(g)}: z={r.z:.0f}" + ("\n" + ",\n".join(labs) if labs else ""), fontsize=7,
                     color="red" if labs else "black")
    for ax in axes.ravel():
        ax.axis("off")
    state = "unlabelled test study" if test else "labels in red"
    fig.suptitle(f"study {study_uid} ({window_name} window; {state})", fontsize=9)
    fig.tight_layout()
    return fig


def window_png(hu: np.ndarray, center: float, width: float) -> bytes:
    """One slice under a window as 8-bit grey PNG bytes at its native size (the browser scales it)."""

    img = np.round(window(hu, center, width) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def study_browser(cat: pd.DataFrame, cache: np.ndarray, study_uid: str | None = None) -> Any:
    """An ipywidgets control to scroll a study's slices and switch windows (JupyterLab).

    Laid out for a 1366x768 screen: the image (native pixels, at most 4x / 400 px) beside the controls and
    caption. Slider and caption number slices 1..n in z order, as notebook 06's viewer does; test studies
    are captioned as unlabelled. Returns the widget box; ``.controls`` and ``.render()`` serve tests.
    """

    studies = list(dict.fromkeys(cat.study_uid))
    wide = {"description_width": "initial"}
    study = W.Dropdown(options=studies, value=study_uid or studies[0], description="study", style=wide,
                       layout=W.Layout(width=f"{min(640, 80 + 8 * max(len(s) for s in studies))}px"))
    win = W.ToggleButtons(options=list(WINDOWS), value="brain", description="window",
                          style={"button_width": "84px", **wide})
    slider = W.IntSlider(min=1, max=1, value=1, description="slice", continuous_update=True, style=wide,
                         layout=W.Layout(width="420px"))
    image = W.Image(format="png", layout=W.Layout(margin="0 12px 0 0"))
    caption = W.HTML()
    for w_, css in [(study, "ichd-browser-study"), (win, "ichd-browser-window"), (slider, "ichd-browser-slider"),
                    (image, "ichd-browser-image"), (caption, "ichd-browser-caption")]:
        w_.add_class(css)

    def rows_of(s: str) -> pd.DataFrame:
        return cat[cat.study_uid == s]

    def render(*_: Any) -> None:
        g = rows_of(study.value)
        r = g.iloc[min(max(slider.value, 1), len(g)) - 1]
        hu = np.asarray(cache[int(r.row)], np.float32)
        image.value = window_png(hu, *WINDOWS[win.value])
        image.layout.width = f"{display_width(hu.shape[1])}px"
        caption.value = f"<b>{r.sop_uid}</b><br>{slice_caption(r, len(g))}"

    def on_study(*_: Any) -> None:
        n = len(rows_of(study.value))
        slider.value = 1
        slider.max = n
        slider.value = (n + 1) // 2
        render()

    study.observe(on_study, names="value")
    slider.observe(render, names="value")
    win.observe(render, names="value")
    on_study()
    side = W.VBox([study, win, slider, caption], layout=W.Layout(min_width="440px"))
    box = W.HBox([image, side], layout=W.Layout(align_items="flex-start"))
    box.add_class("ichd-browser")
    box.render = render  # type: ignore[attr-defined]
    box.controls = {"study": study, "window": win, "slider": slider, "image": image,  # type: ignore[attr-defined]
                    "caption": caption}
    return box
