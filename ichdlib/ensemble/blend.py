"""Notebook 05 as one call: score every stage, blend ``ensemble.members``, write the submission and
``metrics.json`` (:func:`run_ensemble`, the stage's entry :func:`run_stage`).

The pieces live along their seams: the stages' predictions in :mod:`ichdlib.predictions`, blending in
:mod:`ichdlib.ensemble.weights`, the submission and ``metrics.json`` in :mod:`ichdlib.ensemble.outputs`, the
figures in :mod:`ichdlib.ensemble.plots`; their names are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdlib.config import Params
from ichdlib.ensemble.intervals import METHOD, groups_for, score_with_intervals, write_predictions
from ichdlib.ensemble.optional import offer_member, offered_members
from ichdlib.ensemble.outputs import (  # noqa: F401  (re-exported: notebook 05's API in one import)
    fill_prior,
    read_sample_ids,
    read_truth,
    train_prior,
    update_metrics,
    validate_submission,
    write_submission,
)
from ichdlib.ensemble.plots import plot_reliability, plot_roc, plot_stages  # noqa: F401
from ichdlib.ensemble.weights import Blend, apply_weights, blend, fit_weights  # noqa: F401
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS, read_labels
from ichdlib.metrics import prior_baseline
from ichdlib.predictions import (  # noqa: F401  (the stage IO, re-exported under its old names)
    StagePredictions,
    load_stage,
    resolve_members,
    stage_dir,
    stage_files,
    stage_names,
)
from ichdlib.stages import StageReport

L = list(LABELS)


@dataclass
class EnsembleReport:
    """What :func:`run_ensemble` returns."""

    table: pd.DataFrame  # one row per stage: oof/test wll, ECE, mean AUC
    metrics: dict
    submission: Path
    filled_with_prior: list[str]
    blend: Blend
    stages: dict[str, StagePredictions]
    y_oof: pd.DataFrame
    y_test: pd.DataFrame | None

    def arrays(self, split: str, names: list[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Truth and aligned predictions ``(N, 6)`` of ``names`` (default: every stage and the ensemble) on
        the ``oof`` or ``test`` images that every one of them predicts."""
        truth = self.y_oof if split == "oof" else self.y_test
        if truth is None:
            raise ValueError("no test truth: paths.answer_key is not set or the file does not exist")
        frames = {n: getattr(s, split) for n, s in self.stages.items()}
        frames["ensemble"] = getattr(self.blend, split)
        names = names or list(frames)
        ids = truth.index
        for n in names:
            ids = ids.intersection(frames[n].index, sort=False)
        return truth.loc[ids, L].to_numpy(float), {n: frames[n].loc[ids, L].to_numpy(float) for n in names}


def _score(truth: pd.DataFrame | None, pred: pd.DataFrame, P: Params, groups: pd.Series) -> dict | None:
    """Scores with their 95% intervals (``<key>_ci`` siblings; :mod:`ichdlib.ensemble.intervals`)."""
    return score_with_intervals(truth, pred[L], groups, P.ensemble.bootstrap, P.ensemble.bootstrap_seed)


