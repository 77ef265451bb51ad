"""95% intervals for the figures of ``metrics.json`` and the per-image predictions ``ichd compare`` pairs.

Every figure ``<key>`` of a stage's ``oof`` / ``test`` scores gains a sibling ``<key>_ci: [lo, hi]``
(``wll_ci``, ``auc_ci.<label>``) from a percentile bootstrap over patients (:mod:`ichdlib.stats`; studies where
the catalog has no patient id): the slices of one patient are resampled together, because they are not
independent. ``ensemble.bootstrap`` replicates drawn with ``ensemble.bootstrap_seed`` (fixed, so two runs are
scored with the same draws). ``reports/<run>/predictions.parquet`` keeps the scored probabilities of every stage
with the truth and the resampling group of each image, so that ``ichd compare`` can pair two runs image by image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdlib import stats
from ichdlib.files import save_parquet
from ichdlib.labels import LABELS
from ichdlib.metrics import score_arrays

L = list(LABELS)
#: How the intervals were made (stored in metrics.json under ``intervals``).
METHOD = "95% percentile bootstrap over patients (studies where no patient id); AUC ties count one half"


def groups_for(ids: pd.Index, catalog: pd.DataFrame) -> pd.Series:
    """The resampling group of each image: its patient, else its study, else the image itself (an image the
    catalog lacks, e.g. a quarantined test file scored with the prior)."""
    cat = catalog.drop_duplicates("sop_uid").set_index("sop_uid")
    g = pd.Series(index=ids, dtype=object)
    for col in ("patient_id", "study_uid"):
        if col in cat.columns:
            vals = cat[col].reindex(ids)
            vals = vals.where(vals.astype(str).str.len() > 0)
            g = g.fillna(vals.map(lambda v, c=col: None if pd.isna(v) else f"{c[0]}:{v}"))
    return g.fillna(pd.Series(["i:" + str(i) for i in ids], index=ids)).astype(str)


def intervals(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """``wll_ci`` and ``auc_ci`` (per label; None where the AUC is undefined) of ``(N, 6)`` truth and predictions."""
    ci = stats.wll_ci(y, p, groups=groups, n_boot=n_boot, seed=seed)
    auc_ci: dict[str, list[float] | None] = {}
    for k, c in enumerate(L):
        col = y[:, k]
        a = stats.auc_ci(col, p[:, k], groups=groups, n_boot=n_boot, seed=seed) if 0 < col.sum() < len(col) else None
        auc_ci[c] = None if a is None else [a[0], a[1]]
    return {"wll_ci": None if ci is None else [ci[0], ci[1]], "auc_ci": auc_ci,
            "groups": int(len(np.unique(groups))) if groups is not None else int(len(y))}


def score_with_intervals(truth: pd.DataFrame | None, pred: pd.DataFrame, groups: pd.Series, n_boot: int = 1000,
                         seed: int = 0) -> dict | None:
    """:func:`ichdlib.metrics.score_frames` (every truth image must have a prediction) plus :func:`intervals`."""
    if truth is None:
        return None
    missing = truth.index.difference(pred.index)
    if len(missing):
        raise ValueError(f"{len(missing)} image(s) have no prediction, e.g. {list(missing[:3])}")
    ids = truth.index
    y, p = truth.loc[ids, L].to_numpy(float), pred.loc[ids, L].to_numpy(float)
    return {**score_arrays(y, p), **intervals(y, p, groups.reindex(ids).to_numpy(), n_boot, seed)}


def write_predictions(path: Path, truth: dict[str, pd.DataFrame | None], preds: dict[str, dict[str, pd.DataFrame]],
                      groups: pd.Series) -> Path:
    """``predictions.parquet``: one row per scored image (``sop_uid``, ``split``, ``group``), the truth as
    ``y|<label>`` and each stage's probabilities as ``<stage>|<label>`` (float32), for splits with truth."""
    parts = []
    for split, y in truth.items():
        if y is None:
            continue
        ids = y.index
        cols: dict[str, Any] = {"sop_uid": ids.astype(str), "split": split,
                                "group": groups.reindex(ids).to_numpy(str)}
        cols.update({f"y|{c}": y.loc[ids, c].to_numpy(np.float32) for c in L})
        for name, frames in preds.items():
            f = frames.get(split)
            if f is None or ids.difference(f.index).size:
                continue
            cols.update({f"{name}|{c}": f.loc[ids, c].to_numpy(np.float32) for c in L})
        parts.append(pd.DataFrame(cols))
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["sop_uid", "split", "group"])
    return save_parquet(df, path)


def read_predictions(path: Path) -> dict[str, pd.DataFrame]:
    """``predictions.parquet`` by split: frames indexed by ``sop_uid`` with ``group``, ``y|*`` and stage columns."""
    df = pd.read_parquet(path)
    return {s: g.drop(columns="split").set_index("sop_uid") for s, g in df.groupby("split", sort=False)}


def stage_arrays(frame: pd.DataFrame, stage: str) -> np.ndarray | None:
    """A stage's ``(N, 6)`` probabilities from a :func:`read_predictions` frame (None if it lacks the stage)."""
    cols = [f"{stage}|{c}" for c in L]
    return frame[cols].to_numpy(np.float64) if all(c in frame.columns for c in cols) else None


def stages_in(frame: pd.DataFrame) -> list[str]:
    """Stage names with probabilities in a :func:`read_predictions` frame."""
    names = [c.rsplit("|", 1)[0] for c in frame.columns if "|" in c and not c.startswith("y|")]
    return list(dict.fromkeys(names))
