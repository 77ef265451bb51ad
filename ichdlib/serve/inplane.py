"""In-plane field-of-view (FOV) normalisation at inference: a series from a scanner with another field of view
is shown to the models at the physical scale of the training data.

The HU cache (:func:`ichdlib.ingest.cache.resize_hu`) resizes each whole slice (rows x cols) to ``size x size``,
so a cache pixel is ``PixelSpacing * cols / size`` mm wide: a scanner with a 1.3x wider field of view shows the
head 1.3x smaller than any training image. ``ichd export`` records the training slices' physical field of view
in the bundle (``training.inplane``, :func:`inplane_section`: per study the median of ``pixel_spacing x cols``
(and ``x rows``), then the 2nd percentile, median and 98th percentile over the training studies).

At inference (:func:`plan_series`, used by :class:`ichdlib.serve.pipeline.Predictor` for ``ichd predict``,
``ichd validate`` and the shift scoring), a series whose field of view lies outside the training range widened by
:data:`TOLERANCE` is resampled so that its field of view equals the training median: each slice becomes the
central box of ``median_fov / pixel_spacing`` pixels per axis (:class:`Box`: a wider field of view is cropped,
a narrower one padded with air, :data:`AIR_HU`), resized to the cache size as ``resize_hu`` does (area
interpolation when shrinking), one slice at a time. Inside the range nothing changes: the cache rows are exactly
``resize_hu``'s. Maps computed on the cache (Grad-CAM) go back to the slice's own pixel grid through
:meth:`Box.to_original`, the inverse of the crop/pad.

A series without PixelSpacing is not normalised (a warning names it); a bundle that records no training field of
view (exported before this) is not normalised either (said once per bundle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pandas as pd

from ichdlib.ingest.cache import resize_hu

log = logging.getLogger(__name__)

#: Value of the padding around a slice whose field of view is narrower than the training data's (air).
AIR_HU = -1024.0
#: Relative margin around the training range within which a series is left as it is.
TOLERANCE = 0.05
#: Percentiles of the per-study field of view recorded as the training range.
QUANTILES = (2.0, 50.0, 98.0)
#: Largest box side (pixels) a resample may ask for; beyond it (an absurd PixelSpacing) nothing is done.
MAX_SIDE = 8192


# --------------------------------------------------------------------------------------------------
# What the bundle records
# --------------------------------------------------------------------------------------------------
def _quantiles(values: pd.Series) -> dict[str, float]:
    lo, mid, hi = np.percentile(values.to_numpy(np.float64), QUANTILES)
    return {"p02": round(float(lo), 2), "median": round(float(mid), 2), "p98": round(float(hi), 2)}


def inplane_section(cat: pd.DataFrame) -> dict[str, Any] | None:
    """``training.inplane`` of the bundle from the training catalog (``split``, ``study_uid``, ``pixel_spacing``,
    ``rows``, ``cols``): the physical field of view per slice (``fov_x_mm`` = spacing x cols, ``fov_y_mm`` =
    spacing x rows; the catalog keeps one spacing, training pixels are square), its median per study, then the
    2nd/50th/98th percentiles over studies. None when the catalog has no usable spacing."""
    t = cat[cat["split"] == "train"] if "split" in cat.columns else cat
    ps = pd.to_numeric(t["pixel_spacing"], errors="coerce")
    fov = pd.DataFrame({"study_uid": t["study_uid"], "x": ps * pd.to_numeric(t["cols"], errors="coerce"),
                        "y": ps * pd.to_numeric(t["rows"], errors="coerce")})
    fov = fov[np.isfinite(fov["x"]) & np.isfinite(fov["y"]) & (fov["x"] > 0) & (fov["y"] > 0)]
    if fov.empty:
        return None
    per_study = fov.groupby("study_uid")[["x", "y"]].median()
    return {"fov_x_mm": _quantiles(per_study["x"]), "fov_y_mm": _quantiles(per_study["y"]),
            "n_studies": int(len(per_study)),
            "source": "field of view (PixelSpacing x Columns / Rows) of the training slices: median per study, "
                      "2nd/50th/98th percentile over studies (the catalog)"}


@dataclass(frozen=True)
class TrainingFov:
    """The training data's field of view per axis (mm): ``(p02, median, p98)`` across x (columns) and y (rows)."""

    x: tuple[float, float, float]
    y: tuple[float, float, float]

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> TrainingFov | None:
        """From a bundle manifest's ``training.inplane``; None for a bundle that records none."""
        sec = (manifest.get("training") or {}).get("inplane")
        if not sec:
            return None
        q = [(float(sec[a]["p02"]), float(sec[a]["median"]), float(sec[a]["p98"])) for a in ("fov_x_mm", "fov_y_mm")]
        return cls(*q)

    def inside(self, fov_x: float, fov_y: float, tolerance: float = TOLERANCE) -> bool:
        """Whether a series' field of view lies in the training range widened by ``tolerance``."""
        return all(lo * (1 - tolerance) <= v <= hi * (1 + tolerance)
                   for v, (lo, _, hi) in ((fov_x, self.x), (fov_y, self.y)))

    @property
    def median(self) -> tuple[float, float]:
        """``(fov_y, fov_x)`` medians (mm): the field of view a resampled series is given."""
        return self.y[1], self.x[1]