def run_ensemble(P: Params, force: bool = False) -> EnsembleReport:
    """Score every stage, blend ``ensemble.members``, write and validate the submission, score it with the
    ``ichd score`` code against the answer key when there is one, and merge-update ``metrics.json``.
    (Cheap, so it always recomputes; ``force`` is accepted for the common stage signature.)"""
    cat = load_catalog(P.layout.work)
    y_oof, y_test = read_truth(P, cat)
    prior = train_prior(P, cat)
    sample_ids = read_sample_ids(P.data_root / P.paths.sample_submission)
    members = resolve_members(P)
    stages = {n: load_stage(P, n, cat) for n in dict.fromkeys(stage_names(P) + members)}
    bl = blend([stages[m] for m in members], P.ensemble.method, y_oof)
    offers = {}
    for name in offered_members(P):  # e.g. the 3D member: kept only when it lowers the blend's OOF loss
        bl, members, offers[name] = offer_member(stages, members, name, P.ensemble.method, y_oof, blend, bl,
                                                 groups=cat.set_index("sop_uid")["patient_id"])
    sub_path, filled = write_submission(P, bl.test, prior)
    out: dict[str, dict] = {}
    groups = groups_for(y_oof.index.append(sample_ids).append(
        y_test.index if y_test is not None else pd.Index([])).drop_duplicates(), cat)
    scored: dict[str, dict[str, pd.DataFrame]] = {}
    for name, st in [*stages.items(), ("ensemble", StagePredictions("ensemble", bl.oof, bl.test))]:
        test_scores = test_pred = None
        if y_test is not None:
            if name == "ensemble":  # the submission file itself, read back as `ichd score` does
                test_pred = read_labels(sub_path)[0]
            else:  # what a submission of this stage alone would score (prior for the missing images)
                test_pred = fill_prior(st.test, sample_ids, prior)[0]
            test_scores = _score(y_test, test_pred, P, groups)
        out[name] = {"oof": _score(y_oof, st.oof, P, groups), "test": test_scores}
        scored[name] = {"oof": st.oof, "test": test_pred}
    yo = y_oof.to_numpy(float)
    prior_scores = {"oof": _score(y_oof, pd.DataFrame(prior_baseline(yo, len(yo)), index=y_oof.index, columns=L),
                                  P, groups),
                    "test": None if y_test is None else _score(
                        y_test, pd.DataFrame(np.tile(prior, (len(y_test), 1)), index=y_test.index, columns=L),
                        P, groups)}
    write_predictions(P.layout.predictions, {"oof": y_oof, "test": y_test}, scored, groups)
    submission = {"path": str(sub_path.relative_to(P.layout.reports)), "images": len(sample_ids),
                  "rows": 6 * len(sample_ids), "filled_with_prior": filled, "method": P.ensemble.method,
                  "members": members, "weights": bl.weights, "fold_weights": bl.fold_weights, "note": bl.note,
                  "scored_against": None if y_test is None else P.paths.answer_key,
                  "sources": {n: st.source for n, st in stages.items()}, "offered": offers}
    ci = {"method": METHOD, "n_boot": P.ensemble.bootstrap, "seed": P.ensemble.bootstrap_seed, "level": 0.95,
          "predictions": P.layout.predictions.name}
    metrics = update_metrics(P, {"stages": out, "prior": prior_scores, "submission": submission, "intervals": ci})
    return EnsembleReport(stage_table(metrics), metrics, sub_path, filled, bl, stages, y_oof, y_test)


def run_stage(P: Params, force: bool = False) -> StageReport:
    """Stage 05 (:data:`ichdlib.stages.STAGES`): :func:`run_ensemble`; the report's ``result`` is the
    :class:`EnsembleReport`, its rows the stage table."""
    rep = run_ensemble(P, force=force)
    return StageReport("ensemble", rep.table.reset_index().to_dict("records"), result=rep)


def stage_table(metrics: dict) -> pd.DataFrame:
    """One row per stage of ``metrics.json`` (plus the prior): OOF and test weighted log loss and AUC of ``any``
    (as in ``summary.md`` and the ROC legends) with their 95% interval ends (``*_lo``, ``*_hi``), and ECE."""
    rows = []
    entries = [*metrics.get("stages", {}).items(), ("prior", metrics.get("prior", {}))]
    for name, s in entries:
        row: dict[str, Any] = {"stage": name}
        for split in ("oof", "test"):
            sc = (s or {}).get(split) or {}
            for key, val, ci in (("wll", sc.get("wll"), sc.get("wll_ci")),
                                 ("auc_any", (sc.get("auc") or {}).get("any"), (sc.get("auc_ci") or {}).get("any"))):
                row[f"{split}_{key}"] = val
                row[f"{split}_{key}_lo"], row[f"{split}_{key}_hi"] = ci if ci else (None, None)
            row[f"{split}_ece"] = sc.get("ece")
        rows.append(row)
    return pd.DataFrame(rows).set_index("stage")


def stage_display(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """:func:`stage_table` for reading: each figure as ``value [lo, hi]``, blanks where there is none."""
    def cell(row: pd.Series, key: str) -> str:
        v, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
        if v is None or pd.isna(v):
            return ""
        ci = "" if lo is None or pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
        return f"{v:.{digits}f}{ci}"

    cols = {"OOF wLL [95% CI]": "oof_wll", "test wLL [95% CI]": "test_wll", "OOF AUC any [95% CI]": "oof_auc_any",
            "test AUC any [95% CI]": "test_auc_any"}
    out = pd.DataFrame({c: [cell(r, k) for _, r in table.iterrows()] for c, k in cols.items()}, index=table.index)
    for split in ("oof", "test"):
        out[f"{split.upper() if split == 'oof' else split} ECE"] = [
            "" if v is None or pd.isna(v) else f"{v:.{digits}f}" for v in table[f"{split}_ece"]]
    return out
