"""The models on one study: the bundle's 2D CNNs (every fold, the TTA of notebook 03), the sequence models on
the inputs notebook 04 gives them, the blend of notebook 05; then folders of studies and Grad-CAM overlays."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ichdlib.cnn import infer as cnn_infer  # cnn_infer.predict looked up per call (tests wrap it)
from ichdlib.cnn.data import SliceDataset
from ichdlib.cnn.infer import eval_augment, feature_views, fold_feature_mean
from ichdlib.cnn3d.data import VolumeAugment
from ichdlib.cnn3d.infer import predict_volume
from ichdlib.ensemble.weights import apply_weights
from ichdlib.ingest.validity import capped_z
from ichdlib.labels import LABELS
from ichdlib.registry import CAM_METHODS
from ichdlib.review.cam import explain
from ichdlib.review.plots import annotated_overlay, overlay
from ichdlib.runtime import amp_enabled, prepare_model, resolve_device
from ichdlib.seq.infer import predict_studies
from ichdlib.seq.inputs import SeqInputs, normalize_test
from ichdlib.serve.bundle import Bundle
from ichdlib.serve.discover import (
    WARNING,
    LoadedStudy,
    discover_all,
    index_ranges,
    load_study,
    problem,
    problems_frame,
    safe_name,
)
from ichdlib.serve.inplane import InplanePlan, TrainingFov, identity_plan, plan_series, say_once
from ichdlib.serve.onnx_runtime import bundle_engine, cnn_runners, profile_views
from ichdlib.serve.series import SERIES_COLUMNS


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def study_cache(loaded: LoadedStudy, size: int, plan: InplanePlan | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A study's slices as the training pipeline sees them: the HU cache rows at ``size``
    (:func:`ichdlib.ingest.cache.resize_hu`, through ``plan``'s in-plane boxes when given:
    :mod:`ichdlib.serve.inplane`) and the ``(n, 3)`` stack rows (s-1, s, s+1)."""

    cache = (plan or identity_plan(loaded.hu)).cache(loaded.hu, size)
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
    """A bundle's models on one device, ready to predict studies. The 2D models run in the engine the bundle
    names (``runtime``: ``torch`` or an ONNX engine, :mod:`ichdlib.serve.onnx_runtime`; CUDA always torch),
    with the TTA views its ``profile`` keeps. ``fov_norm``: resample a series whose in-plane field of view lies
    outside the training range to the training median (:mod:`ichdlib.serve.inplane`; needs a bundle that records
    it)."""

    def __init__(self, bundle: Any, device: str | None = "auto", batch: int | None = None,
                 runtime: str | None = None, fov_norm: bool = True) -> None:

        self.bundle = bundle
        self.device = resolve_device(device)
        self.P = bundle.params()
        self.batch = batch or self.P.features.batch
        self.amp = amp_enabled(self.P, self.device)
        self.channels_last = self.device.startswith("cuda") and self.P.cnn.channels_last
        self.cnn: dict[str, list[Any]] = {}
        self.aug: dict[str, list[Any]] = {}
        self.engine = (runtime or bundle_engine(bundle)) if self.device == "cpu" else "torch"
        graphs = cnn_runners(bundle, self.engine) if self.engine != "torch" else {}
        for key, member in bundle.cnn.items():
            self.cnn[key] = graphs.get(key) or [prepare_model(m, self.P, self.device)[1]
                                                for m in member.build(self.device)]
            self.aug[key] = [eval_augment(self.P, meta) for meta in member.metas]
        self.seq = {name: member.build(self.device) for name, member in bundle.seq.items()}
        self.views = profile_views(bundle, feature_views(self.P))
        self.cnn3d, self.aug3d = self._volume_models(bundle)
        self.fov = TrainingFov.from_manifest(bundle.manifest) if fov_norm else None
        if fov_norm and self.fov is None:
            say_once(str(bundle.source), f"bundle {bundle.source or bundle.manifest.get('run')}: no training field of "
                     "view recorded (exported before the in-plane normalisation): series are not resampled in plane")

    def inplane(self, loaded: LoadedStudy) -> InplanePlan:
        """What happens in plane to this study's slices (:func:`ichdlib.serve.inplane.plan_series`): the identity
        unless its field of view lies outside the training range."""
        return plan_series(loaded.hu, getattr(loaded.scan, "pixel_spacing", None), self.fov)

    def _volume_models(self, bundle: Any) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """The 3D member's fold models and their evaluation views (none for bundles without one)."""
        members = getattr(bundle, "cnn3d", {}) or {}
        models = {name: m.build(self.device) for name, m in members.items()}
        augs = {name: [VolumeAugment.from_spec(m.spec, self.P.cnn.augment) for m in models[name]] for name in models}
        return models, augs

    def cnn3d_outputs(self, loaded: LoadedStudy) -> dict[str, np.ndarray]:
        """Per-slice probabilities ``(n, 6)`` of the 3D member (mean over its fold models) on the whole study,
        as notebook 02b predicts test studies (:func:`ichdlib.cnn3d.infer.predict_volume`)."""
        out = {}
        plan = self.inplane(loaded) if self.cnn3d else None
        for name, models in self.cnn3d.items():
            vol = study_cache(loaded, self.aug3d[name][0].size, plan)[0]
            out[name] = np.mean([predict_volume(m, a, vol, self.device, self.amp)
                                 for m, a in zip(models, self.aug3d[name], strict=True)], axis=0)
        return out

    def cnn_outputs(self, key: str, cache: np.ndarray, rows: np.ndarray) -> CnnOutput:
        """Run every fold model of backbone ``key`` on a study's cache rows, as notebook 03 (and, when the
        blend used its table, notebook 02) does for test slices (:func:`ichdlib.cnn.infer.predict`)."""

        ds = SliceDataset(cache, rows)
        kw = {"batch": self.batch, "device": self.device, "amp": self.amp, "channels_last": self.channels_last}
        val_view = self.bundle.ensemble.get("sources", {}).get(f"cnn:{key}") == "cnn"
        probs, tta_probs, feats = [], [], []
        for runner, aug in zip(self.cnn[key], self.aug[key], strict=True):
            tp, f = cnn_infer.predict(runner, aug, ds, pooled=True, views=self.views, **kw)
            tta_probs.append(tp)
            feats.append(f)
            if val_view:
                probs.append(cnn_infer.predict(runner, aug, ds, **kw)[0])
        tta = np.mean(tta_probs, axis=0)
        feat = fold_feature_mean(feats).astype(np.float32)  # as notebook 03 stores test rows
        return CnnOutput(np.mean(probs, axis=0) if val_view else tta, tta, feat, np.stack(tta_probs))

    def predict(self, loaded: LoadedStudy) -> pd.DataFrame:
        """Per-slice 2D and final probabilities of one loaded study (rows in z order)."""

        sl = loaded.slices
        n = len(sl)
        outs: dict[str, CnnOutput] = {}
        plan = self.inplane(loaded)
        for key in self.cnn:
            cache, rows = study_cache(loaded, int(self.bundle.backbone(key)["size"]), plan)
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
        stage.update(self.cnn3d_outputs(loaded))
        final = apply_weights(stage, self.bundle.ensemble["weights"])  # notebook 05's blend of the test rows
        p2d = np.mean([o.tta_prob for o in outs.values()], axis=0)
        frame = pd.DataFrame({
            "study_uid": loaded.scan.study_uid, "series_uid": loaded.scan.series_uid,
            "sop_uid": sl["sop_uid"].to_numpy(str), "slice_index": sl["slice_index"].to_numpy(int),
            "slice": sl["slice_index"].to_numpy(int) + 1,  # what people read: 1..n in z order (0-based above)
            "z": sl["z"].to_numpy(float), "path": sl["path"].to_numpy(str)})
        if "slab" in sl.columns:  # a thin series read as slabs: the SOPs averaged into each row, joined by ';'
            frame["slab"] = sl["slab"].to_numpy(str)
        for k, c in enumerate(LABELS):
            frame[f"p2d_{c}"] = p2d[:, k]
        for k, c in enumerate(LABELS):
            frame[f"p_{c}"] = final[:, k]
        for name, p in stage.items():
            for k, c in enumerate(LABELS):
                frame[f"{name}:{c}"] = p[:, k]
        return frame


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
    #: Every series of every study: role, whether it was read and why (:mod:`ichdlib.serve.series`).
    series: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SERIES_COLUMNS))


