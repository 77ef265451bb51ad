"""Which series of a multi-series study the models read, and thin series as slabs of the training thickness.

A hospital study often holds several reconstructions of one acquisition (CQ500: a thin 0.625 mm soft-tissue
series, a 5 mm one, a bone-kernel series, sometimes a post-contrast series, a localizer). An RSNA-trained
model saw non-contrast, soft-tissue-kernel axial slices about 5 mm thick, so :func:`choose_series` ranks the
axial CT image series of a study:

1. never a localizer/scout (ImageType ``LOCALIZER``/``SCOUT``/``TOPOGRAM``, or not axial), a non-CT series or
   one without pixels;
2. no contrast: ``ContrastBolusAgent`` present, or the description says so (``C+``, ``CONTRAST``, ``POST``
   contrast, ``ENHANCED``; ``NON CONTRAST``, ``PLAIN``, ``W/O`` read as non-contrast);
3. soft-tissue kernel over bone: ``ConvolutionKernel`` or description ``BONE``/``SHARP``/``EDGE``/``LUNG``,
   or a Siemens/Canon-style kernel number of 60 and up (``H70h``, ``Br64``, ``FC81``) is bone;
4. slice thickness (``SliceThickness``, else the median z step) closest to the bundle's training thickness;
5. then most slices (then the SeriesInstanceUID, for a stable order).

Bone-kernel and contrast series are read only when a study has nothing else: ``ichd predict`` then reads the
best of them with a warning (one patient's study: a caveat beats no answer), ``ichd validate`` leaves the study
out with a message (a validation must not mix series the model never saw into its figures). Each series gets a
**role** (:data:`ROLES`): ``thick_soft`` (soft tissue, thickness at least :data:`THIN_FRACTION` x the training
thickness), ``thin`` (soft tissue, thinner), ``bone``, ``contrast``, ``localizer`` or ``other``, and a one-line
reason why it was or was not read (``series.csv`` of ``ichd validate`` and of ``ichd predict``).

When the chosen series is thin (a study with only thin slices), :func:`to_slabs` averages consecutive
slices into slabs of the training thickness (mean HU over each slab), as a thick reconstruction does, and
the study's problems say so.

The training thickness comes from the bundle (``training.slice_thickness_mm``, recorded by ``ichd export``
from the training catalog's z spacing); bundles without it use :data:`DEFAULT_THICKNESS_MM` (5 mm, the
RSNA 2019 data's usual slice thickness).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pydicom

#: Series roles, in the order a report lists them.
ROLES = ("thick_soft", "thin", "bone", "contrast", "localizer", "other")
#: Training slice thickness assumed for a bundle that does not record one (RSNA 2019: mostly 5 mm).
DEFAULT_THICKNESS_MM = 5.0
#: A soft-tissue series thinner than this fraction of the training thickness is ``thin`` (and reformatted
#: into slabs when it is the one read).
THIN_FRACTION = 0.6

#: Series-level DICOM attributes read from one file per series (read_header does not keep them).
SERIES_TAGS = ("SeriesDescription", "ConvolutionKernel", "ContrastBolusAgent", "SliceThickness", "PixelSpacing")

_NOT_CONTRAST = re.compile(r"NON[\s_-]*CON|PRE[\s_-]*CON|W/?O\b|WITHOUT|PLAIN|NATIVE|NC\b", re.I)
_CONTRAST = re.compile(r"C\+|\+C\b|CONTRAST|POST[\s_-]*(CON|GAD|IV)|ENHANC|\bCE\b|\bCECT\b|ANGIO|CTA\b", re.I)
_BONE = re.compile(r"BONE|SHARP|EDGE|LUNG|DETAIL|\bHR\b", re.I)
_KERNEL_NUMBER = re.compile(r"^[A-Z]{1,2}[a-z]?(\d{2})[a-z]?\b")


@dataclass
class SeriesInfo:
    """One series of a study with its role and whether (and why) it was read."""

    study_uid: str
    series_uid: str
    n_images: int
    role: str
    description: str = ""
    kernel: str = ""
    contrast_agent: str = ""
    thickness: float | None = None
    read: bool = False
    reason: str = ""
    #: In-plane field of view (mm, PixelSpacing x Columns; None without PixelSpacing) and, for the series read,
    #: what the in-plane normalisation did (:mod:`ichdlib.serve.inplane`; empty: nothing).
    fov_mm: float | None = None
    inplane: str = ""

    def as_row(self) -> dict[str, Any]:
        return {"study": self.study_uid, "series_uid": self.series_uid, "description": self.description,
                "kernel": self.kernel, "contrast_agent": self.contrast_agent,
                "thickness_mm": "" if self.thickness is None else round(float(self.thickness), 3),
                "n_images": self.n_images, "role": self.role, "read": self.read, "reason": self.reason,
                "fov_mm": "" if self.fov_mm is None else round(float(self.fov_mm), 1), "inplane": self.inplane}


SERIES_COLUMNS = ["study", "series_uid", "description", "kernel", "contrast_agent", "thickness_mm", "n_images",
                  "role", "read", "reason", "fov_mm", "inplane"]


def series_tags(path: str) -> dict[str, str]:
    """The :data:`SERIES_TAGS` of one file (empty strings when absent or unreadable)."""

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(SERIES_TAGS), force=True)
    except Exception:  # the header was readable a moment ago; missing descriptions are not worth a failure
        return dict.fromkeys(SERIES_TAGS, "")
    out = {}
    for tag in SERIES_TAGS:
        value = ds.get(tag, "")
        if value is None:
            value = ""
        if not isinstance(value, str) and hasattr(value, "__iter__"):
            value = "\\".join(str(v) for v in value)
        out[tag] = str(value).strip()
    return out


def is_contrast(description: str, agent: str) -> bool:
    """Whether a series is post-contrast: a ContrastBolusAgent, or a description that says so."""
    if agent and agent.upper() not in {"NONE", "NO", "N/A", "NA", "0"}:
        return True
    return bool(_CONTRAST.search(description)) and not _NOT_CONTRAST.search(description)


def is_bone(description: str, kernel: str) -> bool:
    """Whether a series is reconstructed with a bone (sharp) kernel, from its kernel or description."""
    if _BONE.search(kernel) or _BONE.search(description):
        return True
    m = _KERNEL_NUMBER.match(kernel.strip())
    return bool(m) and int(m.group(1)) >= 60


def series_thickness(tags: dict[str, str], z: np.ndarray) -> float | None:
    """SliceThickness when given and positive, else the median positive z step, else None."""
    try:
        t = float(tags.get("SliceThickness") or "nan")
    except ValueError:
        t = float("nan")
    if np.isfinite(t) and t > 0:
        return t
    z = np.sort(np.asarray(z, float)[np.isfinite(np.asarray(z, float))])
    steps = np.diff(z)
    steps = steps[steps > 1e-3]
    return float(np.median(steps)) if len(steps) else None


def classify(kind: str, tags: dict[str, str], thickness: float | None, training_mm: float) -> str:
    """Role of a series: ``kind`` is discover's verdict (``ok``, ``localizer``, ``not_axial``, ``not_ct``, ...)."""
    if kind in ("localizer", "not_axial"):
        return "localizer"
    if kind != "ok":
        return "other"
    desc, kernel = tags.get("SeriesDescription", ""), tags.get("ConvolutionKernel", "")
    if is_contrast(desc, tags.get("ContrastBolusAgent", "")):
        return "contrast"
    if is_bone(desc, kernel):
        return "bone"
    if thickness is not None and thickness < THIN_FRACTION * training_mm:
        return "thin"
    return "thick_soft"


