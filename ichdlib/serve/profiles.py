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
it unchanged. :class:`RunEvaluator` scores a profile on a finished run's OOF and test rows with the bundle's
own models (the 2D outputs per fold model and view are computed once and recombined per profile).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ichdlib.labels import LABELS


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
    from ichdlib.serve.bundle import Bundle, Member

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


# --------------------------------------------------------------------------------------------------
# Scoring profiles on a finished run
# --------------------------------------------------------------------------------------------------
class RunEvaluator:
    """A run's OOF and test rows through a bundle's models under any :class:`Profile`.

    Built once: every 2D fold model's probabilities and pooled features for each TTA view, on its own
    held-out rows (OOF) and on the test rows. A call then averages the kept views (and, for test rows, the
    kept fold models, with the sequence stage's per-fold input normalisation), runs the sequence models
    (OOF rows: the fold model that did not see them; test rows: every fold model) and blends, as notebooks
    03-05 do. ``runtime`` picks the engine of the 2D models (``torch``, ``onnxruntime``, ...; default the
    bundle's). ``max_studies`` scores a seeded sample of studies per split (RSNA-sized runs)."""

    def __init__(self, P: Any, bundle: Any, *, runtime: str | None = None, max_studies: int | None = None,
                 seed: int = 0, progress: bool = False) -> None:
        from ichdlib.cnn.data import SliceDataset
        from ichdlib.cnn.infer import predict as cnn_predict
        from ichdlib.cnn.infer import subset
        from ichdlib.ensemble.blend import read_truth
        from ichdlib.ingest.native import open_slices
        from ichdlib.ingest.table import load_catalog
        from ichdlib.serve.pipeline import Predictor

        t0 = time.perf_counter()
        self.P, self.bundle = P, bundle
        self.predictor = Predictor(bundle, "cpu", runtime=runtime)
        self.views = self.predictor.views  # the bundle's views (a profile's subset for a profiled bundle)
        cat = load_catalog(P.work_dir)
        parts = []
        for split in ("train", "test"):
            rows = cat[cat["split"] == split]
            studies = rows["study_uid"].unique()
            if max_studies and len(studies) > max_studies:
                pick = set(np.random.default_rng(seed).choice(studies, max_studies, replace=False))
                rows = rows[rows["study_uid"].isin(pick)]
            parts.append(rows)
        self.train, self.test = (p.reset_index(drop=True) for p in parts)
        y_oof, y_test = read_truth(P, cat)
        self.y_oof = y_oof.loc[self.train["sop_uid"]].to_numpy(np.float64)
        self.y_test = None
        if y_test is not None and self.test["sop_uid"].isin(y_test.index).all():
            self.y_test = y_test.loc[self.test["sop_uid"]].to_numpy(np.float64)
        # out[key][fold][view] = (oof probs on that fold's rows, oof feats, test probs, test feats)
        self.out: dict[str, dict[int, list[tuple[np.ndarray, ...]]]] = {}
        batch = P.features.batch
        for key, member in bundle.cnn.items():
            cache = open_slices(P, int(bundle.backbone(key)["size"]), cat)
            ds_tr = SliceDataset.from_catalog(self.train, cache, labels=False)
            ds_te = SliceDataset.from_catalog(self.test, cache, labels=False)
            self.out[key] = {}
            for fold, runner, aug in zip(member.folds, self.predictor.cnn[key], self.predictor.aug[key], strict=True):
                sel = np.flatnonzero(self.train["fold"].to_numpy() == fold)
                dim = int(bundle.backbone(key)["feature_dim"])
                per_view = []
                for view in self.views:
                    po, fo = cnn_predict(runner, aug, subset(ds_tr, sel), batch, "cpu", pooled=True, views=[view])
                    pt, ft = cnn_predict(runner, aug, ds_te, batch, "cpu", pooled=True, views=[view])
                    # an empty split (a sample without this fold) gives no features array
                    per_view.append((po, np.zeros((0, dim), np.float32) if fo is None else fo, pt,
                                     np.zeros((0, dim), np.float32) if ft is None else ft))
                self.out[key][fold] = per_view
                if progress:
                    print(f"  {key} fold {fold}: {len(self.views)} view(s) on {len(sel)} OOF and {len(ds_te)} "
                          f"test slices")
        self.seconds = time.perf_counter() - t0

    def fold_scores(self) -> dict[str, dict[int, float]]:
        """Each 2D fold model's weighted log loss on its own held-out rows (all views) divided by the loss of
        the label frequencies of its training rows on the same rows: folds differ in how hard their rows
        are, the ratio compares the models."""
        from ichdlib.metrics import prior_baseline, weighted_log_loss

        out: dict[str, dict[int, float]] = {}
        fold_of = self.train["fold"].to_numpy()
        for key, folds in self.out.items():
            out[key] = {}
            for fold, per_view in folds.items():
                sel = fold_of == fold
                p = np.mean([pv[0] for pv in per_view], axis=0)
                prior = prior_baseline(self.y_oof[~sel], int(sel.sum()))
                out[key][fold] = weighted_log_loss(self.y_oof[sel], p) / weighted_log_loss(self.y_oof[sel], prior)
        return out

    def predict(self, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
        """Final (blended) probabilities of the OOF rows and the test rows under ``profile``."""
        from ichdlib.cnn.infer import fold_feature_mean
        from ichdlib.ensemble.blend import apply_weights
        from ichdlib.seq.infer import predict_studies
        from ichdlib.seq.inputs import SeqInputs, apply_fold_norm, normalize_test

        views = list(profile.views)
        fold_of = self.train["fold"].to_numpy()
        oof_p, oof_f, te_folds, te_feats = {}, {}, {}, {}
        for key in profile.folds:
            dim = self.out[key][next(iter(self.out[key]))][0][1].shape[1]
            oof_p[key] = np.zeros((len(self.train), len(LABELS)), np.float32)
            oof_f[key] = np.zeros((len(self.train), dim), np.float16)
            for fold, per_view in self.out[key].items():
                sel = fold_of == fold
                oof_p[key][sel] = np.mean([per_view[v][0] for v in views], axis=0)
                oof_f[key][sel] = np.mean([per_view[v][1] for v in views], axis=0).astype(np.float16)
            kept = list(profile.folds[key])
            te_folds[key] = np.stack([np.mean([self.out[key][k][v][2] for v in views], axis=0) for k in kept])
            te_feats[key] = fold_feature_mean(np.mean([self.out[key][k][v][3] for v in views], axis=0) for k in kept)
        stage: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        sources = self.bundle.ensemble.get("sources", {})
        for m in profile.members:
            if m.startswith("cnn:"):
                key = m[4:]
                if sources.get(m) == "cnn":  # notebook 02's validation view
                    oof = np.zeros_like(oof_p[key])
                    for fold, per_view in self.out[key].items():
                        oof[fold_of == fold] = per_view[0][0]
                    test = np.mean([self.out[key][k][0][2] for k in profile.folds[key]], axis=0)
                else:
                    oof, test = oof_p[key], te_folds[key].mean(axis=0)
                stage[m] = (oof, test)
        seq_names = [m for m in profile.members if not m.startswith("cnn:")]
        if seq_names:
            keys = self.bundle.seq_backbones
            norm = next(iter(self.bundle.seq.values())).metas[0].get("input_norm")
            probs_tr = np.stack([oof_p[k] for k in keys], axis=1)
            if norm:
                out = np.empty_like(probs_tr)
                for k in np.unique(fold_of):
                    out[fold_of == k] = apply_fold_norm(probs_tr[fold_of == k], norm, int(k))
                probs_tr = out
                probs_te = normalize_test(np.stack([te_folds[k] for k in keys], axis=2), norm,
                                          list(profile.folds[keys[0]]))
            else:
                probs_te = np.stack([te_folds[k].mean(axis=0) for k in keys], axis=1)

            def inputs(rows: Any, feats: list[np.ndarray], probs: np.ndarray) -> SeqInputs:
                return SeqInputs(sop_uid=rows["sop_uid"].to_numpy(str), study_uid=rows["study_uid"].to_numpy(str),
                                 patient_id=rows["patient_id"].to_numpy(str), fold=rows["fold"].to_numpy(int),
                                 z=rows["z"].to_numpy(np.float64), feats=feats, probs=probs.astype(np.float32))

            tr_in = inputs(self.train, [oof_f[k] for k in keys], probs_tr)
            te_in = inputs(self.test, [te_feats[k] for k in keys], probs_te)
            sf = tr_in.study_fold()
            for name in seq_names:
                models = self.predictor.seq[name]
                oof = np.full((len(self.train), len(LABELS)), np.nan)
                for fold, model in zip(self.bundle.seq[name].folds, models, strict=True):
                    p = predict_studies([model], tr_in, np.flatnonzero(sf == fold), batch=self.P.seq.batch)
                    rows = fold_of == fold
                    oof[rows] = p[rows]
                stage[name] = (oof, predict_studies(models, te_in, batch=self.P.seq.batch))
        weights = blend_weights(self.bundle.ensemble["weights"], profile.members)
        return (apply_weights({m: s[0] for m, s in stage.items()}, weights),
                apply_weights({m: s[1] for m, s in stage.items()}, weights))

    def __call__(self, profile: Profile) -> Scores:
        from ichdlib.metrics import per_class_auc, weighted_log_loss

        oof, test = self.predict(profile)
        s = Scores(weighted_log_loss(self.y_oof, oof), float(per_class_auc(self.y_oof, oof)["any"] or np.nan))
        if self.y_test is not None:
            s.test_wll = weighted_log_loss(self.y_test, test)
            s.test_auc_any = float(per_class_auc(self.y_test, test)["any"] or np.nan)
        return s


def pass_seconds(bundle: Any, batch: int = 8, repeats: int = 2) -> dict[str, float]:
    """Measured CPU seconds per slice of one forward pass of each 2D member (its first fold model, torch)."""
    import torch

    out = {}
    for key, member in bundle.cnn.items():
        size = int(bundle.backbone(key)["size"])
        model = member.build("cpu")[0]
        x = torch.rand(batch, 3, size, size)
        with torch.no_grad():
            model.forward_both(x)
            t0 = time.perf_counter()
            for _ in range(repeats):
                model.forward_both(x)
        out[key] = (time.perf_counter() - t0) / (repeats * batch)
    return out


def profile_cost(per_pass: dict[str, float]) -> Callable[[Profile], float]:
    """Seconds per slice of a profile's 2D passes (the sequence models cost milliseconds per study)."""
    return lambda p: sum(len(f) * len(p.views) * per_pass[k] for k, f in p.folds.items())


def select_for_run(P: Any, bundle: Any, **kwargs: Any) -> tuple[Selection, RunEvaluator]:
    """:func:`select_profile` on a finished run's OOF predictions (``kwargs``: ``folds``, ``max_wll_ratio``,
    ``max_auc_drop``, ``budget``, ``max_studies``, ``runtime``)."""
    ev = RunEvaluator(P, bundle, runtime=kwargs.pop("runtime", None), max_studies=kwargs.pop("max_studies", None))
    sel = select_profile(full_profile(bundle), ev, profile_cost(pass_seconds(bundle)),
                         fold_scores=ev.fold_scores(), seq_backbones=bundle.seq_backbones, **kwargs)
    return sel, ev
