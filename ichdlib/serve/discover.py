"""Finding the studies in a folder of DICOM files: discovery, series choice, slice validity, pixels.

1. **Discovery** (:func:`discover`): every file under a folder (recursively, any name, with or without
   ``.dcm``) is read header-only and grouped by StudyInstanceUID and SeriesInstanceUID. Per study one series
   is chosen by :mod:`ichdlib.serve.series` (soft-tissue, non-contrast axial CT whose thickness is closest to
   the model's training data, then most slices; a thin-only study is read as slabs); non-CT series,
   localizers/scouts (ImageType ``LOCALIZER`` or a non-axial orientation), the other series (one row each,
   with why), non-DICOM and unreadable files and ``DICOMDIR`` indexes are listed in ``problems`` with the reason. Only regular files are opened; hidden files, FIFOs, devices and unreadable folders are listed
   (:func:`ichdlib.ingest.validity.list_files`), and each slice must pass :func:`ichdlib.ingest.validity.slice_problem`,
   the rule ingest applies. Slices are ordered by z exactly as the catalog orders them (ties by SOPInstanceUID; duplicate
   positions are kept, as in training, with a warning).
2. **Pixels** (:func:`load_study`): HU through :func:`ichdlib.ingest.dicom.read_hu` (compressed transfer syntaxes
   through pylibjpeg); a slice that cannot be decoded is dropped with a message and the z-neighbours are
   recomputed over the readable slices.

Nothing here raises on bad input: each problem becomes a row of ``problems.csv``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from tqdm import tqdm

from ichdlib.ingest.dicom import DicomReadError, read_header, read_hu
from ichdlib.ingest.table import order_slices as catalog_order
from ichdlib.ingest.validity import (  # noqa: F401  (is_axial, slice_normal: re-exported for callers of predict)
    AXIAL_MIN_COS,
    GAP_FACTOR,
    capped_z,
    is_axial,
    list_files,
    slice_normal,
    slice_problem,
)
from ichdlib.serve.inplane import parse_spacing
from ichdlib.serve.series import (
    DEFAULT_THICKNESS_MM,
    SeriesInfo,
    choose_series,
    classify,
    series_tags,
    series_thickness,
    to_slabs,
)

#: Problem severities: ``skipped`` (something was left out) or ``warning`` (predicted, with a caveat).
SKIPPED, WARNING = "skipped", "warning"
PROBLEM_COLUMNS = ["study_uid", "series_uid", "path", "severity", "message"]


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------
def problem(message: str, *, path: str | os.PathLike = "", study_uid: str = "", series_uid: str = "",
            severity: str = SKIPPED) -> dict[str, str]:
    """One row of ``problems.csv``."""
    return {"study_uid": study_uid, "series_uid": series_uid, "path": str(path), "severity": severity,
            "message": message}


def problems_frame(problems: Iterable[dict[str, str]]) -> pd.DataFrame:
    """Problem rows as a DataFrame with the ``problems.csv`` columns (empty frame when there are none)."""
    return pd.DataFrame(list(problems), columns=PROBLEM_COLUMNS)


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------
def find_files(root: str | os.PathLike) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), sorted; hidden files and folders, FIFOs,
    sockets and devices are not included (:func:`ichdlib.ingest.validity.list_files`, as ingest does)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    return [Path(p) for p in list_files(root)[0]]


def without_dicomdir(paths: Sequence[str]) -> tuple[list[str], list[dict]]:
    """``paths`` without ``DICOMDIR`` files (a media index, not an image: read as one it would make a study of
    its own), and one problem naming each."""
    index = [p for p in paths if Path(p).name.upper() == "DICOMDIR"]
    return ([p for p in paths if Path(p).name.upper() != "DICOMDIR"],
            [problem("skipped: a DICOMDIR (an index of the files, not an image)", path=p) for p in index])


def _image_type(meta: dict[str, Any]) -> str:
    """ImageType as ``A\\B\\C`` upper case (from ``meta`` when the reader provides it, else the file)."""
    value = meta.get("image_type")
    if value is None:

        try:
            ds = pydicom.dcmread(meta["path"], stop_before_pixels=True, specific_tags=["ImageType"], force=True)
            value = ds.get("ImageType", "")
        except Exception:  # the header was readable a moment ago; an odd ImageType is not worth a failure
            value = ""
    if not isinstance(value, str):
        value = "\\".join(str(v) for v in value)
    return value.upper()


def scan_headers(paths: Sequence[str | os.PathLike], progress: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """Header of every file (no pixels): a table with one row per DICOM file, and the unreadable files."""

    metas, problems = [], []
    for p in tqdm(paths, desc="headers", unit="file", disable=not progress, leave=False):
        try:
            meta = read_header(p)
        except DicomReadError as exc:
            problems.append(problem(f"not read: {exc.reason}", path=p))
            continue
        except Exception as exc:  # one odd file never stops a folder
            problems.append(problem(f"not read: unexpected error ({type(exc).__name__}: {exc})", path=p))
            continue
        meta["image_type"] = _image_type(meta)
        metas.append(meta)
    cols = ["path", "sop_uid", "patient_id", "study_uid", "series_uid", "modality", "z", "position",
            "orientation", "rows", "cols", "instance_number", "has_pixels", "frames", "samples_per_pixel",
            "image_type", "transfer_syntax", "fixes", "slope", "intercept", "photometric", "bits_allocated",
            "bits_stored"]
    table = pd.DataFrame([{k: m.get(k) for k in cols} for m in metas], columns=cols)
    table["study_uid"] = table["study_uid"].fillna("").astype(str)
    table["series_uid"] = table["series_uid"].fillna("").astype(str)
    # Files without UIDs are grouped by their folder, so that they still form a study / series.
    no_study = table["study_uid"] == ""
    table.loc[no_study, "study_uid"] = [f"(no StudyInstanceUID) {Path(p).parent}" for p in table.loc[no_study, "path"]]
    no_series = table["series_uid"] == ""
    table.loc[no_series, "series_uid"] = "(no SeriesInstanceUID)"
    return table, problems


@dataclass
class StudyScan:
    """One study's chosen series: its slices ordered by z with neighbours, and what was left out."""

    study_uid: str
    patient_id: str
    series_uid: str
    #: One row per slice in z order: ``path, sop_uid, z, rows, cols, slice_index, prev_index, next_index``
    #: (+ the header columns of :func:`scan_headers`).
    slices: pd.DataFrame
    problems: list[dict] = field(default_factory=list)
    #: Every series of the study with its role and why it was (not) read.
    series: list[SeriesInfo] = field(default_factory=list)
    #: Slab thickness (mm) when the chosen series is thin and is averaged into slabs at load, else None.
    slab_mm: float | None = None
    #: PixelSpacing ``(row mm, col mm)`` of the series (None when its files do not say; :mod:`ichdlib.serve.inplane`).
    pixel_spacing: tuple[float, float] | None = None

    @property
    def n_slices(self) -> int:
        return len(self.slices)


