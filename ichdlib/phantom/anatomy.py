"""Phantom anatomy: one study's head geometry and one slice's rendering (with its lesions and masks)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ichdlib.labels import SUBTYPES
from ichdlib.phantom.lesions import (
    MASK_BITS,
    MIN_LESION_MM2,
    MIN_LESION_PX,
    MIN_SLAB_COVER,
    Lesion,
    draw_lesions,
)
from ichdlib.phantom.shift import ScannerShift


# ----------------------------------------------------------------------------------------------------
# Anatomy: one study's geometry and one slice's rendering
# ----------------------------------------------------------------------------------------------------
def _soft(d: np.ndarray | float, w: float) -> np.ndarray:
    """Membership of the region ``d < 0`` with a linear ramp one pixel (``w`` mm) wide: partial volume."""
    return np.clip(0.5 - np.asarray(d) / w, 0.0, 1.0)


def _bump(s: float, lo: float, hi: float) -> float:
    """0 outside (lo, hi), rising to 1 in the middle (a structure's extent along z)."""
    if s <= lo or s >= hi:
        return 0.0
    return math.sin(math.pi * (s - lo) / (hi - lo))


def _profile(s: float) -> tuple[float, float]:
    """Relative in-plane size of the cranial cavity at level ``s`` (0 base, ~1 vertex) and its slope."""
    if s >= 0.45:
        x = (s - 0.45) / 0.58
        if x >= 1.0:
            return 0.0, -1e9
        p = math.sqrt(1.0 - x * x)
        return p, -x / (0.58 * max(p, 1e-6))
    t = (0.45 - s) / 0.5
    return 1.0 - 0.35 * t * t, 0.35 * 2 * t / 0.5


_VERTEX = 0.45 + 0.58


class _Head:
    """One study's anatomy parameters and its pixel grid in head coordinates (mm).

    ``u`` runs to the patient's left, ``v`` posterior (image down), the angle ``alpha`` is 0 anteriorly and
    +-pi at the occiput (where the interhemispheric fissure hides the seam of the gyral pattern).
    """

    def __init__(self, plan: Any, rng: np.random.Generator):
        r = rng.uniform
        sh = getattr(plan, "shift", None) or ScannerShift()
        self.A = r(62.0, 72.0)
        self.B = self.A * r(1.16, 1.30)
        self.T0, self.Tv, self.S = r(4.5, 6.5), r(0.1, 0.35), r(4.0, 7.0)
        self.egg, self.h2, self.h3 = r(0.02, 0.06), rng.normal(0, 0.01), rng.normal(0, 0.008)
        self.ph2, self.ph3 = r(0, 2 * math.pi), r(0, 2 * math.pi)
        theta = math.radians(r(-8.0, 8.0))
        cx, cy = np.clip(rng.normal(0.0, 4.0, 2), -10, 10)
        extent = 2 * (self.B * (1 + self.egg) + self.T0 * (1 + self.Tv) + self.S)
        fov = (extent * r(1.06, 1.18) + 2 * max(abs(cx), abs(cy))) * sh.fov_scale
        self.ps = round(fov / plan.size, 6)
        self.H = plan.head_height
        # Tissue values (HU).
        self.white = r(26.0, 30.0)
        self.grey = self.white + r(8.0, 12.0)
        self.csf = r(2.0, 12.0)
        self.scalp = r(30.0, 50.0)
        self.table, self.diploe = r(1300.0, 1800.0), r(500.0, 900.0)
        self.petrous = r(1600.0, 2100.0)
        # Image quality.
        self.noise = r(1.5, 4.5) * (0.47 / self.ps) ** 0.5 * sh.noise_scale
        self.blur_mm = r(0.3, 0.8) * sh.blur_scale
        # Folding, CSF spaces, ventricles.
        self.k0 = r(16.0, 24.0)
        self.sulc_w = r(1.0, 2.6)
        self.depth = r(12.0, 18.0)
        self.cortex = r(2.5, 3.5)
        self.csf_w = r(0.2, 1.2)
        self.vscale = r(0.75, 1.5)
        # Gyral pattern: two families of sulci (the second gated, for branching), each bent by warps.
        self.warp = [(r(1.0, 2.5), r(0.1, 0.2), r(0, 6.3), r(0.4, 1.0), int(rng.integers(3, 7)), r(0, 6.3))
                     for _ in range(2)]
        self.k1 = r(0.55, 0.8)
        # Mimics and artefacts.
        self.calc = {
            "choroid": (rng.random() < 0.6, r(110.0, 300.0), r(1.6, 3.2)),
            "pineal": (rng.random() < 0.5, r(100.0, 250.0), r(1.8, 3.0)),
            "falx": (rng.random() < 0.2, r(150.0, 400.0), r(8.0, 20.0)),
            "basal": (rng.random() < 0.12, r(90.0, 200.0), r(1.5, 2.8)),
        }
        self.beam = r(8.0, 25.0)
        self.beam_n, self.beam_ph = int(rng.integers(6, 12)), r(0, 6.3)
        self.cup = r(1.0, 5.0)
        self.lowfreq = rng.normal(0.0, r(1.0, 3.0), size=(max(3, plan.n_slices // 5 + 2), 5, 5)).astype(np.float32)
        # Pixel grid, cropped to the head's bounding box (outside is air plus noise).
        rows, cols = plan.rows, plan.cols
        self.full_shape = (rows, cols)
        y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * self.ps - cy
        x = (np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * self.ps - cx
        X, Y = np.meshgrid(x, y)
        c, s = math.cos(theta), math.sin(theta)
        u, v = c * X + s * Y, -s * X + c * Y
        reach = self.B * (1 + self.egg + 0.05) + self.T0 * (1 + self.Tv) + self.S + 3 * self.ps + 2.0
        inside = np.hypot(u, v) < reach
        rr, cc = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        self.crop = (slice(int(rr[0]), int(rr[-1]) + 1), slice(int(cc[0]), int(cc[-1]) + 1))
        self.u = np.ascontiguousarray(u[self.crop], dtype=np.float32)
        self.v = np.ascontiguousarray(v[self.crop], dtype=np.float32)
        self.rho = np.hypot(self.u, self.v)
        self.alpha = np.arctan2(self.u, -self.v)
        self._rot = (c, s, cx, cy, rows, cols, int(rr[0]), int(cc[0]))
        ca, sa = np.cos(self.alpha), np.sin(self.alpha)
        ell = self.A * self.B / np.sqrt((self.B * sa) ** 2 + (self.A * ca) ** 2)
        self.R0 = (ell * (1 - self.egg * ca + self.h2 * np.cos(2 * self.alpha + self.ph2)
                          + self.h3 * np.cos(3 * self.alpha + self.ph3))).astype(np.float32)
        self.R0_mean = (self.A + self.B) / 2  # for the slope of the skull along z
        self.T = (self.T0 * (1 + self.Tv * ca * ca)).astype(np.float32)
        self.ca = ca.astype(np.float32)
        self._cells: np.ndarray | None = None
        self._cell_seed = int(rng.integers(0, 2**31))
        # Inner-table radius straight ahead (alpha = 0), for the frontal sinus.
        self.R_front = self.B * (1 - self.egg + self.h2 * math.cos(self.ph2) + self.h3 * math.cos(self.ph3))

    # -- helpers on sub-windows ------------------------------------------------------------------
    def window(self, cu: float, cv: float, radius: float) -> tuple[slice, slice] | None:
        """Pixel window covering the disc of ``radius`` mm around head point (cu, cv); None if outside."""
        c, s, cx, cy, rows, cols, top, left = self._rot
        X, Y = c * cu - s * cv + cx, s * cu + c * cv + cy
        col, row = X / self.ps + (cols - 1) / 2 - left, Y / self.ps + (rows - 1) / 2 - top
        half = radius / self.ps + 2
        h, w = self.u.shape
        r0, r1 = max(0, int(row - half)), min(h, int(math.ceil(row + half)) + 1)
        c0, c1 = max(0, int(col - half)), min(w, int(math.ceil(col + half)) + 1)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ellipse(self, cu: float, cv: float, a: float, b: float, ang: float = 0.0):
        """(window, membership) of an ellipse with half-axes a (along u) and b (along v), rotated by ang."""
        a, b = max(a, 1e-3), max(b, 1e-3)
        win = self.window(cu, cv, max(a, b) + self.ps)
        if win is None:
            return None, None
        du, dv = self.u[win] - cu, self.v[win] - cv
        if ang:
            c, s = math.cos(ang), math.sin(ang)
            du, dv = c * du + s * dv, -s * du + c * dv
        e = np.sqrt((du / a) ** 2 + (dv / b) ** 2)
        return win, _soft((e - 1.0) * min(a, b), self.ps)

    def capsule(self, p1: tuple[float, float], p2: tuple[float, float], half: float, half2: float | None = None):
        """(window, distance in mm) to the segment p1-p2 minus its half width (negative inside).

        The half width runs linearly from ``half`` at p1 to ``half2`` (default ``half``) at p2 (a wedge).
        """
        return self.polyline([p1, p2], half, half2)

    def polyline(self, pts: list[tuple[float, float]], half: float, half2: float | None = None, win=None):
        """(window, distance in mm) to a polyline minus its half width (tapering from ``half`` to ``half2``).

        The window covers the polyline unless one is given.
        """
        half2 = half if half2 is None else half2
        if win is None:
            us, vs = [p[0] for p in pts], [p[1] for p in pts]
            cu, cv = (min(us) + max(us)) / 2, (min(vs) + max(vs)) / 2
            radius = math.hypot(max(us) - min(us), max(vs) - min(vs)) / 2 + max(half, half2) + self.ps
            win = self.window(cu, cv, radius)
        if win is None:
            return None, None
        uu, vv = self.u[win], self.v[win]
        seg = [math.hypot(b[0] - a[0], b[1] - a[1]) for a, b in zip(pts[:-1], pts[1:], strict=True)]
        total, done, best = max(sum(seg), 1e-6), 0.0, None
        for (a, b), length in zip(zip(pts[:-1], pts[1:], strict=True), seg, strict=True):
            du, dv = uu - a[0], vv - a[1]
            eu, ev = b[0] - a[0], b[1] - a[1]
            t = np.clip((du * eu + dv * ev) / max(eu * eu + ev * ev, 1e-6), 0.0, 1.0)
            frac = (done + t * length) / total
            d = np.hypot(du - t * eu, dv - t * ev) - (half + (half2 - half) * frac)
            best = d if best is None else np.minimum(best, d)
            done += length
        return win, best

    def cells(self, win) -> np.ndarray:
        """A fixed random texture in [0, 1] (about 2 mm blobs) for air cells, on window ``win``."""
        if self._cells is None:

            rows, cols = self.u.shape
            n = max(4, int(rows * self.ps / 2.0)), max(4, int(cols * self.ps / 2.0))
            n = n[0], n[1]
            rng = np.random.default_rng(self._cell_seed)
            low = rng.random(n).astype(np.float32)
            self._cells = cv2.resize(low, (cols, rows), interpolation=cv2.INTER_CUBIC)
        return self._cells[win]

    def lowfreq_at(self, k: float, shape: tuple[int, int]) -> np.ndarray:
        """Smooth parenchymal variation for slice position ``k`` (in units of 5 slices)."""

        g = self.lowfreq
        k = min(max(k, 0.0), g.shape[0] - 1.001)
        i = int(k)
        plane = (1 - (k - i)) * g[i] + (k - i) * g[i + 1]
        return cv2.resize(plane, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _paint(img: np.ndarray, win, value, m) -> None:
    """Blend ``value`` into ``img`` with membership ``m`` (on window ``win``; None = whole image)."""
    if m is None:
        return
    if win is None:
        img += (value - img) * m
    else:
        sub = img[win]
        sub += (value - sub) * m


def _max_into(acc: np.ndarray, win, m) -> None:
    if m is not None:
        np.maximum(acc[win], m, out=acc[win])


class _Slice:
    """The arrays of one rendered slice that lesions reuse (sulci, ventricles, cisterns, brain masks)."""

    def __init__(self, head: _Head, s: float):
        self.s = s
        p, dp = _profile(s)
        self.p = p
        if s >= _VERTEX:
            self.d3 = np.hypot(head.rho, (s - _VERTEX) * head.H)
            self.k = 1.0
        else:
            self.k = min(5.0, math.sqrt(1.0 + (head.R0_mean * dp / head.H) ** 2))
            self.d3 = (head.rho - head.R0 * p) / self.k
        self.w = head.ps / self.k
        self.band = np.empty(0, np.intp)
        self.sulc: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.vent: dict[float, np.ndarray] = {}
        self.cistern: np.ndarray | None = None
        self.sylvian: dict[float, list] = {}


def _sv(head: _Head, u: float, v: float) -> tuple[float, float]:
    """Scale a canonical head position (mm, for A=68, B=85) to this head."""
    return u * head.A / 68.0, v * head.B / 85.0


def render_slice(head: _Head, s: float, k: int, lesions: list[Lesion], min_px: int,
                 slab: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU (float32) and the lesion bitmask (uint8) of the slice at level ``s``, on the head crop.

    ``slab`` is half the slice thickness in head-height units: lesions that fill only part of the slab are
    drawn at the size of that part's middle level with proportionally lower contrast (partial volume).
    """

    H = head
    sl = _Slice(H, s)
    d3, w, ps = sl.d3, sl.w, H.ps
    shape = d3.shape
    T = H.T
    # -- scalp and skull, computed on the ring around the inner table only -------------------------
    img = np.where(d3 < 0, np.float32(H.table), np.float32(-1000.0))
    ring = np.flatnonzero(((d3 > -w) & (d3 - T < H.S + w)).ravel())
    d, t = d3.ravel()[ring], T.ravel()[ring]
    val = -1000.0 + (H.scalp + 1000.0) * _soft(d - t - H.S, w)
    # Two tables and the diploe between them; with under ~4 pixels across the skull only their average shows.
    layered = min(1.0, max(0.0, (H.T0 / ps - 1.5) / 3.0))
    dip = layered * np.sin(np.pi * np.clip(d / t, 0.0, 1.0)) ** 2 + (1.0 - layered) * 0.5
    bone = H.table - (H.table - H.diploe) * dip
    val += (bone - val) * _soft(d - t, w)
    img.ravel()[ring] = val
    m_cran = _soft(d3, w)
    # -- parenchyma: cortex, sulci and the rim, computed in the band under the surface -------------
    brain = H.white + H.lowfreq_at(k / 5.0, shape)
    band = np.flatnonzero(((d3 > -(H.depth + H.cortex + 2 * ps + 2.0)) & (d3 < w)).ravel())
    sl.band = band
    b_alpha, b_rho, b_d3 = H.alpha.ravel()[band], H.rho.ravel()[band], d3.ravel()[band]
    csf_w = H.csf_w * (1.0 + 0.6 * H.ca.ravel()[band] ** 2)
    surf = -(b_d3 + csf_w)  # depth below the pial surface (mm)
    ks = max(8.0, H.k0 * max(sl.p, 0.35))
    d_sulc = depth = None
    for j, (a1, f1, ph1, a2, n2, ph2) in enumerate(H.warp):
        kj = ks if j == 0 else ks * H.k1
        X = kj * b_alpha + a1 * np.sin(b_rho * f1 + ph1 + 9.0 * s) + a2 * np.sin(n2 * b_alpha + ph2 + 6.0 * s)
        dj = np.abs(np.mod(X + np.pi / 2, np.pi) - np.pi / 2) * (b_rho + 1.0) / kj
        if j == 0:
            d_sulc = dj
            depth = H.depth * (0.7 + 0.3 * np.sin(0.5 * X + 7.0 * s))
        else:
            gate = np.sin(2.0 * X / kj * 3 + ph1 + 4.0 * s) > 0.3
            d_sulc = np.where(gate, np.minimum(d_sulc, dj), d_sulc)
    sw = np.maximum(H.sulc_w * np.sqrt(np.clip(1.0 - surf / depth, 0.0, 1.0)), 0.25)
    sl.sulc = (d_sulc, surf, depth)
    grey = np.zeros(shape, np.float32)
    csf = np.zeros(shape, np.float32)
    grey_d = np.minimum(surf, np.hypot(np.maximum(d_sulc - sw / 2, 0), np.maximum(surf - depth, 0)))
    grey.ravel()[band] = _soft(grey_d - H.cortex, ps)
    csf.ravel()[band] = np.maximum(_soft(np.maximum(d_sulc - sw / 2, surf - depth), ps), _soft(surf, w))
    brain.ravel()[band] += H.cup * np.exp(np.minimum(b_d3, 0) / 6.0)  # bright rim under the skull: a mimic
    # Interhemispheric fissure (full length above the corpus callosum, front and back below it).
    region = None
    if 0.3 < s:
        R_ap = H.B * sl.p
        region = np.ones(shape, bool) if s > 0.72 else (H.v < -0.28 * R_ap) | (H.v > 0.42 * R_ap)
        fiss = np.abs(H.u) - 0.9
        np.maximum(csf, _soft(fiss, ps) * region, out=csf)
        np.maximum(grey, _soft(np.maximum(fiss, 0) - H.cortex, ps) * region, out=grey)
    # Deep grey nuclei.
    for sd in (-1.0, 1.0):
        for (cu, cv, a, b, ang, lo, hi) in ((11, -16, 5, 7, 0, 0.40, 0.60), (9, 6, 8, 11, 0, 0.33, 0.52),
                                            (22, -6, 5, 14, -0.26, 0.34, 0.52)):
            f = _bump(s, lo, hi)
            if f > 0:
                win, m = H.ellipse(*_sv(H, sd * cu, cv), a * f**0.5, b * f**0.5, sd * ang)
                _max_into(grey, win, m)
    brain += (H.grey - 4.0 - brain) * grey
    # Sylvian fissures and basal cisterns.
    for sd in (-1.0, 1.0):
        f = _bump(s, 0.30, 0.50)
        if f > 0:
            lat = H.A * sl.p
            pts = [(sd * lat * 1.02, -0.10 * H.B * sl.p), (sd * lat * 0.78, -0.14 * H.B * sl.p),
                   (sd * lat * 0.6, -0.09 * H.B * sl.p), _sv(H, sd * 30, -2 - 6 * f)]
            win, dist = H.polyline(pts, 0.5 + 0.8 * f * H.sulc_w, 0.4)
            if win is not None:
                sl.sylvian[sd] = pts
                _max_into(csf, win, _soft(dist, ps))
    cis = np.zeros(shape, np.float32)
    f = _bump(s, 0.21, 0.35)
    if f > 0:
        cu, cv = _sv(H, 0, -10)
        win, m = H.ellipse(cu, cv, 9 * f**0.5, 7 * f**0.5)
        _max_into(cis, win, m)
    f = _bump(s, 0.24, 0.38)
    if f > 0:
        cu, cv = _sv(H, 0, 8)
        win = H.window(cu, cv, 18)
        if win is not None:
            # Around the midbrain: thin at the sides, widening into the quadrigeminal cistern behind.
            du, dv = H.u[win] - cu, H.v[win] - cv
            rr = np.hypot(du / 14.0, dv / 12.0)
            back = np.clip(dv / np.maximum(np.hypot(du, dv), 1e-3), 0.0, 1.0)
            ring = np.abs(rr - 1.0) * 12.0 - (0.4 + 1.6 * back**2) * f - 0.3
            _max_into(cis, win, _soft(ring, ps))
    np.maximum(csf, cis, out=csf)
    sl.cistern = cis
    # Ventricles: lateral (frontal horn, body, atrium), third, temporal horns, fourth.
    vs = H.vscale
    for sd in (-1.0, 1.0):
        lv = np.zeros(shape, np.float32)
        for (cu, cv, a, b, ang, lo, hi) in ((7, -22, 4.5, 13, 0.35, 0.40, 0.62), (8, 0, 3.5, 22, 0.09, 0.50, 0.74),
                                            (16, 24, 6, 12, -0.44, 0.40, 0.60), (30, -8, 2, 8, 0.26, 0.25, 0.37)):
            f = _bump(s, lo, hi)
            if f > 0:
                win, m = H.ellipse(*_sv(H, sd * cu * (0.8 + 0.2 * vs), cv), a * vs * f**0.5, b * (0.5 + 0.5 * f**0.5),
                                   sd * ang)
                _max_into(lv, win, m)
        sl.vent[sd] = lv
        np.maximum(csf, lv, out=csf)
    for (cu, cv, a, b, lo, hi) in ((0, -2, 1.5, 10, 0.32, 0.47), (0, 30, 6, 3.5, 0.12, 0.29)):
        f = _bump(s, lo, hi)
        if f > 0:
            win, m = H.ellipse(*_sv(H, cu, cv), a * vs * f**0.5, b * f**0.5)
            _max_into(csf, win, m)
    brain += (H.csf - brain) * csf
    # Falx (slightly dense) in the fissure.
    if region is not None:
        brain += (50.0 - brain) * (_soft(np.abs(H.u) - 0.25, ps) * region * 0.7)
    # Mimics: calcifications.
    calcs = []
    on, hu_c, rad = H.calc["choroid"]
    if on and _bump(s, 0.44, 0.56) > 0:
        calcs += [(sd * 17, 26, rad * _bump(s, 0.44, 0.56) ** 0.5, hu_c) for sd in (-1, 1)]
    on, hu_c, rad = H.calc["pineal"]
    if on and _bump(s, 0.40, 0.47) > 0:
        calcs.append((0, 17, rad * _bump(s, 0.40, 0.47) ** 0.5, hu_c))
    on, hu_c, rad = H.calc["basal"]
    if on and _bump(s, 0.38, 0.47) > 0:
        calcs += [(sd * 18, -4, rad * _bump(s, 0.38, 0.47) ** 0.5, hu_c) for sd in (-1, 1)]
    for cu, cv, rad, hu_c in calcs:
        win, m = H.ellipse(*_sv(H, cu, cv), rad, rad)
        _paint(brain, win, hu_c, m)
    on, hu_c, length = H.calc["falx"]
    if on and _bump(s, 0.6, 0.85) > 0:
        win, dist = H.capsule(_sv(H, 0, -45), _sv(H, 0, -45 + length), 0.8)
        if win is not None:
            _paint(brain, win, hu_c, _soft(dist, ps))
    # -- skull base ------------------------------------------------------------------------------
    base = np.zeros(shape, np.float32) if s < 0.34 else None  # where the base replaces brain
    if s < 0.24:
        _skull_base(H, sl, img, base, m_cran)
    if 0.12 < s < 0.34:  # frontal sinus in the thickened frontal bone
        f = _bump(s, 0.12, 0.34)
        Tf = H.T0 * (1 + H.Tv)
        cu, cv = 0.0, -(H.R_front * sl.p + Tf * 0.5)
        win, m = H.ellipse(cu, cv, 18 * f**0.5, Tf * 0.5 + 3.5 * f)
        _paint(img, win, H.table * 0.8, m)
        _max_into(base, win, m)
        win, m = H.ellipse(cu, cv, 13 * f**0.5, max(0.5, Tf * 0.5 + 2.0 * f - 1.5))
        _paint(img, win, -1000.0, m)
    m_brain = m_cran * (1.0 - base) if s < 0.34 else m_cran
    # Beam-hardening streaks and the dark band between the petrous bones.
    if s < 0.32:
        amp = H.beam * min(1.0, (0.32 - s) / 0.18)
        win = H.window(0.0, 0.1 * H.B, 0.75 * H.A)
        if win is not None:
            uu, vv = H.u[win], H.v[win]
            streak = -0.6 * np.exp(-(((vv - 0.06 * H.B) / 4.5) ** 2) - (uu / (0.25 * H.A)) ** 4)
            for sd in (-1.0, 1.0):
                cu, cv = sd * 0.5 * H.A * sl.p, 0.1 * H.B
                ang = np.arctan2(vv - cv, uu - cu)
                streak += np.cos(H.beam_n * ang + H.beam_ph + sd) ** 9 * np.exp(-np.hypot(uu - cu, vv - cv) / 22.0)
            brain[win] += amp * streak
    # -- lesions: only those covering enough pixels are painted, so labels (from masks) match the image --
    mask = np.zeros(shape, np.uint8)
    layers = []
    for les in lesions:
        cover, s_les = les.coverage(s, slab, H.H)
        f = les.taper(s_les, H.H) if cover >= MIN_SLAB_COVER else 0.0
        m = _lesion_membership(H, sl, les, f, m_brain) if f > 0 else None
        if m is not None and int(np.count_nonzero(m[1] >= 0.5)) >= min_px:
            layers.append((les, f, cover, *m))
    order = {"intraparenchymal": 0, "intraventricular": 1, "subarachnoid": 2, "subdural": 3, "epidural": 4}
    for les, f, cover, win, mem in sorted(layers, key=lambda t: order[t[0].kind]):
        win = win or (slice(None), slice(None))
        if les.kind == "intraparenchymal" and les.p["edema"] > 0.05:
            _paint(brain, win, brain[win] - les.p["edema_hu"], _edema(H, les, mem, f) * np.float32(cover))
        _paint(brain, win, les.hu, mem * np.float32(cover))
        mask[win] |= (mem >= 0.5).astype(np.uint8) * np.uint8(MASK_BITS[les.kind])
    # -- compose, blur (noise is added on the full frame) ------------------------------------------
    img += (brain - img) * m_brain
    sig = H.blur_mm / ps
    if sig > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sig)
    return img, mask


def _skull_base(H: _Head, sl: _Slice, img: np.ndarray, base: np.ndarray, m_cran: np.ndarray) -> None:
    """Paint the lowest slices: orbits and ethmoid cells in front, sphenoid sinus, clivus, petrous bones
    with mastoid air cells; ``base`` receives where bone/face replaces brain."""
    s, ps, Ap, Bp = sl.s, H.ps, H.A * sl.p, H.B * sl.p
    tb = ((0.24 - s) / 0.29) ** 0.7
    cut0 = -Bp * (1.0 - 0.5 * tb)
    cut_v = cut0 + 12.0 * tb * np.exp(-((H.u / 16.0) ** 2))  # the sella pushes the boundary back mid-line
    cut = _soft(H.v - cut_v, ps).astype(np.float32)
    face = np.full(img.shape, 35.0, np.float32)
    f = _bump(s, -0.1, 0.18)
    if f > 0:
        for sd in (-1.0, 1.0):  # orbits: fat cone with the globe in front
            cu, cv = sd * 0.40 * Ap, cut0 - 15
            win, m = H.ellipse(cu, cv, 14 * f**0.5, 16 * f**0.5, sd * 0.3)
            _paint(face, win, -90.0, m)
            win, m = H.ellipse(cu * 1.05, cv - 5, 11 * f**0.5, 11 * f**0.5)
            _paint(face, win, 12.0, m)
        win, m = H.ellipse(0.0, cut0 - 14, 10 * f**0.5, 20 * f**0.5)  # ethmoid air cells
        if win is not None:
            _paint(face, win, np.where(H.cells(win) > 0.45, -900.0, 300.0), m)
    _paint(face, None, 800.0, _soft(np.abs(H.v - cut_v) - 1.2, ps))
    img += (face - img) * (m_cran * cut)
    np.maximum(base, cut * m_cran, out=base)

    def bone(win, m, value) -> None:
        if win is not None:
            _paint(img, win, value, m)
            _max_into(base, win, m)

    f = _bump(s, -0.06, 0.21)
    if f > 0:  # sphenoid sinus with its bony rim
        cu, cv = _sv(H, 0, -30)
        win, m = H.ellipse(cu, cv, 15 * f**0.5, 11 * f**0.5)
        bone(win, m, 850.0)
        win, m = H.ellipse(cu, cv, 12.5 * f**0.5, 8.5 * f**0.5)
        _paint(img, win, -1000.0, m)
    f = _bump(s, -0.1, 0.17)
    if f > 0:  # clivus
        win, dist = H.capsule(_sv(H, 0, -18), _sv(H, 0, -4), 5.0 * f**0.5)
        bone(win, _soft(dist, ps) if win is not None else None, 1000.0)
    for sd in (-1.0, 1.0):
        f = _bump(s, -0.08, 0.23)
        if f > 0:  # petrous bone: a wedge from the apex near the clivus to the mastoid
            lat = (sd * 0.86 * Ap, 0.27 * H.B)
            apex = _sv(H, sd * 10, -6)
            apex = (lat[0] + (apex[0] - lat[0]) * f**0.3, lat[1] + (apex[1] - lat[1]) * f**0.3)
            win, dist = H.capsule(apex, lat, 2.0 * f**0.5, 7.5 * f**0.5)
            bone(win, _soft(dist, ps) if win is not None else None, H.petrous)
        f = _bump(s, -0.05, 0.2)
        if f > 0:  # mastoid air cells
            cu, cv = sd * 0.84 * Ap, 0.36 * H.B
            win, m = H.ellipse(cu, cv, 10 * f**0.5, 11 * f**0.5)
            if win is not None:
                bone(win, m, np.where(H.cells(win) > 0.5, -850.0, 950.0))


def _edema(H: _Head, les: Lesion, mem: np.ndarray, f: float) -> np.ndarray:
    ring = 1.0 + les.p["edema"]
    grown = _dilate(mem, max(1, int(round(les.p["radius"] * f * (ring - 1) / H.ps))))
    return np.clip(grown - mem, 0, 1)


def _dilate(m: np.ndarray, r: int) -> np.ndarray:

    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(m.astype(np.float32), k)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angles wrapped to [-pi, pi)."""
    return np.mod(angle + np.pi, 2 * np.pi) - np.pi


def _lesion_membership(H: _Head, sl: _Slice, les: Lesion, f: float, m_brain: np.ndarray):
    """(window or None for the whole crop, membership in [0, 1]) of one lesion on this slice, or None."""
    P, ps = les.p, H.ps
    if les.kind in ("epidural", "subdural"):
        span = P["da"] * (0.6 + 0.4 * f)
        prof = np.clip(1.0 - (_wrap(H.alpha - P["a0"]) / span) ** 2, 0.0, None)
        if les.kind == "subdural":
            prof = prof**0.35
        inner = _soft(-sl.d3 - P["thick"] * f * prof, sl.w) * (prof > 0)
        return None, np.minimum(inner, _soft(sl.d3, sl.w)) * (m_brain > 0.5)
    if les.kind == "intraparenchymal":
        if les.variant == "lobar":
            rr = H.B * sl.p * 0.8 - P["cv"]
            if rr <= 5:
                return None
            cu, cv = rr * math.sin(P["cu"]), -rr * math.cos(P["cu"])
        else:
            cu, cv = _sv(H, P["cu"], P["cv"])
        rad = P["radius"] * f
        win = H.window(cu, cv, rad * (1.35 + P["edema"]) + 2 * ps)
        if win is None:
            return None
        du, dv = H.u[win] - cu, H.v[win] - cv
        th = np.arctan2(dv, du)
        rim = rad * (1 + P["h2"] * np.cos(2 * th + P["ph2"]) + P["h3"] * np.cos(3 * th + P["ph3"]))
        return win, _soft(np.hypot(du, dv) - rim, ps) * m_brain[win]
    if les.kind == "intraventricular":
        sides = (-1.0, 1.0) if P["both"] > 0.5 else (P["side"],)
        m = np.zeros_like(sl.d3)
        for sd in sides:
            np.maximum(m, sl.vent[sd], out=m)
        # The blood settles posteriorly: the fluid level is horizontal in the image (gravity), not in the head.
        c, sn = H._rot[0], H._rot[1]
        return None, m * _soft(_sv(H, 0, P["level"])[1] - (sn * H.u + c * H.v), ps)
    # Subarachnoid: blood fills CSF spaces (widened a little) inside a region.
    width = max(P["width"], 1.1 * ps)
    if les.variant == "cistern":
        cu, cv = _sv(H, 13 * math.sin(P["a0"]), 8 - 13 * math.cos(P["a0"]))
        win = H.window(cu, cv, P["radius"] * 0.6 * f + 2 * ps)
        if win is None or sl.cistern is None:
            return None
        region = _soft(np.hypot(H.u[win] - cu, H.v[win] - cv) - P["radius"] * 0.6 * f, ps)
        return win, sl.cistern[win] * region
    d_sulc, surf, depth = sl.sulc
    blood = np.zeros_like(sl.d3)
    keep = surf > -1.0
    if les.variant == "convexity":
        keep &= (surf < 20.0) & (np.abs(_wrap(H.alpha.ravel()[sl.band] - P["a0"])) < P["da"] * (0.5 + 0.5 * f))
    blood.ravel()[sl.band] = _soft(np.maximum(d_sulc - width / 2, surf - depth * 0.8), ps) * keep
    if les.variant == "convexity":
        return None, blood * m_brain
    if P["side"] not in sl.sylvian:
        return None
    pts = sl.sylvian[P["side"]]
    cu, cv = pts[1]
    win = H.window(cu, cv, P["radius"] * f + 2 * ps)
    if win is None:
        return None
    _, dist = H.polyline(pts, width / 2 + 0.3, win=win)
    region = _soft(np.hypot(H.u[win] - cu, H.v[win] - cv) - P["radius"] * f, ps)
    return win, np.maximum(_soft(dist, ps), blood[win]) * region * m_brain[win]


@dataclass
class RenderedStudy:
    """One rendered study: HU volume, lesion bitmasks, per-slice subtype labels and its geometry."""

    hu: np.ndarray  # (n, rows, cols) float32
    masks: np.ndarray  # (n, rows, cols) uint8 bitmasks
    labels: np.ndarray  # (n, 5) uint8 in SUBTYPES order
    pixel_spacing: float
    levels: list[float]
    lesions: list[Lesion]


def render_study(plan: Any) -> RenderedStudy:
    """Render every slice of a planned study (a :class:`ichdlib.phantom.synth.StudyPlan`; before the
    missing-slice quirk drops one)."""

    rng = np.random.default_rng([plan.seed, 7])
    head = _Head(plan, rng)
    lesions = draw_lesions(rng, plan.positive)
    n = plan.n_slices
    hu = np.empty((n, plan.rows, plan.cols), np.float32)
    masks = np.empty((n, plan.rows, plan.cols), np.uint8)
    levels = [plan.s0 + i * plan.spacing_z / plan.head_height for i in range(n)]
    thr = max(MIN_LESION_PX, int(math.ceil(MIN_LESION_MM2 / head.ps**2)))
    slab = 0.5 * plan.spacing_z / plan.head_height  # contiguous slices: thickness = spacing
    hu[:] = -1000.0
    masks[:] = 0
    bits = np.array([MASK_BITS[name] for name in SUBTYPES], np.uint8)
    labels = np.zeros((n, len(SUBTYPES)), np.uint8)
    sh = getattr(plan, "shift", None) or ScannerShift()
    smooth = head.ps < 0.8  # CT noise is correlated over a few pixels at fine pixel spacing
    k, sig = sh.noise_kernel, sh.noise_sigma_px
    gain = 1.0 / float(np.sum(cv2.getGaussianKernel(k, sig) ** 2)) if smooth else 1.0  # unit std after blur
    for i, s in enumerate(levels):
        img, masks[i][head.crop] = render_slice(head, s, i, lesions, thr, slab)
        if sh.sharpen > 0:  # edge-enhancing reconstruction kernel (overshoot at edges, as sharp kernels do)
            img = img + np.float32(sh.sharpen) * (img - cv2.GaussianBlur(img, (0, 0), sh.sharpen_mm / head.ps))
        hu[i][head.crop] = img
        noise = rng.standard_normal((plan.rows, plan.cols), dtype=np.float32)
        if smooth:
            noise = cv2.GaussianBlur(noise, (k, k), sig)
        hu[i] += np.float32(head.noise * gain) * noise
        if sh.hu_scale != 1.0 or sh.hu_offset != 0.0:  # calibration drift
            hu[i] = np.float32(sh.hu_scale) * hu[i] + np.float32(sh.hu_offset)
        labels[i] = (np.bitwise_or.reduce(masks[i][head.crop], axis=None) & bits) > 0
    return RenderedStudy(hu, masks, labels, head.ps, levels, lesions)