# --------------------------------------------------------------------------------------------------
# One slice: forward (slice -> cache row) and inverse (cache-frame map -> slice grid)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """The part of a ``rows x cols`` slice that becomes the cache image: ``height x width`` pixels from
    ``(top, left)`` (it may reach outside the slice: that part is air). The whole slice is the identity."""

    rows: int
    cols: int
    top: int = 0
    left: int = 0
    height: int = 0
    width: int = 0

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:  # the identity box of a slice
            object.__setattr__(self, "height", self.rows)
            object.__setattr__(self, "width", self.cols)

    @property
    def identity(self) -> bool:
        return (self.top, self.left, self.height, self.width) == (0, 0, self.rows, self.cols)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``: the box in slice pixels (the ``out_size`` of a map before :meth:`to_original`)."""
        return self.height, self.width

    def _overlap(self) -> tuple[int, int, int, int]:
        """Rows ``r0:r1`` and columns ``c0:c1`` of the slice inside the box."""
        return (max(self.top, 0), min(self.top + self.height, self.rows),
                max(self.left, 0), min(self.left + self.width, self.cols))

    def to_cache(self, hu: np.ndarray, size: int) -> np.ndarray:
        """The slice's cache row ``(size, size)`` int16: :func:`ichdlib.ingest.cache.resize_hu` of the box (air
        outside the slice). The identity box gives ``resize_hu(hu, size)`` exactly. Memory: the slice and the
        output only (the padded box is never built)."""
        if self.identity:
            return resize_hu(hu, size)
        r0, r1, c0, c1 = self._overlap()
        if r0 >= r1 or c0 >= c1:
            return resize_hu(np.full((size, size), AIR_HU, np.float32), size)
        if r0 == self.top and c0 == self.left and r1 - r0 == self.height and c1 - c0 == self.width:
            return resize_hu(np.asarray(hu)[r0:r1, c0:c1], size)  # a crop inside the slice
        # the slice's part of the box, resized into its footprint on an air canvas
        sy, sx = size / self.height, size / self.width
        o_r0, o_r1 = int(round((r0 - self.top) * sy)), int(round((r1 - self.top) * sy))
        o_c0, o_c1 = int(round((c0 - self.left) * sx)), int(round((c1 - self.left) * sx))
        o_r1, o_c1 = max(o_r1, o_r0 + 1), max(o_c1, o_c0 + 1)
        part = np.asarray(hu, dtype=np.float32)[r0:r1, c0:c1]
        shrink = part.shape[0] >= o_r1 - o_r0 and part.shape[1] >= o_c1 - o_c0
        canvas = np.full((size, size), AIR_HU, np.float32)
        canvas[o_r0:o_r1, o_c0:o_c1] = cv2.resize(part, (o_c1 - o_c0, o_r1 - o_r0),
                                                  interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return resize_hu(canvas, size)

    def to_original(self, maps: np.ndarray) -> np.ndarray:
        """Maps over the box (``(..., height, width)``, e.g. Grad-CAM computed with ``out_size=box.size``) ->
        ``(..., rows, cols)`` on the slice's pixel grid: the inverse of :meth:`to_cache`'s crop/pad (zero where
        the slice lies outside the box). The identity box returns ``maps`` itself."""
        maps = np.asarray(maps)
        if maps.shape[-2:] != self.size:
            raise ValueError(f"maps of shape {maps.shape[-2:]} for a box of {self.size}")
        if self.identity:
            return maps
        r0, r1, c0, c1 = self._overlap()
        out = np.zeros((*maps.shape[:-2], self.rows, self.cols), dtype=maps.dtype)
        if r0 < r1 and c0 < c1:
            out[..., r0:r1, c0:c1] = maps[..., r0 - self.top:r1 - self.top, c0 - self.left:c1 - self.left]
        return out


def fov_box(shape: tuple[int, int], spacing: tuple[float, float], target: tuple[float, float]) -> Box:
    """The centred box of a ``rows x cols`` slice with ``spacing`` ``(row mm, col mm)`` whose physical size is
    ``target`` ``(height mm, width mm)`` (anisotropic pixels and non-square slices included)."""
    rows, cols = int(shape[0]), int(shape[1])
    h = max(1, int(round(target[0] / spacing[0])))
    w = max(1, int(round(target[1] / spacing[1])))
    return Box(rows, cols, int(round((rows - h) / 2)), int(round((cols - w) / 2)), h, w)


# --------------------------------------------------------------------------------------------------
# One series
# --------------------------------------------------------------------------------------------------
@dataclass
class InplanePlan:
    """What happens in plane to one loaded series: a :class:`Box` per slice, the series' field of view
    (``fov_mm``: x, columns; ``fov_y_mm``: rows; None without PixelSpacing), the note for the outputs
    (``"resampled from X mm to Y mm field of view"`` or empty) and a warning when nothing could be decided."""

    boxes: list[Box]
    fov_mm: float | None = None
    fov_y_mm: float | None = None
    note: str = ""
    warning: str = ""

    @property
    def changed(self) -> bool:
        return any(not b.identity for b in self.boxes)

    def cache(self, hu: list[np.ndarray], size: int) -> np.ndarray:
        """The series' cache rows ``(n, size, size)`` int16, slice by slice."""
        if not hu:
            return np.zeros((0, size, size), np.int16)
        return np.stack([b.to_cache(h, size) for b, h in zip(self.boxes, hu, strict=True)])


def identity_plan(hu: list[np.ndarray]) -> InplanePlan:
    """Every slice as it is (what ``resize_hu`` alone does)."""
    return InplanePlan([Box(*np.shape(h)[:2]) for h in hu])


def parse_spacing(value: Any) -> tuple[float, float] | None:
    """PixelSpacing ``(row mm, col mm)`` from a DICOM value (``"0.5\\0.6"``, a list, one number); None when absent
    or not positive and finite."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split("\\") if isinstance(value, str) else np.atleast_1d(value).tolist()
    try:
        nums = [float(p) for p in parts][:2]
    except (TypeError, ValueError):
        return None
    if not nums or not all(np.isfinite(n) and n > 0 for n in nums):
        return None
    return (nums[0], nums[-1])


def plan_series(hu: list[np.ndarray], spacing: tuple[float, float] | None, fov: TrainingFov | None,
                tolerance: float = TOLERANCE) -> InplanePlan:
    """The in-plane plan of one series (module docstring): identity when ``fov`` is None (no training field of
    view, or normalisation off), when the series has no PixelSpacing (with a warning) or when its field of view
    (the median over its slices) lies in the training range; otherwise each slice's box of the training median."""
    plan = identity_plan(hu)
    if not hu:
        return plan
    if spacing is None:
        if fov is not None:
            plan.warning = ("no PixelSpacing: the field of view is unknown, the series is not resampled to the "
                            "training field of view")
        return plan
    fov_x = float(np.median([spacing[1] * np.shape(h)[1] for h in hu]))
    fov_y = float(np.median([spacing[0] * np.shape(h)[0] for h in hu]))
    plan.fov_mm, plan.fov_y_mm = round(fov_x, 1), round(fov_y, 1)
    if fov is None or fov.inside(fov_x, fov_y, tolerance):
        return plan
    boxes = [fov_box(np.shape(h)[:2], spacing, fov.median) for h in hu]
    if max(max(b.height, b.width) for b in boxes) > MAX_SIDE:
        plan.warning = (f"PixelSpacing {spacing[0]:g} x {spacing[1]:g} mm would need a {MAX_SIDE}+ pixel box to "
                        "reach the training field of view; not resampled")
        return plan
    plan.boxes = boxes
    ty, tx = fov.median
    was = f"{fov_x:.0f}" if abs(fov_x - fov_y) < 1 else f"{fov_x:.0f} x {fov_y:.0f}"
    to = f"{tx:.0f}" if abs(tx - ty) < 1 else f"{tx:.0f} x {ty:.0f}"
    lo, hi = fov.x[0], fov.x[2]
    plan.note = f"resampled from {was} mm to {to} mm field of view (training {lo:.0f}-{hi:.0f} mm)"
    return plan


_SAID: set[str] = set()


def say_once(key: str, message: str) -> None:
    """Log ``message`` once per process for ``key`` (e.g. a bundle without a training field of view)."""
    if key not in _SAID:
        _SAID.add(key)
        log.warning(message)
