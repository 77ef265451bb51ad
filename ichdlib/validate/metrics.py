"""Study-level metrics of an external validation, computed from ``studies.csv`` and ``labels.csv`` alone
(so anyone can recompute ``metrics.json`` from the two files).

Per label: ROC AUC with its 95% DeLong interval (``auc_ci``; studies are independent, one per patient in
CQ500 and CT-ICH) and, with ``n_boot > 0``, a seeded bootstrap interval over studies (``auc_ci_bootstrap``);
sensitivity, specificity, PPV and NPV at the bundle's operating point with Wilson intervals; prevalence and
counts. Two bundles: DeLong's paired test per label on the studies both scored. All statistics come from
:mod:`ichdlib.stats`. A statistic that is undefined (an AUC when every study is negative, a PPV with no
positive call) is ``null``, never NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from ichdlib.labels import LABELS
from ichdlib.stats import auc_ci, binary_rates, delong_ci, delong_paired

#: ``studies.csv`` probability columns, in the contract's order.
PROB_COLUMNS = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
STUDY_COLUMNS = ["study", "series_uid", "n_slices", *PROB_COLUMNS]
#: Order of labels in metrics.json and the report (``any`` first).
REPORT_LABELS = ["any", *PROB_COLUMNS[:-1]]


def joined(studies: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Studies that were scored and have reference labels: probability columns ``p_<label>`` and labels
    ``y_<label>``, index ``study`` (as text)."""
    s = studies.assign(study=studies["study"].astype(str)).set_index("study")[PROB_COLUMNS]
    y = labels.copy()
    if "study" in y.columns:
        y = y.set_index("study")
    y.index = y.index.astype(str)
    both = s.add_prefix("p_").join(y[list(LABELS)].add_prefix("y_"), how="inner")
    return both.sort_index()


def _none_if_nan(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, tuple | list):
        return None if any(x is None or not np.isfinite(x) for x in v) else [float(x) for x in v]
    return v


def _auc(y: np.ndarray, p: np.ndarray) -> float:

    return float(roc_auc_score(y, p))


def label_metrics(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One label's metrics (module docstring)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, float)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    out: dict[str, Any] = {"auc": None, "auc_ci": None}
    if n_pos and n_neg:
        auc, lo, hi = delong_ci(y, p) if min(n_pos, n_neg) >= 2 else (_auc(y, p), None, None)
        # DeLong's variance needs two studies of each class; with one the interval is left out (null)
        out.update(auc=float(auc), auc_ci=None if lo is None else [float(lo), float(hi)])
        if n_boot:
            out["auc_ci_bootstrap"] = _none_if_nan(auc_ci(y, p, n_boot=n_boot, seed=seed))
    rates = binary_rates(y, p, threshold)
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        out[k] = rates[k]
        out[f"{k}_ci"] = _none_if_nan(rates[f"{k}_ci"]) if rates[f"{k}_ci"] is not None else None
    out.update(threshold=float(threshold), n_pos=n_pos, n_neg=n_neg,
               prevalence=n_pos / len(y) if len(y) else None,
               tp=rates["tp"], fp=rates["fp"], tn=rates["tn"], fn=rates["fn"])
    return out


def compute_metrics(studies: pd.DataFrame, labels: pd.DataFrame, thresholds: dict[str, float],
                    n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``metrics.json``'s core: ``{"n_studies": N, "labels": {label: {...}}}`` over the studies that were
    scored and have reference labels."""
    both = joined(studies, labels)
    return {"n_studies": len(both),
            "labels": {c: label_metrics(both[f"y_{c}"].to_numpy(), both[f"p_{c}"].to_numpy(), thresholds[c],
                                        n_boot, seed) for c in REPORT_LABELS}}


def compare_bundles(a: pd.DataFrame, b: pd.DataFrame, labels: pd.DataFrame) -> dict[str, Any]:
    """DeLong's paired test per label (first bundle minus second) on the studies both scored."""
    ja, jb = joined(a, labels), joined(b, labels)
    common = ja.index.intersection(jb.index)
    out: dict[str, Any] = {"n_studies": len(common), "labels": {}}
    for c in REPORT_LABELS:
        y = ja.loc[common, f"y_{c}"].to_numpy()
        if min(int(y.sum()), int(len(y) - y.sum())) < 2:  # DeLong needs two studies of each class
            out["labels"][c] = None
            continue
        r = delong_paired(y, ja.loc[common, f"p_{c}"].to_numpy(), jb.loc[common, f"p_{c}"].to_numpy())
        out["labels"][c] = {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in r.items()}
    return out


def metrics_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """metrics.json's labels as a table for the report (one row per label)."""
    def ci(v: Any) -> str:
        return "" if not v else f"{v[0]:.3f}-{v[1]:.3f}"

    def num(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    rows = []
    for c, m in metrics["labels"].items():
        rows.append({"label": c, "AUC": num(m["auc"]), "95% CI (DeLong)": ci(m["auc_ci"]),
                     "threshold": f"{m['threshold']:.3g}", "sensitivity": num(m["sensitivity"]),
                     "specificity": num(m["specificity"]), "PPV": num(m["ppv"]), "NPV": num(m["npv"]),
                     "positives": m["n_pos"], "negatives": m["n_neg"],
                     "prevalence": num(m["prevalence"])})
    return pd.DataFrame(rows)
