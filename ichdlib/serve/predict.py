"""Predict on new head-CT studies: a folder of DICOM files in, per-slice and per-study probabilities out.

``ichd predict DIR --bundle BUNDLE --out OUT [--cam] [--device cpu|cuda]``

1. **Discovery** (:func:`discover`): every file under ``DIR`` (recursively, any name, with or without
   ``.dcm``) is read header-only and grouped by StudyInstanceUID and SeriesInstanceUID. Per study the axial
   CT series with the most slices is chosen; non-CT series, localizers/scouts (ImageType ``LOCALIZER`` or a
   non-axial orientation), other series, non-DICOM and unreadable files are listed in ``problems`` with
   the reason. Only regular files are opened; hidden files, FIFOs, devices and unreadable folders are listed
   (:func:`ichdlib.ingest.validity.list_files`), and each slice must pass :func:`ichdlib.ingest.validity.slice_problem`,
   the rule ingest applies. Slices are ordered by z exactly as the catalog orders them (ties by SOPInstanceUID; duplicate
   positions are kept, as in training, with a warning).
2. **Pixels** (:func:`load_study`): HU through :func:`ichdlib.ingest.dicom.read_hu` (compressed transfer syntaxes
   through pylibjpeg); a slice that cannot be decoded is dropped with a message and the z-neighbours are
   recomputed over the readable slices.
3. **Models** (:func:`predict_study`): the bundle's 2D CNNs (every fold, mean, the TTA of notebook 03),
   the sequence models on the same inputs as notebook 04, and the blend of notebook 05.

Nothing here raises on bad input: each problem becomes a row of ``problems.csv`` (study, series, file,
severity, message) and the readable slices are still predicted.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdlib.files import json_ready, write_text
from ichdlib.ingest.validity import (  # noqa: F401  (is_axial, slice_normal: re-exported for callers of predict)
    AXIAL_MIN_COS,
    GAP_FACTOR,
    capped_z,
    is_axial,
    list_files,
    slice_normal,
    slice_problem,
)
from ichdlib.spec import ModelSpec

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


def _image_type(meta: dict[str, Any]) -> str:
    """ImageType as ``A\\B\\C`` upper case (from ``meta`` when the reader provides it, else the file)."""
    value = meta.get("image_type")
    if value is None:
        import pydicom

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
    from tqdm import tqdm

    from ichdlib.ingest.dicom import DicomReadError, read_header

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

    @property
    def n_slices(self) -> int:
        return len(self.slices)


def order_slices(table: pd.DataFrame) -> pd.DataFrame:
    """Order one series exactly as the catalog orders a study (:func:`ichdlib.ingest.catalog.order_slices`: z, ties
    by ``sop_uid``) and add ``slice_index``, ``prev_index``/``next_index`` (positions of the z-neighbours in
    the returned table; a slice at the edge is its own neighbour), ``spacing_z`` and ``dup_z``."""
    from ichdlib.ingest.catalog import order_slices as catalog_order

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


def select_series(table: pd.DataFrame) -> tuple[list[StudyScan], list[dict]]:
    """Group the header table into studies, choose each study's axial CT series and order its slices.

    Returns the chosen series (one :class:`StudyScan` per study that has one) and the problems: studies
    without a usable series, series left out (with why), files left out of the chosen series.
    """
    scans: list[StudyScan] = []
    problems: list[dict] = []
    for study_uid, study in table.groupby("study_uid", sort=True):
        study_problems: list[dict] = []
        candidates = []
        for series_uid, group in study.groupby("series_uid", sort=True):
            kind, reason = _series_kind(group)
            if kind == "ok":
                candidates.append((series_uid, group))
            else:
                study_problems += [problem(f"series left out: {reason}", study_uid=study_uid,
                                           series_uid=series_uid, path=p) for p in group["path"]]
        if not candidates:
            study_problems.append(problem("no axial CT series in this study; nothing to predict",
                                          study_uid=study_uid, path=_one_path(study)))
            problems += study_problems
            continue
        candidates.sort(key=lambda c: (-len(c[1]), c[0]))
        series_uid, group = candidates[0]
        for other_uid, other in candidates[1:]:
            study_problems += [problem(
                f"other CT series left out ({len(other)} image(s)); predicted series {series_uid} "
                f"({len(group)} images)", study_uid=study_uid, series_uid=other_uid, path=p) for p in other["path"]]
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
        scans.append(StudyScan(study_uid, patient, series_uid, slices, study_problems))
        problems += study_problems
    return scans, problems


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


def discover(root: str | os.PathLike, progress: bool = False) -> tuple[list[StudyScan], list[dict]]:
    """Folder (one study, many studies, nested, any file names) -> chosen series per study + problems."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    paths, skipped = list_files(root)
    not_opened = [problem(why, path=p) for p, why in skipped]  # "skipped: hidden file", "skipped: a FIFO ..."
    if not paths:
        return [], not_opened + [problem("no files found", path=root)]
    table, problems = scan_headers(paths, progress=progress)
    problems = not_opened + problems
    if table.empty:
        problems.append(problem("no readable DICOM file found", path=root))
        return [], problems
    scans, more = select_series(table)
    return scans, problems + more


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
    from ichdlib.ingest.dicom import DicomReadError, read_hu

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


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def resolve_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; asking for ``cuda`` without one is an error."""
    import torch

    device = device or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    return device


def study_cache(loaded: LoadedStudy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A study's slices as the training pipeline sees them: the HU cache rows at ``size``
    (:func:`ichdlib.ingest.cache.resize_hu`) and the ``(n, 3)`` stack rows (s-1, s, s+1)."""
    from ichdlib.ingest.cache import resize_hu

    cache = np.stack([resize_hu(h, size) for h in loaded.hu]) if loaded.hu else np.zeros((0, size, size), np.int16)
    rows = loaded.slices[["prev_index", "slice_index", "next_index"]].to_numpy(dtype=np.int64)
    return cache, rows


