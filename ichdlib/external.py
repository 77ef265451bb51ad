"""Score ``ichd predict`` output against slice-level truth, at slice and study level (shift checks).

:func:`score_predictions` takes predict's ``slices.csv`` (``sop_uid``, ``study_uid``, ``p_<label>``, and
``p2d_<label>`` for the 2D models alone) and a wide truth table indexed by SOP UID (e.g. a phantom's
labels and answer key, :func:`phantom_truth`). Study level: a study is positive when any of
its slices is, and its probability is the max over its slices (the usual rule; the paper's CQ500 figures are
study level too). Slices without truth, or truth without a prediction, are counted and left out, never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from ichdlib.labels import LABELS, read_labels
from ichdlib.metrics import weighted_log_loss
from ichdlib.stats import auc_ci


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None


def _ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None) -> list[float] | None:
    """95% bootstrap interval of the AUC (resampling ``groups`` when given; :mod:`ichdlib.stats`)."""
    if not 0 < y.sum() < len(y):
        return None
    ci = auc_ci(y, p, groups=groups, n_boot=1000, seed=0)
    return None if ci is None else [round(float(ci[0]), 4), round(float(ci[1]), 4)]


def expand_slabs(slices: pd.DataFrame) -> pd.DataFrame:
    """One row per source slice: a slab row (a thin series read as slabs, ``slab`` = its SOPs joined by ``;``)
    gives its prediction to every slice averaged into it, so thin-series studies are scored on all their slices."""
    if "slab" not in slices.columns or not slices["slab"].notna().any():
        return slices
    rows = slices.assign(sop_uid=[s.split(";") if isinstance(s, str) and s else [u]
                                  for s, u in zip(slices["slab"], slices["sop_uid"], strict=True)])
    return rows.explode("sop_uid", ignore_index=True)


def score_predictions(slices: pd.DataFrame, truth: pd.DataFrame, prefix: str = "p_") -> dict[str, Any]:
    """Slice and study figures of ``slices`` (predict's per-slice table) against ``truth`` (wide, by SOP UID).

    ``prefix``: ``p_`` scores the whole pipeline (sequence models and blend), ``p2d_`` the 2D CNNs alone.
    Returns slice ``wll``, ``auc_any`` (with ``auc_any_ci``, a 95% bootstrap interval over studies), ``mean_p_any`` vs ``prevalence``, and under ``study`` the same for max-over-slices.
    """
    cols = [f"{prefix}{c}" for c in LABELS]
    missing = [c for c in ["sop_uid", "study_uid", *cols] if c not in slices.columns]
    if missing:
        raise ValueError(f"predictions lack columns {missing}; expected ichd predict's slices.csv")
    pred = expand_slabs(slices).drop_duplicates("sop_uid").set_index("sop_uid")
    common = pred.index.intersection(truth.index)
    if len(common) == 0:
        raise ValueError("no predicted slice has a truth row (SOP UIDs do not match)")
    y = truth.loc[common, list(LABELS)].to_numpy(np.float64)
    p = pred.loc[common, cols].to_numpy(np.float64)
    study = pred.loc[common, "study_uid"].to_numpy()
    out: dict[str, Any] = {
        "n_slices": len(common), "slices_without_truth": int(len(pred) - len(common)),
        "truth_without_prediction": int(len(truth) - len(common)),
        "wll": round(weighted_log_loss(y, p), 4),
        "auc_any": _round(_auc(y[:, 0], p[:, 0])), "auc_any_ci": _ci(y[:, 0], p[:, 0], study),
        "mean_p_any": round(float(p[:, 0].mean()), 4), "prevalence": round(float(y[:, 0].mean()), 4),
    }
    frame = pd.DataFrame({"study": study, "y": y[:, 0], "p": p[:, 0]})
    per_study = frame.groupby("study", sort=True).max()
    ys, ps = per_study["y"].to_numpy(), per_study["p"].to_numpy()
    neg = ps[ys == 0]
    out["study"] = {
        "n_studies": len(per_study), "n_positive": int(ys.sum()),
        "auc_any": _round(_auc(ys, ps)), "auc_any_ci": _ci(ys, ps, None),
        "mean_max_any": round(float(ps.mean()), 4),
        "median_max_any_negative": round(float(np.median(neg)), 4) if len(neg) else None,
        # at the fixed threshold 0.5 (chosen before seeing the external data)
        "sensitivity_05": round(float((ps[ys == 1] >= 0.5).mean()), 4) if ys.sum() else None,
        "specificity_05": round(float((neg < 0.5).mean()), 4) if len(neg) else None,
    }
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def phantom_truth(root: str | os.PathLike) -> pd.DataFrame:
    """Slice truth of a phantom folder: its training labels and its test answer key (wide, by SOP UID)."""
    root = Path(root)
    parts = [read_labels(root / name, values="binary")[0] for name in ("stage_2_train.csv", "answer_key.csv")
             if (root / name).exists()]
    if not parts:
        raise FileNotFoundError(f"{root}: neither stage_2_train.csv nor answer_key.csv; not a phantom folder")
    truth = pd.concat(parts)
    return truth[~truth.index.duplicated()]


def score_files(pred_dir: str | os.PathLike, phantom_root: str | os.PathLike) -> dict[str, Any]:
    """:func:`score_predictions` of ``pred_dir/slices.csv`` against :func:`phantom_truth`, for the whole
    pipeline (``final``) and the 2D models alone (``cnn2d``)."""
    slices = pd.read_csv(Path(pred_dir) / "slices.csv")
    truth = phantom_truth(phantom_root)
    return {"final": score_predictions(slices, truth, "p_"), "cnn2d": score_predictions(slices, truth, "p2d_")}


__all__ = ["score_predictions", "score_files", "phantom_truth"]
