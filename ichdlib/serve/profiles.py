"""Inference profiles: which fold models, TTA views and blend members a bundle runs, chosen by what each
contributes on the out-of-fold predictions.

A :class:`Profile` names, per 2D member, the fold models kept; the TTA views kept (indices into
``feature_views(P)``: 0 validation view, 1 h-flip, 2 slice swap, 3 both, then seeded crops); and the blend
members kept (their fitted weights renormalised). ``full`` keeps everything. ``fast``
(:func:`select_profile`, ``ichd export --profile fast``):

1. **folds**: out-of-fold rows are each predicted by the one fold model that did not train on them, so OOF
   predictions cannot show what averaging fold models adds. Each 2D member keeps ``folds`` (default 1)
   fold model(s): those with the lowest weighted log loss on their own held-out fold. The test split then
   measures what the dropped folds cost (``benchmarks/predict.py --profiles``).
2. **views and members**, greedily: at each step every single removal (one TTA view, one blend member; a 2D
   member no kept model reads goes with it) is scored on the OOF rows through the whole stack (2D views ->
   sequence models -> blend); the removal with the lowest OOF loss is taken while the profile stays within
   the bar (OOF wLL <= ``max_wll_ratio`` x the full profile's, AUC any >= the full's - ``max_auc_drop``) and
   saves cost. With a ``budget`` (cost units, e.g. seconds per slice) removals continue past the bar until
   the cost fits; the selection then says ``within_bar: false``.

The chosen profile is written into the bundle's ``profile`` section (with the selection trace);
:func:`apply_profile` cuts a bundle down to it, so ``ichd predict`` and every other consumer of the bundle run
it unchanged. :class:`ichdlib.app.profile_select.RunEvaluator` scores a profile on a finished run's OOF and
test rows with the bundle's own models (``ichd export --profile fast`` runs the selection there).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ichdlib.serve.bundle import Bundle, Member


@dataclass(frozen=True)
class Profile:
    """Fold models per 2D member, TTA view indices and blend members of a bundle (see the module docstring)."""

    name: str
    folds: dict[str, tuple[int, ...]]
    views: tuple[int, ...]
    members: tuple[str, ...]

    def passes_per_slice(self) -> int:
        """2D forward passes per slice."""
        return sum(len(f) for f in self.folds.values()) * len(self.views)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "folds": {k: list(v) for k, v in self.folds.items()}, "views": list(self.views),
                "members": list(self.members)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(str(d["name"]), {k: tuple(int(f) for f in v) for k, v in d["folds"].items()},
                   tuple(int(v) for v in d["views"]), tuple(d["members"]))


@dataclass
class Scores:
    """A profile's figures on a run: OOF and test weighted log loss and AUC of ``any`` (test: None without
    an answer key)."""

    oof_wll: float
    oof_auc_any: float
    test_wll: float | None = None
    test_auc_any: float | None = None


@dataclass
class Selection:
    """What :func:`select_profile` returns: the profile, its scores and cost, and every step taken."""

    profile: Profile
    scores: Scores
    cost: float
    within_bar: bool
    full: Scores
    full_cost: float
    trace: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.to_dict(), "scores": asdict(self.scores), "cost": self.cost,
                "within_bar": self.within_bar, "full": asdict(self.full), "full_cost": self.full_cost,
                "trace": self.trace}


def full_profile(bundle: Any) -> Profile:
    """Everything the bundle holds."""
    n_views = len((bundle.manifest.get("profile") or {}).get("views") or range(int(bundle.manifest["tta"])))
    return Profile("full", {k: tuple(m.folds) for k, m in bundle.cnn.items()}, tuple(range(n_views)),
                   tuple(bundle.ensemble["members"]))


def needed_backbones(profile: Profile, seq_backbones: list[str]) -> list[str]:
    """2D members some kept blend member reads (all sequence-model inputs, and ``cnn:<key>`` members)."""
    keys = set(seq_backbones) if any(not m.startswith("cnn:") for m in profile.members) else set()
    keys |= {m[4:] for m in profile.members if m.startswith("cnn:")}
    return [k for k in profile.folds if k in keys]


def _without(profile: Profile, *, view: int | None = None, member: str | None = None,
             seq_backbones: list[str]) -> Profile:
    views = tuple(v for v in profile.views if v != view)
    members = tuple(m for m in profile.members if m != member)
    p = Profile(profile.name, profile.folds, views, members)
    keep = needed_backbones(p, seq_backbones)
    return Profile(profile.name, {k: f for k, f in profile.folds.items() if k in keep}, views, members)


def select_profile(full: Profile, evaluate: Callable[[Profile], Scores], cost: Callable[[Profile], float], *,
                   fold_scores: dict[str, dict[int, float]], seq_backbones: list[str], folds: int = 1,
                   max_wll_ratio: float = 1.02, max_auc_drop: float = 0.005, budget: float | None = None,
                   name: str = "fast") -> Selection:
    """The ``fast`` profile (module docstring): ``folds`` best fold models per 2D member by their own
    held-out loss (``fold_scores[key][fold]``, lower is better), then greedy removal of views and blend
    members scored by ``evaluate`` (OOF figures) while within the bar and cheaper by ``cost``."""
    ref = evaluate(full)
    full_cost = cost(full)

    def ok(s: Scores) -> bool:
        return s.oof_wll <= ref.oof_wll * max_wll_ratio and s.oof_auc_any >= ref.oof_auc_any - max_auc_drop

    kept = {k: tuple(sorted(sorted(f, key=lambda j, k=k: (fold_scores.get(k, {}).get(j, np.inf), j))[:folds]))
            for k, f in full.folds.items()}
    cur = Profile(name, kept, full.views, full.members)
    cur_s = evaluate(cur)
    trace = [{"step": f"keep {folds} fold model(s) per 2D member (lowest own-fold OOF loss): "
                      + ", ".join(f"{k} {list(v)}" for k, v in kept.items()),
              "oof_wll": cur_s.oof_wll, "oof_auc_any": cur_s.oof_auc_any, "cost": cost(cur)}]
    within = ok(cur_s)
    while True:
        cands = []
        for v in cur.views if len(cur.views) > 1 else ():
            cands.append((f"drop TTA view {v}", _without(cur, view=v, seq_backbones=seq_backbones)))
        for m in cur.members if len(cur.members) > 1 else ():
            cands.append((f"drop blend member {m}", _without(cur, member=m, seq_backbones=seq_backbones)))
        c_cur = cost(cur)
        scored = [(what, p, evaluate(p), cost(p)) for what, p in cands]
        scored = [s for s in scored if s[3] < c_cur or (s[3] <= c_cur and s[2].oof_wll <= cur_s.oof_wll)]
        over = budget is not None and c_cur > budget
        allowed = [s for s in scored if ok(s[2])] or (scored if over else [])
        if not allowed:
            trace.append({"step": "stop: no further removal " + ("saves cost" if not scored else "stays within the bar"),
                          "oof_wll": cur_s.oof_wll, "oof_auc_any": cur_s.oof_auc_any, "cost": c_cur,
                          "candidates": [{"step": w, "oof_wll": sc.oof_wll, "oof_auc_any": sc.oof_auc_any,
                                          "cost": co, "within_bar": ok(sc)} for w, _, sc, co in scored]})
            break
        what, cur, cur_s, c = min(allowed, key=lambda s: (s[2].oof_wll, s[3]))
        within = within and ok(cur_s)
        trace.append({"step": what, "oof_wll": cur_s.oof_wll, "oof_auc_any": cur_s.oof_auc_any, "cost": c,
                      "candidates": [{"step": w, "oof_wll": sc.oof_wll, "oof_auc_any": sc.oof_auc_any, "cost": co,
                                      "within_bar": ok(sc)} for w, _, sc, co in scored]})
    return Selection(cur, cur_s, cost(cur), within, ref, full_cost, trace)


def blend_weights(weights: dict[str, float], members: tuple[str, ...] | list[str]) -> dict[str, float]:
    """The fitted weights of the kept members renormalised to sum to 1 (equal when all kept ones are 0)."""
    w = {m: float(weights[m]) for m in members}
    total = sum(w.values())
    return {m: (v / total if total > 0 else 1.0 / len(w)) for m, v in w.items()}


def apply_profile(bundle: Any, profile: Profile, selection: dict[str, Any] | None = None) -> Any:
    """A new in-memory bundle holding only what ``profile`` runs (save it with ``.save``); its manifest's
    ``profile`` section records the profile and, if given, the selection that chose it."""
    manifest = copy.deepcopy(bundle.manifest)
    manifest.pop("runtime", None)  # graphs are exported again for the new bundle
    cnn = {}
    entries = []
    for entry in manifest["backbones"]:
        key = entry["key"]
        if key not in profile.folds:
            continue
        m = bundle.cnn[key]
        idx = [m.folds.index(f) for f in profile.folds[key]]
        cnn[key] = Member(m.kind, key, [m.folds[i] for i in idx], [m.metas[i] for i in idx],
                          [m.states[i] for i in idx])
        entry.update(folds=cnn[key].folds, metas=cnn[key].metas, files={})
        entries.append(entry)
    manifest["backbones"] = entries
    seq_names = [m for m in profile.members if not m.startswith("cnn:")]
    seq = {k: v for k, v in bundle.seq.items() if k in seq_names}
    manifest["seq"]["models"] = [e for e in manifest["seq"]["models"] if e["key"] in seq]
    if not seq:
        manifest["seq"]["backbones"] = []
    ens = manifest["ensemble"]
    ens["members"] = list(profile.members)
    ens["weights"] = blend_weights(ens["weights"], profile.members)
    ens["sources"] = {m: s for m, s in ens.get("sources", {}).items() if m in profile.members}
    base = (bundle.manifest.get("profile") or {}).get("views")
    views = [int(base[v]) for v in profile.views] if base is not None else list(profile.views)
    manifest["profile"] = {**profile.to_dict(), "views": views, **({"selection": selection} if selection else {})}
    return Bundle(manifest, cnn, seq, source=bundle.source)