def order_slices(table: pd.DataFrame) -> pd.DataFrame:
    """Order one series exactly as the catalog orders a study (:func:`ichdlib.ingest.table.order_slices`: z, ties
    by ``sop_uid``) and add ``slice_index``, ``prev_index``/``next_index`` (positions of the z-neighbours in
    the returned table; a slice at the edge is its own neighbour), ``spacing_z`` and ``dup_z``."""

    t = table.drop(columns=["slice_index", "prev_index", "next_index", "spacing_z", "dup_z", "n_slices"],
                   errors="ignore").assign(split="test", row=0)
    t = catalog_order(t)
    t["row"] = np.arange(len(t), dtype=np.int64)
    t = catalog_order(t)  # neighbours as positions in this table, as the catalog does with cache rows
    t = t.rename(columns={"prev_row": "prev_index", "next_row": "next_index"})
    return t.drop(columns=["split", "row"]).reset_index(drop=True)


def _series_kind(group: pd.DataFrame) -> tuple[str, str]:
    """``("ok" | "not_ct" | "not_image" | "localizer" | "not_axial", reason)`` for one series."""
    n = len(group)
    modalities = sorted(set(group["modality"].fillna("").astype(str)) - {""})
    if modalities and "CT" not in modalities:
        return "not_ct", f"modality {'/'.join(modalities)}, not CT"
    if not group["has_pixels"].fillna(False).astype(bool).any():
        return "not_image", "no pixel data (not an image series)"
    types = group["image_type"].fillna("").astype(str)
    if types.str.contains("LOCALIZER|SCOUT|TOPOGRAM", regex=True).any():
        return "localizer", f"localizer/scout (ImageType {types.iloc[0]}), {n} image(s)"
    axial = [is_axial(o) for o in group["orientation"]]
    if any(a is False for a in axial) and not any(a is True for a in axial):
        few = " (a localizer?)" if n <= 3 else ""
        return "not_axial", f"not axial (ImageOrientationPatient {_fmt_orientation(group['orientation'].iloc[0])}), {n} image(s){few}"
    return "ok", ""