def label_thresholds(threshold: float | dict[str, float] | None, bundle: Any = None) -> dict[str, float]:
    """Per-label thresholds: one number for every label, a dict as given, or (None) the bundle's operating
    point (:attr:`ichdlib.serve.bundle.Bundle.thresholds`; 0.5 when it records none)."""
    if isinstance(threshold, dict):
        return {c: float(threshold[c]) for c in LABELS}
    if threshold is None:
        return dict(bundle.thresholds) if bundle is not None else dict.fromkeys(LABELS, 0.5)
    return dict.fromkeys(LABELS, float(threshold))


def summarize_studies(slices: pd.DataFrame, threshold: float | dict[str, float] = 0.5) -> pd.DataFrame:
    """One row per study: slices, max final probability per label, findings (subtypes whose max reaches
    their threshold, with it) and the slices involved as index ranges. ``threshold``: one number, or one
    per label."""
    thr = label_thresholds(threshold)

    cols = ["study_uid", "series_uid", "n_slices", "max_any", "positive", "findings",
            *[f"max_{c}" for c in LABELS[1:]], *[f"slices_{c}" for c in LABELS]]
    if slices.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for uid, g in slices.groupby("study_uid", sort=False):
        row: dict[str, Any] = {"study_uid": uid, "series_uid": g["series_uid"].iloc[0], "n_slices": len(g),
                               "max_any": float(g["p_any"].max()), "positive": bool(g["p_any"].max() >= thr["any"])}
        findings = []
        for c in LABELS:
            p = g[f"p_{c}"]
            row[f"max_{c}"] = float(p.max())
            row[f"slices_{c}"] = index_ranges(g.loc[p >= thr[c], "slice_index"] + 1)  # 1-based, as `slice`
            if c != "any" and p.max() >= thr[c]:
                findings.append((float(p.max()), c))
        row["findings"] = "; ".join(f"{c} ({m:.2f})" for m, c in sorted(findings, reverse=True))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def predict_dir(dicom_dir: str | os.PathLike, bundle: Any, *, device: str | None = "auto",
                threshold: float | dict[str, float] | None = None,
                cam_dir: str | os.PathLike | None = None, progress: bool = False,
                predictor: Predictor | None = None,
                on_study: Callable[[Predictor, LoadedStudy, pd.DataFrame], Any] | None = None,
                fov_norm: bool = True) -> Prediction:
    """Discover, read and predict every study under ``dicom_dir`` with ``bundle`` (a :class:`ichdlib.serve.bundle.Bundle`
    or a bundle folder). Bad input never raises: it ends up in ``problems``. With ``cam_dir``, Grad-CAM
    overlays of the positive slices are written there (at the ``any`` threshold). ``threshold``: one number,
    one per label, or None for the bundle's operating point. The series of each study is chosen by
    :mod:`ichdlib.serve.series` for the bundle's training thickness; ``series`` lists every series with its
    role and why it was (not) read. ``on_study(predictor, loaded, frame)`` is called after
    each study is predicted (e.g. :class:`ichdlib.serve.dicom_out.DicomWriter`); the problem rows it returns and what
    it raises go to ``problems``. ``fov_norm`` (when no ``predictor`` is given): the in-plane field-of-view
    normalisation (:mod:`ichdlib.serve.inplane`); what it did per study is in ``studies`` (``fov_mm``,
    ``inplane``), ``series`` and a warning in ``problems``."""

    t0 = time.perf_counter()
    if not hasattr(bundle, "cnn"):

        bundle = Bundle.load(bundle)
    predictor = predictor or Predictor(bundle, device, fov_norm=fov_norm)
    thr = label_thresholds(threshold, bundle)
    t_load_models = time.perf_counter() - t0
    found = discover_all(dicom_dir, progress=progress, training_mm=bundle.training_mm)
    scans, problems = found.scans, found.problems
    frames, cams = [], []
    inplane: dict[str, InplanePlan] = {}
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
        inplane[scan.study_uid] = plan = predictor.inplane(loaded)
        problems += inplane_problems(plan, scan.study_uid, scan.series_uid)
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
                cams += write_cams(predictor, loaded, frame, Path(cam_dir), thr["any"])
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
    studies = summarize_studies(slices, thr)
    studies["fov_mm"] = [inplane[u].fov_mm if u in inplane else None for u in studies["study_uid"]]
    studies["inplane"] = [inplane[u].note if u in inplane else "" for u in studies["study_uid"]]
    seconds = {"load_models": t_load_models, "read": t_read, "model": t_model,
               "total": time.perf_counter() - t0, "studies": len(frames)}
    for s in found.series:
        if s.read and s.study_uid in inplane:
            s.inplane = inplane[s.study_uid].note
    series = pd.DataFrame([s.as_row() for s in found.series], columns=SERIES_COLUMNS)
    return Prediction(slices, studies, problems_frame(problems), seconds, cams, series)


