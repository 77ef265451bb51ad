"""External test sets as they are downloaded: CQ500, PhysioNet CT-ICH, a folder of DICOM studies + labels.

Each reader returns an :class:`ExternalData`: the studies to score (:class:`Item`, loaded one at a time by
:func:`load_item` so memory stays bounded), the study-level reference labels, every series with its role
(DICOM layouts) and the problems. Nothing raises on one bad study: it becomes a row of ``problems.csv``
naming the study and the file, and the other studies go on.

- **CQ500** (:func:`read_cq500`): ``CQ500CT<n> CQ500CT<n>/Unknown Study/<series>/CT*.dcm`` and ``reads.csv``
  (``name`` = ``CQ500-CT-<n>``, ``Category``, ``R1:``/``R2:``/``R3:`` x findings). The reference label of
  each RSNA label is the **majority of the three readers** (ICH -> any, IPH, IVH, SDH, EDH, SAH). Names and
  folders are matched by ``<n>``; a study on one side only is listed. The series is chosen by
  :mod:`ichdlib.serve.series` (thick soft-tissue, non-contrast, closest to the training thickness).
- **CT-ICH** (:func:`read_ctich`): ``ct_scans/<NNN>.nii``, ``masks/<NNN>.nii``,
  ``hemorrhage_diagnosis_raw_ct.csv`` (slice labels, ``SliceNumber`` from 1 along the stored last axis).
  Volumes are read with nibabel and reoriented from their affine to one orientation (rows posterior, columns
  patient-left, slices inferior -> superior), so a flipped affine gives the same slices. Study label = any
  slice positive. Voxels must be HU (air near -1000); masks must have the volume's shape.
- **DICOM** (:func:`read_dicom`): any folder of DICOM studies and a labels CSV with ``StudyInstanceUID`` or
  ``PatientID`` and the six label columns (0/1).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from tqdm.auto import tqdm

from ichdlib.external_sets import CQ500_LABELS, CTICH_CSV, CTICH_LABELS, CTICH_MASKS, CTICH_SCANS
from ichdlib.labels import LABELS
from ichdlib.serve.discover import (
    SKIPPED,
    WARNING,
    LoadedStudy,
    StudyScan,
    discover_all,
    load_study,
    order_slices,
    problem,
)
from ichdlib.serve.series import DEFAULT_THICKNESS_MM, SERIES_COLUMNS

FORMATS = ("cq500", "ctich", "dicom")
_CQ500_DIR = re.compile(r"^CQ500CT(\d+)(?: CQ500CT\1)?$")
_CQ500_NAME = re.compile(r"^CQ500-CT-(\d+)$")
#: A volume whose 1st percentile is above this is not in HU (no air around the head).
HU_AIR_MAX = -500.0


@dataclass
class Item:
    """One study to score: a chosen DICOM series, or a NIfTI volume (with its mask and slice labels)."""

    study: str
    scan: StudyScan | None = None
    volume: Path | None = None
    mask: Path | None = None
    slice_labels: pd.DataFrame | None = None


@dataclass
class ExternalData:
    """A dataset read for validation (see the module docstring)."""

    format: str
    root: Path
    items: list[Item]
    #: Reference labels, index ``study`` (str), columns :data:`ichdlib.labels.LABELS` (0/1).
    labels: pd.DataFrame
    label_source: str
    series: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SERIES_COLUMNS))
    problems: list[dict] = field(default_factory=list)


@dataclass
class LoadedCase:
    """A study's pixels ready for the models, plus its lesion masks (NIfTI) aligned to the slices."""

    loaded: LoadedStudy
    masks: list[np.ndarray] | None = None
    slice_labels: pd.DataFrame | None = None
    problems: list[dict] = field(default_factory=list)