@dataclass
class CnnOutput:
    """One backbone's outputs for one study (means over folds): the 2D stage as notebook 05 blended it
    (``prob``: notebook 03's TTA table, or notebook 02's validation view when the run blended that), and
    notebook 03's TTA probabilities and pooled features."""

    prob: np.ndarray
    tta_prob: np.ndarray
    feat: np.ndarray
    tta_folds: np.ndarray | None = None  # (n_folds, N, 6) each fold model's TTA probabilities


class Predictor:
    """A bundle's models on one device, ready to predict studies."""

    def __init__(self, bundle: Any, device: str | None = "auto", batch: int | None = None) -> None:
        from ichdlib.cnn.features import eval_augment, feature_views
        from ichdlib.cnn.train import amp_enabled, prepare_model

        self.bundle = bundle
        self.device = resolve_device(device)
        self.P = bundle.params()
        self.batch = batch or self.P.features.batch
        self.amp = amp_enabled(self.P, self.device)
        self.channels_last = self.device.startswith("cuda") and self.P.cnn.channels_last
        self.cnn: dict[str, list[Any]] = {}
        self.aug: dict[str, list[Any]] = {}
        for key, member in bundle.cnn.items():
            self.cnn[key] = [prepare_model(m, self.P, self.device)[1] for m in member.build(self.device)]
            self.aug[key] = [eval_augment(self.P, meta) for meta in member.metas]
        self.seq = {name: member.build(self.device) for name, member in bundle.seq.items()}
        self.views = feature_views(self.P)

    def cnn_outputs(self, key: str, cache: np.ndarray, rows: np.ndarray) -> CnnOutput:
        """Run every fold model of backbone ``key`` on a study's cache rows, as notebook 03 (and, when the
        blend used its table, notebook 02) does for test slices (:func:`ichdlib.cnn.train.predict`)."""
        from ichdlib.cnn.data import SliceDataset
        from ichdlib.cnn.train import predict as cnn_predict

        ds = SliceDataset(cache, rows)
        kw = {"batch": self.batch, "device": self.device, "amp": self.amp, "channels_last": self.channels_last}
        val_view = self.bundle.ensemble.get("sources", {}).get(f"cnn:{key}") == "cnn"
        probs, tta_probs, feats = [], [], []
        for runner, aug in zip(self.cnn[key], self.aug[key], strict=True):
            tp, f = cnn_predict(runner, aug, ds, pooled=True, views=self.views, **kw)
            tta_probs.append(tp)
            feats.append(f)
            if val_view:
                probs.append(cnn_predict(runner, aug, ds, **kw)[0])
        tta = np.mean(tta_probs, axis=0)
        return CnnOutput(np.mean(probs, axis=0) if val_view else tta, tta, _feature_mean(feats), np.stack(tta_probs))

    def predict(self, loaded: LoadedStudy) -> pd.DataFrame:
        """Per-slice 2D and final probabilities of one loaded study (rows in z order)."""
        from ichdlib.labels import LABELS
        from ichdlib.seq.train import SeqInputs, normalize_test, predict_studies

        sl = loaded.slices
        n = len(sl)
        outs: dict[str, CnnOutput] = {}
        for key in self.cnn:
            cache, rows = study_cache(loaded, int(self.bundle.backbone(key)["size"]))
            outs[key] = self.cnn_outputs(key, cache, rows)
        stage: dict[str, np.ndarray] = {f"cnn:{k}": o.prob for k, o in outs.items()}
        if self.seq:
            keys = self.bundle.seq_backbones
            probs = np.stack([outs[k].tta_prob for k in keys], axis=1).astype(np.float32)
            norm = next(iter(self.bundle.seq.values())).metas[0].get("input_norm")
            if norm:  # seq.input_norm 'fold': each fold model normalised as notebook 04 does for test rows
                probs = normalize_test(np.stack([outs[k].tta_folds for k in keys], axis=2), norm,
                                       list(self.bundle.cnn[keys[0]].folds))
            inputs = SeqInputs(
                sop_uid=sl["sop_uid"].to_numpy(str), study_uid=np.full(n, loaded.scan.study_uid),
                patient_id=np.full(n, loaded.scan.patient_id), fold=np.full(n, -1),
                z=capped_z(sl["z"].to_numpy(np.float64)), feats=[outs[k].feat for k in keys], probs=probs)
            for name, models in self.seq.items():
                stage[name] = predict_studies(models, inputs, device=self.device, batch=self.P.seq.batch)
        weights = self.bundle.ensemble["weights"]
        final = np.clip(sum(w * stage[m].astype(np.float64) for m, w in weights.items()), 0.0, 1.0)
        p2d = np.mean([o.tta_prob for o in outs.values()], axis=0)
        frame = pd.DataFrame({
            "study_uid": loaded.scan.study_uid, "series_uid": loaded.scan.series_uid,
            "sop_uid": sl["sop_uid"].to_numpy(str), "slice_index": sl["slice_index"].to_numpy(int),
            "z": sl["z"].to_numpy(float), "path": sl["path"].to_numpy(str)})
        for k, c in enumerate(LABELS):
            frame[f"p2d_{c}"] = p2d[:, k]
        for k, c in enumerate(LABELS):
            frame[f"p_{c}"] = final[:, k]
        for name, p in stage.items():
            for k, c in enumerate(LABELS):
                frame[f"{name}:{c}"] = p[:, k]
        return frame


