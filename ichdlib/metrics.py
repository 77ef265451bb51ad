"""The competition metric (weighted multi-label log loss), per-class AUC, calibration, and ``ichd score``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ichdlib.labels import LABELS, WEIGHTS, read_labels

EPS = 1e-7


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(LABELS):
        raise ValueError(f"expected two (N, 6) arrays in label order, got {y.shape} and {p.shape}")
    if np.isnan(p).any():
        raise ValueError("predictions contain NaN")
    return y, np.clip(p, EPS, 1 - EPS)


def _bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def weighted_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Σ_i Σ_c w_c·BCE(y_ic, p_ic) / (N·Σ_c w_c), w_any = 2, others 1; p clipped to [1e-7, 1-1e-7]."""
    y, p = _check(y, p)
    return float((_bce(y, p) * WEIGHTS).sum() / (len(y) * WEIGHTS.sum()))


def per_class_log_loss(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Mean BCE of each label."""
    y, p = _check(y, p)
    return {c: float(v) for c, v in zip(LABELS, _bce(y, p).mean(axis=0), strict=True)}


def per_class_auc(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """ROC AUC of each label (None where the truth holds one class only)."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415  (scikit-learn/SciPy load only to fit)

    y, p = _check(y, p)
    out: dict[str, float | None] = {}
    for k, c in enumerate(LABELS):
        col = y[:, k]
        out[c] = float(roc_auc_score(col, p[:, k])) if 0 < col.sum() < len(col) else None
    return out


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[float, pd.DataFrame]:
    """Expected calibration error over all labels pooled, and reliability-curve data per label.

    The curve has one row per (label, bin) with mean predicted probability, observed frequency and count,
    over equal-width bins. ECE = Σ_b n_b/N·|freq_b − conf_b| over the pooled (image, label) pairs.
    """
    y, p = _check(y, p)
    edges = np.linspace(0.0, 1.0, bins + 1)

    def table(yy: np.ndarray, pp: np.ndarray) -> pd.DataFrame:
        idx = np.clip(np.digitize(pp, edges[1:-1], right=False), 0, bins - 1)
        n = np.bincount(idx, minlength=bins)
        conf = np.bincount(idx, weights=pp, minlength=bins)
        freq = np.bincount(idx, weights=yy, minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            return pd.DataFrame({"bin": np.arange(bins), "conf": conf / n, "freq": freq / n, "count": n})

    pooled = table(y.ravel(), p.ravel())
    ok = pooled["count"] > 0
    ece = float((pooled.loc[ok, "count"] / y.size * (pooled.loc[ok, "freq"] - pooled.loc[ok, "conf"]).abs()).sum())
    curves = []
    for k, c in enumerate(LABELS):
        t = table(y[:, k], p[:, k])
        t.insert(0, "label", c)
        curves.append(t)
    return ece, pd.concat(curves, ignore_index=True)


def prior_baseline(y_train: np.ndarray, n: int) -> np.ndarray:
    """Predict each label's training frequency for ``n`` images (the 'knows nothing' baseline)."""
    freq = np.clip(np.nanmean(np.asarray(y_train, dtype=np.float64), axis=0), EPS, 1 - EPS)
    return np.tile(freq, (n, 1))


def score_arrays(y: np.ndarray, p: np.ndarray) -> dict:
    """All figures for one set of predictions: ``wll``, ``per_class_ll``, ``auc``, ``ece``, ``n``."""
    ece, _ = calibration(y, p)
    return {
        "wll": weighted_log_loss(y, p),
        "per_class_ll": per_class_log_loss(y, p),
        "auc": per_class_auc(y, p),
        "ece": ece,
        "n": int(len(y)),
    }


def align(truth: pd.DataFrame, pred: pd.DataFrame, *, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Align two wide frames (index ``sop_uid``, label columns) on their images.

    With ``strict`` every truth image must have a prediction (else ValueError naming some missing IDs).
    """
    if "sop_uid" in truth.columns:
        truth = truth.set_index("sop_uid")
    if "sop_uid" in pred.columns:
        pred = pred.set_index("sop_uid")
    missing = truth.index.difference(pred.index)
    if strict and len(missing):
        raise ValueError(f"{len(missing)} image(s) have no prediction, e.g. {list(missing[:3])}")
    common = truth.index.intersection(pred.index)
    return truth.loc[common, list(LABELS)].to_numpy(float), pred.loc[common, list(LABELS)].to_numpy(float)


def score_frames(truth: pd.DataFrame, pred: pd.DataFrame) -> dict:
    """Score wide prediction frame against wide truth (both indexed or keyed by ``sop_uid``)."""
    y, p = align(truth, pred)
    return score_arrays(y, p)


def format_scores(s: dict) -> str:
    """Human-readable table of :func:`score_arrays` output."""
    lines = [f"images: {s['n']}", f"weighted log loss: {s['wll']:.5f}", f"ECE: {s['ece']:.4f}", "",
             f"{'label':<18}{'log loss':>10}{'AUC':>8}"]
    for c in LABELS:
        auc = s["auc"][c]
        lines.append(f"{c:<18}{s['per_class_ll'][c]:>10.5f}{('  n/a' if auc is None else f'{auc:.4f}'):>8}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truth", required=True, type=Path, help="Kaggle long-format truth CSV (ID,Label)")
    parser.add_argument("--pred", required=True, type=Path, help="Kaggle long-format prediction CSV")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cli(args: argparse.Namespace) -> int:
    truth, tprob = read_labels(args.truth, values="binary")
    pred, pprob = read_labels(args.pred)
    if len(pprob):
        raise ValueError(f"{args.pred}: {len(pprob)} image(s) with missing/conflicting rows, "
                         f"e.g. {pprob.iloc[0].sop_uid}: {pprob.iloc[0].reason}")
    extra = pred.index.difference(truth.index)
    s = score_frames(truth.dropna(), pred)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_scores(s))
        if len(extra):
            print(f"\nnote: {len(extra)} predicted image(s) not in the truth file were ignored")
    return 0
