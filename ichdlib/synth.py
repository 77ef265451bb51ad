"""A synthetic head-CT phantom written in the exact RSNA 2019 / Kaggle layout.

``generate_phantom(out, studies, seed)`` (and ``ichd synth``) writes flat ``stage_2_train/`` and
``stage_2_test/`` folders of ``ID_<hex>.dcm`` slices, ``stage_2_train.csv`` (long ``ID,Label``),
``stage_2_sample_submission.csv``, ``answer_key.csv`` (test truth), optional per-slice lesion masks and
``phantom_manifest.json`` (see the "Phantom" section of ``docs/architecture.md``).

Each study is rendered slice by slice at the target size with vectorised numpy: air, scalp, a two-table
skull with diploe, parenchyma with cortex/white matter, sulci, fissures, cisterns and ventricles whose shape
changes along z, deep grey nuclei, the skull base (petrous bone, clivus, sinuses, orbits) in the lowest
slices and the vertex at the top; noise, blur, head size, position and rotation vary by study. The five
hemorrhage subtypes are drawn at their usual places and shapes, tapering over contiguous slices, and the
labels are counted from the rendered lesion masks, so labels and masks always agree. Mimics (choroid
plexus / pineal / falx calcifications, beam-hardening streaks, a bright rim under the skull) appear on
negative slices too. ``quirks=True`` injects the real data's problems and lists them in the manifest.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ichdlib.labels import LABELS, SUBTYPES, wide_to_long

if TYPE_CHECKING:
    from ichdlib.config import Params

TRAIN_DIR = "stage_2_train"
TEST_DIR = "stage_2_test"
TRAIN_CSV = "stage_2_train.csv"
SAMPLE_SUBMISSION = "stage_2_sample_submission.csv"
ANSWER_KEY = "answer_key.csv"
MASK_DIR = "masks"
MANIFEST = "phantom_manifest.json"
#: Written first / last: a folder with ``COMPLETE_MARKER`` holds a finished phantom.
PROGRESS_MARKER = ".phantom_in_progress"
COMPLETE_MARKER = ".phantom_complete"
#: The corrupt training file of the real data; the phantom's corrupt file gets the same name.
CORRUPT_ID = "ID_6431af929"
#: Mask bit ``k-1`` marks subtype ``LABELS[k]``.
MASK_BITS: dict[str, int] = {name: 1 << i for i, name in enumerate(SUBTYPES)}
#: A slice is positive for a subtype when its mask covers at least this area (and this many pixels).
MIN_LESION_MM2 = 6.0
MIN_LESION_PX = 3
#: Pixel encodings understood by :func:`write_ct_dicom`.
ENCODINGS = ("signed", "unsigned", "unsigned12", "wrap12", "monochrome1", "monochrome1_raw")
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_QUIRK_KEYS = ("corrupt", "intercept_wrap", "duplicate_label_rows", "duplicate_slice", "missing_slice",
               "odd_size", "multi_window", "monochrome1", "fov_padding")


# ----------------------------------------------------------------------------------------------------
# Files: atomic writes, DICOM encoding, masks
# ----------------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a hidden temp file next to ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _fov_circle(rows: int, cols: int) -> np.ndarray:
    """True outside the scanner's circular reconstruction field (diameter = the smaller image side)."""
    yy, xx = np.ogrid[:rows, :cols]
    r = min(rows, cols) / 2.0
    return (yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2 > r * r


def encode_hu(hu: np.ndarray, encoding: str = "signed", *, fov_padding: bool = False) -> tuple[np.ndarray, dict]:
    """HU -> stored pixel values and the header elements that decode them (rounded to whole HU).

    ``signed``: int16, intercept -1024; ``unsigned``: uint16, intercept -1024; ``unsigned12``: 12 bits
    stored; ``wrap12``: the RSNA 12-bit quirk (BitsStored 12, unsigned, intercept 1) that the community fix
    (raw + 1000, values >= 4096 minus 4096, intercept -1000) turns back into HU in [-1000, 3095];
    ``monochrome1``: inverted storage with RescaleSlope -1 (the standard modality LUT gives HU);
    ``monochrome1_raw``: inverted signed storage without rescale tags (HU = -1 - raw).
    ``fov_padding`` (signed only) stores -2000 outside the reconstruction circle, as many scanners do.
    """
    h = np.rint(np.asarray(hu, dtype=np.float64))
    hdr: dict[str, Any] = {"PhotometricInterpretation": "MONOCHROME2", "RescaleSlope": "1"}
    if encoding == "signed":
        raw = (np.clip(h, -1024, 31743) + 1024).astype(np.int16)
        if fov_padding:
            raw[_fov_circle(*raw.shape)] = -2000
        hdr.update(BitsStored=16, PixelRepresentation=1, RescaleIntercept="-1024")
    elif encoding == "unsigned":
        raw = (np.clip(h, -1024, 64511) + 1024).astype(np.uint16)
        hdr.update(BitsStored=16, PixelRepresentation=0, RescaleIntercept="-1024")
    elif encoding == "unsigned12":
        raw = (np.clip(h, -1024, 3071) + 1024).astype(np.uint16)
        hdr.update(BitsStored=12, PixelRepresentation=0, RescaleIntercept="-1024")
    elif encoding == "wrap12":
        hc = np.clip(h, -1000, 3095)
        raw = np.where(hc < 0, hc + 4096, hc).astype(np.uint16)
        hdr.update(BitsStored=12, PixelRepresentation=0, RescaleIntercept="1")
    elif encoding == "monochrome1":
        raw = (4095 - (np.clip(h, -1024, 3071) + 1024)).astype(np.uint16)
        hdr.update(BitsStored=16, PixelRepresentation=0, RescaleIntercept="3071", RescaleSlope="-1",
                   PhotometricInterpretation="MONOCHROME1")
    elif encoding == "monochrome1_raw":
        raw = (-1 - np.clip(h, -32767, 32767)).astype(np.int16)
        hdr.update(BitsStored=16, PixelRepresentation=1, PhotometricInterpretation="MONOCHROME1",
                   RescaleSlope=None, RescaleIntercept=None)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return raw, hdr


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _ds_multi(value: float | list | tuple) -> str | list[str]:
    if isinstance(value, (list, tuple)):
        return [_ds(float(v)) for v in value]
    return _ds(float(value))


_META_KEYS = ("sop_uid", "patient_id", "study_uid", "series_uid", "z", "position", "orientation",
              "pixel_spacing", "encoding", "window_center", "window_width", "fov_padding", "modality",
              "truncate")


def _dicom_bytes(hu: np.ndarray, path: Path, meta: dict[str, Any]) -> bytes:
    import pydicom
    from pydicom import config as pd_config
    from pydicom.datadict import dictionary_has_tag, tag_for_keyword
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    unknown = [k for k in meta if k not in _META_KEYS and not (k[:1].isupper() and tag_for_keyword(k))]
    if unknown:
        raise TypeError(f"write_ct_dicom({path.name}): unknown keyword(s) {unknown}; use {', '.join(_META_KEYS)} "
                        "or DICOM keywords such as RescaleIntercept")
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"write_ct_dicom({path.name}): expected a 2-D slice, got shape {hu.shape}")
    rows, cols = hu.shape
    raw, hdr = encode_hu(hu, meta.get("encoding", "signed"), fov_padding=bool(meta.get("fov_padding", False)))
    sop = str(meta.get("sop_uid") or path.stem)
    spacing = meta.get("pixel_spacing", 0.45)
    if not isinstance(spacing, (list, tuple)):
        spacing = (spacing, spacing)
    position = meta.get("position")
    if position is None:
        position = (-(cols / 2) * float(spacing[1]), -(rows / 2) * float(spacing[0]), float(meta.get("z", 0.0)))
    with pd_config.disable_value_validation():
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
        file_meta.MediaStorageSOPInstanceUID = sop
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(str(path), Dataset(), file_meta=file_meta, preamble=b"\0" * 128)
        # The RSNA files' sparse header, in their order.
        ds.SOPInstanceUID = sop
        ds.Modality = str(meta.get("modality", "CT"))
        ds.PatientID = str(meta.get("patient_id", "ID_00000000"))
        ds.StudyInstanceUID = str(meta.get("study_uid", "ID_0000000000"))
        ds.SeriesInstanceUID = str(meta.get("series_uid", "ID_0000000000"))
        ds.StudyID = ""
        ds.ImagePositionPatient = [_ds(float(p)) for p in position]
        ds.ImageOrientationPatient = [_ds(float(o)) for o in meta.get("orientation", (1, 0, 0, 0, 1, 0))]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = hdr["PhotometricInterpretation"]
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(float(s)) for s in spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = hdr["BitsStored"]
        ds.HighBit = hdr["BitsStored"] - 1
        ds.PixelRepresentation = hdr["PixelRepresentation"]
        ds.WindowCenter = _ds_multi(meta.get("window_center", 40))
        ds.WindowWidth = _ds_multi(meta.get("window_width", 80))
        if hdr["RescaleIntercept"] is not None:
            ds.RescaleIntercept = hdr["RescaleIntercept"]
            ds.RescaleSlope = hdr["RescaleSlope"]
        for key, value in meta.items():
            if key[:1].isupper():
                if value is None:
                    if key in ds:
                        delattr(ds, key)
                elif dictionary_has_tag(tag_for_keyword(key)):
                    setattr(ds, key, value)
        ds.PixelData = raw.astype(raw.dtype.newbyteorder("<"), copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    truncate = meta.get("truncate")
    if truncate is not None:
        # Keep the header and only a fraction of the pixel bytes: a file that looks valid but cannot decode.
        keep = len(data) - raw.nbytes + int(raw.nbytes * float(truncate))
        data = data[:keep]
    return data


def write_ct_dicom(path: str | os.PathLike, hu: np.ndarray, **meta: Any) -> Path:
    """Write one CT slice (2-D HU array) as an RSNA-like DICOM file, atomically; returns the path.

    Keywords: ``sop_uid`` (default: the file stem), ``patient_id``, ``study_uid``, ``series_uid``,
    ``z`` or ``position`` (x, y, z), ``orientation``, ``pixel_spacing`` (float or (row, col)),
    ``encoding`` (one of :data:`ENCODINGS`, default ``signed``), ``window_center``/``window_width`` (a
    number, or a list for multi-valued tags), ``fov_padding``, ``modality`` (default CT), ``truncate``
    (keep only this fraction of the pixel bytes: a corrupt file). Any DICOM keyword (``RescaleIntercept``,
    ``BitsStored``, ...) is set verbatim after the defaults (``None`` removes the element).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, _dicom_bytes(hu, path, meta))
    return path


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write a uint8 lesion bitmask as ``.npz`` (array ``mask``), byte-identical for identical input."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("mask.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(mask, dtype=np.uint8), allow_pickle=False)
    _atomic_write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------------------
# Planning (main process, deterministic): patients, studies, split, IDs, quirks
# ----------------------------------------------------------------------------------------------------
@dataclass
class StudyPlan:
    """Everything a worker needs to render and write one study."""

    index: int
    seed: int
    patient_id: str
    study_uid: str
    series_uid: str
    split: str
    n_slices: int
    spacing_z: float
    z0: float
    s0: float
    head_height: float
    positive: bool
    rows: int
    cols: int
    size: int
    sop_uids: list[str]
    encoding: str = "signed"
    window: tuple[float, float] = (40.0, 80.0)
    fov_padding: bool = False
    #: slice index -> encoding override (quirks).
    slice_encoding: dict[int, str] = field(default_factory=dict)
    multi_window: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    #: slice index -> SOP of a second file at the same position.
    duplicate: dict[int, str] = field(default_factory=dict)


class _Ids:
    """Unique random ``ID_<hex>`` strings from one generator."""

    def __init__(self, rng: np.random.Generator, reserved: set[str]):
        self.rng, self.used = rng, set(reserved)

    def new(self, digits: int) -> str:
        while True:
            uid = f"ID_{int(self.rng.integers(0, 16**digits)):0{digits}x}"
            if uid not in self.used:
                self.used.add(uid)
                return uid


def plan_phantom(studies: int, seed: int, size: int = 512, quirks: bool = False) -> tuple[list[StudyPlan], dict]:
    """Draw patients, studies, split by patient, IDs, geometry along z and the quirks (no pixels yet)."""
    rng = np.random.default_rng([seed, 20191])
    ids = _Ids(rng, {CORRUPT_ID})
    # Patients: about 1 in 5 has two studies; at least two patients so both splits are populated.
    patients: list[int] = []
    left = studies
    while left > 0:
        two = left >= 3 and rng.random() < 0.2
        patients.append(2 if two else 1)
        left -= patients[-1]
    n_pat = len(patients)
    order = rng.permutation(n_pat)
    target, n_test, test_pat = 0.25 * studies, 0, set()
    for p in order:
        if n_test >= target or len(test_pat) >= n_pat - 1:
            break
        test_pat.add(int(p))
        n_test += patients[p]
    if not test_pat:
        test_pat.add(int(order[0]))
    n_pos = int(round(0.42 * studies))
    positive = np.zeros(studies, bool)
    positive[rng.permutation(studies)[:n_pos]] = True
    encodings = rng.choice(["signed", "signed", "unsigned", "unsigned12"], size=studies)
    windows = [(40, 80), (40, 80), (40, 150), (35, 80), (30, 80), (40, 100)]
    plans: list[StudyPlan] = []
    k = 0
    for p, n_st in enumerate(patients):
        pid = ids.new(8)
        for _ in range(n_st):
            dz = round(float(rng.uniform(4.0, 6.0)), 2)
            extent = rng.uniform(125.0, 160.0)
            n = int(np.clip(round(extent / dz) + 1, 24, 40))
            s0 = float(rng.uniform(-0.04, 0.04))
            s1 = float(rng.uniform(0.94, 1.0))
            height = float(np.clip((n - 1) * dz / (s1 - s0), 118.0, 170.0))
            plans.append(StudyPlan(
                index=k, seed=int(rng.integers(0, 2**31)), patient_id=pid, study_uid=ids.new(10),
                series_uid=ids.new(10), split="test" if p in test_pat else "train", n_slices=n,
                spacing_z=dz, z0=round(float(rng.uniform(-160.0, 40.0)), 3), s0=s0, head_height=height,
                positive=bool(positive[k]), rows=size, cols=size, size=size,
                sop_uids=[ids.new(9) for _ in range(n)], encoding=str(encodings[k]),
                window=tuple(float(w) for w in windows[int(rng.integers(len(windows)))]),
            ))
            k += 1
    quirk_log: dict[str, list] = {key: [] for key in _QUIRK_KEYS}
    if quirks:
        _plan_quirks(plans, rng, ids, quirk_log)
    return plans, quirk_log


def _plan_quirks(plans: list[StudyPlan], rng: np.random.Generator, ids: _Ids, log: dict[str, list]) -> None:
    """Assign the real data's problems to studies/slices; record what can be known before rendering."""
    train = [plans[i] for i in rng.permutation(len(plans)) if plans[i].split == "train"]
    test = [pl for pl in plans if pl.split == "test"]
    taken: set[tuple[int, int]] = set()

    def pick(pl: StudyPlan, interior: bool = True) -> int:
        lo, hi = (2, pl.n_slices - 2) if interior else (0, pl.n_slices)
        free = [i for i in range(lo, hi) if (pl.index, i) not in taken]
        i = int(free[int(rng.integers(len(free)))])
        taken.add((pl.index, i))
        return i

    def nth(i: int) -> StudyPlan:
        return train[i % len(train)]

    odd = nth(0)
    odd.cols = max(16, int(round(odd.size * 0.9)))
    log["odd_size"].append({"study_uid": odd.study_uid, "rows": odd.rows, "cols": odd.cols})
    wrap_study = nth(1)
    wrap_study.encoding = "wrap12"
    wrap_test = test[int(rng.integers(len(test)))]
    for _ in range(min(3, wrap_test.n_slices - 4)):
        wrap_test.slice_encoding[pick(wrap_test)] = "wrap12"
    dup = nth(2)
    i = pick(dup)
    dup.duplicate[i] = ids.new(9)
    miss = nth(3)
    miss.missing.append(pick(miss))
    corrupt = nth(4)
    i = pick(corrupt)
    corrupt.corrupt.append(i)
    corrupt.sop_uids[i] = CORRUPT_ID
    mw = nth(5)
    mw.multi_window.extend(sorted(pick(mw, interior=False) for _ in range(2)))
    mono = nth(6)
    mono.slice_encoding[pick(mono)] = "monochrome1"
    for pl in plans:
        if pl.encoding == "signed" and rng.random() < 0.5:
            pl.fov_padding = True


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

    def __init__(self, plan: StudyPlan, rng: np.random.Generator):
        r = rng.uniform
        self.A = r(62.0, 72.0)
        self.B = self.A * r(1.16, 1.30)
        self.T0, self.Tv, self.S = r(4.5, 6.5), r(0.1, 0.35), r(4.0, 7.0)
        self.egg, self.h2, self.h3 = r(0.02, 0.06), rng.normal(0, 0.01), rng.normal(0, 0.008)
        self.ph2, self.ph3 = r(0, 2 * math.pi), r(0, 2 * math.pi)
        theta = math.radians(r(-8.0, 8.0))
        cx, cy = np.clip(rng.normal(0.0, 4.0, 2), -10, 10)
        extent = 2 * (self.B * (1 + self.egg) + self.T0 * (1 + self.Tv) + self.S)
        fov = extent * r(1.06, 1.18) + 2 * max(abs(cx), abs(cy))
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
        self.noise = r(1.5, 4.5) * (0.47 / self.ps) ** 0.5
        self.blur_mm = r(0.3, 0.8)
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
            import cv2

            rows, cols = self.u.shape
            n = max(4, int(rows * self.ps / 2.0)), max(4, int(cols * self.ps / 2.0))
            n = n[0], n[1]
            rng = np.random.default_rng(self._cell_seed)
            low = rng.random(n).astype(np.float32)
            self._cells = cv2.resize(low, (cols, rows), interpolation=cv2.INTER_CUBIC)
        return self._cells[win]

    def lowfreq_at(self, k: float, shape: tuple[int, int]) -> np.ndarray:
        """Smooth parenchymal variation for slice position ``k`` (in units of 5 slices)."""
        import cv2

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


def render_slice(head: _Head, s: float, k: int, lesions: list[Lesion], min_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU (float32) and the lesion bitmask (uint8) of the slice at level ``s``, on the head crop."""
    import cv2

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
        f = les.taper(s, H.H)
        m = _lesion_membership(H, sl, les, f, m_brain) if f > 0 else None
        if m is not None and int(np.count_nonzero(m[1] >= 0.5)) >= min_px:
            layers.append((les, f, *m))
    order = {"intraparenchymal": 0, "intraventricular": 1, "subarachnoid": 2, "subdural": 3, "epidural": 4}
    for les, f, win, mem in sorted(layers, key=lambda t: order[t[0].kind]):
        win = win or (slice(None), slice(None))
        if les.kind == "intraparenchymal" and les.p["edema"] > 0.05:
            _paint(brain, win, brain[win] - les.p["edema_hu"], _edema(H, les, mem, f))
        _paint(brain, win, les.hu, mem)
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
    import cv2

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


def render_study(plan: StudyPlan) -> RenderedStudy:
    """Render every slice of a planned study (before the missing-slice quirk drops one)."""
    import cv2

    rng = np.random.default_rng([plan.seed, 7])
    head = _Head(plan, rng)
    lesions = draw_lesions(rng, plan.positive)
    n = plan.n_slices
    hu = np.empty((n, plan.rows, plan.cols), np.float32)
    masks = np.empty((n, plan.rows, plan.cols), np.uint8)
    levels = [plan.s0 + i * plan.spacing_z / plan.head_height for i in range(n)]
    thr = max(MIN_LESION_PX, int(math.ceil(MIN_LESION_MM2 / head.ps**2)))
    hu[:] = -1000.0
    masks[:] = 0
    bits = np.array([MASK_BITS[name] for name in SUBTYPES], np.uint8)
    labels = np.zeros((n, len(SUBTYPES)), np.uint8)
    smooth = head.ps < 0.8  # CT noise is correlated over a few pixels at fine pixel spacing
    gain = 1.0 / float(np.sum(cv2.getGaussianKernel(5, 0.7) ** 2)) if smooth else 1.0
    for i, s in enumerate(levels):
        hu[i][head.crop], masks[i][head.crop] = render_slice(head, s, i, lesions, thr)
        noise = rng.standard_normal((plan.rows, plan.cols), dtype=np.float32)
        if smooth:
            noise = cv2.GaussianBlur(noise, (5, 5), 0.7)
        hu[i] += np.float32(head.noise * gain) * noise
        labels[i] = (np.bitwise_or.reduce(masks[i][head.crop], axis=None) & bits) > 0
    return RenderedStudy(hu, masks, labels, head.ps, levels, lesions)


# ----------------------------------------------------------------------------------------------------
# Writing one study (runs in a worker process)
# ----------------------------------------------------------------------------------------------------
def _worker_init() -> None:
    """Pool workers: one OpenCV thread each (the processes already use every core)."""
    import cv2

    cv2.setNumThreads(1)


def _write_study(job: tuple[StudyPlan, str, bool]) -> dict[str, Any]:
    """Render one study and write its DICOMs (and masks); returns its image records (worker entry point)."""
    plan, out_str, with_masks = job
    try:
        return _write_study_files(plan, Path(out_str), with_masks)
    except Exception as exc:
        raise RuntimeError(f"phantom study #{plan.index} ({plan.study_uid}, seed {plan.seed}) failed: "
                           f"{type(exc).__name__}: {exc}") from exc


def _write_study_files(plan: StudyPlan, out: Path, with_masks: bool) -> dict[str, Any]:
    folder = out / (TRAIN_DIR if plan.split == "train" else TEST_DIR)
    study = render_study(plan)
    ps = study.pixel_spacing
    x0 = round(-(plan.cols / 2) * ps + (plan.seed % 41 - 20) * 0.5, 3)
    y0 = round(-(plan.rows / 2) * ps + (plan.seed % 23 - 11) * 0.5, 3)
    images = []
    for i in range(plan.n_slices):
        if i in plan.missing:
            continue
        z = round(plan.z0 + i * plan.spacing_z, 3)
        meta = {
            "patient_id": plan.patient_id, "study_uid": plan.study_uid, "series_uid": plan.series_uid,
            "position": (x0, y0, z), "pixel_spacing": ps,
            "encoding": plan.slice_encoding.get(i, plan.encoding),
            "window_center": plan.window[0], "window_width": plan.window[1],
        }
        if meta["encoding"] == "signed":
            meta["fov_padding"] = plan.fov_padding
        if i in plan.multi_window:
            meta["window_center"] = [plan.window[0], 600.0]
            meta["window_width"] = [plan.window[1], 2800.0]
        if i in plan.corrupt:
            meta["truncate"] = 0.35
        sops = [plan.sop_uids[i]] + ([plan.duplicate[i]] if i in plan.duplicate else [])
        label = study.labels[i]
        for sop in sops:
            write_ct_dicom(folder / f"{sop}.dcm", study.hu[i], sop_uid=sop, **meta)
            if with_masks and study.masks[i].any():
                write_mask(out / MASK_DIR / f"{sop}.npz", study.masks[i])
            images.append({"sop_uid": sop, "split": plan.split, "study_uid": plan.study_uid, "slice": i, "z": z,
                           "encoding": meta["encoding"], **{n: int(v) for n, v in zip(SUBTYPES, label, strict=True)}})
    lesions = []
    for les in study.lesions:
        lesions.append({"kind": les.kind, "variant": les.variant, "hu": round(les.hu, 1),
                        "slices": int(study.labels[:, SUBTYPES.index(les.kind)].sum())})
    return {"index": plan.index, "images": images, "pixel_spacing": ps, "lesions": lesions}


# ----------------------------------------------------------------------------------------------------
# The phantom
# ----------------------------------------------------------------------------------------------------
_OWNED = (TRAIN_DIR, TEST_DIR, MASK_DIR, TRAIN_CSV, SAMPLE_SUBMISSION, ANSWER_KEY, MANIFEST, COMPLETE_MARKER)


def _prepare_out(out: Path) -> None:
    """Make ``out`` ready: clear an earlier phantom there, refuse to touch anything else."""
    ours = (out / COMPLETE_MARKER).exists() or (out / PROGRESS_MARKER).exists()
    if not ours:
        foreign = [name for name in (TRAIN_CSV, TRAIN_DIR, TEST_DIR) if (out / name).exists()
                   and ((out / name).is_file() or any((out / name).iterdir()))]
        if foreign:
            raise ValueError(f"{out}: holds {', '.join(foreign)} but no phantom marker ({COMPLETE_MARKER}); "
                             "refusing to overwrite what may be real data. Choose another --out folder.")
    for name in _OWNED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _config(studies: int, seed: int, size: int, quirks: bool, masks: bool) -> dict[str, Any]:
    return {"studies": studies, "seed": seed, "size": size, "quirks": quirks, "masks": masks, "version": 1}


def generate_phantom(out: str | os.PathLike, studies: int, seed: int, size: int = 512, quirks: bool = False,
                     masks: bool = False, workers: int = 0, progress: bool = True) -> dict:
    """Write a phantom in the RSNA/Kaggle layout under ``out``; returns the manifest (also written).

    Same arguments -> identical files and labels (independent of ``workers``). ``workers=0`` uses one
    process per CPU core. An earlier phantom in ``out`` is replaced; a folder holding other data is refused.
    """
    from tqdm.auto import tqdm

    if studies < 2:
        raise ValueError(f"studies={studies}: need at least 2 (one patient per split)")
    if size < 32:
        raise ValueError(f"size={size}: need at least 32 pixels")
    out = Path(out)
    t0 = time.perf_counter()
    _prepare_out(out)
    config = _config(studies, seed, size, quirks, masks)
    _atomic_write_text(out / PROGRESS_MARKER, json.dumps(config))
    (out / TRAIN_DIR).mkdir()
    (out / TEST_DIR).mkdir()
    if masks:
        (out / MASK_DIR).mkdir()
    plans, quirk_log = plan_phantom(studies, seed, size, quirks)
    jobs = [(pl, str(out), masks) for pl in plans]
    if workers == 0:
        # One process per core, except for tiny phantoms where starting the pool costs more than it saves.
        workers = 1 if studies * size * size < 40 * 64 * 64 else (os.cpu_count() or 1)
    workers = max(1, min(workers, len(jobs)))
    results: list[dict] = [{}] * len(jobs)
    with tqdm(total=len(jobs), desc="synth studies", unit="study", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                res = _write_study(job)
                results[res["index"]] = res
                bar.update()
        else:
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for res in pool.imap_unordered(_write_study, jobs):
                    results[res["index"]] = res
                    bar.update()
    manifest = _finish(out, plans, results, quirk_log, config, seed)
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    return manifest


def _finish(out: Path, plans: list[StudyPlan], results: list[dict], quirk_log: dict, config: dict,
            seed: int) -> dict:
    """Write the CSVs, the manifest and the completion marker."""
    rng = np.random.default_rng([seed, 4242])
    images = pd.DataFrame([img for res in results for img in res["images"]])
    for name in SUBTYPES:
        images[name] = images[name].astype(int)
    images["any"] = images[list(SUBTYPES)].max(axis=1)
    train = images[images.split == "train"].iloc[rng.permutation(int((images.split == "train").sum()))]
    test = images[images.split == "test"].iloc[rng.permutation(int((images.split == "test").sum()))]
    train_long = wide_to_long(train.set_index("sop_uid")[list(LABELS)])
    if config["quirks"]:
        blocks = rng.choice(len(train), size=min(3, len(train)), replace=False)
        parts, start = [], 0
        for b in sorted(int(x) for x in blocks):
            cut = (b + 1) * 6
            parts += [train_long.iloc[start:cut], train_long.iloc[b * 6:cut]]
            start = cut
            quirk_log["duplicate_label_rows"].append({"sop_uid": str(train.iloc[b]["sop_uid"]), "rows": 6})
        parts.append(train_long.iloc[start:])
        train_long = pd.concat(parts, ignore_index=True)
    _atomic_write_text(out / TRAIN_CSV, train_long.to_csv(index=False))
    test_wide = test.set_index("sop_uid")[list(LABELS)]
    _atomic_write_text(out / ANSWER_KEY, wide_to_long(test_wide).to_csv(index=False))
    sample = wide_to_long(test_wide.astype(float) * 0 + 0.5)
    _atomic_write_text(out / SAMPLE_SUBMISSION, sample.to_csv(index=False))
    # Quirks known only after rendering.
    by_index = {pl.index: pl for pl in plans}
    for pl in plans:
        folder = TRAIN_DIR if pl.split == "train" else TEST_DIR
        for i in pl.corrupt:
            quirk_log["corrupt"].append({"sop_uid": pl.sop_uids[i], "study_uid": pl.study_uid,
                                         "path": f"{folder}/{pl.sop_uids[i]}.dcm",
                                         "reason": "pixel data truncated to 35% after a valid header"})
        for i, dup in pl.duplicate.items():
            quirk_log["duplicate_slice"].append({"study_uid": pl.study_uid, "sop_uids": [pl.sop_uids[i], dup],
                                                 "z": round(pl.z0 + i * pl.spacing_z, 3)})
        for i in pl.missing:
            quirk_log["missing_slice"].append({"study_uid": pl.study_uid, "z": round(pl.z0 + i * pl.spacing_z, 3),
                                               "between": [pl.sop_uids[i - 1], pl.sop_uids[i + 1]]})
        if pl.fov_padding:
            quirk_log["fov_padding"].append({"study_uid": pl.study_uid, "raw": -2000})
    wraps = images[(images.encoding == "wrap12") & ~images.sop_uid.isin([CORRUPT_ID])]
    quirk_log["intercept_wrap"] = [{"sop_uid": r.sop_uid, "study_uid": r.study_uid, "split": r.split}
                                   for r in wraps.itertuples()]
    mono = images[images.encoding == "monochrome1"]
    quirk_log["monochrome1"] = [{"sop_uid": r.sop_uid, "study_uid": r.study_uid,
                                 "note": "inverted storage, RescaleSlope -1: the modality LUT gives HU"}
                                for r in mono.itertuples()]
    for pl in plans:
        for i in pl.multi_window:
            quirk_log["multi_window"].append({"sop_uid": pl.sop_uids[i], "study_uid": pl.study_uid})
    study_any = images.groupby("study_uid")["any"].max()
    counts = {
        "studies": len(plans), "patients": len({pl.patient_id for pl in plans}),
        "train_studies": sum(pl.split == "train" for pl in plans),
        "test_studies": sum(pl.split == "test" for pl in plans),
        "train_images": int((images.split == "train").sum()), "test_images": int((images.split == "test").sum()),
        "positive_studies": int(study_any.sum()), "positive_slices": {n: int(images[n].sum()) for n in LABELS},
        "train_label_rows": len(train_long),
    }
    studies = []
    for res in results:
        pl = by_index[res["index"]]
        studies.append({"study_uid": pl.study_uid, "patient_id": pl.patient_id, "series_uid": pl.series_uid,
                        "split": pl.split, "images": len(res["images"]), "rows": pl.rows, "cols": pl.cols,
                        "pixel_spacing": res["pixel_spacing"], "spacing_z": pl.spacing_z,
                        "encoding": pl.encoding, "lesions": res["lesions"]})
    manifest = {"seed": seed, "config": config, "counts": counts, "quirks": quirk_log,
                "mask_bits": MASK_BITS, "studies": studies}
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    _atomic_write_text(out / COMPLETE_MARKER, json.dumps(config))
    (out / PROGRESS_MARKER).unlink(missing_ok=True)
    return manifest


def ensure_phantom(params: Params, force: bool = False, progress: bool = True) -> Path:
    """Generate the phantom under ``params.data_root`` from ``params.synth`` unless data is already there.

    A complete phantom (marker present) with the same settings is kept; one with other settings raises
    unless ``force``. A folder with a ``stage_2_train.csv`` but no phantom marker is taken as real data
    and never touched. An interrupted phantom is regenerated.
    """
    root = params.data_root
    cfg = params.synth
    want = _config(cfg.studies, cfg.seed, cfg.size, cfg.quirks, cfg.masks)
    done = root / COMPLETE_MARKER
    if done.exists() and not force:
        have = json.loads(done.read_text())
        if have != want:
            raise ValueError(f"{root}: holds a phantom made with {have}, params.synth asks for {want}; "
                             "delete the folder, point paths.data_root elsewhere or pass force=True")
        return root
    ours = done.exists() or (root / PROGRESS_MARKER).exists()
    if (root / params.paths.train_csv).exists() and not ours:
        return root
    if not cfg.enabled:
        raise FileNotFoundError(f"{root}: no {params.paths.train_csv} and synth.enabled is false; "
                                "point paths.data_root at RSNA data or enable the phantom")
    names = (params.paths.train_dir, params.paths.test_dir, params.paths.train_csv, params.paths.sample_submission)
    if names != (TRAIN_DIR, TEST_DIR, TRAIN_CSV, SAMPLE_SUBMISSION):
        raise ValueError(f"the phantom writes the Kaggle names {TRAIN_DIR}, {TEST_DIR}, {TRAIN_CSV}, "
                         f"{SAMPLE_SUBMISSION}; params.paths names {names}")
    generate_phantom(root, cfg.studies, cfg.seed, cfg.size, cfg.quirks, cfg.masks, workers=cfg.workers,
                     progress=progress)
    return root


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd synth``."""
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created; an old phantom is replaced)")
    parser.add_argument("--studies", type=int, default=60, help="number of studies (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=512, help="rows/columns of a slice (default 512)")
    parser.add_argument("--quirks", action="store_true", help="inject the real data's problems (see the manifest)")
    parser.add_argument("--masks", action="store_true", help="write per-slice lesion masks to masks/<sop>.npz")
    parser.add_argument("--workers", type=int, default=0, help="processes (default 0 = one per CPU core)")


def cli(args: argparse.Namespace) -> int:
    """Run ``ichd synth``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        man = generate_phantom(args.out, args.studies, args.seed, args.size, args.quirks, args.masks,
                               args.workers)
    c = man["counts"]
    print(f"wrote {c['train_images']} train + {c['test_images']} test slices of {c['studies']} studies "
          f"({c['patients']} patients) to {args.out} in {man['seconds']} s; "
          f"{c['positive_studies']} positive studies, {c['positive_slices']['any']} positive slices")
    if args.quirks:
        print("quirks: " + ", ".join(f"{k}={len(v)}" for k, v in man["quirks"].items()))
    return 0


__all__ = ["generate_phantom", "ensure_phantom", "write_ct_dicom", "write_mask", "encode_hu", "plan_phantom",
           "render_study", "StudyPlan", "RenderedStudy", "Lesion", "draw_lesions", "ENCODINGS", "MASK_BITS",
           "CORRUPT_ID"]
