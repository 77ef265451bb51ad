"""Blending stages: the plain mean, or non-negative weights fitted on OOF weighted log loss (cross-fitted
over the folds for an honest OOF score)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ichdlib.labels import LABELS
from ichdlib.metrics import weighted_log_loss
from ichdlib.predictions import StagePredictions

L = list(LABELS)


# ----------------------------------------------------------------------------------------------------
# Blending
# ----------------------------------------------------------------------------------------------------
def fit_weights(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 for ``preds (M, N, 6)`` minimising the weighted log loss."""
    from scipy.optimize import minimize  # noqa: PLC0415  (scikit-learn/SciPy load only to fit)

    M = preds.shape[0]
    if M == 1:
        return np.ones(1)
    res = minimize(lambda w: weighted_log_loss(y, np.tensordot(w, preds, axes=1)), np.full(M, 1.0 / M),
                   method="SLSQP", bounds=[(0.0, 1.0)] * M,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}])
    w = np.clip(res.x, 0, None)
    return w / w.sum()


@dataclass
class Blend:
    """A blend's OOF and test frames (wide, by ``sop_uid``), its weights and, for ``fit``, each fold's."""

    oof: pd.DataFrame
    test: pd.DataFrame
    weights: dict[str, float]
    fold_weights: dict[int, dict[str, float]] = field(default_factory=dict)
    #: Why the blend is what it is, when ``fit`` fell back to its best member ("" otherwise).
    note: str = ""


def apply_weights(stage_probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The blend of per-stage probabilities ``(N, 6)`` with fixed weights: what notebook 05 applies to the test
    rows and ``ichd predict`` to a new study (float64, clipped to [0, 1] against rounding)."""
    missing = sorted(set(weights) - set(stage_probs))
    if missing:
        raise ValueError(f"blend members without predictions: {', '.join(missing)}")
    names = list(weights)
    stacked = np.stack([np.asarray(stage_probs[m], dtype=np.float64) for m in names])
    return np.clip(np.tensordot(np.array([weights[m] for m in names], dtype=np.float64), stacked, axes=1), 0.0, 1.0)


def blend(stages: list[StagePredictions], method: str = "mean", y_oof: pd.DataFrame | None = None) -> Blend:
    """Blend stages on their common images. ``fit`` needs ``y_oof`` (wide truth of the OOF images); its
    OOF predictions are cross-fitted: fold k uses weights fitted on the other folds' OOF rows. When that
    cross-fitted blend scores worse than its best member alone (weights fitted on few studies need not
    carry over between folds), ``fit`` uses the best member alone and says so in ``Blend.note``."""
    names = [s.name for s in stages]
    oof_ids = stages[0].oof.index
    test_ids = stages[0].test.index
    for s in stages[1:]:
        if not (s.oof.index.equals(oof_ids) or set(s.oof.index) == set(oof_ids)):
            raise ValueError(f"stage {s.name!r} predicts other OOF images than {stages[0].name!r}")
        if set(s.test.index) != set(test_ids):
            raise ValueError(f"stage {s.name!r} predicts other test images than {stages[0].name!r}")
    po = np.stack([s.oof.loc[oof_ids, L].to_numpy(float) for s in stages])
    pt = np.stack([s.test.loc[test_ids, L].to_numpy(float) for s in stages])
    fold = stages[0].oof.loc[oof_ids, "fold"].to_numpy() if "fold" in stages[0].oof else np.zeros(len(oof_ids))
    fold_w: dict[int, dict[str, float]] = {}
    note = ""
    if method == "mean":
        w = np.full(len(stages), 1.0 / len(stages))
        oof = np.tensordot(w, po, axes=1)
    elif method == "fit":
        if y_oof is None:
            raise ValueError("ensemble.method 'fit' needs the OOF truth")
        y = y_oof.loc[oof_ids, L].to_numpy(float)
        w = fit_weights(po, y)
        oof = np.empty_like(po[0])
        for k in np.unique(fold):
            m = fold == k
            wk = fit_weights(po[:, ~m], y[~m]) if (~m).any() else w
            oof[m] = np.tensordot(wk, po[:, m], axes=1)
            fold_w[int(k)] = dict(zip(names, map(float, wk), strict=True))
        single = [weighted_log_loss(y, p) for p in po]
        best, blended = int(np.argmin(single)), weighted_log_loss(y, oof)
        if len(stages) > 1 and single[best] < blended:
            note = (f"the fitted blend scores {blended:.4f} cross-fitted on OOF, worse than its best member "
                    f"{names[best]} alone ({single[best]:.4f}): using {names[best]} alone")
            w, oof, fold_w = np.eye(len(stages))[best], po[best].copy(), {}
    else:
        raise ValueError(f"ensemble.method {method!r}: expected 'mean' or 'fit'")
    test = apply_weights(dict(zip(names, pt, strict=True)), dict(zip(names, map(float, w), strict=True)))
    oof_df = pd.DataFrame(oof, index=oof_ids, columns=L)
    oof_df["fold"] = fold
    return Blend(oof_df, pd.DataFrame(test, index=test_ids, columns=L),
                 dict(zip(names, map(float, w), strict=True)), fold_w, note)