def _fmt_orientation(o: Any) -> str:
    return "missing" if o is None else "[" + ", ".join(f"{v:g}" for v in o) + "]"


def select_series(table: pd.DataFrame, training_mm: float = DEFAULT_THICKNESS_MM, fallback: bool = True
                  ) -> tuple[list[StudyScan], list[dict], list[SeriesInfo]]:
    """Group the header table into studies, choose each study's series (:func:`ichdlib.serve.series.choose_series`:
    soft-tissue, non-contrast axial CT, thickness closest to ``training_mm``, then most slices) and order its
    slices.

    Returns the chosen series (one :class:`StudyScan` per study that has one, with its study's series in
    ``scan.series``), the problems (studies without a usable series, series left out with why, files left out
    of the chosen series) and every series of every study with its role and reason.
    """
    scans: list[StudyScan] = []
    problems: list[dict] = []
    all_series: list[SeriesInfo] = []
    for study_uid, study in table.groupby("study_uid", sort=True):
        study_problems: list[dict] = []
        infos: list[SeriesInfo] = []
        groups: dict[str, pd.DataFrame] = {}
        spacings: dict[str, tuple[float, float] | None] = {}
        for series_uid, group in study.groupby("series_uid", sort=True):
            kind, reason = _series_kind(group)
            tags = series_tags(str(group["path"].iloc[0]))
            thick = series_thickness(tags, pd.to_numeric(group["z"], errors="coerce").to_numpy(float))
            spacing = parse_spacing(tags["PixelSpacing"])
            info = SeriesInfo(study_uid, series_uid, len(group), classify(kind, tags, thick, training_mm),
                              tags["SeriesDescription"], tags["ConvolutionKernel"], tags["ContrastBolusAgent"], thick,
                              reason=f"not read: {reason}" if kind != "ok" else "",
                              fov_mm=_fov_mm(spacing, group["cols"]))
            spacings[series_uid] = spacing
            infos.append(info)
            groups[series_uid] = group
            if kind != "ok":
                study_problems.append(problem(f"series left out: {reason}", study_uid=study_uid,
                                              series_uid=series_uid, path=_one_path(group)))
        chosen = choose_series(infos, training_mm, fallback)
        all_series += infos
        if chosen is None:
            roles = sorted({s.role for s in infos if s.role in ("bone", "contrast")})
            why = (f"only {' and '.join(r if r == 'contrast' else 'bone-kernel' for r in roles)} series"
                   if roles else "no axial CT series")
            study_problems.append(problem(f"{why} in this study; nothing to predict", study_uid=study_uid,
                                          path=_one_path(study)))
            problems += study_problems
            continue
        series_uid, group = chosen.series_uid, groups[chosen.series_uid]
        if chosen.role in ("contrast", "bone"):
            study_problems.append(problem(chosen.reason, study_uid=study_uid, series_uid=chosen.series_uid,
                                          path=_one_path(group), severity=WARNING))
        for info in infos:
            if info is not chosen and info.role in ("thick_soft", "thin", "bone", "contrast"):
                what = ("other CT series left out" if info.role in ("thick_soft", "thin") else "series left out")
                study_problems.append(problem(
                    f"{what} ({info.n_images} image(s)): {info.reason.removeprefix('not read: ')}; predicted "
                    f"series {series_uid}", study_uid=study_uid, series_uid=info.series_uid,
                    path=_one_path(groups[info.series_uid])))
        slices, dropped = _clean_series(group, study_uid, series_uid)
        study_problems += dropped
        if len(slices) == 0:
            study_problems.append(problem("no usable slice in the chosen series", study_uid=study_uid,
                                          series_uid=series_uid))
            problems += study_problems
            continue
        if len(slices) == 1:
            study_problems.append(problem(
                "single slice: its own neighbours in the 3-slice input and no sequence context, so the "
                "prediction is less reliable", study_uid=study_uid, series_uid=series_uid,
                path=slices["path"].iloc[0], severity=WARNING))
        patient = str(slices["patient_id"].iloc[0] or "")
        scan = StudyScan(study_uid, patient, series_uid, slices, study_problems, infos,
                         training_mm if chosen.role == "thin" else None, spacings[series_uid])
        scans.append(scan)
        problems += study_problems
    return scans, problems, all_series


