"""Operating points fixed before any external data is seen, and study probabilities from slice probabilities.

``ichd export`` chooses one threshold per label on the run's **internal out-of-fold study-level**
predictions (the blend of the bundle's members on the OOF slices, aggregated per study with
:func:`study_probability`, against the study label = any positive slice) and records them in the bundle
(``operating_point``); ``ichd predict`` and ``ichd validate`` use them unless ``--threshold`` is given.

Rules (``ensemble.operating_point`` in the params):

- ``sens95``: the highest threshold whose OOF study sensitivity is at least 0.95 (a triage setting);
- ``youden`` (default): the threshold maximising Youden's J = sensitivity + specificity - 1 on the OOF
  studies (ties: the higher threshold).

A label whose OOF studies are all positive or all negative gets 0.5 and says so (``fallback``). Bundles
written before operating points existed load with 0.5 for every label (:data:`DEFAULT_THRESHOLD`).

Study probability (``aggregate``): ``max`` over the study's slices (default: a study is as suspicious as its
most suspicious slice), ``top3`` (mean of the three highest slices: less sensitive to one noisy slice) or
``mean``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from ichdlib.labels import LABELS

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.config import Params

RULES = ("youden", "sens95")
AGGREGATES = ("max", "top3", "mean")
DEFAULT_THRESHOLD = 0.5
DEFAULT_AGGREGATE = "max"


def study_probability(p: np.ndarray, how: str = DEFAULT_AGGREGATE) -> np.ndarray:
    """Slice probabilities ``(n_slices, n_labels)`` of one study -> one probability per label."""
    p = np.asarray(p, float)
    if p.ndim == 1:
        p = p[:, None]
    if len(p) == 0:
        raise ValueError("a study without slices has no study probability")
    if how == "max":
        return p.max(axis=0)
    if how == "top3":
        k = min(3, len(p))
        return np.sort(p, axis=0)[-k:].mean(axis=0)
    if how == "mean":
        return p.mean(axis=0)
    raise ValueError(f"aggregate {how!r}: expected one of {', '.join(AGGREGATES)}")


def study_table(slices: pd.DataFrame, study_col: str, cols: list[str], how: str = DEFAULT_AGGREGATE) -> pd.DataFrame:
    """Per-slice table -> one row per study (index ``study_col``) with :func:`study_probability` of ``cols``."""
    out = {s: study_probability(g[cols].to_numpy(float), how) for s, g in slices.groupby(study_col, sort=False)}
    return pd.DataFrame.from_dict(out, orient="index", columns=cols)


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str) -> float:
    """One label's threshold by ``rule`` (module docstring); raises ValueError when y has one class only."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, float)
    if y.all() or not y.any():
        raise ValueError("needs positive and negative studies")
    if rule == "sens95":
        pos = np.sort(p[y])
        misses = int(np.floor(0.05 * len(pos) + 1e-9))
        return float(pos[misses])
    if rule == "youden":

        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # thresholds descending, the first above all
        j = (tpr - fpr)[1:]
        return float(min(1.0, thr[1:][int(np.argmax(j))]))  # argmax: the first maximum = the higher threshold
    raise ValueError(f"operating point rule {rule!r}: expected one of {', '.join(RULES)}")


def operating_points(y: pd.DataFrame, p: pd.DataFrame, rule: str, aggregate: str = DEFAULT_AGGREGATE) -> dict[str, Any]:
    """The bundle's ``operating_point`` entry from study-level truth ``y`` and probabilities ``p`` (columns
    :data:`LABELS`, same index): the chosen rule's thresholds and every rule's, for reference."""
    by_rule: dict[str, dict[str, float]] = {}
    fallback: list[str] = []
    for r in RULES:
        by_rule[r] = {}
        for c in LABELS:
            try:
                by_rule[r][c] = choose_threshold(y[c].to_numpy(), p[c].to_numpy(), r)
            except ValueError:
                by_rule[r][c] = DEFAULT_THRESHOLD
                if r == rule:
                    fallback.append(c)
    return {"rule": rule, "aggregate": aggregate, "thresholds": by_rule[rule], "rules": by_rule,
            "fallback": fallback, "n_studies": len(y), "n_pos": {c: int(y[c].sum()) for c in LABELS},
            "source": "internal out-of-fold study-level predictions"}


def internal_oof_studies(P: Params, weights: dict[str, float], aggregate: str = DEFAULT_AGGREGATE
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Study-level truth and blended OOF probabilities of a finished run (the blend ``weights`` of the
    bundle's members applied to their OOF slice tables, as notebook 05 blends them)."""
    from ichdlib.ensemble.outputs import read_truth  # noqa: PLC0415  (export only: keep predict's imports small)
    from ichdlib.ensemble.weights import apply_weights  # noqa: PLC0415  (as above)
    from ichdlib.predictions import load_stage  # noqa: PLC0415  (as above)

    cat = pd.read_parquet(P.layout.catalog)
    y_oof, _ = read_truth(P, cat)
    oofs = {m: load_stage(P, m, cat).oof for m in weights}
    ids = y_oof.index
    for o in oofs.values():
        ids = ids.intersection(o.index)
    final = apply_weights({m: o.loc[ids, list(LABELS)].to_numpy(float) for m, o in oofs.items()}, weights)
    study = cat.set_index("sop_uid")["study_uid"].reindex(ids).to_numpy()
    probs = pd.DataFrame(final, columns=list(LABELS)).assign(study=study)
    truth = y_oof.loc[ids, list(LABELS)].reset_index(drop=True).assign(study=study)
    y = truth.groupby("study", sort=True)[list(LABELS)].max()
    p = study_table(probs, "study", list(LABELS), aggregate).loc[y.index]
    return y, p
