"""The phantom's hemorrhage model: the five subtypes' lesions and when a slice counts as positive."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ichdlib.labels import SUBTYPES

#: Mask bit ``k-1`` marks subtype ``LABELS[k]``.
MASK_BITS: dict[str, int] = {name: 1 << i for i, name in enumerate(SUBTYPES)}
#: A slice is positive for a subtype when its mask covers at least this area (and this many pixels).
MIN_LESION_MM2 = 6.0
MIN_LESION_PX = 3
#: Each slice is a slab as thick as the slice spacing; a lesion covering less of it than this is not drawn.
#: A lesion that only partly fills the slab is drawn with its contrast scaled by the filled fraction
#: (partial volume), so hemorrhage fades at its ends along z the way it does on 5 mm CT slices.
MIN_SLAB_COVER = 0.25


@dataclass
class Lesion:
    """One hemorrhage: a subtype, a centre level, a half extent along z (mm) and shape parameters."""

    kind: str
    variant: str
    s_c: float
    half_mm: float
    hu: float
    p: dict[str, float] = field(default_factory=dict)

    def taper(self, s: float, height: float) -> float:
        t = (s - self.s_c) * height / self.half_mm
        return math.sqrt(1.0 - t * t) if abs(t) < 1.0 else 0.0

    def coverage(self, s: float, slab: float, height: float) -> tuple[float, float]:
        """(share of the slab ``[s - slab, s + slab]`` inside the lesion's z extent, middle level of that part).

        ``slab`` and ``s`` are in head-height units; ``slab=0`` is a thin plane at ``s``.
        """
        half = self.half_mm / height
        if slab <= 0:
            return (1.0 if abs(s - self.s_c) < half else 0.0), s
        lo, hi = max(s - slab, self.s_c - half), min(s + slab, self.s_c + half)
        if hi <= lo:
            return 0.0, s
        return (hi - lo) / (2.0 * slab), 0.5 * (lo + hi)


def draw_lesions(rng: np.random.Generator, positive: bool) -> list[Lesion]:
    """The hemorrhages of one study (none when not ``positive``), RSNA-like subtype mix."""
    if not positive:
        return []
    kinds = ["epidural", "subdural", "subarachnoid", "intraparenchymal", "intraventricular"]
    probs = [0.05, 0.22, 0.27, 0.28, 0.18]
    n = 1 + int(rng.random() < 0.5) + int(rng.random() < 0.25)
    chosen = list(rng.choice(kinds, size=n, p=probs))
    if "intraparenchymal" in chosen and "intraventricular" not in chosen and rng.random() < 0.3:
        chosen.append("intraventricular")
    r, out = rng.uniform, []
    for kind in chosen:
        side = float(rng.choice([-1.0, 1.0]))
        if kind == "epidural":
            out.append(Lesion(kind, "convexity", r(0.35, 0.8), r(10, 25), r(60, 90),
                              {"a0": side * r(0.6, 2.5), "da": r(0.25, 0.5), "thick": r(5, 17)}))
        elif kind == "subdural":
            out.append(Lesion(kind, "convexity", r(0.4, 0.85), r(18, 50), r(50, 80),
                              {"a0": side * r(0.6, 2.5), "da": r(0.5, 1.1), "thick": r(2, 12)}))
        elif kind == "subarachnoid":
            variant = str(rng.choice(["cistern", "sylvian", "convexity"], p=[0.3, 0.35, 0.35]))
            s_c = {"cistern": r(0.25, 0.33), "sylvian": r(0.32, 0.46), "convexity": r(0.45, 0.88)}[variant]
            out.append(Lesion(kind, variant, s_c, r(10, 25), r(55, 85),
                              {"side": side, "a0": side * r(0.4, 2.7), "da": r(0.3, 0.6), "radius": r(18, 32),
                               "width": r(1.8, 3.5)}))
        elif kind == "intraparenchymal":
            variant = str(rng.choice(["basal_ganglia", "lobar", "cerebellar"], p=[0.45, 0.45, 0.1]))
            radius = r(4, 22)
            if variant == "basal_ganglia":
                s_c, cu, cv = r(0.38, 0.52), side * r(12, 28), r(-15, 12)
            elif variant == "lobar":
                s_c, cu, cv = r(0.45, 0.85), r(0, 2 * math.pi), r(12, 30)  # angle, depth below surface
            else:
                s_c, cu, cv, radius = r(0.12, 0.25), side * r(15, 32), r(28, 42), r(4, 14)
            out.append(Lesion(kind, variant, s_c, radius * r(0.8, 1.3), r(55, 85),
                              {"cu": cu, "cv": cv, "radius": radius, "h2": r(0.05, 0.2), "h3": r(0.0, 0.12),
                               "ph2": r(0, 6.3), "ph3": r(0, 6.3), "edema": r(0.0, 0.5), "edema_hu": r(4, 10)}))
        else:
            cast = rng.random() < 0.25
            out.append(Lesion(kind, "cast" if cast else "layering", r(0.44, 0.58), r(10, 22), r(50, 75),
                              {"side": side, "both": float(rng.random() < 0.4),
                               "level": -1e3 if cast else r(21, 30)}))
    return out