def _fov_mm(spacing: tuple[float, float] | None, cols: pd.Series) -> float | None:
    """A series' field of view across its columns (mm): PixelSpacing x the median Columns."""
    n = pd.to_numeric(cols, errors="coerce").dropna()
    return None if spacing is None or n.empty else round(spacing[1] * float(n.median()), 1)


def _one_path(group: pd.DataFrame) -> str:
    paths = group["path"].astype(str).tolist()
    return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"


def _clean_series(group: pd.DataFrame, study_uid: str, series_uid: str) -> tuple[pd.DataFrame, list[dict]]:
    """Drop a series' files that break the slice-validity rule (:func:`ichdlib.ingest.validity.slice_problem`,
    the rule ingest applies) or repeat a SOP, and order the rest by z."""
    problems: list[dict] = []
    group = group.copy()
    z = pd.to_numeric(group["z"], errors="coerce")
    inst = pd.to_numeric(group["instance_number"], errors="coerce").where(lambda v: v >= 0)
    if len(group) and z.isna().all() and inst.notna().all():
        problems.append(problem(
            "no ImagePositionPatient/SliceLocation in this series: slices ordered by InstanceNumber, z spacing "
            "assumed uniform", study_uid=study_uid, series_uid=series_uid, severity=WARNING))
        group["z"] = inst.astype(float)
        group["position"] = None
    keep = []
    seen_sop: set[str] = set()
    for _, row in group.iterrows():
        why = slice_problem(row.to_dict())
        if why is None and str(row["sop_uid"]) in seen_sop:
            why = f"duplicate SOPInstanceUID {row['sop_uid']}"
        if why is not None:
            problems.append(problem(f"slice left out: {why}", study_uid=study_uid, series_uid=series_uid,
                                    path=row["path"]))
            continue
        seen_sop.add(str(row["sop_uid"]))
        keep.append(row)
    table = pd.DataFrame(keep, columns=group.columns)
    if table.empty:
        return order_slices(table), problems
    table["z"] = table["z"].astype(float)
    table = order_slices(table)
    if table["dup_z"].any():
        dz = table.loc[table["dup_z"], "z"]
        problems.append(problem(
            f"{len(dz)} slices share {dz.nunique()} z position(s) (e.g. {float(dz.iloc[0]):g} mm); all kept and "
            "ordered by SOPInstanceUID, as in training", study_uid=study_uid, series_uid=series_uid,
            severity=WARNING))
    gaps = z_gaps(table["z"].to_numpy(float))
    if gaps:
        problems.append(problem(
            f"{len(gaps)} gap(s) in the slice positions (e.g. {gaps[0][1]:g} mm after z={gaps[0][0]:g}, the usual "
            f"step is {gaps[0][2]:g} mm): missing slices or an outlier position; slices predicted in position "
            f"order, the sequence models see steps capped at {GAP_FACTOR:g}x the usual one",
            study_uid=study_uid, series_uid=series_uid, severity=WARNING))
    return table, problems


def z_gaps(z: np.ndarray, factor: float = GAP_FACTOR) -> list[tuple[float, float, float]]:
    """Steps between z-ordered positions larger than ``factor`` x the median step:
    ``[(z before the gap, step, median step), ...]``."""
    if len(z) < 3:
        return []
    d = np.diff(z)
    pos = d[d > 0]
    if not len(pos):
        return []
    med = float(np.median(pos))
    return [(float(z[i]), float(d[i]), med) for i in np.flatnonzero(d > factor * med)]


