"""Optional blend members (the 3D CNN): offered to the blend, kept only when they lower its OOF loss.

The comparison uses the blend's own OOF score: for ``ensemble.method: fit`` that score is cross-fitted (each
fold's weights come from the other folds), so keeping a member is not rewarded for fitting noise; for ``mean``
it is the plain OOF mean (one yes/no decision on OOF). Either way the decision and both scores are written
to ``metrics.json`` (``submission.offered``) and printed by notebook 05.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ichdlib.config import Params
from ichdlib.labels import LABELS
from ichdlib.metrics import weighted_log_loss
from ichdlib.stats import paired_wll


def offered_members(P: Params) -> list[str]:
    """Members the blend tries beside ``ensemble.members`` and keeps only when they help on OOF: the 3D CNN
    when ``cnn3d.enabled`` and ``cnn3d.blend`` (and it is not listed already)."""
    return ["cnn3d"] if P.cnn3d.enabled and P.cnn3d.blend and "cnn3d" not in P.ensemble.members else []


def _oof_wll(b: Any, y_oof: pd.DataFrame) -> float:
    ids = b.oof.index
    return weighted_log_loss(y_oof.loc[ids, list(LABELS)].to_numpy(float), b.oof.loc[ids, list(LABELS)].to_numpy(float))


def offer_member(stages: dict[str, Any], members: list[str], name: str, method: str, y_oof: pd.DataFrame,
                 blend_fn: Any, without: Any = None, groups: pd.Series | None = None,
                 n_boot: int = 200) -> tuple[Any, list[str], dict[str, Any]]:
    """Blend ``members`` with and without ``name`` (``blend_fn(stages, method, y_oof)``, i.e.
    :func:`ichdlib.ensemble.blend.blend`); return the better blend, its members and the decision (``taken``,
    both OOF scores, ``weight``, the paired difference with its bootstrap interval over ``groups`` (patients,
    by ``sop_uid``; :func:`ichdlib.stats.paired_wll`), ``note``: one sentence)."""
    without = without or blend_fn([stages[m] for m in members], method, y_oof)
    with_it = blend_fn([stages[m] for m in [*members, name]], method, y_oof)
    a, b = _oof_wll(without, y_oof), _oof_wll(with_it, y_oof)
    weight = float(with_it.weights.get(name, 0.0))
    taken = b < a and weight > 0
    verdict = "taken" if taken else "left out"
    ids = without.oof.index
    diff = paired_wll(y_oof.loc[ids, list(LABELS)].to_numpy(float), with_it.oof.loc[ids, list(LABELS)].to_numpy(float),
                      without.oof.loc[ids, list(LABELS)].to_numpy(float),
                      groups=None if groups is None else groups.reindex(ids).to_numpy(), n_boot=n_boot)
    unit = "slices" if groups is None else "patients"
    ci = "" if diff["lo"] is None else f", 95% CI {diff['lo']:+.4f} to {diff['hi']:+.4f} resampling {unit}"
    note = (f"{name} {verdict}: the blend scores {b:.4f} OOF with it (weight {weight:.2f}) and {a:.4f} without "
            f"({'cross-fitted' if method == 'fit' else 'plain mean'}; difference {b - a:+.4f}{ci})")
    decision = {"taken": taken, "oof_wll_with": b, "oof_wll_without": a, "weight": weight,
                "difference": {k: diff[k] for k in ("delta", "lo", "hi", "p_value")}, "note": note}
    return (with_it, [*members, name], decision) if taken else (without, list(members), decision)


def blended_members(P: Params, members: list[str]) -> list[str]:
    """The members notebook 05 finally blended: ``members`` (``ensemble.members`` resolved) plus the offered
    members it kept (``metrics.json``; before notebook 05 ran, the offered members are not counted)."""
    offered = offered_members(P)
    if not offered:
        return members
    path = P.layout.metrics
    sub = json.loads(path.read_text()).get("submission", {}) if path.is_file() else {}
    taken = [m for m in offered if (sub.get("offered") or {}).get(m, {}).get("taken")]
    return members + taken