def inplane_problems(plan: InplanePlan, study: str, series_uid: str, path: str = "") -> list[dict]:
    """Warning rows of ``problems.csv`` for a series resampled in plane, or one that could not be (no PixelSpacing)."""
    return [problem(text, study_uid=study, series_uid=series_uid, path=path, severity=WARNING)
            for text in (plan.note, plan.warning) if text]


def predict_study(dicom_dir: str | os.PathLike, bundle: Any, **kwargs: Any) -> pd.DataFrame:
    """Per-slice probabilities (``p2d_<label>`` 2D, ``p_<label>`` final, plus each ensemble member's) of the
    studies under ``dicom_dir``; the problems are in ``frame.attrs["problems"]`` (a DataFrame)."""
    pred = predict_dir(dicom_dir, bundle, **kwargs)
    frame = pred.slices
    frame.attrs["problems"] = pred.problems
    frame.attrs["studies"] = pred.studies
    return frame


# --------------------------------------------------------------------------------------------------
# Explaining a study: Grad-CAM overlays (PNGs here, DICOM in ichdlib.serve.dicom_out)
# --------------------------------------------------------------------------------------------------
class CamOverlay(NamedTuple):
    """One explained slice and label of a study: its row in the study frame, the label, its final
    probability, the overlay on the brain-window slice (RGB uint8) and the map in [0, 1] at the slice's size."""

    row: int
    label: str
    prob: float
    rgb: np.ndarray
    cam: np.ndarray


