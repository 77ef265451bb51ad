"""Blending, the Kaggle submission and its validator, ``metrics.json`` and the report figures (notebook 05).

Stages are named ``cnn:<key>`` (one per 2D backbone, ``work/cnn/<key>/``), ``seq1`` and ``seq2``
(``work/seq/<model>/``); each has an OOF frame (``sop_uid, fold`` + six labels, training slices) and a test
frame (``sop_uid`` + six labels). The ensemble blends ``ensemble.members`` by a plain mean or by
non-negative weights fitted on OOF weighted log loss (cross-fitted over the folds for an honest OOF score).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdlib.config import Params
from ichdlib.ensemble.optional import offer_member, offered_members
from ichdlib.files import json_ready, write_text
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS, LabelFileError, long_to_wide, read_labels, split_id, write_long_csv
from ichdlib.metrics import calibration, prior_baseline, score_arrays, score_frames, weighted_log_loss

L = list(LABELS)


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------
def stage_names(P: Params) -> list[str]:
    """Every stage this run produces: ``cnn:<key>`` per backbone, then the sequence models."""
    return [f"cnn:{b.key}" for b in P.cnn.backbones] + list(P.seq.models) + (["cnn3d"] if P.cnn3d.enabled else [])


def stage_dir(P: Params, name: str) -> Path:
    """Folder holding a stage's ``oof.parquet`` and ``test.parquet``."""
    if name.startswith("cnn:"):
        return P.work_dir / "cnn" / name[4:]
    if name in ("seq1", "seq2"):
        return P.work_dir / "seq" / name
    if name == "cnn3d":
        return P.work_dir / "cnn3d" / P.cnn3d.key
    raise ValueError(f"unknown stage {name!r}: expected 'cnn:<key>', 'seq1', 'seq2' or 'cnn3d'")


@dataclass
class Stage:
    """One stage's predictions as wide frames indexed by ``sop_uid`` (``oof`` also has ``fold``)."""

    name: str
    oof: pd.DataFrame
    test: pd.DataFrame
    source: str = ""


def stage_files(P: Params, name: str) -> tuple[Path, Path]:
    """A stage's OOF and test files. For a 2D backbone these are notebook 03's TTA probabilities (what the
    sequence models read, and the stronger 2D baseline) when they exist, else notebook 02's tables."""
    if name.startswith("cnn:"):
        f = P.work_dir / "features" / name[4:]
        if (f / "oof_prob.parquet").is_file() and (f / "test_prob.parquet").is_file():
            return f / "oof_prob.parquet", f / "test_prob.parquet"
    d = stage_dir(P, name)
    return d / "oof.parquet", d / "test.parquet"