@dataclass
class Discovery:
    """What :func:`discover_all` found: the chosen series per study, the problems, every series with its role."""

    scans: list[StudyScan]
    problems: list[dict]
    series: list[SeriesInfo]


def discover_all(root: str | os.PathLike, progress: bool = False, training_mm: float = DEFAULT_THICKNESS_MM,
                 fallback: bool = True) -> Discovery:
    """Folder (one study, many studies, nested, any file names) -> chosen series per study, problems, and
    every series with its role (the series choice is :func:`select_series` for a model trained on
    ``training_mm`` slices; ``fallback``: read a contrast-only or bone-only study anyway, with a warning)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    paths, skipped = list_files(root)
    paths, index = without_dicomdir(paths)
    not_opened = [problem(why, path=p) for p, why in skipped] + index  # "skipped: hidden file", "skipped: a FIFO ..."
    if not paths:
        return Discovery([], not_opened + [problem("no files found", path=root)], [])
    table, problems = scan_headers(paths, progress=progress)
    problems = not_opened + problems
    if table.empty:
        problems.append(problem("no readable DICOM file found", path=root))
        return Discovery([], problems, [])
    scans, more, series = select_series(table, training_mm, fallback)
    return Discovery(scans, problems + more, series)


def discover(root: str | os.PathLike, progress: bool = False,
             training_mm: float = DEFAULT_THICKNESS_MM) -> tuple[list[StudyScan], list[dict]]:
    """:func:`discover_all` without the series list: ``(scans, problems)``."""
    found = discover_all(root, progress, training_mm)
    return found.scans, found.problems


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedStudy:
    """A study's readable slices: HU images in z order and their table (neighbours over readable slices)."""

    scan: StudyScan
    slices: pd.DataFrame
    hu: list[np.ndarray]
    problems: list[dict] = field(default_factory=list)


def load_study(scan: StudyScan) -> LoadedStudy:
    """Decode every slice of a chosen series to HU; undecodable slices are dropped with a message."""

    problems: list[dict] = []
    keep, images = [], []
    for i, row in scan.slices.iterrows():
        try:
            hu, _ = read_hu(row["path"])
        except DicomReadError as exc:
            problems.append(problem(f"slice left out: {exc.reason}", study_uid=scan.study_uid,
                                    series_uid=scan.series_uid, path=row["path"]))
            continue
        except Exception as exc:  # a decoder failing in an unexpected way still only costs the slice
            problems.append(problem(f"slice left out: cannot decode ({type(exc).__name__}: {exc})",
                                    study_uid=scan.study_uid, series_uid=scan.series_uid, path=row["path"]))
            continue
        if not np.isfinite(hu).all():
            problems.append(problem("slice left out: pixel values are not finite", study_uid=scan.study_uid,
                                    series_uid=scan.series_uid, path=row["path"]))
            continue
        keep.append(i)
        images.append(hu)
    slices = order_slices(scan.slices.loc[keep]) if keep else scan.slices.iloc[:0]
    if scan.slab_mm and len(slices) > 1:
        n_thin = len(slices)
        slabs, images = to_slabs(slices, images, scan.slab_mm)
        slices = order_slices(slabs)
        problems.append(problem(
            f"only a thin series ({n_thin} slices): reformatted into {len(slices)} slabs of {scan.slab_mm:g} mm "
            "(mean HU over each slab), the model's training thickness", study_uid=scan.study_uid,
            series_uid=scan.series_uid, severity=WARNING))
    if scan.n_slices > 1 and len(keep) == 1:
        problems.append(problem("only one readable slice: no neighbours and no sequence context",
                                study_uid=scan.study_uid, series_uid=scan.series_uid, severity=WARNING))
    return LoadedStudy(scan, slices, images, problems)


def index_ranges(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    idx = sorted({int(i) for i in indices})
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def safe_name(uid: str) -> str:
    """A UID as a file or folder name (alphanumerics, ``._-``; the last 64 characters)."""
    keep = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uid)
    return keep[-64:] or "study"
