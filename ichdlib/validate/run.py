"""``ichd validate``: score a bundle (or several) on an external dataset, study by study, with confidence
intervals; the output contract other tools read.

``ichd validate DATA --bundle B [--bundle B2 ...] --out DIR [--format auto|cq500|ctich|dicom] [--labels CSV]``

Each study is read by :mod:`ichdlib.validate.readers` (series chosen by :mod:`ichdlib.serve.series` for the
first bundle's training thickness; thin-only studies as slabs), predicted by the bundle's whole pipeline
(:class:`ichdlib.serve.pipeline.Predictor`: 2D CNNs with TTA -> sequence models -> blend, exactly as
``ichd predict``), and its slice probabilities become one probability per label
(:func:`ichdlib.serve.operating.study_probability`; ``max`` over slices by default, ``--aggregate``).

Outputs under ``DIR`` (the names are a contract):

- ``studies.csv``: ``study, series_uid, n_slices, epidural, intraparenchymal, intraventricular,
  subarachnoid, subdural, any`` (the first bundle; ``study`` is the CQ500 ``reads.csv`` name, the CT-ICH
  ``PatientNumber``, or the StudyInstanceUID; ``series_uid`` empty for NIfTI);
- ``labels.csv``: the reference labels used (``study`` + the six labels), so that ``metrics.json`` can be
  recomputed from ``studies.csv`` and ``labels.csv`` alone (:func:`ichdlib.validate.metrics.compute_metrics`);
- ``metrics.json``: ``{"n_studies": N, "labels": {"any": {"auc", "auc_ci", "sensitivity", "specificity",
  "threshold", "n_pos", "n_neg", ...}, ...}, ...}`` plus the PPV/NPV, Wilson intervals, counts, the bundle,
  thresholds' origin, the paired comparison (``comparison``) and the pointing game (``pointing``);
- ``series.csv``: every series of every study, its role and why it was (not) read; ``problems.csv`` as in
  ``ichd predict``; ``slices.csv``: per-slice final probabilities of the first bundle;
- ``report.md`` with the tables and ``figures/roc.png`` (operating point marked), ``figures/reliability.png``;
- with several bundles: ``compare/<k>_<name>/studies.csv`` and ``metrics.json`` for each further bundle.

Thresholds are the first bundle's operating point (chosen at export on the internal OOF studies) unless
``--threshold`` is given. No NaN reaches ``studies.csv`` or ``metrics.json``: a study whose models return
non-finite values is listed in ``problems.csv`` and not scored.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve
from tqdm.auto import tqdm

from ichdlib.files import json_ready, write_text
from ichdlib.labels import LABELS
from ichdlib.layout import FIGURES, METRICS
from ichdlib.metrics import calibration
from ichdlib.review.cam import STANDARD_TOLERANCE, explain
from ichdlib.review.pointing import peak_distances
from ichdlib.serve.bundle import Bundle, export
from ichdlib.serve.discover import WARNING, problem, problems_frame
from ichdlib.serve.operating import AGGREGATES, study_probability
from ichdlib.serve.pipeline import Predictor, inplane_problems, label_thresholds, study_cache
from ichdlib.stages import StageReport
from ichdlib.validate.metrics import (
    PROB_COLUMNS,
    REPORT_LABELS,
    STUDY_COLUMNS,
    compare_bundles,
    compute_metrics,
    joined,
    metrics_table,
)
from ichdlib.validate.readers import (
    FORMATS,
    ExternalData,
    detect_format,
    load_item,
    read_cq500,
    read_ctich,
    read_dicom,
)

#: The paper's external results (any-ICH AUC), shown next to ours in the report.
PAPER = {"cq500": 0.949, "ctich": 0.964}


@dataclass
class Validation:
    """What :func:`validate` returns (and wrote under ``out``)."""

    out: Path
    data: ExternalData
    studies: pd.DataFrame
    metrics: dict[str, Any]
    series: pd.DataFrame
    problems: pd.DataFrame
    others: dict[str, pd.DataFrame] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def read_external(data: str | os.PathLike, fmt: str = "auto", labels: str | os.PathLike | None = None,
                  training_mm: float = 5.0, progress: bool = False) -> ExternalData:
    """Read a dataset in the given (or detected) format."""
    fmt = detect_format(data) if fmt == "auto" else fmt
    if fmt == "cq500":
        return read_cq500(data, training_mm, progress)
    if fmt == "ctich":
        return read_ctich(data)
    if fmt == "dicom":
        return read_dicom(data, labels, training_mm, progress)
    raise ValueError(f"--format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")


def _bundle_name(b: Bundle, k: int) -> str:
    return f"{k}_{Path(b.source).name or b.manifest.get('run', 'bundle')}"


def _pointing(predictor: Predictor, case: Any, frame: pd.DataFrame, thr_any: float) -> list[dict]:
    """Pointing-game rows for the true-positive slices with a lesion mask: per label found on the slice
    (slice labels where the dataset has them, and ``any``), whether the Grad-CAM peak falls in the mask."""
    rows = []
    key = next(iter(predictor.cnn))
    model = predictor.bundle.cnn[key].models[0]  # the first backbone's first fold, as ichd predict --cam explains
    cache = None
    plan = predictor.inplane(case.loaded)
    p_any = frame["p_any"].to_numpy()
    for i, mask in enumerate(case.masks):
        if not mask.any() or p_any[i] < thr_any:
            continue
        labels = ["any"]
        if case.slice_labels is not None:
            labels += [c for c in LABELS[1:] if c in case.slice_labels.columns and case.slice_labels[c].iloc[i]]
        if cache is None:
            cache, rows_idx = study_cache(case.loaded, int(model.spec.size), plan)
        box = plan.boxes[i]  # the map over the slice's in-plane box, back on the slice's (and mask's) pixel grid
        maps = list(box.to_original(explain(model, cache[rows_idx[i]][None], labels, predictor.P.cam,
                                            out_size=box.size)[0]))
        dist = peak_distances(maps, [mask] * len(maps))
        tol = STANDARD_TOLERANCE * mask.shape[0] / 224.0
        for c, d in zip(labels, dist, strict=True):
            rows.append({"study": case.loaded.scan.study_uid, "slice_index": i, "label": c, "hit": bool(d == 0),
                         "hit_tolerance": bool(d <= tol)})
    return rows


def _pointing_summary(rows: list[dict]) -> dict[str, Any] | None:
    if not rows:
        return None
    t = pd.DataFrame(rows)
    out = {"rule": "Grad-CAM peak of the first fold model inside the lesion mask, true-positive slices",
           "tolerance": "15 px at 224 px, scaled to the slice size", "labels": {}}
    for c in REPORT_LABELS:
        g = t[t["label"] == c]
        if len(g):
            out["labels"][c] = {"n_slices": len(g), "hit_rate": float(g["hit"].mean()),
                                "hit_rate_tolerance": float(g["hit_tolerance"].mean())}
    return out


def validate(data: str | os.PathLike, bundles: list[Any], out: str | os.PathLike, *, fmt: str = "auto",
             labels: str | os.PathLike | None = None, aggregate: str = "max",
             threshold: float | None = None, device: str | None = "auto", n_boot: int = 1000, seed: int = 0,
             pointing: bool = True, progress: bool = False, fov_norm: bool = True) -> Validation:
    """Score ``bundles`` (folders or :class:`ichdlib.serve.bundle.Bundle`) on the dataset at ``data`` and
    write the outputs under ``out`` (module docstring). One bad study never stops the run. ``fov_norm``: the
    in-plane field-of-view normalisation (:mod:`ichdlib.serve.inplane`; ``series.csv`` ``fov_mm``/``inplane``)."""

    t0 = time.perf_counter()
    if not bundles:
        raise ValueError("give at least one --bundle")
    if aggregate not in AGGREGATES:
        raise ValueError(f"--aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold {threshold}: expected a probability between 0 and 1")
    bundles = [b if hasattr(b, "cnn") else Bundle.load(b) for b in bundles]
    first = bundles[0]
    ds = read_external(data, fmt, labels, first.training_mm, progress)
    thr = label_thresholds(threshold, first)
    problems = list(ds.problems)
    if threshold is None and first.aggregate != aggregate:
        problems.append(problem(f"the bundle's thresholds were chosen for '{first.aggregate}' study probabilities, "
                                f"this run aggregates with '{aggregate}'", severity=WARNING))
    predictors = [Predictor(b, device, fov_norm=fov_norm) for b in bundles]
    inplane: dict[tuple[str, str], str] = {}
    rows: list[list[dict]] = [[] for _ in bundles]
    slice_rows, point_rows = [], []
    for item in tqdm(ds.items, desc="studies", unit="study", disable=not progress):
        case, probs = load_item(item)
        problems += probs
        if case is None:
            continue
        for k, pred in enumerate(predictors):
            try:
                frame = pred.predict(case.loaded)
            except Exception as exc:  # one study that breaks a model must not stop the rest
                problems.append(problem(f"study {item.study}: prediction failed ({type(exc).__name__}: {exc})",
                                        study_uid=item.study, path=_where(item)))
                continue
            p = frame[[f"p_{c}" for c in PROB_COLUMNS]].to_numpy(float)
            if not np.isfinite(p).all():
                problems.append(problem(f"study {item.study}: the models returned non-finite probabilities; not "
                                        "scored", study_uid=item.study, path=_where(item)))
                continue
            study_p = study_probability(p, aggregate)
            rows[k].append({"study": item.study, "series_uid": item.scan.series_uid if item.scan else "",
                            "n_slices": len(frame), **dict(zip(PROB_COLUMNS, map(float, study_p), strict=True))})
            if k == 0:
                plan = pred.inplane(case.loaded)
                series_uid = item.scan.series_uid if item.scan else ""
                inplane[(item.study, series_uid)] = plan.note
                problems += inplane_problems(plan, item.study, series_uid, _where(item))
                slice_rows.append(frame[["slice_index", "z", *[f"p_{c}" for c in PROB_COLUMNS]]]
                                  .assign(study=item.study, sop_uid=frame["sop_uid"]))
                if pointing and case.masks is not None:
                    try:
                        point_rows += _pointing(pred, case, frame, thr["any"])
                    except Exception as exc:  # Grad-CAM trouble costs the pointing game, not the scores
                        problems.append(problem(f"study {item.study}: pointing game skipped ({type(exc).__name__}: "
                                                f"{exc})", study_uid=item.study, path=_where(item), severity=WARNING))
    studies = [pd.DataFrame(r, columns=STUDY_COLUMNS) for r in rows]
    names = [_bundle_name(b, k) for k, b in enumerate(bundles)]
    metrics = compute_metrics(studies[0], ds.labels, thr, n_boot, seed)
    metrics.update(_context(ds, first, thr, threshold, aggregate, studies[0], problems))
    metrics["pointing"] = _pointing_summary(point_rows)
    if len(bundles) > 1:
        metrics["comparison"] = {names[k]: compare_bundles(studies[0], studies[k], ds.labels)
                                 for k in range(1, len(bundles))}
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    v = Validation(Path(out), ds, studies[0], metrics, _with_inplane(ds.series, inplane), problems_frame(problems),
                   {names[k]: studies[k] for k in range(1, len(bundles))})
    slices = pd.concat(slice_rows, ignore_index=True) if slice_rows else pd.DataFrame()
    write_outputs(v, bundles, slices, thr, aggregate, n_boot, seed)
    return v


def _with_inplane(series: pd.DataFrame, notes: dict[tuple[str, str], str]) -> pd.DataFrame:
    """``series.csv`` with the in-plane note of each series read (``inplane``; empty: nothing done)."""
    if series.empty or "inplane" not in series.columns:
        return series
    series = series.copy()
    keys = zip(series["study"].astype(str), series["series_uid"].astype(str), strict=True)
    series["inplane"] = [notes.get(k, "") if r else "" for k, r in zip(keys, series["read"].astype(bool), strict=True)]
    return series


def _where(item: Any) -> str:
    if item.scan is not None and len(item.scan.slices):
        return str(Path(item.scan.slices["path"].iloc[0]).parent)
    return str(item.volume or "")


def _context(ds: ExternalData, bundle: Bundle, thr: dict[str, float], given: float | None, aggregate: str,
             studies: pd.DataFrame, problems: list[dict]) -> dict[str, Any]:
    m = bundle.manifest
    op = m.get("operating_point") or {}
    return {
        "format": ds.format, "data": str(ds.root), "label_source": ds.label_source,
        "n_scored": len(studies), "n_labelled": len(ds.labels), "n_problems": len(problems),
        "aggregate": aggregate,
        "thresholds": thr,
        "thresholds_from": ("--threshold" if given is not None else
                            f"bundle operating point ({op.get('rule')}, internal OOF studies)" if op else
                            "default 0.5 (the bundle records no operating point)"),
        "bundle": {"source": str(bundle.source), "run": m.get("run"), "created": m.get("created"),
                   "training_slice_thickness_mm": bundle.training_mm},
        "paper_any_auc": PAPER.get(ds.format),
    }


# --------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------
def write_outputs(v: Validation, bundles: list[Bundle], slices: pd.DataFrame, thr: dict[str, float],
                  aggregate: str, n_boot: int, seed: int) -> dict[str, Path]:
    """The files of the module docstring."""
    out = v.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.csv" for name in ("studies", "labels", "series", "problems", "slices")}
    write_text(paths["studies"], v.studies.to_csv(index=False))
    lab = v.data.labels.rename_axis("study").reset_index()
    write_text(paths["labels"], lab[["study", *LABELS]].to_csv(index=False))
    write_text(paths["series"], v.series.to_csv(index=False))
    write_text(paths["problems"], v.problems.to_csv(index=False))
    write_text(paths["slices"], slices.to_csv(index=False))
    for name, st in v.others.items():
        folder = out / "compare" / name
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "studies.csv", st.to_csv(index=False))
        k = int(name.split("_", 1)[0])
        m = compute_metrics(st, v.data.labels, label_thresholds(None, bundles[k]), n_boot, seed)
        write_text(folder / METRICS, json.dumps(json_ready(m), indent=1, allow_nan=False))
    paths["metrics"] = out / METRICS
    write_text(paths["metrics"], json.dumps(json_ready(v.metrics), indent=1, allow_nan=False))
    paths.update(write_figures(v, out / FIGURES))
    paths["report"] = write_report(v, out / "report.md")
    v.paths = paths
    return paths


def _curves(v: Validation) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:

    return joined(v.studies, v.data.labels), {n: joined(s, v.data.labels) for n, s in v.others.items()}


def plot_roc(v: Validation):
    """ROC per label (studies), the operating point marked; further bundles dashed."""

    both, others = _curves(v)
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    for ax, c in zip(axes.ravel(), REPORT_LABELS, strict=True):
        m = v.metrics["labels"][c]
        y = both[f"y_{c}"].to_numpy()
        ax.plot([0, 1], [0, 1], color="0.8", lw=1)
        if m["auc"] is None:
            ax.text(0.5, 0.5, f"{m['n_pos']} positive / {m['n_neg']} negative:\nno ROC", ha="center", va="center")
        else:
            fpr, tpr, _ = roc_curve(y, both[f"p_{c}"])
            ci = f" ({m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f})" if m["auc_ci"] else ""
            ax.plot(fpr, tpr, lw=2, label=f"AUC {m['auc']:.3f}{ci}")
            for name, o in others.items():
                if o[f"y_{c}"].nunique() == 2:
                    f2, t2, _ = roc_curve(o[f"y_{c}"], o[f"p_{c}"])
                    ax.plot(f2, t2, lw=1.5, ls="--", label=name)
            if m["sensitivity"] is not None and m["specificity"] is not None:
                ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="crimson", ms=8,
                        label=f"threshold {m['threshold']:.3g}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{c} (n={m['n_pos']}+{m['n_neg']})")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
    fig.tight_layout()
    return fig


def plot_reliability(v: Validation):
    """Reliability diagram per label (study probabilities vs observed frequency, 10 bins)."""

    both, _ = _curves(v)
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    if len(both):
        _, curves = calibration(both[[f"y_{c}" for c in LABELS]].to_numpy(float),
                                both[[f"p_{c}" for c in LABELS]].to_numpy(float), bins=10)
    for ax, c in zip(axes.ravel(), REPORT_LABELS, strict=True):
        ax.plot([0, 1], [0, 1], color="0.8", lw=1)
        if len(both):
            t = curves[(curves["label"] == c) & (curves["count"] > 0)]
            ax.plot(t["conf"], t["freq"], "o-")
            for _, r in t.iterrows():
                ax.annotate(str(int(r["count"])), (r["conf"], r["freq"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(c)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed frequency")
    fig.tight_layout()
    return fig


def write_figures(v: Validation, folder: Path) -> dict[str, Path]:

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, fn in (("roc", plot_roc), ("reliability", plot_reliability)):
        fig = fn(v)
        out[f"figure_{name}"] = folder / f"{name}.png"
        fig.savefig(out[f"figure_{name}"], dpi=90)
        plt.close(fig)
    return out


def _md(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def series_summary(series: pd.DataFrame) -> pd.DataFrame:
    """Series per role and how many of them were read."""
    if series.empty:
        return pd.DataFrame(columns=["role", "series", "read"])
    g = series.assign(read=series["read"].astype(bool)).groupby("role")
    return pd.DataFrame({"series": g.size(), "read": g["read"].sum()}).reset_index()


def write_report(v: Validation, path: Path) -> Path:
    """``report.md``: what was scored, the metrics table, comparison, pointing game, series, problems."""
    m = v.metrics
    lines = [f"# External validation: {m['data']}", "",
             f"Format **{m['format']}**, reference: {m['label_source']}. Bundle `{m['bundle']['source']}` (run "
             f"{m['bundle']['run']}, trained on {m['bundle']['training_slice_thickness_mm']:g} mm slices). "
             f"{m['n_scored']} studies scored, {m['n_labelled']} with reference labels, **{m['n_studies']} in the "
             f"metrics**; {m['n_problems']} problem(s) in `problems.csv`. Study probability: **{m['aggregate']}** "
             f"over slices; thresholds: {m['thresholds_from']}.", "",
             "AUC intervals are DeLong 95%; sensitivity, specificity, PPV and NPV intervals (in metrics.json) are "
             "Wilson 95%.", "", _md(metrics_table(m)), ""]
    if m.get("paper_any_auc") is not None:
        lines += [f"The 1st-place paper reported any-ICH AUC **{m['paper_any_auc']}** on the real "
                  f"{'CQ500' if m['format'] == 'cq500' else 'CT-ICH'} data.", ""]
    if m.get("comparison"):
        lines += ["## Paired comparison (DeLong, same studies)", ""]
        for name, comp in m["comparison"].items():
            rows = [{"label": c, "AUC first": f"{r['auc1']:.3f}", f"AUC {name}": f"{r['auc2']:.3f}",
                     "difference": f"{r['delta']:+.3f} ({r['lo']:+.3f} to {r['hi']:+.3f})", "p": f"{r['p_value']:.3g}"}
                    for c, r in comp["labels"].items() if r is not None]
            lines += [f"{comp['n_studies']} studies.", "", _md(pd.DataFrame(rows)), ""]
    if m.get("pointing"):
        rows = [{"label": c, "slices": r["n_slices"], "peak in mask": f"{r['hit_rate']:.3f}",
                 "within tolerance": f"{r['hit_rate_tolerance']:.3f}"} for c, r in m["pointing"]["labels"].items()]
        lines += ["## Pointing game on the dataset's lesion masks", "", m["pointing"]["rule"] + ".", "",
                  _md(pd.DataFrame(rows)), ""]
    lines += ["## Figures", "", "![ROC](figures/roc.png)", "", "![reliability](figures/reliability.png)", ""]
    if len(v.series):
        lines += ["## Series (series.csv)", "", _md(series_summary(v.series)), ""]
    if len(v.problems):
        top = v.problems["message"].str.replace(r"\s+", " ", regex=True).head(15)
        lines += ["## Problems (first 15 of problems.csv)", ""] + [f"- {t}" for t in top] + [""]
    return write_text(path, "\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Command line and notebook 07
# --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd validate``."""
    parser.add_argument("data", type=Path, help="the external dataset folder (CQ500, CT-ICH or DICOM layout)")
    parser.add_argument("--bundle", type=Path, action="append", required=True,
                        help="model bundle from 'ichd export' (repeat to compare bundles on the same studies)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (studies.csv, metrics.json, ...)")
    parser.add_argument("--format", choices=["auto", *FORMATS], default="auto", help="dataset layout (default auto)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="study-level labels CSV for --format dicom (StudyInstanceUID or PatientID + six labels)")
    parser.add_argument("--aggregate", choices=list(AGGREGATES), default="max",
                        help="slice -> study probability: max (default), top3 (mean of the 3 highest), mean")
    parser.add_argument("--threshold", type=float, default=None,
                        help="one threshold for every label (default: the bundle's operating point)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for auc_ci_bootstrap (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--no-pointing", action="store_true", help="skip the pointing game on lesion masks")
    parser.add_argument("--no-fov-norm", action="store_true",
                        help="do not resample series whose in-plane field of view lies outside the training range")


def summary_lines(v: Validation) -> list[str]:
    """What ``ichd validate`` prints."""
    m = v.metrics
    lines = [f"{m['format']}: {m['n_scored']} studies scored, {m['n_studies']} with reference labels in the metrics "
             f"({m['label_source']}); thresholds: {m['thresholds_from']}; study probability: {m['aggregate']}"]
    read = v.series[v.series["read"].astype(bool)] if len(v.series) else v.series
    if len(read):
        lines.append("series read: " + ", ".join(f"{n} {r}" for r, n in read["role"].value_counts().items())
                     + f" (of {len(v.series)} series; why: series.csv)")
    for c in REPORT_LABELS:
        r = m["labels"][c]
        auc = "AUC n/a" if r["auc"] is None else f"AUC {r['auc']:.3f}" + (
            f" [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]" if r["auc_ci"] else " [CI n/a]")

        def f(x: Any) -> str:
            return "n/a" if x is None else f"{x:.2f}"

        lines.append(f"  {c:<17} {auc}  sens {f(r['sensitivity'])} spec {f(r['specificity'])} "
                     f"@ {r['threshold']:.3g}  ({r['n_pos']} pos / {r['n_neg']} neg)")
    for name, comp in (m.get("comparison") or {}).items():
        r = comp["labels"].get("any")
        if r:
            lines.append(f"  vs {name}: any AUC {r['auc1']:.3f} vs {r['auc2']:.3f}, difference {r['delta']:+.3f} "
                         f"[{r['lo']:+.3f}, {r['hi']:+.3f}], DeLong p={r['p_value']:.3g}")
    if m.get("pointing"):
        lines.append("pointing game (Grad-CAM peak in the lesion mask, TP slices): " + ", ".join(
            f"{c} {r['hit_rate']:.2f} of {r['n_slices']}" for c, r in m["pointing"]["labels"].items()))
    if m.get("paper_any_auc") is not None:
        lines.append(f"paper (real data): any AUC {m['paper_any_auc']}")
    lines.append(f"{len(v.problems)} problem(s) in {v.out / 'problems.csv'}; report: {v.out / 'report.md'}")
    return lines


def cli(args: argparse.Namespace) -> int:
    """``ichd validate``: exit 0 when at least one study was scored, 1 when none could be."""
    v = validate(args.data, args.bundle, args.out, fmt=args.format, labels=args.labels, aggregate=args.aggregate,
                 threshold=args.threshold, device=args.device, n_boot=args.n_boot, seed=args.seed,
                 pointing=not args.no_pointing, progress=True, fov_norm=not args.no_fov_norm)
    print("\n".join(summary_lines(v)))
    return 0 if len(v.studies) else 1


def _ensure_phantom(data: Path, E: Any, seed: int, progress: bool) -> None:
    """The demo's external phantom at ``data``: written when missing, rewritten when the one there was drawn
    with other settings (layout, studies, seed, size, scanner); a folder that is not a phantom is never touched."""
    from ichdlib.phantom.layouts import generate_layout  # noqa: PLC0415  (the demo only: never for real data)

    want = {"layout": E.phantom, "studies": E.phantom_studies, "seed": seed, "size": E.phantom_size,
            "shift": E.phantom_shift}
    marker = data / "phantom_layout.json"
    if data.exists() and marker.is_file():
        have = json.loads(marker.read_text())
        if {k: have.get(k, "none" if k == "shift" else None) for k in want} == want:
            return
        shutil.rmtree(data)
    elif data.exists():
        return  # real data (or anything else) at that path: validated as it is
    generate_layout(data, E.phantom, E.phantom_studies, seed, E.phantom_size, progress=progress, shift=E.phantom_shift)


def run_external(P: Any, progress: bool = False) -> Validation:
    """Notebook 07: validate on ``P.external.data`` the bundle ``P.external.bundle`` (default: this run's
    own models, exported to ``work/<run>/bundle``) and any ``P.external.compare`` bundles; outputs under
    ``reports/<run>/<external.out>``. With ``external.phantom`` and no folder at ``data`` yet, the phantom is
    first written there in that layout (the demo)."""

    E = P.external
    if E.data is None:
        raise ValueError("params external.data is not set: no external dataset to validate on")
    data = P._resolve(E.data)
    if E.phantom is not None:
        _ensure_phantom(data, E, P.synth.seed + 1, progress)
    bundle: Any = P._resolve(E.bundle) if E.bundle is not None else export(P, P.layout.bundle, force=True)
    return validate(data, [bundle, *[P._resolve(b) for b in E.compare]], P.layout.external(E.out), fmt=E.format,
                    labels=P._resolve(E.labels) if E.labels is not None else None, aggregate=E.aggregate,
                    device=P.device, n_boot=E.n_boot, seed=P.seed, pointing=E.pointing, progress=progress,
                    fov_norm=E.fov_norm)


def run_stage(P: Any, force: bool = False) -> StageReport:
    """Stage 07 (:data:`ichdlib.stages.STAGES`): :func:`run_external` (always recomputed: its stamp decides
    whether it runs); the report's rows are the metrics table, its ``result`` the :class:`Validation`."""
    v = run_external(P)
    return StageReport("external", metrics_table(v.metrics).to_dict("records"), result=v)
