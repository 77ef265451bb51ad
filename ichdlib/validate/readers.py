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

Copies written by other tools are read too (the variants are listed in ``docs/validation.md``): a dataset in a
top folder of its own, other CQ500 folder names and nesting, ``.nii.gz`` and unpadded file numbers, CSV headers
and 0/1 values in other spellings (:mod:`ichdlib.validate.inputs`), files without ``.dcm``, series split or
mixed across folders (grouped by SeriesInstanceUID), ``DICOMDIR`` and non-DICOM files (listed, not read).
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

from ichdlib.external_sets import (
    CQ500_FINDINGS,
    CQ500_LABELS,
    CQ500_READS,
    CTICH_CSV,
    CTICH_LABELS,
    CTICH_MASKS,
    CTICH_SCANS,
)
from ichdlib.ingest.validity import list_files
from ichdlib.labels import LABELS
from ichdlib.serve.discover import (
    SKIPPED,
    WARNING,
    Discovery,
    LoadedStudy,
    StudyScan,
    load_study,
    order_slices,
    problem,
    scan_headers,
    select_series,
    without_dicomdir,
)
from ichdlib.serve.series import DEFAULT_THICKNESS_MM, SERIES_COLUMNS
from ichdlib.validate.inputs import (
    as_written,
    binary_values,
    child,
    find_root,
    numbered_files,
    read_table,
    rename_columns,
    row_numbers,
    subdirs,
)

FORMATS = ("cq500", "ctich", "dicom")
#: A CQ500 study folder: ``CQ500CT<n> CQ500CT<n>`` (the zips), ``CQ500CT<n>``, ``CQ500-CT-<n>`` (a folder per zip).
_CQ500_DIR = re.compile(r"^CQ500[-_ ]?CT[-_ ]?(\d+)(?:\s+CQ500[-_ ]?CT[-_ ]?\1)?$", re.IGNORECASE)
#: A ``reads.csv`` name: ``CQ500-CT-<n>`` (also ``CQ500CT<n>``).
_CQ500_NAME = re.compile(r"^CQ500[-_ ]?CT[-_ ]?(\d+)$", re.IGNORECASE)
#: How deep study folders are looked for under the CQ500 root (``root/batch/CQ500CT<n> CQ500CT<n>``).
CQ500_DEPTH = 3
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


def _format_here(folder: Path) -> str | None:
    if child(folder, CQ500_READS).is_file() or any(_CQ500_DIR.match(d.name) for d in subdirs(folder)):
        return "cq500"
    if child(folder, CTICH_SCANS).is_dir() or child(folder, CTICH_CSV).is_file():
        return "ctich"
    return None


