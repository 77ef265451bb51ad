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
from ichdlib.metrics import prior_baseline, score_arrays, score_frames
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


def _score(truth: pd.DataFrame | None, pred: pd.DataFrame) -> dict | None:
    return None if truth is None else score_frames(truth, pred[L])


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
    for name, st in [*stages.items(), ("ensemble", StagePredictions("ensemble", bl.oof, bl.test))]:
        test_scores = None
        if y_test is not None:
            if name == "ensemble":  # the submission file itself, read back as `ichd score` does
                test_scores = _score(y_test, read_labels(sub_path)[0])
            else:  # what a submission of this stage alone would score (prior for the missing images)
                test_scores = _score(y_test, fill_prior(st.test, sample_ids, prior)[0])
        out[name] = {"oof": _score(y_oof, st.oof), "test": test_scores}
    yo = y_oof.to_numpy(float)
    prior_scores = {"oof": score_arrays(yo, prior_baseline(yo, len(yo))),
                    "test": None if y_test is None else score_frames(
                        y_test, pd.DataFrame(np.tile(prior, (len(y_test), 1)), index=y_test.index, columns=L))}
    submission = {"path": str(sub_path.relative_to(P.layout.reports)), "images": len(sample_ids),
                  "rows": 6 * len(sample_ids), "filled_with_prior": filled, "method": P.ensemble.method,
                  "members": members, "weights": bl.weights, "fold_weights": bl.fold_weights, "note": bl.note,
                  "scored_against": None if y_test is None else P.paths.answer_key,
                  "sources": {n: st.source for n, st in stages.items()}, "offered": offers}
    metrics = update_metrics(P, {"stages": out, "prior": prior_scores, "submission": submission})
    return EnsembleReport(stage_table(metrics), metrics, sub_path, filled, bl, stages, y_oof, y_test)


def run_stage(P: Params, force: bool = False) -> StageReport:
    """Stage 05 (:data:`ichdlib.stages.STAGES`): :func:`run_ensemble`; the report's ``result`` is the
    :class:`EnsembleReport`, its rows the stage table."""
    rep = run_ensemble(P, force=force)
    return StageReport("ensemble", rep.table.reset_index().to_dict("records"), result=rep)


def stage_table(metrics: dict) -> pd.DataFrame:
    """One row per stage of ``metrics.json`` (plus the prior): OOF and test weighted log loss, ECE, mean AUC."""
    rows = []
    entries = [*metrics.get("stages", {}).items(), ("prior", metrics.get("prior", {}))]
    for name, s in entries:
        row: dict[str, Any] = {"stage": name}
        for split in ("oof", "test"):
            sc = (s or {}).get(split)
            aucs = [a for a in (sc or {}).get("auc", {}).values() if a is not None]
            row[f"{split}_wll"] = None if sc is None else sc["wll"]
            row[f"{split}_ece"] = None if sc is None else sc["ece"]
            row[f"{split}_auc"] = float(np.mean(aucs)) if aucs else None
        rows.append(row)
    return pd.DataFrame(rows).set_index("stage")
