"""Figures of notebook 02b: per-slice probabilities of the 3D member along z, beside the truth."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ichdlib.labels import LABELS
from ichdlib.metrics import per_class_auc, weighted_log_loss


def plot_study_strips(cat: pd.DataFrame, probs: dict[str, pd.DataFrame], studies: list[str], label: str = "any") -> Any:
    """One panel per study: ``label`` probability per slice (z order) of each named prediction table (indexed by
    ``sop_uid``) and the truth as grey bars."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (plotting libraries load only to draw)

    fig, axes = plt.subplots(1, len(studies), figsize=(4.2 * len(studies), 2.8), squeeze=False)
    for ax, uid in zip(axes[0], studies, strict=True):
        g = cat[cat["study_uid"] == uid].sort_values("slice_index")
        z = np.arange(len(g))
        if label in g and g[label].notna().all():
            ax.bar(z, g[label].to_numpy(float), color="0.85", width=1.0, label="truth")
        for name, table in probs.items():
            p = table.reindex(g["sop_uid"])[label].to_numpy(float)
            ax.plot(z, p, marker=".", lw=1.2, label=name)
        ax.set(ylim=(0, 1), xlabel="slice (z order)", title=f"{uid} ({len(g)} slices)")
        ax.title.set_fontsize(8)
    axes[0, 0].set_ylabel(f"p({label})")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def oof_table(y: np.ndarray, preds: dict[str, np.ndarray]) -> pd.DataFrame:
    """Weighted log loss and per-class AUC of each named OOF prediction ``(N, 6)`` against ``y``."""
    rows = []
    for name, p in preds.items():
        auc = per_class_auc(y, p)
        rows.append({"stage": name, "oof_wll": weighted_log_loss(y, p),
                     **{f"auc_{c}": auc.get(c) for c in LABELS}})
    return pd.DataFrame(rows).set_index("stage")