def detect_format(root: str | os.PathLike) -> str:
    """``cq500`` (``reads.csv`` or ``CQ500CT*`` folders), ``ctich`` (``ct_scans/`` or the slice CSV) or ``dicom``;
    a dataset unzipped into a top folder of its own is recognised one level down."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    return _format_here(find_root(root, lambda d: _format_here(d) is not None)) or "dicom"


def _binary(frame: pd.DataFrame, cols: list[str], source: Path, key: str) -> tuple[pd.DataFrame, list[dict]]:
    """Rows whose ``cols`` are all 0/1 (:func:`ichdlib.validate.inputs.binary_values`: also ``1.0``, ``True``),
    as int, and one problem per study (``key``) with other values, naming it, the file, how many rows and the
    first bad row and column. A study with any bad row loses all its rows."""
    values = binary_values(frame, cols)
    ok = values.isin([0, 1]).all(axis=1).to_numpy()
    lines = row_numbers(frame)
    problems, bad_keys = [], []
    for study, idx in pd.Series(np.flatnonzero(~ok)).groupby(frame[key].astype(str).to_numpy()[~ok], sort=False):
        i = int(idx.iloc[0])
        first = next(f"{as_written(frame, c)}={frame.iloc[i][c]!r}" for c in cols if values.iloc[i][c] not in (0, 1))
        problems.append(problem(f"study {study}: label values outside {{0, 1}} in {len(idx)} row(s) of "
                                f"{source.name} (row {lines[i]}: {first}); its reference labels are left out (the "
                                "study is still scored)", study_uid=str(study), path=source))
        bad_keys.append(str(study))
    keep = ok & ~frame[key].astype(str).isin(bad_keys).to_numpy()
    clean = frame.loc[keep].copy()
    clean[cols] = values.loc[keep].astype(int)
    return clean, problems


# ----------------------------------------------------------------------------------------------------
# CQ500
# ----------------------------------------------------------------------------------------------------
def reader_majority(reads: pd.DataFrame, source: Path) -> tuple[pd.DataFrame, list[dict]]:
    """``reads.csv`` -> reference labels (index ``name``): per RSNA label, the majority of the readers
    ``R1``, ``R2``, ``R3`` (at least two of three say 1). Reader columns may be spelled ``R1: ICH`` or
    ``r1:ich``; rows with values outside {0, 1} (``1.0`` and ``True`` are 1) and names given twice are left
    out, each with one problem."""
    reads = rename_columns(reads, [f"R{k}:{f}" for k in range(1, 10) for f in CQ500_FINDINGS])
    readers = sorted({c.split(":", 1)[0] for c in reads.columns if re.match(r"^R\d+:", c)})
    if len(readers) < 1:
        raise ValueError(f"{source}: no reader columns (R1:ICH, R2:ICH, ...)")
    cols = [f"{r}:{f}" for r in readers for f in CQ500_LABELS]
    missing = [c for c in cols if c not in reads.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing[:6])}")
    reads = reads.assign(name=reads["name"].astype(str).str.strip())
    clean, problems = _binary(reads, cols, source, "name")
    twice = clean["name"].duplicated(keep=False)
    for name in sorted(set(clean.loc[twice, "name"])):
        problems.append(problem(f"study {name}: {int((clean['name'] == name).sum())} rows in {source.name}; its "
                                "reference labels are left out (the study is still scored)", study_uid=name,
                                path=source))
    clean = clean.loc[~twice]
    out = pd.DataFrame(index=clean["name"])
    need = len(readers) // 2 + 1
    for finding, label in CQ500_LABELS.items():
        votes = clean[[f"{r}:{finding}" for r in readers]].sum(axis=1).to_numpy()
        out[label] = (votes >= need).astype(int)
    return out[list(LABELS)], problems


def _cq500_folders(root: Path) -> dict[int, list[Path]]:
    """Study folders under ``root`` (up to :data:`CQ500_DEPTH` levels; not inside a study folder) by number."""
    found: dict[int, list[Path]] = {}
    level = [root]
    for _ in range(CQ500_DEPTH):
        deeper = []
        for folder in level:
            for d in subdirs(folder):
                m = _CQ500_DIR.match(d.name)
                if m:
                    found.setdefault(int(m.group(1)), []).append(d)
                else:
                    deeper.append(d)
        level = deeper
    return found


def read_cq500(root: str | os.PathLike, training_mm: float = DEFAULT_THICKNESS_MM,
               progress: bool = False) -> ExternalData:
    """The CQ500 layout (module docstring). Study folders may be named ``CQ500CT<n> CQ500CT<n>``,
    ``CQ500CT<n>`` or ``CQ500-CT-<n>`` (nested folders too) and lie up to :data:`CQ500_DEPTH` levels down;
    ``reads.csv`` may lie one level down."""

    root = find_root(Path(root), lambda d: child(d, CQ500_READS).is_file())
    reads_path = child(root, CQ500_READS)
    if not reads_path.is_file():
        raise FileNotFoundError(f"{reads_path}: not found; CQ500 reference labels come from reads.csv")
    reads = read_table(reads_path, ["name"])
    labels, problems = reader_majority(reads, reads_path)
    by_number: dict[int, str] = {}
    for name in labels.index:
        m = _CQ500_NAME.match(name)
        if m is None:
            problems.append(problem(f"study {name}: name is not CQ500-CT-<n>; left out", study_uid=name,
                                    path=reads_path))
        elif int(m.group(1)) in by_number:
            problems.append(problem(f"study {name}: same number as {by_number[int(m.group(1))]} in reads.csv; "
                                    "left out", study_uid=name, path=reads_path))
        else:
            by_number[int(m.group(1))] = name
    found = _cq500_folders(root)
    folders = {}
    for n, paths in sorted(found.items()):
        if len(paths) > 1:  # two copies of one study (unzipped twice?): the one with most files is read
            paths = sorted(paths, key=lambda d: -sum(len(f) for _, _, f in os.walk(d)))
            name = by_number.get(n, f"CQ500-CT-{n}")
            problems.append(problem(f"study {name}: {len(paths)} folders ({', '.join(p.name for p in paths)}); read "
                                    f"{paths[0]} (most files), the others left out", study_uid=name, path=paths[1],
                                    severity=WARNING))
        folders[n] = paths[0]
    zips = {int(m.group(1)): p for p in sorted(root.glob("*.zip")) if (m := _CQ500_NAME.match(p.stem))}
    for n in sorted(set(by_number) - set(folders)):
        if n in zips:
            problems.append(problem(f"study {by_number[n]}: in reads.csv but only as {zips[n].name}, not unzipped; not "
                                    "scored", study_uid=by_number[n], path=zips[n]))
        else:
            problems.append(problem(f"study {by_number[n]}: in reads.csv but no folder CQ500CT{n} CQ500CT{n} (or "
                                    f"CQ500-CT-{n}); not scored", study_uid=by_number[n], path=reads_path))
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


def _scan_folder(folder: Path, progress: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """Headers of every file under ``folder`` (any name, with or without ``.dcm``) and the problems: what was
    not opened (hidden files such as ``.DS_Store``, FIFOs, ...), ``DICOMDIR`` indexes (listed, not read as a
    series) and files that are not DICOM (``Thumbs.db``, notes)."""
    paths, skipped = list_files(folder)
    paths, index = without_dicomdir(paths)
    table, unreadable = scan_headers(paths, progress=progress) if paths else (pd.DataFrame(), [])
    return table, [problem(why, path=p) for p, why in skipped] + index + unreadable


def _dicom_items(folder: Path, name: str, training_mm: float) -> tuple[list[Item], list[dict], list[dict]]:
    """One study folder -> its item (the chosen series), series rows and problems, all named ``name``. Files
    are grouped into series by SeriesInstanceUID (any folders, any file names); the folder is the study, so
    series with several StudyInstanceUIDs in it are chosen among together (with a warning)."""
    table, found = _scan_folder(folder)
    problems = [dict(p, study_uid=name, message=f"study {name}: {p['message']}") for p in found]
    if table.empty:
        problems.append(problem(f"study {name}: study folder holds no images; not scored", study_uid=name,
                                path=folder))
        return [], [], problems
    uids = table["study_uid"].value_counts()
    if len(uids) > 1:
        real = [u for u in uids.index if not u.startswith("(no StudyInstanceUID)")]
        if len(real) > 1:
            problems.append(problem(f"study {name}: {len(real)} StudyInstanceUIDs in one study folder; its series "
                                    f"are read as one study ({real[0]})", study_uid=name, path=folder,
                                    severity=WARNING))
        table["study_uid"] = real[0] if real else uids.index[0]
    scans, more, found = select_series(table, training_mm, fallback=False)
    problems += [dict(p, study_uid=name) for p in more]
    rows = [dict(s.as_row(), study=name) for s in found]
    return [Item(name, scan=scans[0])] if scans else [], rows, problems


# ----------------------------------------------------------------------------------------------------
# Generic DICOM + labels CSV
# ----------------------------------------------------------------------------------------------------
def read_labels_csv(path: Path) -> tuple[pd.DataFrame, str, list[dict]]:
    """A study-level labels CSV -> (labels indexed by the key, key column, problems). Column names are matched
    in any case (``studyinstanceuid``, ``Any``); values ``1.0``/``True`` count as 1."""
    frame = read_table(path, [])
    frame = rename_columns(frame, ["StudyInstanceUID", "PatientID", *LABELS])
    key = next((k for k in ("StudyInstanceUID", "PatientID") if k in frame.columns), None)
    if key is None:
        raise ValueError(f"{path}: needs a StudyInstanceUID or PatientID column (has {', '.join(frame.columns[:12])})")
    missing = [c for c in LABELS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing label column(s) {', '.join(missing)}")
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
    table, more = _scan_folder(root, progress)
    problems += more
    if table.empty:
        problems.append(problem("no readable DICOM file found", path=root))
    found = Discovery(*select_series(table, training_mm, fallback=False)) if len(table) else Discovery([], [], [])
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
def _is_ctich_root(folder: Path) -> bool:
    return child(folder, CTICH_CSV).is_file() or child(folder, CTICH_SCANS).is_dir()


def _slice_table(csv_path: Path) -> tuple[pd.DataFrame, list[dict]]:
    """The slice CSV with whole ``PatientNumber`` (as str) and ``SliceNumber`` (int); rows without them are
    left out with one problem naming how many and the first."""
    slices = read_table(csv_path, ["PatientNumber", "SliceNumber", *CTICH_LABELS], optional=["No_Hemorrhage"])
    numbers = slices[["PatientNumber", "SliceNumber"]].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
    bad = (numbers.isna() | (numbers % 1 != 0)).any(axis=1) | (numbers["SliceNumber"] < 1)
    problems = []
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        problems.append(problem(
            f"{int(bad.sum())} row(s) of {csv_path.name} without a whole PatientNumber and SliceNumber (from 1) "
            f"(row {row_numbers(slices)[i]}: PatientNumber={slices['PatientNumber'].iloc[i]!r}, "
            f"SliceNumber={slices['SliceNumber'].iloc[i]!r}); left out", path=csv_path))
    ok = ~bad
    return slices.loc[ok].assign(PatientNumber=numbers.loc[ok, "PatientNumber"].astype(int).astype(str),
                                 SliceNumber=numbers.loc[ok, "SliceNumber"].astype(int)), problems


def read_ctich(root: str | os.PathLike) -> ExternalData:
    """The CT-ICH layout (module docstring); volumes are opened later, one at a time (:func:`load_item`).
    Also read: the dataset one folder down, ``.nii.gz``, file names with or without zero padding, a slice CSV
    with another column order, extra columns, spaces or a byte-order mark; other files (``Patients_CT/``,
    ``Patient_demographics.csv``) are not looked at."""
    root = find_root(Path(root), _is_ctich_root)
    csv_path = child(root, CTICH_CSV)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: not found; CT-ICH labels come from the slice CSV")
    slices, problems = _slice_table(csv_path)
    cols = [*CTICH_LABELS, *[c for c in ("No_Hemorrhage",) if c in slices.columns]]
    clean, more = _binary(slices, cols, csv_path, "PatientNumber")
    problems += more
    bad_patients = set(slices["PatientNumber"]) - set(clean["PatientNumber"])
    labels = {}
    per_patient = {}
    for pid, g in clean.groupby("PatientNumber", sort=False):
        if g["SliceNumber"].duplicated().any():
            twice = sorted(set(g.loc[g["SliceNumber"].duplicated(), "SliceNumber"]))
            problems.append(problem(f"study {pid}: SliceNumber {', '.join(map(str, twice[:5]))} given more than once "
                                    f"in {CTICH_CSV}; a slice is positive if any of its rows is", study_uid=pid,
                                    path=csv_path, severity=WARNING))
        g = g.groupby("SliceNumber")[cols].max()
        sub = {v: int(g[c].max()) for c, v in CTICH_LABELS.items()}
        has = any(sub.values()) or (bool((g["No_Hemorrhage"] == 0).any()) if "No_Hemorrhage" in g else False)
        labels[pid] = {"any": int(has), **sub}
        per_patient[pid] = g.rename(columns=CTICH_LABELS)[list(CTICH_LABELS.values())]
    volumes, left = numbered_files(child(root, CTICH_SCANS))
    masks, left_masks = numbered_files(child(root, CTICH_MASKS))
    problems += [problem(f"{p.name}: {why}; left out", path=p) for p, why in left + left_masks]
    items = []
    for n, vol in sorted(volumes.items()):
        pid = str(n)
        if n not in masks:
            problems.append(problem(f"study {pid}: no mask file {CTICH_MASKS}/{vol.name}; scored without the pointing "
                                    "game", study_uid=pid, path=vol, severity=WARNING))
        if pid not in labels and pid not in bad_patients:
            problems.append(problem(f"study {pid}: no rows in {CTICH_CSV}; scored, but not in the metrics",
                                    study_uid=pid, path=vol, severity=WARNING))
        items.append(Item(pid, volume=vol, mask=masks.get(n), slice_labels=per_patient.get(pid)))
    for n in sorted(set(masks) - set(volumes)):
        problems.append(problem(f"study {n}: a mask but no volume in {CTICH_SCANS}/; mask not used", study_uid=str(n),
                                path=masks[n], severity=WARNING))
    for pid in sorted(set(labels) - {str(n) for n in volumes}, key=int):
        problems.append(problem(f"study {pid}: in {CTICH_CSV} but no volume {CTICH_SCANS}/{int(pid):03d}.nii (or "
                                ".nii.gz); not scored", study_uid=pid, path=csv_path))
    frame = pd.DataFrame.from_dict(labels, orient="index", columns=list(LABELS)).astype(int)
    frame.index = frame.index.astype(str)
    return ExternalData("ctich", root, items, frame, f"{CTICH_CSV}: any positive slice", problems=problems)


def canonical(img: Any, like: Any = None) -> tuple[np.ndarray, int, bool, float]:
    """A nibabel image's data (scaled by its ``scl_slope``/``scl_inter``; a trailing axis of length 1 dropped)
    reoriented to rows posterior / columns patient-left / slices superior (the DICOM display of axial slices),
    as ``(slices, rows, cols)`` float32; also the stored axis the slices came from, whether it was reversed,
    and the slice spacing (mm). ``like``: take the orientation from that image's affine instead (a mask is
    aligned voxel by voxel with its volume, whatever affine the tool that wrote it put in)."""

    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {data.shape}")
    ref = img if like is None else like
    tr = ornt_transform(io_orientation(ref.affine), axcodes2ornt(("L", "P", "S")))
    out = apply_orientation(data, tr)  # [L, P, S]
    axis = int(np.flatnonzero(tr[:, 0] == 2)[0])
    zooms = ref.header.get_zooms()
    spacing = float(abs(zooms[axis])) if len(zooms) > axis else 1.0
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0)), dtype=np.float32), axis, bool(tr[axis, 1] < 0), spacing


def inplane_spacing(img: Any) -> tuple[float, float] | None:
    """Pixel spacing ``(row mm, col mm)`` of :func:`canonical`'s slices (rows posterior, columns patient-left),
    from the voxel sizes of the stored axes they came from; None when not positive and finite."""
    tr = ornt_transform(io_orientation(img.affine), axcodes2ornt(("L", "P", "S")))
    zooms = img.header.get_zooms()
    try:
        row, col = (float(abs(zooms[int(np.flatnonzero(tr[:, 0] == k)[0])])) for k in (1, 0))
    except (IndexError, TypeError, ValueError):
        return None
    return (row, col) if all(np.isfinite(v) and v > 0 for v in (row, col)) else None


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
    scan = StudyScan(item.study, item.study, "", slices, [], pixel_spacing=inplane_spacing(img))
    masks = None
    if item.mask is not None:
        try:
            mimg = nib.load(str(item.mask))
            if tuple(mimg.shape[:3]) != tuple(img.shape[:3]):
                raise ValueError(f"mask shape {tuple(mimg.shape)} differs from the volume's {tuple(img.shape)}")
            m, _, _, _ = canonical(mimg, like=img)
            masks = [m[k] > 0 for k in range(n)]  # 0/1, 0/255, float or label masks; NaN is background
            if not np.array_equal(io_orientation(mimg.affine), io_orientation(img.affine)):
                probs.append(problem(f"study {item.study}: the mask's affine orients it differently from the volume; "
                                     "the mask is aligned voxel by voxel with the volume", study_uid=item.study,
                                     path=item.mask, severity=WARNING))
        except Exception as exc:
            probs.append(problem(f"study {item.study}: mask not used ({type(exc).__name__}: {exc}); scored without the "
                                 "pointing game", study_uid=item.study, path=item.mask, severity=SKIPPED))
    labels = None
    if item.slice_labels is not None and axis == 2:
        labels = item.slice_labels.reindex(slices["slice_number"].to_numpy()).fillna(0).astype(int)
        numbers = item.slice_labels.index
        if len(numbers) != n or numbers.max() > n:
            probs.append(problem(f"study {item.study}: {CTICH_CSV} has {len(numbers)} slice row(s) (SliceNumber up to "
                                 f"{numbers.max()}), the volume {n} slices; slices without a row count as negative",
                                 study_uid=item.study, path=item.volume, severity=WARNING))
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