def load_stage(P: Params, name: str, catalog: pd.DataFrame | None = None) -> Stage:
    """Read a stage's OOF and test predictions; a missing file names the notebook that writes it. An OOF
    table without ``fold`` gets it from ``catalog``."""
    frames = []
    paths = stage_files(P, name)
    for path in paths:
        if not path.is_file():
            nb = ("02 (2D CNN)" if name.startswith("cnn:") else "02b (3D CNN)" if name == "cnn3d"
                  else "04 (sequence models)")
            raise FileNotFoundError(f"{path}: missing; run notebook {nb} first")
        df = pd.read_parquet(path)
        missing = [c for c in ["sop_uid", *L] if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        if df["sop_uid"].duplicated().any():
            raise ValueError(f"{path}: duplicate sop_uid, e.g. {df.sop_uid[df.sop_uid.duplicated()].iloc[0]!r}")
        frames.append(df.set_index("sop_uid"))
    oof = frames[0]
    if "fold" not in oof.columns and catalog is not None:
        oof["fold"] = catalog.set_index("sop_uid")["fold"].reindex(oof.index).to_numpy()
    source = str(paths[0].parent.relative_to(P.work_dir)) if paths[0].is_relative_to(P.work_dir) else str(paths[0])
    return Stage(name, oof, frames[1], source)


def resolve_members(P: Params) -> list[str]:
    """``ensemble.members`` with ``cnn:*`` expanded to every backbone."""
    out: list[str] = []
    for m in P.ensemble.members:
        names = [f"cnn:{b.key}" for b in P.cnn.backbones] if m == "cnn:*" else [m]
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("ensemble.members is empty")
    return out


# ----------------------------------------------------------------------------------------------------
# Blending
# ----------------------------------------------------------------------------------------------------
def fit_weights(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 for ``preds (M, N, 6)`` minimising the weighted log loss."""
    from scipy.optimize import minimize

    M = preds.shape[0]
    if M == 1:
        return np.ones(1)
    res = minimize(lambda w: weighted_log_loss(y, np.tensordot(w, preds, axes=1)), np.full(M, 1.0 / M),
                   method="SLSQP", bounds=[(0.0, 1.0)] * M,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}])
    w = np.clip(res.x, 0, None)
    return w / w.sum()


@dataclass
class Blend:
    """A blend's OOF and test frames (wide, by ``sop_uid``), its weights and, for ``fit``, each fold's."""

    oof: pd.DataFrame
    test: pd.DataFrame
    weights: dict[str, float]
    fold_weights: dict[int, dict[str, float]] = field(default_factory=dict)
    #: Why the blend is what it is, when ``fit`` fell back to its best member ("" otherwise).
    note: str = ""


def apply_weights(stage_probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The blend of per-stage probabilities ``(N, 6)`` with fixed weights: what notebook 05 applies to the test
    rows and ``ichd predict`` to a new study (float64, clipped to [0, 1] against rounding)."""
    missing = sorted(set(weights) - set(stage_probs))
    if missing:
        raise ValueError(f"blend members without predictions: {', '.join(missing)}")
    names = list(weights)
    stacked = np.stack([np.asarray(stage_probs[m], dtype=np.float64) for m in names])
    return np.clip(np.tensordot(np.array([weights[m] for m in names], dtype=np.float64), stacked, axes=1), 0.0, 1.0)


def blend(stages: list[Stage], method: str = "mean", y_oof: pd.DataFrame | None = None) -> Blend:
    """Blend stages on their common images. ``fit`` needs ``y_oof`` (wide truth of the OOF images); its
    OOF predictions are cross-fitted: fold k uses weights fitted on the other folds' OOF rows. When that
    cross-fitted blend scores worse than its best member alone (weights fitted on few studies need not
    carry over between folds), ``fit`` uses the best member alone and says so in ``Blend.note``."""
    names = [s.name for s in stages]
    oof_ids = stages[0].oof.index
    test_ids = stages[0].test.index
    for s in stages[1:]:
        if not (s.oof.index.equals(oof_ids) or set(s.oof.index) == set(oof_ids)):
            raise ValueError(f"stage {s.name!r} predicts other OOF images than {stages[0].name!r}")
        if set(s.test.index) != set(test_ids):
            raise ValueError(f"stage {s.name!r} predicts other test images than {stages[0].name!r}")
    po = np.stack([s.oof.loc[oof_ids, L].to_numpy(float) for s in stages])
    pt = np.stack([s.test.loc[test_ids, L].to_numpy(float) for s in stages])
    fold = stages[0].oof.loc[oof_ids, "fold"].to_numpy() if "fold" in stages[0].oof else np.zeros(len(oof_ids))
    fold_w: dict[int, dict[str, float]] = {}
    note = ""
    if method == "mean":
        w = np.full(len(stages), 1.0 / len(stages))
        oof = np.tensordot(w, po, axes=1)
    elif method == "fit":
        if y_oof is None:
            raise ValueError("ensemble.method 'fit' needs the OOF truth")
        y = y_oof.loc[oof_ids, L].to_numpy(float)
        w = fit_weights(po, y)
        oof = np.empty_like(po[0])
        for k in np.unique(fold):
            m = fold == k
            wk = fit_weights(po[:, ~m], y[~m]) if (~m).any() else w
            oof[m] = np.tensordot(wk, po[:, m], axes=1)
            fold_w[int(k)] = dict(zip(names, map(float, wk), strict=True))
        single = [weighted_log_loss(y, p) for p in po]
        best, blended = int(np.argmin(single)), weighted_log_loss(y, oof)
        if len(stages) > 1 and single[best] < blended:
            note = (f"the fitted blend scores {blended:.4f} cross-fitted on OOF, worse than its best member "
                    f"{names[best]} alone ({single[best]:.4f}): using {names[best]} alone")
            w, oof, fold_w = np.eye(len(stages))[best], po[best].copy(), {}
    else:
        raise ValueError(f"ensemble.method {method!r}: expected 'mean' or 'fit'")
    test = apply_weights(dict(zip(names, pt, strict=True)), dict(zip(names, map(float, w), strict=True)))
    oof_df = pd.DataFrame(oof, index=oof_ids, columns=L)
    oof_df["fold"] = fold
    return Blend(oof_df, pd.DataFrame(test, index=test_ids, columns=L),
                 dict(zip(names, map(float, w), strict=True)), fold_w, note)


# ----------------------------------------------------------------------------------------------------
# Submission
# ----------------------------------------------------------------------------------------------------
def read_sample_ids(sample_path: str | Path) -> pd.Index:
    """The image IDs (``ID_<sop>``) of a Kaggle sample submission, in file order."""
    sample_path = Path(sample_path)
    if not sample_path.is_file():
        raise FileNotFoundError(f"{sample_path}: sample submission not found")
    long = pd.read_csv(sample_path, dtype={"ID": str})
    long_to_wide(long, source=str(sample_path))  # checks the format
    order = long["ID"].str.rsplit("_", n=1).str[0].drop_duplicates().to_numpy(str)
    return pd.Index(order, name="sop_uid")


def train_prior(P: Params, catalog: pd.DataFrame | None = None) -> np.ndarray:
    """Each label's frequency over the catalog's training slices (the prior-only prediction)."""
    if catalog is None:
        catalog = load_catalog(P.work_dir)
    y = catalog.loc[catalog["split"] == "train", L].to_numpy(float)
    return prior_baseline(y, 1)[0]


def fill_prior(pred: pd.DataFrame, ids: pd.Index, prior: np.ndarray) -> tuple[pd.DataFrame, list[str]]:
    """``pred`` reindexed to ``ids``; images without a prediction get ``prior``. Returns (frame, filled IDs)."""
    out = pred[L].astype(np.float64).reindex(ids)
    missing = out.index[out.isna().any(axis=1)]
    out.loc[missing, L] = np.tile(prior, (len(missing), 1))
    out.index.name = "sop_uid"
    return out, [str(m) for m in missing]


def validate_submission(path: str | Path, sample_path: str | Path, max_report: int = 5) -> pd.DataFrame:
    """Check a submission against the sample: header ``ID,Label``, the same IDs (none missing, none extra,
    no duplicates), well-formed IDs, probabilities in [0, 1] and no NaN. Raises ValueError naming the file
    and the first problems; returns the file as a DataFrame when it is valid."""
    path, sample_path = Path(path), Path(sample_path)
    try:
        sub = pd.read_csv(path, dtype={"ID": str})
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as CSV ({exc})") from exc
    sample = pd.read_csv(sample_path, dtype={"ID": str})
    problems: list[str] = []
    if list(sub.columns) != ["ID", "Label"]:
        raise ValueError(f"{path}: invalid submission: header must be 'ID,Label', got {','.join(map(str, sub.columns))!r}")
    ids = sub["ID"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        problems.append(f"{len(dup)} duplicate ID(s), first {dup.iloc[0]!r}")
    bad = []
    for i in ids:
        try:
            split_id(i)
        except LabelFileError:
            bad.append(i)
    if bad:
        problems.append(f"{len(bad)} malformed ID(s), first {bad[0]!r} (expected 'ID_<hex>_<label>')")
    want, got = set(sample["ID"].astype(str)), set(ids)
    missing = [i for i in sample["ID"].astype(str) if i not in got]
    extra = [i for i in ids if i not in want]
    if missing:
        problems.append(f"{len(missing)} ID(s) of the sample submission missing, first {missing[:max_report]}")
    if extra:
        problems.append(f"{len(extra)} ID(s) not in the sample submission, first {extra[:max_report]}")
    label = pd.to_numeric(sub["Label"], errors="coerce")
    nan = ids[label.isna()]
    if len(nan):
        problems.append(f"{len(nan)} Label(s) empty, NaN or not a number, first at {nan.iloc[0]!r}")
    out = ids[(label < 0) | (label > 1)]
    if len(out):
        problems.append(f"{len(out)} Label(s) outside [0, 1], first at {out.iloc[0]!r} "
                        f"({label[(label < 0) | (label > 1)].iloc[0]})")
    if problems:
        raise ValueError(f"{path}: invalid submission ({len(sub)} rows, sample {sample_path.name} has "
                         f"{len(sample)}):\n  - " + "\n  - ".join(problems[:max_report]))
    return sub


def write_submission(P: Params, test: pd.DataFrame, prior: np.ndarray) -> tuple[Path, list[str]]:
    """Write ``reports/<run>/submission.csv`` for every image of the sample submission (images the catalog
    lacks, e.g. a quarantined corrupt file, get ``prior``), validate it, and return (path, filled IDs)."""
    sample_path = P.data_root / P.paths.sample_submission
    ids = read_sample_ids(sample_path)
    extra = test.index.difference(ids)
    if len(extra):
        raise ValueError(f"{len(extra)} predicted test image(s) are not in {sample_path}, e.g. {list(extra[:3])}")
    wide, filled = fill_prior(test, ids, prior)
    path = write_long_csv(np.clip(wide, 0.0, 1.0), P.reports_dir / "submission.csv")
    validate_submission(path, sample_path)
    return path, filled


# ----------------------------------------------------------------------------------------------------
# Scores and metrics.json
# ----------------------------------------------------------------------------------------------------
def update_metrics(P: Params, updates: dict[str, Any]) -> dict:
    """Merge ``updates`` into ``reports/<run>/metrics.json`` (dicts merged one level deep, other keys such as
    ``pointing_game`` kept) and write it atomically. Returns the merged content."""
    path = P.reports_dir / "metrics.json"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); move it away to start afresh") from exc
    for key, val in updates.items():
        if isinstance(val, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **val}
        else:
            data[key] = val
    data = json_ready(data)
    write_text(path, json.dumps(data, indent=2))
    return data


def read_truth(P: Params, catalog: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(OOF truth from the catalog's training slices, test truth from ``paths.answer_key`` or None)."""
    tr = catalog[catalog["split"] == "train"].set_index("sop_uid")[L].astype(float)
    test = None
    if P.paths.answer_key:
        key = P.data_root / P.paths.answer_key
        if key.is_file():
            test, _ = read_labels(key, values="binary")
            test = test.dropna()
    return tr, test


@dataclass
class EnsembleReport:
    """What :func:`run_ensemble` returns."""

    table: pd.DataFrame  # one row per stage: oof/test wll, ECE, mean AUC
    metrics: dict
    submission: Path
    filled_with_prior: list[str]
    blend: Blend
    stages: dict[str, Stage]
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
    cat = load_catalog(P.work_dir)
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
    for name, st in [*stages.items(), ("ensemble", Stage("ensemble", bl.oof, bl.test))]:
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
    submission = {"path": str(sub_path.relative_to(P.reports_dir)), "images": len(sample_ids),
                  "rows": 6 * len(sample_ids), "filled_with_prior": filled, "method": P.ensemble.method,
                  "members": members, "weights": bl.weights, "fold_weights": bl.fold_weights, "note": bl.note,
                  "scored_against": None if y_test is None else P.paths.answer_key,
                  "sources": {n: st.source for n, st in stages.items()}, "offered": offers}
    metrics = update_metrics(P, {"stages": out, "prior": prior_scores, "submission": submission})
    return EnsembleReport(stage_table(metrics), metrics, sub_path, filled, bl, stages, y_oof, y_test)


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


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------
def plot_stages(table: pd.DataFrame):
    """Bar chart of OOF and test weighted log loss per stage, with the prior-only baseline as a line."""
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

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
    import matplotlib.pyplot as plt

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
