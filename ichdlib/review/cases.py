"""Which slices to review: the review table (2D and final probabilities beside the truth) and the
confident true positives, worst false positives and worst false negatives per label."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ichdlib.ensemble.outputs import read_truth
from ichdlib.ensemble.weights import blend
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS
from ichdlib.metrics import weighted_log_loss
from ichdlib.predictions import load_stage, resolve_members

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.config import Params

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Which slices to review
# --------------------------------------------------------------------------------------------------
def _read_probs(path: Path, prefix: str) -> pd.DataFrame:
    df = pd.read_parquet(path, columns=["sop_uid", *LABELS])
    return df.rename(columns={c: f"{prefix}{c}" for c in LABELS})


log = logging.getLogger(__name__)


def final_oof(P: Params, catalog: pd.DataFrame) -> pd.DataFrame | None:
    """The final OOF prediction (wide, by ``sop_uid``): notebook 05's blend of ``ensemble.members``, or
    None while a member's predictions are missing."""

    try:
        stages = [load_stage(P, m) for m in resolve_members(P)]
    except FileNotFoundError as exc:
        log.warning("final prediction unavailable (%s); showing the 2D CNN's as final", exc)
        return None
    y_oof, _ = read_truth(P, catalog)
    return blend(stages, P.ensemble.method, y_oof).oof[list(LABELS)]


def review_table(P: Params, key: str | None = None, catalog: pd.DataFrame | None = None) -> pd.DataFrame:
    """Training slices with truth ``y_<label>``, 2D CNN OOF ``p2d_<label>`` and final OOF ``p_<label>``.

    The final prediction is notebook 05's blend of ``ensemble.members`` (the 2D CNN's while the sequence
    models have not run). Rows in catalog order with ``study_uid``, ``slice_index``, ``fold``, ``rows``,
    ``cols``, ``path``, ``row``, ``prev_row``, ``next_row``.
    """
    if catalog is None:
        catalog = load_catalog(P.layout.work)
    key = key or P.cnn.backbones[0].key
    cnn_path = P.layout.cnn(key).oof
    if not cnn_path.is_file():
        raise FileNotFoundError(f"{cnn_path}: no 2D CNN OOF predictions; run notebook 02 first")
    cols = ["sop_uid", "study_uid", "slice_index", "n_slices", "fold", "rows", "cols", "path", "row",
            "prev_row", "next_row", *LABELS]
    tab = catalog.loc[catalog["split"] == "train", cols].rename(columns={c: f"y_{c}" for c in LABELS})
    tab = tab.merge(_read_probs(cnn_path, "p2d_"), on="sop_uid", how="left", validate="one_to_one")
    final = final_oof(P, catalog)
    if final is not None:
        final = final.rename(columns={c: f"p_{c}" for c in LABELS}).rename_axis("sop_uid").reset_index()
        tab = tab.merge(final, on="sop_uid", how="left", validate="one_to_one")
    else:
        for c in LABELS:
            tab[f"p_{c}"] = tab[f"p2d_{c}"]
    need = [f"p2d_{c}" for c in LABELS] + [f"p_{c}" for c in LABELS]
    missing = int(tab[need].isna().any(axis=1).sum())
    if missing:
        log.warning("%d training slices lack an OOF prediction; left out of the review", missing)
        tab = tab.dropna(subset=need)
    return tab.reset_index(drop=True)


def select_cases(table: pd.DataFrame, k: int, prob: str = "p2d_", labels: Sequence[str] = LABELS,
                 threshold: float = 0.5) -> pd.DataFrame:
    """Per label, the ``k`` most confident true positives, worst false positives and worst false negatives.

    Judged on the probabilities with column prefix ``prob`` (default the 2D CNN, whose decisions the CAMs
    explain) at ``threshold``. A group with fewer than ``k`` slices keeps what there is. Returns the
    table's rows plus ``label``, ``group``, ``prob``, ``truth``.
    """
    parts = []
    for lab in labels:
        p, y = table[f"{prob}{lab}"], table[f"y_{lab}"]
        picks = {
            "tp": p[(y == 1) & (p >= threshold)].nlargest(k),
            "fp": p[(y == 0) & (p >= threshold)].nlargest(k),
            "fn": p[(y == 1) & (p < threshold)].nsmallest(k),
        }
        for g, sel in picks.items():
            parts.append(table.loc[sel.index].assign(label=lab, group=g, prob=sel.to_numpy(),
                                                     truth=y.loc[sel.index].to_numpy()))
    cols = [*table.columns, "label", "group", "prob", "truth"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


def study_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per study: ``pred_any`` (max final ``any``), ``true_any`` and ``error`` (weighted log loss), by study."""

    rows = []
    for uid, g in table.groupby("study_uid", sort=False):
        y = g[[f"y_{c}" for c in LABELS]].to_numpy(float)
        p = g[[f"p_{c}" for c in LABELS]].to_numpy(float)
        rows.append({"study_uid": uid, "n_slices": len(g), "pred_any": float(p[:, 0].max()),
                     "true_any": float(y[:, 0].max()), "error": weighted_log_loss(y, p)})
    return pd.DataFrame(rows)