def choose_series(infos: list[SeriesInfo], training_mm: float, fallback: bool = False) -> SeriesInfo | None:
    """Rank a study's series (module docstring) and mark the one read; every series gets its reason.
    Returns the chosen series, or None when no soft-tissue non-contrast axial CT series exists. With
    ``fallback`` (``ichd predict``: one patient's study, a caveat beats no answer) a study with only
    contrast or bone-kernel series is read from the best of those (contrast before bone), and says so;
    ``ichd validate`` leaves such a study out."""
    readable = [s for s in infos if s.role in ("thick_soft", "thin")]
    if not readable and fallback:
        readable = sorted((s for s in infos if s.role in ("contrast", "bone")), key=lambda s: s.role != "contrast")
        readable = [s for s in readable if s.role == readable[0].role] if readable else []

    def key(s: SeriesInfo) -> tuple:
        dist = abs(s.thickness - training_mm) if s.thickness is not None else np.inf
        return (dist, -s.n_images, s.series_uid)

    chosen = min(readable, key=key) if readable else None
    for s in infos:
        if s is chosen:
            s.read = True
            t = "unknown thickness" if s.thickness is None else f"{s.thickness:g} mm"
            what = {"thin": f"thin soft-tissue series, reformatted into {training_mm:g} mm slabs",
                    "contrast": "post-contrast series, the only kind in this study (the model was trained on "
                                "non-contrast CT: less reliable)",
                    "bone": "bone-kernel series, the only kind in this study (the model was trained on soft-tissue "
                            "reconstructions: less reliable)"}.get(s.role, "soft-tissue axial series")
            s.reason = f"read: {what} ({t}, closest to the model's {training_mm:g} mm; {s.n_images} images)"
        elif s.reason:
            continue  # discover already said why (localizer, not CT, no pixels)
        elif s.role == "contrast":
            s.reason = "not read: post-contrast series (the model was trained on non-contrast CT)"
        elif s.role == "bone":
            s.reason = "not read: bone (sharp) kernel (the model was trained on soft-tissue reconstructions)"
        elif chosen is not None:
            s.reason = "not read: " + _why_not(s, chosen, training_mm)
    return chosen


