"""Scoring inference profiles on a finished run, and the ``fast`` selection on it (``ichd export --profile
fast``). :class:`RunEvaluator` reads the run's catalog and HU slices (the ingest side), so it lives here, in the
application layer, and the serve package (what ``ichd predict`` loads) stays free of it. The profile itself,
the greedy selection and cutting a bundle down are :mod:`ichdlib.serve.profiles`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ichdlib.cnn.data import SliceDataset
from ichdlib.cnn.infer import fold_feature_mean, subset
from ichdlib.cnn.infer import predict as cnn_predict
from ichdlib.ensemble.outputs import read_truth
from ichdlib.ensemble.weights import apply_weights
from ichdlib.ingest.native import open_slices
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS
from ichdlib.metrics import per_class_auc, prior_baseline, weighted_log_loss
from ichdlib.seq.infer import predict_studies
from ichdlib.seq.inputs import SeqInputs, apply_fold_norm, normalize_test
from ichdlib.serve.pipeline import Predictor
from ichdlib.serve.profiles import Profile, Scores, Selection, blend_weights, full_profile, select_profile


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
        oof, test = self.predict(profile)
        s = Scores(weighted_log_loss(self.y_oof, oof), float(per_class_auc(self.y_oof, oof)["any"] or np.nan))
        if self.y_test is not None:
            s.test_wll = weighted_log_loss(self.y_test, test)
            s.test_auc_any = float(per_class_auc(self.y_test, test)["any"] or np.nan)
        return s


def pass_seconds(bundle: Any, batch: int = 8, repeats: int = 2) -> dict[str, float]:
    """Measured CPU seconds per slice of one forward pass of each 2D member (its first fold model, torch)."""
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