def _feature_mean(feats: list[np.ndarray]) -> np.ndarray:
    """Fold-mean features exactly as notebook 03 stores test rows: each fold's features in float16, their
    float32 mean stored as float16 (read back as float32 by the sequence stage)."""
    return np.mean([f.astype(np.float16).astype(np.float32) for f in feats], axis=0).astype(np.float16).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Folders -> predictions
# --------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """What :func:`predict_dir` returns: per-slice and per-study tables, problems, timings."""

    slices: pd.DataFrame
    studies: pd.DataFrame
    problems: pd.DataFrame
    seconds: dict[str, float]
    cams: list[str] = field(default_factory=list)


def summarize_studies(slices: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """One row per study: slices, max final probability per label, findings (subtypes whose max reaches
    ``threshold``, with it) and the slices involved as index ranges."""
    from ichdlib.labels import LABELS

    cols = ["study_uid", "series_uid", "n_slices", "max_any", "positive", "findings",
            *[f"max_{c}" for c in LABELS[1:]], *[f"slices_{c}" for c in LABELS]]
    if slices.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for uid, g in slices.groupby("study_uid", sort=False):
        row: dict[str, Any] = {"study_uid": uid, "series_uid": g["series_uid"].iloc[0], "n_slices": len(g),
                               "max_any": float(g["p_any"].max()), "positive": bool(g["p_any"].max() >= threshold)}
        findings = []
        for c in LABELS:
            p = g[f"p_{c}"]
            row[f"max_{c}"] = float(p.max())
            row[f"slices_{c}"] = index_ranges(g.loc[p >= threshold, "slice_index"])
            if c != "any" and p.max() >= threshold:
                findings.append((float(p.max()), c))
        row["findings"] = "; ".join(f"{c} ({m:.2f})" for m, c in sorted(findings, reverse=True))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def predict_dir(dicom_dir: str | os.PathLike, bundle: Any, *, device: str | None = "auto", threshold: float = 0.5,
                cam_dir: str | os.PathLike | None = None, progress: bool = False,
                predictor: Predictor | None = None,
                on_study: Callable[[Predictor, LoadedStudy, pd.DataFrame], Any] | None = None) -> Prediction:
    """Discover, read and predict every study under ``dicom_dir`` with ``bundle`` (a :class:`ichdlib.serve.bundle.Bundle`
    or a bundle folder). Bad input never raises: it ends up in ``problems``. With ``cam_dir``, Grad-CAM
    overlays of the positive slices are written there. ``on_study(predictor, loaded, frame)`` is called after
    each study is predicted (e.g. :class:`ichdlib.serve.dicom_out.DicomWriter`); the problem rows it returns and what
    it raises go to ``problems``."""
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    if not hasattr(bundle, "cnn"):
        from ichdlib.serve.bundle import Bundle

        bundle = Bundle.load(bundle)
    predictor = predictor or Predictor(bundle, device)
    t_load_models = time.perf_counter() - t0
    scans, problems = discover(dicom_dir, progress=progress)
    frames, cams = [], []
    t_read, t_model = time.perf_counter() - t0 - t_load_models, 0.0
    for scan in tqdm(scans, desc="studies", unit="study", disable=not progress):
        t1 = time.perf_counter()
        loaded = load_study(scan)
        problems += loaded.problems
        t_read += time.perf_counter() - t1
        if not loaded.hu:
            problems.append(problem("no readable slice; study not predicted", study_uid=scan.study_uid,
                                    series_uid=scan.series_uid))
            continue
        t1 = time.perf_counter()
        try:
            frame = predictor.predict(loaded)
        except Exception as exc:  # one study that breaks a model (odd geometry, memory) must not stop the rest
            problems.append(problem(f"prediction failed ({type(exc).__name__}: {exc})", study_uid=scan.study_uid,
                                    series_uid=scan.series_uid))
            continue
        t_model += time.perf_counter() - t1
        numbers = frame.select_dtypes("number").drop(columns=["slice_index", "z"], errors="ignore")
        if not np.isfinite(numbers.to_numpy(np.float64)).all():  # never report NaN as "no finding"
            problems.append(problem("prediction failed: the models returned non-finite probabilities; study not "
                                    "reported", study_uid=scan.study_uid, series_uid=scan.series_uid))
            continue
        frames.append(frame)
        if cam_dir is not None:
            try:
                cams += write_cams(predictor, loaded, frame, Path(cam_dir), threshold)
            except ImportError as exc:
                problems.append(problem(f"--cam: Grad-CAM unavailable ({exc})", severity=WARNING))
                cam_dir = None
        if on_study is not None:
            try:
                problems += list(on_study(predictor, loaded, frame) or [])
            except Exception as exc:  # an output that cannot be written is reported, the predictions stay
                problems.append(problem(f"output not written ({type(exc).__name__}: {exc})",
                                        study_uid=scan.study_uid, series_uid=scan.series_uid))
    slices = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    studies = summarize_studies(slices, threshold)
    seconds = {"load_models": t_load_models, "read": t_read, "model": t_model,
               "total": time.perf_counter() - t0, "studies": len(frames)}
    return Prediction(slices, studies, problems_frame(problems), seconds, cams)


def _labels() -> list[str]:
    from ichdlib.labels import LABELS

    return list(LABELS)


def predict_study(dicom_dir: str | os.PathLike, bundle: Any, **kwargs: Any) -> pd.DataFrame:
    """Per-slice probabilities (``p2d_<label>`` 2D, ``p_<label>`` final, plus each ensemble member's) of the
    studies under ``dicom_dir``; the problems are in ``frame.attrs["problems"]`` (a DataFrame)."""
    pred = predict_dir(dicom_dir, bundle, **kwargs)
    frame = pred.slices
    frame.attrs["problems"] = pred.problems
    frame.attrs["studies"] = pred.studies
    return frame


# --------------------------------------------------------------------------------------------------
# Grad-CAM overlays
# --------------------------------------------------------------------------------------------------
def _safe_name(uid: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uid)
    return keep[-64:] or "study"


def write_cams(predictor: Predictor, loaded: LoadedStudy, frame: pd.DataFrame, out: Path,
               threshold: float = 0.5) -> list[str]:
    """Overlay PNGs ``<out>/<study>/slice<k>_<label>.png`` for slices whose final ``any`` reaches
    ``threshold``, one per label found there, from the first backbone's first fold model (as notebook 06
    explains test slices), at the slice's own size."""
    import cv2

    from ichdlib.review.cam import compute_cams, overlay

    pos = np.flatnonzero(frame["p_any"].to_numpy() >= threshold)
    if len(pos) == 0:
        return []
    P, key = predictor.P, next(iter(predictor.cnn))
    spec = predictor.bundle.backbone(key)
    meta = spec["metas"][0]
    model = predictor.bundle.cnn[key].models[0]
    cache, rows = study_cache(loaded, int(spec["size"]))
    written = []
    folder = out / _safe_name(loaded.scan.study_uid)
    folder.mkdir(parents=True, exist_ok=True)
    for i in pos:
        labels = [c for c in _labels() if frame[f"p_{c}"].iloc[i] >= threshold]
        hu = loaded.hu[i]
        maps = compute_cams(model, cache[rows[i]][None], labels, method=P.cam.method,
                            out_size=hu.shape, **ModelSpec.from_meta(meta).cam_kwargs(), batch=P.cam.batch,
                            target_layer=P.cam.target_layer)[0]
        for c, m in zip(labels, maps, strict=True):
            path = folder / f"slice{int(frame['slice_index'].iloc[i]):03d}_{c}.png"
            cv2.imwrite(str(path), cv2.cvtColor(overlay(hu, m), cv2.COLOR_RGB2BGR))
            written.append(str(path))
    return written


# --------------------------------------------------------------------------------------------------
# Output files and command line
# --------------------------------------------------------------------------------------------------
def write_outputs(pred: Prediction, out: str | os.PathLike, bundle: Any = None, threshold: float = 0.5) -> dict[str, Path]:
    """``slices.csv``, ``studies.csv``, ``problems.csv`` and ``predictions.json`` under ``out``."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.csv" for name in ("slices", "studies", "problems")}
    write_text(paths["slices"], pred.slices.to_csv(index=False))
    write_text(paths["studies"], pred.studies.to_csv(index=False))
    write_text(paths["problems"], pred.problems.to_csv(index=False))
    labels = _labels()
    studies = []
    for st in pred.studies.to_dict("records"):
        g = pred.slices[pred.slices["study_uid"] == st["study_uid"]]
        studies.append({
            "study_uid": st["study_uid"], "series_uid": st["series_uid"], "n_slices": int(st["n_slices"]),
            "max_any": st["max_any"], "positive": st["positive"],
            "findings": [{"label": c, "max_prob": st[f"max_{c}"], "slices": st[f"slices_{c}"]}
                         for c in labels[1:] if st[f"max_{c}"] >= threshold],
            "max": {c: st[f"max_{c}"] for c in labels},
            "slices": [{"sop_uid": r["sop_uid"], "slice_index": int(r["slice_index"]), "z": r["z"],
                        "p2d": {c: r[f"p2d_{c}"] for c in labels}, "p": {c: r[f"p_{c}"] for c in labels}}
                       for r in g.to_dict("records")],
        })
    doc = {"threshold": threshold, "labels": labels, "studies": studies,
           "problems": pred.problems.to_dict("records"), "cams": pred.cams,
           "seconds": {k: round(float(v), 3) for k, v in pred.seconds.items()}}
    if bundle is not None:
        m = bundle.manifest
        doc["bundle"] = {"source": str(bundle.source), "run": m.get("run"), "created": m.get("created"),
                         "format_version": m.get("format_version")}
    paths["predictions"] = out / "predictions.json"
    write_text(paths["predictions"], json.dumps(json_ready(doc), indent=1, allow_nan=False))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd predict``."""
    parser.add_argument("dir", type=Path, nargs="?", default=None,
                        help="a folder of DICOM files (one study, or many; searched recursively); not with --dicomweb")
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder written by 'ichd export'")
    parser.add_argument("--out", type=Path, required=True, help="output folder (slices.csv, studies.csv, ...)")
    parser.add_argument("--cam", action="store_true", help="write Grad-CAM overlay PNGs for positive slices")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run the models (default: cuda when available)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability for a finding (default 0.5)")
    dicom = parser.add_argument_group("DICOM outputs and PACS (docs/pacs.md)")
    dicom.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                       help="write a DICOM SR per study (and, with --cam, a Grad-CAM Secondary Capture series) here")
    dicom.add_argument("--pmap", action="store_true",
                       help="with --cam and --dicom-out: also the raw Grad-CAM maps as DICOM Parametric Maps "
                            "(one per label; needs sources with a FrameOfReferenceUID)")
    dicom.add_argument("--dicomweb", default=None, metavar="URL",
                       help="read the studies from this DICOMweb server (QIDO/WADO-RS) instead of a folder; "
                            "URL may end in /studies/<StudyInstanceUID>")
    dicom.add_argument("--study", action="append", default=None, metavar="UID",
                       help="StudyInstanceUID to predict (repeatable; with --dicomweb)")
    dicom.add_argument("--since", default=None, metavar="YYYYMMDD",
                       help="with --dicomweb: also every study with a StudyDate from this day on")
    dicom.add_argument("--filter", action="append", default=None, metavar="KEY=VALUE",
                       help="with --dicomweb: also every study QIDO-RS finds with this attribute (repeatable)")
    dicom.add_argument("--store", action="store_true",
                       help="send the DICOM outputs back to the --dicomweb server (STOW-RS); default --dicom-out "
                            "OUT/dicom")