def _why_not(s: SeriesInfo, chosen: SeriesInfo, training_mm: float) -> str:
    def mm(t: float | None) -> str:
        return "unknown thickness" if t is None else f"{t:g} mm"

    if s.thickness != chosen.thickness:
        return (f"{mm(s.thickness)} is further from the model's {training_mm:g} mm than the chosen series' "
                f"{mm(chosen.thickness)}")
    return f"fewer images than the chosen series ({s.n_images} vs {chosen.n_images}) at {mm(s.thickness)}"


def slab_groups(z: np.ndarray, thickness: float) -> list[np.ndarray]:
    """Consecutive z-ordered slices grouped into slabs about ``thickness`` mm thick (the last one may be
    thinner; a slab holds at least one slice)."""
    z = np.asarray(z, float)
    if len(z) == 0:
        return []
    steps = np.diff(z)
    step = float(np.median(steps[steps > 1e-3])) if np.any(steps > 1e-3) else thickness
    per = max(1, int(round(thickness / step)))
    return [np.arange(i, min(i + per, len(z))) for i in range(0, len(z), per)]


def to_slabs(slices: pd.DataFrame, hu: list[np.ndarray], thickness: float) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Mean HU over consecutive slabs of ``thickness`` mm of a z-ordered thin series. The slab's row is its
    first slice's row (``sop_uid``, ``path``) with ``z`` the slab's mean and ``slab`` listing its SOPs."""
    groups = slab_groups(slices["z"].to_numpy(float), thickness)
    rows, images = [], []
    for g in groups:
        shapes = {hu[i].shape for i in g}
        if len(shapes) > 1:  # a slice of another size cannot be averaged in; keep the first shape only
            g = np.array([i for i in g if hu[i].shape == hu[g[0]].shape])
        images.append(np.mean([hu[i] for i in g], axis=0, dtype=np.float64).astype(np.float32))
        row = slices.iloc[int(g[0])].to_dict()
        row["z"] = float(slices["z"].iloc[g].mean())
        row["slab"] = ";".join(str(s) for s in slices["sop_uid"].iloc[g])
        rows.append(row)
    return pd.DataFrame(rows), images
