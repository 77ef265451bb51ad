"""What counts as input: the one slice-validity rule and the one file-discovery rule, shared by ingest
(:mod:`ichdlib.ingest.catalog`) and predict (:mod:`ichdlib.serve.predict`), so that both paths keep and leave out the
same files for the same reasons.

**Slices** (:func:`slice_problem`): a slice reaches a model only when its header says it is a 2-D,
single-frame, greyscale CT image of a sane size with a finite, non-zero rescale slope, a finite intercept, a
finite position inside +-100 m and (when given) a finite axial orientation. Anything else returns a reason
that starts with a short kind (``no pixel data:``, ``not a 2-D slice:``, ``not greyscale:``, ``bad size:``,
``not CT:``, ``bad rescale:``, ``no position:``, ``bad position:``, ``bad orientation:``, ``not axial:``,
``unsupported pixels:``). Ingest quarantines such a slice, predict lists it in ``problems.csv``. A missing
Modality is accepted as CT (older anonymisers drop it); a missing orientation is accepted (the slice is
assumed axial); a missing position is not (its place in the study is unknown; predict orders a series in
which *every* slice lacks a position by InstanceNumber, with a warning, and then applies this rule).

**Files** (:func:`list_files`): only regular files (or links to them) are opened. FIFOs, sockets and
devices, hidden files and folders (names starting with ``.``) and folders that cannot be read are returned
as skipped entries with the reason, never opened and never dropped without a word.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Largest Rows / Columns accepted (CT slices are 512 x 512; a few scanners write 1024 or 2048).
MAX_SIDE = 4096
#: Positions further than this from the scanner origin (mm) are corrupt, not anatomy.
MAX_POSITION_MM = 1e5
#: Sane rescale: |slope| in [MIN_SLOPE, MAX_SLOPE], |intercept| <= MAX_INTERCEPT (HU).
MIN_SLOPE, MAX_SLOPE, MAX_INTERCEPT = 1e-6, 1e3, 1e5
#: |z component of the slice normal| at or above this counts as axial (gantry tilt up to ~35 degrees).
AXIAL_MIN_COS = 0.8
_BITS = (8, 16, 32)
_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False


def slice_normal(orientation: Sequence[float] | None) -> np.ndarray | None:
    """Unit normal of a slice from ImageOrientationPatient (row and column direction cosines)."""
    if orientation is None or _missing(orientation) or len(orientation) != 6:
        return None
    o = np.asarray(orientation, float)
    if not np.isfinite(o).all():
        return None
    n = np.cross(o[:3], o[3:])
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 1e-6 else None


def is_axial(orientation: Sequence[float] | None) -> bool | None:
    """True for an axial slice (normal within ~35 degrees of the z axis), None when unknown or degenerate."""
    n = slice_normal(orientation)
    return None if n is None else bool(abs(n[2]) >= AXIAL_MIN_COS)


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def slice_problem(meta: Mapping[str, Any]) -> str | None:
    """Why a slice (its header, as :func:`ichdlib.ingest.dicom.read_header` returns it) must not reach a model, or
    None when it may. The reason starts with its kind (see the module docstring)."""
    if not meta.get("has_pixels", True):
        return "no pixel data: element 7FE0,0010 missing (not an image, or a truncated file)"
    frames = int(_num(meta.get("frames", 1)) if not _missing(meta.get("frames")) else 1)
    if frames != 1:
        return f"not a 2-D slice: multi-frame image ({frames} frames); one 2-D slice per file expected"
    spp = int(_num(meta.get("samples_per_pixel", 1)) if not _missing(meta.get("samples_per_pixel")) else 1)
    photometric = str(meta.get("photometric") or "MONOCHROME2").strip().upper()
    if spp != 1 or photometric not in _GREYSCALE:
        return f"not greyscale: SamplesPerPixel={spp}, PhotometricInterpretation={photometric}"
    rows, cols = _num(meta.get("rows")), _num(meta.get("cols"))
    if not (1 <= rows <= MAX_SIDE and 1 <= cols <= MAX_SIDE):
        return f"bad size: Rows={rows:g} Columns={cols:g} (expected 1..{MAX_SIDE})"
    alloc, stored = _num(meta.get("bits_allocated", 16)), _num(meta.get("bits_stored", 16))
    if alloc not in _BITS or not 1 <= stored <= alloc:
        return f"unsupported pixels: BitsAllocated={alloc:g} BitsStored={stored:g}"
    modality = str(meta.get("modality") or "").strip().upper()
    if modality not in ("", "CT"):
        return f"not CT: modality {modality}"
    slope, intercept = _num(meta.get("slope", 1.0)), _num(meta.get("intercept", 0.0))
    if not math.isfinite(slope) or not math.isfinite(intercept):
        return f"bad rescale: RescaleSlope {slope:g}, RescaleIntercept {intercept:g} (not finite)"
    if slope == 0:
        return "bad rescale: RescaleSlope 0 (every pixel would be the intercept: a constant image)"
    if not MIN_SLOPE <= abs(slope) <= MAX_SLOPE or abs(intercept) > MAX_INTERCEPT:
        return (f"bad rescale: RescaleSlope {slope:g}, RescaleIntercept {intercept:g} (outside |slope| "
                f"{MIN_SLOPE:g}..{MAX_SLOPE:g}, |intercept| <= {MAX_INTERCEPT:g})")
    position = meta.get("position")
    if isinstance(position, Sequence) and not isinstance(position, str) and len(position) == 3:
        pos = [_num(v) for v in position]
    else:
        pos = [_num(meta.get("z"))]
    if all(math.isnan(v) for v in pos) or math.isnan(pos[-1]):
        return "no position: no ImagePositionPatient/SliceLocation z; its place in the study is unknown"
    if not all(math.isfinite(v) and abs(v) <= MAX_POSITION_MM for v in pos):
        return f"bad position: ImagePositionPatient {_fmt(pos)} (not finite or beyond +-{MAX_POSITION_MM:g} mm)"
    orientation = meta.get("orientation")
    if orientation is not None and not _missing(orientation):
        o = [_num(v) for v in orientation]
        if len(o) != 6 or not all(math.isfinite(v) and abs(v) <= 1.0 + 1e-3 for v in o):
            return f"bad orientation: ImageOrientationPatient {_fmt(o)} (not six finite direction cosines)"
        axial = is_axial(o)
        if axial is None:
            return f"bad orientation: ImageOrientationPatient {_fmt(o)} (row and column directions are parallel)"
        if not axial:
            return f"not axial: ImageOrientationPatient {_fmt(o)}"
    return None


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def list_files(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """Regular files under ``root`` (sorted; ``root`` itself when it is a file) and ``[(path, reason)]`` for
    what was not opened: hidden files and folders, FIFOs, sockets, devices, broken links and unreadable
    folders. Nothing is opened here (a FIFO would block)."""
    root = Path(root)
    files: list[str] = []
    skipped: list[tuple[str, str]] = []

    def check(path: str) -> None:
        try:
            mode = os.stat(path).st_mode  # follows links: a link to a regular file is a file
        except FileNotFoundError:
            skipped.append((path, "skipped: broken link or vanished file"))
            return
        except OSError as exc:
            skipped.append((path, f"skipped: cannot stat ({exc.strerror or exc})"))
            return
        if stat.S_ISREG(mode):
            files.append(path)
        else:
            skipped.append((path, f"skipped: {_kind(mode)}, not a regular file"))

    if not root.is_dir():
        if os.path.lexists(root):
            check(str(root))
        return files, skipped

    def on_error(err: OSError) -> None:
        skipped.append((str(err.filename), f"skipped: folder cannot be read ({err.strerror or err})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        hidden = sorted(d for d in dirnames if d.startswith("."))
        skipped += [(os.path.join(dirpath, d), "skipped: hidden folder") for d in hidden]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                skipped.append((path, "skipped: hidden file"))
            else:
                check(path)
    return files, skipped


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------
#: A step between z-ordered slices above this multiple of the study's median step is a gap or an outlier.
GAP_FACTOR = 3.0


def capped_z(z: np.ndarray, factor: float = GAP_FACTOR) -> np.ndarray:
    """Positions (in slice order) whose steps are capped at ``factor`` x the median positive step, so that a gap
    or an outlier position keeps its place in the order but no arithmetic on the bad value (a step of
    thousands of mm) reaches a model. Steps within the cap are unchanged; the first position is kept."""
    z = np.asarray(z, dtype=np.float64)
    if len(z) < 3:
        return z.copy()
    d = np.diff(z)
    pos = np.abs(d[d != 0])
    if not len(pos):
        return z.copy()
    cap = factor * float(np.median(pos))
    return np.concatenate([z[:1], z[0] + np.cumsum(np.clip(d, -cap, cap))])