def explain_study(predictor: Predictor, loaded: LoadedStudy, frame: pd.DataFrame,
                  threshold: float = 0.5) -> list[CamOverlay]:
    """The one "explain a study" path (``ichd predict --cam``'s PNGs and the DICOM outputs): for each slice
    whose final ``any`` reaches ``threshold``, one map per label found there, from the first backbone's first
    fold model (as notebook 06 explains test slices), with the preprocessing its spec names and the run's
    ``cam`` settings (:func:`ichdlib.review.cam.explain`), at the slice's own size."""
    pos = np.flatnonzero(frame["p_any"].to_numpy() >= threshold)
    if len(pos) == 0:
        return []
    key = next(iter(predictor.cnn))
    model = predictor.bundle.cnn[key].build(predictor.device)[0]  # torch (built here for an ONNX bundle)
    plan = predictor.inplane(loaded)
    cache, rows = study_cache(loaded, int(model.spec.size), plan)
    out = []
    for i in pos:
        labels = [c for c in LABELS if frame[f"p_{c}"].iloc[i] >= threshold]
        hu = loaded.hu[i]
        # the whole slice (crop=1.0), not a hard-edged centre-crop rectangle of map values; computed over the
        # slice's in-plane box, then placed on the slice's own pixel grid (the inverse of the crop/pad)
        box = plan.boxes[i]
        maps = box.to_original(explain(model, cache[rows[i]][None], labels, predictor.P.cam, out_size=box.size,
                                       crop=1.0)[0])
        out += [CamOverlay(int(i), c, float(frame[f"p_{c}"].iloc[i]), overlay(hu, m), np.asarray(m, dtype=np.float32))
                for c, m in zip(labels, maps, strict=True)]
    return out


def write_cam_pngs(overlays: list[CamOverlay], frame: pd.DataFrame, study_uid: str, out: str | os.PathLike,
                   hu: Any, method: str) -> list[str]:
    """``<out>/<study>/slice<k>_<label>.png`` for each overlay, ``k`` = 1..n in z order as people number slices:
    the map over the whole slice, at 512 px or more, titled with the label, its probability and the slice, with
    a colour scale of ``method`` (:func:`ichdlib.review.plots.annotated_overlay`; ``hu``: the study's slices).
    Returns the paths written."""
    if not overlays:
        return []
    folder = Path(out) / safe_name(study_uid)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for o in overlays:
        k = int(frame["slice_index"].iloc[o.row]) + 1
        img = annotated_overlay(hu[o.row], o.cam, o.label, o.prob, method=method, caption=f"slice {k}/{len(frame)}")
        path = folder / f"slice{k:03d}_{o.label}.png"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        written.append(str(path))
    return written


def write_cams(predictor: Predictor, loaded: LoadedStudy, frame: pd.DataFrame, out: Path,
               threshold: float = 0.5) -> list[str]:
    """Overlay PNGs ``<out>/<study>/slice<k>_<label>.png`` of :func:`explain_study`."""
    return write_cam_pngs(explain_study(predictor, loaded, frame, threshold), frame, loaded.scan.study_uid, out,
                          loaded.hu, CAM_METHODS[predictor.P.cam.method].label)
