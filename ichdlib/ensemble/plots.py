"""Notebook 05's figures: stage losses, ROC curves, reliability."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from ichdlib.labels import LABELS
from ichdlib.metrics import calibration

L = list(LABELS)


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------
def plot_stages(table: pd.DataFrame):
    """Bar chart of OOF and test weighted log loss per stage, with the prior-only baseline as a line."""

    t = table.drop(index="prior", errors="ignore")
    fig, ax = plt.subplots(figsize=(1.3 * len(t) + 3, 3.8))
    x = np.arange(len(t))
    for j, (split, color) in enumerate([("oof", "tab:blue"), ("test", "tab:orange")]):
        vals = t[f"{split}_wll"].astype(float).to_numpy()
        bars = ax.bar(x + (j - 0.5) * 0.38, np.nan_to_num(vals), 0.38, label=split.upper(), color=color)
        ax.bar_label(bars, labels=[("" if np.isnan(v) else f"{v:.4f}") for v in vals], fontsize=7)
        if "prior" in table.index and table.loc["prior", f"{split}_wll"] is not None:
            ax.axhline(float(table.loc["prior", f"{split}_wll"]), color=color, ls="--", lw=1,
                       label=f"prior only ({split})")
    ax.set_xticks(x, t.index, rotation=20)
    ax.set_ylabel("weighted log loss (lower is better)")
    ax.set_title("Stage by stage")
    ax.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.25), frameon=False)
    fig.tight_layout()
    return fig


def plot_roc(y: np.ndarray, preds: dict[str, np.ndarray], title: str = "ROC per class"):
    """One ROC panel per label, one curve per named prediction array ``(N, 6)``."""

    fig, axes = plt.subplots(2, 3, figsize=(11, 6.8), sharex=True, sharey=True)
    for k, (ax, c) in enumerate(zip(axes.ravel(), L, strict=True)):
        col = y[:, k]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        if 0 < col.sum() < len(col):
            for name, p in preds.items():
                fpr, tpr, _ = roc_curve(col, p[:, k])
                ax.plot(fpr, tpr, lw=1.3, label=f"{name} {roc_auc_score(col, p[:, k]):.3f}")
            ax.legend(fontsize=7, loc="lower right", title="AUC", title_fontsize=7)
        else:
            ax.text(0.5, 0.5, "one class only", ha="center", transform=ax.transAxes)
        ax.set_title(f"{c} (n+={int(col.sum())})", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("false positive rate")
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_reliability(y: np.ndarray, p: np.ndarray, bins: int = 10, title: str = "Reliability"):
    """Reliability curves per label (observed frequency vs mean predicted probability) and the pooled ECE."""

    ece, curve = calibration(y, p, bins)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfect")
    for c in L:
        cc = curve[(curve.label == c) & (curve["count"] > 0)]
        ax.plot(cc["conf"], cc["freq"], marker="o", ms=3, lw=1, label=c)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{title} (ECE {ece:.4f})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