def cli(args: argparse.Namespace) -> int:
    """``ichd predict``: exit 0 when at least one study was predicted, 1 when none could be."""
    import tempfile

    from ichdlib.serve.bundle import Bundle

    dicomweb = getattr(args, "dicomweb", None)
    if dicomweb and args.dir is not None:
        raise ValueError(f"give a folder ({args.dir}) or --dicomweb, not both")
    if getattr(args, "pmap", False) and not (args.cam and (args.dicom_out or getattr(args, "store", False))):
        raise ValueError("--pmap needs --cam and --dicom-out (or --store)")
    if not dicomweb:
        if args.store or args.study or args.since or args.filter:
            raise ValueError("--store, --study, --since and --filter need --dicomweb URL")
        if args.dir is None:
            raise ValueError("give a folder of DICOM files, or --dicomweb URL --study UID")
        if not args.dir.exists():
            raise FileNotFoundError(f"{args.dir}: no such file or folder")
    if not 0.0 <= args.threshold <= 1.0:  # also refuses nan
        raise ValueError(f"--threshold {args.threshold}: expected a probability between 0 and 1")
    bundle = Bundle.load(args.bundle)
    folder, server, tmp = args.dir, None, None
    fetched: list[str] = []
    if dicomweb:
        from ichdlib.serve.dicomweb import fetch

        tmp = tempfile.TemporaryDirectory(prefix="ichd-dicomweb-")
        folder = Path(tmp.name)
        try:
            server, fetched = fetch(args, folder)
        except BaseException:
            tmp.cleanup()
            raise
    dicom_out = getattr(args, "dicom_out", None) or (args.out / "dicom" if getattr(args, "store", False) else None)
    writer = None
    if dicom_out is not None:
        from ichdlib.serve.dicom_out import DicomWriter

        # with --cam the writer also writes the PNGs, so that each Grad-CAM is computed once
        writer = DicomWriter(dicom_out, bundle, args.threshold, cam=args.cam,
                             png_dir=args.out / "cam" if args.cam else None, pmap=getattr(args, "pmap", False))
    cam_dir = args.out / "cam" if args.cam and writer is None else None
    try:
        pred = predict_dir(folder, bundle, device=args.device, threshold=args.threshold, cam_dir=cam_dir,
                           progress=True, on_study=writer)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if writer is not None and args.cam:
        pred.cams = writer.pngs
    paths = write_outputs(pred, args.out, bundle, args.threshold)
    n_pos = int(pred.studies["positive"].sum()) if len(pred.studies) else 0
    print(f"{len(pred.studies)} stud{'y' if len(pred.studies) == 1 else 'ies'} predicted "
          f"({len(pred.slices)} slices, {n_pos} with a finding) in {pred.seconds['total']:.1f} s; "
          f"{len(pred.problems)} problem(s) listed in {paths['problems']}")
    for st in pred.studies.itertuples():
        print(f"  {st.study_uid}: max any {st.max_any:.3f}" + (f"; {st.findings}" if st.findings else ""))
    for p in pred.problems.head(10).itertuples():
        print(f"  [{p.severity}] {p.path or p.study_uid}: {p.message}")
    if len(pred.problems) > 10:
        print(f"  ... {len(pred.problems) - 10} more in {paths['problems']}")
    print(f"outputs: {args.out}")
    if writer is not None:
        print(f"DICOM outputs: {len(writer.paths)} file(s) for {len(writer.written)} stud"
              f"{'y' if len(writer.written) == 1 else 'ies'} in {dicom_out}")
    if server is not None and args.store:
        from ichdlib.serve.dicomweb import store_outputs

        rc = store_outputs(server, writer.written, args.out)
        done = {w.study_uid for w in writer.written}
        for uid in fetched:
            if uid not in done:
                rc = 1
                print(f"nothing stored for study {uid}: no outputs were written (see {paths['problems']})")
        if rc != 0:
            return 1
    return 0 if len(pred.studies) else 1