def detect_format(root: str | os.PathLike) -> str:
    """``cq500`` (``reads.csv`` or ``CQ500CT*`` folders), ``ctich`` (``ct_scans/`` or the slice CSV) or ``dicom``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if (root / "reads.csv").is_file() or any(_CQ500_DIR.match(p.name) for p in root.iterdir() if p.is_dir()):
        return "cq500"
    if (root / CTICH_SCANS).is_dir() or (root / CTICH_CSV).is_file():
        return "ctich"
    return "dicom"


def _binary(frame: pd.DataFrame, cols: list[str], source: Path, key: str) -> tuple[pd.DataFrame, list[dict]]:
    """Rows whose ``cols`` are all 0/1 (as int), and one problem per study (``key``) with other values,
    naming it, the file, how many rows and the first bad value. A study with any bad row loses all its rows."""
    values = frame[cols].apply(pd.to_numeric, errors="coerce")
    ok = values.isin([0, 1]).all(axis=1).to_numpy()
    problems, bad_keys = [], []
    for study, idx in pd.Series(np.flatnonzero(~ok)).groupby(frame[key].astype(str).to_numpy()[~ok], sort=False):
        i = int(idx.iloc[0])
        first = next(f"{c}={frame.iloc[i][c]!r}" for c in cols if values.iloc[i][c] not in (0, 1))
        problems.append(problem(f"study {study}: label values outside {{0, 1}} in {len(idx)} row(s) of "
                                f"{source.name} (row {i + 2}: {first}); its reference labels are left out (the "
                                "study is still scored)", study_uid=str(study), path=source))
        bad_keys.append(str(study))
    keep = ok & ~frame[key].astype(str).isin(bad_keys).to_numpy()
    clean = frame.loc[keep].copy()
    clean[cols] = values.loc[keep].astype(int)
    return clean, problems


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(frame.columns[:12])})")
    return frame


# ----------------------------------------------------------------------------------------------------
# CQ500
# ----------------------------------------------------------------------------------------------------
def reader_majority(reads: pd.DataFrame, source: Path) -> tuple[pd.DataFrame, list[dict]]:
    """``reads.csv`` -> reference labels (index ``name``): per RSNA label, the majority of the readers
    ``R1``, ``R2``, ``R3`` (at least two of three say 1). Rows with values outside {0, 1} are left out."""
    readers = sorted({c.split(":", 1)[0] for c in reads.columns if re.match(r"^R\d+:", c)})
    if len(readers) < 1:
        raise ValueError(f"{source}: no reader columns (R1:ICH, R2:ICH, ...)")
    cols = [f"{r}:{f}" for r in readers for f in CQ500_LABELS]
    missing = [c for c in cols if c not in reads.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing[:6])}")
    clean, problems = _binary(reads, cols, source, "name")
    out = pd.DataFrame(index=clean["name"].astype(str).str.strip())
    need = len(readers) // 2 + 1
    for finding, label in CQ500_LABELS.items():
        votes = clean[[f"{r}:{finding}" for r in readers]].sum(axis=1).to_numpy()
        out[label] = (votes >= need).astype(int)
    return out[list(LABELS)], problems


def read_cq500(root: str | os.PathLike, training_mm: float = DEFAULT_THICKNESS_MM,
               progress: bool = False) -> ExternalData:
    """The CQ500 layout (module docstring)."""

    root = Path(root)
    reads_path = root / "reads.csv"
    if not reads_path.is_file():
        raise FileNotFoundError(f"{reads_path}: not found; CQ500 reference labels come from reads.csv")
    reads = _read_csv(reads_path, ["name"])
    labels, problems = reader_majority(reads, reads_path)
    by_number: dict[int, str] = {}
    for name in labels.index:
        m = _CQ500_NAME.match(name)
        if m is None:
            problems.append(problem(f"study {name}: name is not CQ500-CT-<n>; left out", study_uid=name,
                                    path=reads_path))
            continue
        by_number[int(m.group(1))] = name
    folders = {int(m.group(1)): p for p in sorted(root.iterdir()) if p.is_dir() and (m := _CQ500_DIR.match(p.name))}
    for n in sorted(set(by_number) - set(folders)):
        problems.append(problem(f"study {by_number[n]}: in reads.csv but no folder CQ500CT{n} CQ500CT{n}; not scored",
                                study_uid=by_number[n], path=reads_path))
    items, series = [], []
    for n, folder in tqdm(sorted(folders.items()), desc="studies", unit="study", disable=not progress):
        name = by_number.get(n, f"CQ500-CT-{n}")
        if n not in by_number:
            problems.append(problem(f"study {name}: folder has no row in reads.csv; scored, but not in the metrics",
                                    study_uid=name, path=folder, severity=WARNING))
        items_n, series_n, problems_n = _dicom_items(folder, name, training_mm)
        items += items_n
        series += series_n
        problems += problems_n
    labels = labels.loc[[by_number[n] for n in sorted(by_number)]]
    return ExternalData("cq500", root, items, labels, f"{reads_path.name}: majority of the readers",
                        pd.DataFrame(series, columns=SERIES_COLUMNS), problems)


def _dicom_items(folder: Path, name: str, training_mm: float) -> tuple[list[Item], list[dict], list[dict]]:
    """One study folder -> its item (the chosen series), series rows and problems, all named ``name``."""
    try:
        found = discover_all(folder, training_mm=training_mm, fallback=False)
    except OSError as exc:
        return [], [], [problem(f"study {name}: folder not readable ({exc}); not scored", study_uid=name, path=folder)]
    problems = [dict(p, study_uid=name) for p in found.problems]
    rows = [dict(s.as_row(), study=name) for s in found.series]
    if not found.series:
        problems.append(problem(f"study {name}: study folder holds no images; not scored", study_uid=name,
                                path=folder))
        return [], rows, problems
    if not found.scans:
        return [], rows, problems  # discover said why (only bone/contrast series, no axial CT, ...)
    if len(found.scans) > 1:
        problems.append(problem(f"study {name}: {len(found.scans)} StudyInstanceUIDs in one folder; scored the "
                                f"first ({found.scans[0].study_uid})", study_uid=name, path=folder, severity=WARNING))
    return [Item(name, scan=found.scans[0])], rows, problems


# ----------------------------------------------------------------------------------------------------
# Generic DICOM + labels CSV
# ----------------------------------------------------------------------------------------------------
def read_labels_csv(path: Path) -> tuple[pd.DataFrame, str, list[dict]]:
    """A study-level labels CSV -> (labels indexed by the key, key column, problems)."""
    frame = _read_csv(path, [])
    key = next((k for k in ("StudyInstanceUID", "PatientID") if k in frame.columns), None)
    if key is None:
        raise ValueError(f"{path}: needs a StudyInstanceUID or PatientID column")
    lower = {c.lower(): c for c in frame.columns}
    missing = [c for c in LABELS if c not in lower]
    if missing:
        raise ValueError(f"{path}: missing label column(s) {', '.join(missing)}")
    frame = frame.rename(columns={lower[c]: c for c in LABELS})
    frame[key] = frame[key].astype(str).str.strip()
    clean, problems = _binary(frame, list(LABELS), path, key)
    dup = clean[key].duplicated(keep=False)
    for k in sorted(set(clean.loc[dup, key])):
        problems.append(problem(f"study {k}: several rows in the labels CSV; its labels are left out", study_uid=k,
                                path=path))
    clean = clean.loc[~dup]
    return clean.set_index(key)[list(LABELS)], key, problems


def read_dicom(root: str | os.PathLike, labels_csv: str | os.PathLike | None,
               training_mm: float = DEFAULT_THICKNESS_MM, progress: bool = False) -> ExternalData:
    """A folder of DICOM studies and a study-level labels CSV (module docstring)."""
    root = Path(root)
    if labels_csv is None:
        raise ValueError(f"{root}: a folder of DICOM studies needs --labels CSV (StudyInstanceUID or PatientID "
                         "and the six labels)")
    labels_csv = Path(labels_csv)
    labels, key, problems = read_labels_csv(labels_csv)
    found = discover_all(root, progress=progress, training_mm=training_mm, fallback=False)
    problems += found.problems
    items = [Item(scan.study_uid, scan=scan) for scan in found.scans]
    if key == "PatientID":
        by_patient: dict[str, list[str]] = {}
        for scan in found.scans:
            by_patient.setdefault(scan.patient_id, []).append(scan.study_uid)
        rows = {}
        for pid, lab in labels.iterrows():
            studies = by_patient.get(str(pid), [])
            if len(studies) == 1:
                rows[studies[0]] = lab
            elif len(studies) > 1:
                problems.append(problem(f"patient {pid}: {len(studies)} studies but one label row; its labels are "
                                        "left out", study_uid=str(pid), path=labels_csv))
            else:
                problems.append(problem(f"patient {pid}: in the labels CSV but no study found", study_uid=str(pid),
                                        path=labels_csv))
        labels = pd.DataFrame.from_dict(rows, orient="index", columns=list(LABELS)).astype(int)
    else:
        seen = {it.study for it in items} | {s.study_uid for s in found.series}
        for uid in labels.index:
            if uid not in seen:
                problems.append(problem(f"study {uid}: in the labels CSV but not found under {root}", study_uid=uid,
                                        path=labels_csv))
    for it in items:
        if it.study not in labels.index:
            problems.append(problem(f"study {it.study}: no row in {labels_csv.name}; scored, but not in the metrics",
                                    study_uid=it.study, path=labels_csv, severity=WARNING))
    series = pd.DataFrame([s.as_row() for s in found.series], columns=SERIES_COLUMNS)
    return ExternalData("dicom", root, items, labels, f"{labels_csv.name} ({key})", series, problems)


# ----------------------------------------------------------------------------------------------------
# PhysioNet CT-ICH
# ----------------------------------------------------------------------------------------------------
def read_ctich(root: str | os.PathLike) -> ExternalData:
    """The CT-ICH layout (module docstring); volumes are opened later, one at a time (:func:`load_item`)."""
    root = Path(root)
    csv_path = root / CTICH_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: not found; CT-ICH labels come from the slice CSV")
    slices = _read_csv(csv_path, ["PatientNumber", "SliceNumber", *CTICH_LABELS])
    extra = [c for c in ("No_Hemorrhage",) if c in slices.columns]
    numeric = pd.to_numeric(slices["PatientNumber"], errors="coerce")
    problems = [problem(f"row {i + 2}: PatientNumber {slices['PatientNumber'].iloc[i]!r} is not a number; left out",
                        path=csv_path) for i in np.flatnonzero(numeric.isna().to_numpy())]
    slices = slices.loc[numeric.notna()].assign(PatientNumber=numeric.dropna().astype(int).astype(str))
    clean, more = _binary(slices, [*CTICH_LABELS, *extra], csv_path, "PatientNumber")
    problems += more
    bad_patients = set(slices["PatientNumber"]) - set(clean["PatientNumber"])
    clean["SliceNumber"] = pd.to_numeric(clean["SliceNumber"], errors="coerce")
    labels = {}
    per_patient = {}
    for pid, g in clean.groupby("PatientNumber", sort=False):
        sub = {v: int(g[c].max()) for c, v in CTICH_LABELS.items()}
        has = any(sub.values()) or (bool((g["No_Hemorrhage"] == 0).any()) if "No_Hemorrhage" in g else False)
        labels[pid] = {"any": int(has), **sub}
        per_patient[pid] = g.rename(columns=CTICH_LABELS).set_index("SliceNumber")[list(CTICH_LABELS.values())]
    volumes = {}
    for p in sorted((root / CTICH_SCANS).glob("*.nii*")) if (root / CTICH_SCANS).is_dir() else []:
        stem = p.name.split(".")[0]
        if stem.isdigit():
            volumes[str(int(stem))] = p
        else:
            problems.append(problem(f"{p.name}: file name is not a patient number; left out", path=p))
    items = []
    for pid, vol in sorted(volumes.items(), key=lambda kv: int(kv[0])):
        masks = sorted((root / CTICH_MASKS).glob(f"{vol.name.split('.')[0]}.nii*")) if (root / CTICH_MASKS).is_dir() else []
        if not masks:
            problems.append(problem(f"study {pid}: no mask file masks/{vol.name}; scored without the pointing game",
                                    study_uid=pid, path=vol, severity=WARNING))
        if pid not in labels and pid not in bad_patients:
            problems.append(problem(f"study {pid}: no rows in {CTICH_CSV}; scored, but not in the metrics",
                                    study_uid=pid, path=vol, severity=WARNING))
        items.append(Item(pid, volume=vol, mask=masks[0] if masks else None, slice_labels=per_patient.get(pid)))
    for pid in sorted(set(labels) - set(volumes), key=int):
        problems.append(problem(f"study {pid}: in {CTICH_CSV} but no volume ct_scans/{int(pid):03d}.nii; not scored",
                                study_uid=pid, path=csv_path))
    frame = pd.DataFrame.from_dict(labels, orient="index", columns=list(LABELS)).astype(int)
    frame.index = frame.index.astype(str)
    return ExternalData("ctich", root, items, frame, f"{CTICH_CSV}: any positive slice", problems=problems)


def canonical(img: Any) -> tuple[np.ndarray, int, bool, float]:
    """A nibabel image's data reoriented to rows posterior / columns patient-left / slices superior (the
    DICOM display of axial slices), as ``(slices, rows, cols)`` float32; also the stored axis the slices
    came from, whether it was reversed, and the slice spacing (mm)."""

    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {data.shape}")
    tr = ornt_transform(io_orientation(img.affine), axcodes2ornt(("L", "P", "S")))
    out = apply_orientation(data, tr)  # [L, P, S]
    axis = int(np.flatnonzero(tr[:, 0] == 2)[0])
    zooms = img.header.get_zooms()
    spacing = float(abs(zooms[axis])) if len(zooms) > axis else 1.0
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0)), dtype=np.float32), axis, bool(tr[axis, 1] < 0), spacing


def _load_nifti(item: Item) -> LoadedCase | tuple[None, list[dict]]:

    probs: list[dict] = []
    try:
        img = nib.load(str(item.volume))
        hu, axis, flipped, spacing = canonical(img)
    except Exception as exc:  # a damaged or odd file costs the study, not the run
        return None, [problem(f"study {item.study}: volume not read ({type(exc).__name__}: {exc}); not scored",
                              study_uid=item.study, path=item.volume)]
    finite = hu[np.isfinite(hu)]
    if finite.size == 0:
        return None, [problem(f"study {item.study}: volume has no finite voxel; not scored", study_uid=item.study,
                              path=item.volume)]
    lo, p1 = float(finite.min()), float(np.percentile(finite[:: max(1, finite.size // 200000)], 1))
    if p1 > HU_AIR_MAX:
        return None, [problem(f"study {item.study}: values are not HU (range {lo:g} to {float(finite.max()):g}, no air "
                              "near -1000; stored values without rescaling?); not scored", study_uid=item.study,
                              path=item.volume)]
    if not np.isfinite(hu).all():
        hu = np.nan_to_num(hu, nan=-1000.0, posinf=3000.0, neginf=-1000.0)
        probs.append(problem(f"study {item.study}: non-finite voxels set to -1000 HU", study_uid=item.study,
                             path=item.volume, severity=WARNING))
    n = len(hu)
    stored = np.arange(n)[::-1] if flipped else np.arange(n)  # canonical slice k <- stored index
    if axis != 2:
        probs.append(problem(f"study {item.study}: slices lie along stored axis {axis}, not the last; slice labels "
                             "not matched to slices", study_uid=item.study, path=item.volume, severity=WARNING))
    slices = pd.DataFrame({"sop_uid": [f"{item.study}/{int(s) + 1}" for s in stored], "z": np.arange(n) * spacing,
                           "path": str(item.volume), "study_uid": item.study, "patient_id": item.study,
                           "series_uid": "", "slice_number": stored + 1})
    slices = order_slices(slices)
    scan = StudyScan(item.study, item.study, "", slices, [])
    masks = None
    if item.mask is not None:
        try:
            mimg = nib.load(str(item.mask))
            if tuple(mimg.shape[:3]) != tuple(img.shape[:3]):
                raise ValueError(f"mask shape {tuple(mimg.shape)} differs from the volume's {tuple(img.shape)}")
            m, _, _, _ = canonical(mimg)
            masks = [m[k] > 0 for k in range(n)]
        except Exception as exc:
            probs.append(problem(f"study {item.study}: mask not used ({type(exc).__name__}: {exc}); scored without the "
                                 "pointing game", study_uid=item.study, path=item.mask, severity=SKIPPED))
    labels = None
    if item.slice_labels is not None and axis == 2:
        labels = item.slice_labels.reindex(slices["slice_number"].to_numpy()).fillna(0).astype(int)
    loaded = LoadedStudy(scan, slices, [hu[k] for k in range(n)], [])
    return LoadedCase(loaded, masks, labels, probs)


def load_item(item: Item) -> tuple[LoadedCase | None, list[dict]]:
    """Pixels of one study (DICOM series through :func:`ichdlib.serve.discover.load_study`, thin series as
    slabs; NIfTI reoriented, HU-checked, masks aligned); ``(None, problems)`` when it cannot be scored."""
    if item.scan is not None:
        loaded = load_study(item.scan)
        probs = [dict(p, study_uid=item.study) for p in loaded.problems]
        if not loaded.hu:
            return None, probs + [problem(f"study {item.study}: no readable slice; not scored", study_uid=item.study,
                                          series_uid=item.scan.series_uid)]
        return LoadedCase(loaded), probs
    case = _load_nifti(item)
    if isinstance(case, tuple):
        return case
    return case, case.problems
