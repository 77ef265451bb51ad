"""``ichd compare``: two or more runs side by side, with the noise in every difference.

A run is named by its reports folder (``reports/<run>``, holding ``metrics.json``), by its params file, by
its run name (``demo`` for ``reports/demo``) or by an MLflow run id (``docs/tracking.md``; its artifacts are
fetched from ``--tracking-uri``, ``MLFLOW_TRACKING_URI`` or a ``reports/*/mlflow.db``). The comparison has five
tables, all ``pandas.DataFrame``: the stage table (OOF / test weighted log loss and AUC of ``any``, each with its
95% interval from ``metrics.json``), the **paired differences** of every later run against the first (on the
images both runs scored, from ``predictions.parquet``: a paired bootstrap over patients for the weighted log
loss, DeLong's test for the AUC; ``beyond noise`` says whether the 95% interval excludes zero), per-class OOF
log loss differences, wall time per notebook (``timings.json``), and the params that differ (``params.yaml``).
:meth:`Comparison.markdown` prints them; :meth:`Comparison.figure` draws the losses with their intervals and
the differences. In a notebook::

    from ichdlib.review.compare import compare_runs
    cmp = compare_runs("../reports/demo", "../reports/demo_seed1")
    display(cmp.stages); cmp.figure()
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ichdlib import stats, tracking
from ichdlib.config import load_params
from ichdlib.ensemble.intervals import read_predictions, stage_arrays, stages_in
from ichdlib.files import nested_get as _get
from ichdlib.labels import LABELS
from ichdlib.layout import RunLayout

#: (split, metric path in metrics.json, column label) of the stage table.
STAGE_METRICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("oof", ("wll",), "OOF wLL"),
    ("test", ("wll",), "test wLL"),
    ("oof", ("auc", "any"), "OOF AUC any"),
    ("test", ("auc", "any"), "test AUC any"),
)
#: What a reader should expect between two runs that differ in nothing that matters (README, "What is
#: reproducible"): the same code and params on another CPU type moved the demo's wLL by a few thousandths.
DRIFT_NOTE = ("Expected run-to-run drift: every random stream is seeded, so a rerun on the same machine gives "
              "identical numbers; on another CPU type (or another seed) training drifts, by a few thousandths of "
              "wLL on the demo. A difference whose 95% interval includes 0 is within the noise of these images: "
              "it does not show that one run is better.")
#: params keys that say where a run lives rather than what it computed.
IGNORED_PARAMS = ("root", "run", "paths.")


@dataclass
class Run:
    """One run's recorded outputs."""

    name: str
    reports: Path
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    #: ``predictions.parquet`` by split (see :mod:`ichdlib.ensemble.intervals`), None for older runs.
    predictions: dict[str, pd.DataFrame] | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def resolve_reports(spec: str | Path, tracking_uri: str | None = None) -> Path:
    """The reports folder of ``spec``: a reports folder, a params YAML, a run name under ``reports/``, or an
    MLflow run id (its artifacts fetched into a temporary folder)."""
    p = Path(spec)
    if not p.exists() and tracking.is_run_id(str(spec)):
        return _fetched(str(spec), tracking_uri)
    here = RunLayout.of_reports(p)
    if p.is_file() and p.suffix in {".yaml", ".yml"}:
        return load_params(p).layout.reports
    if p.is_dir() and here.metrics.is_file():
        return p
    if p.is_dir() and here.params_copies()[1].is_file() and not here.metrics.exists():
        return load_params(here.params_copies()[1]).layout.reports
    if not p.exists() and len(p.parts) == 1 and RunLayout.of_reports(Path("reports") / p).metrics.is_file():
        return Path("reports") / p
    what = "has no metrics.json (run notebook 05 first)" if p.is_dir() else "does not exist"
    raise FileNotFoundError(f"{spec}: {what}; give a reports folder (reports/<run>), a params file or a run name")


_FETCHED: dict[str, tuple[Path, str]] = {}


def _fetched(run_id: str, uri: str | None) -> Path:
    """An MLflow run's artifacts in a temporary folder (removed when the process ends)."""
    if run_id not in _FETCHED:
        tmp = Path(tempfile.mkdtemp(prefix="ichd-compare-"))
        atexit.register(shutil.rmtree, tmp, True)
        _FETCHED[run_id] = tracking.download_run(run_id, tmp, uri)
    return _FETCHED[run_id][0]


def load_run(spec: str | Path, tracking_uri: str | None = None) -> Run:
    """Read a run's ``metrics.json``, ``timings.json``, ``params.yaml`` and ``predictions.parquet`` (the last
    three optional)."""

    rep = resolve_reports(spec, tracking_uri)
    L = RunLayout.of_reports(rep)
    metrics = _read_json(L.metrics)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("stages"), dict):
        raise ValueError(f"{L.metrics}: no 'stages' table (not written by notebook 05?)")
    timings: dict[str, float] = {}
    if L.timings.is_file():
        raw = _read_json(L.timings)
        timings = {k: float(v["seconds"]) for k, v in raw.items() if isinstance(v, dict) and "seconds" in v}
    params = None
    params_file = L.params_copies()[1]
    if params_file.is_file():
        params = tracking.flatten(yaml.safe_load(params_file.read_text()) or {})
    preds = read_predictions(L.predictions) if L.predictions.is_file() else None
    fetched = _FETCHED.get(str(spec))
    name = f"{fetched[1]}@{str(spec)[:8]}" if fetched else rep.resolve().name
    return Run(name, rep, metrics, timings, params, preds)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _unique_names(runs: list[Run]) -> list[str]:
    """Column names: run names, qualified by their parent folder where two share one, numbered where the same
    run is given twice (``demo``, ``demo (2)``)."""
    names = [r.name for r in runs]
    folders = {n: {r.reports.resolve() for r in runs if r.name == n} for n in names}
    names = [f"{r.reports.resolve().parent.parent.name}/{r.name}" if len(folders[r.name]) > 1 else r.name
             for r in runs]
    out: list[str] = []
    for n in names:
        out.append(n if n not in out else f"{n} ({sum(o == n or o.startswith(n + ' (') for o in out) + 1})")
    return out


@dataclass
class Comparison:
    """Side-by-side tables of two or more runs (missing values are None, shown as blanks)."""

    names: list[str]
    stages: pd.DataFrame
    per_class: pd.DataFrame
    times: pd.DataFrame
    params: pd.DataFrame
    #: Paired differences of each later run against the first: ``run, stage, metric, Δ, lo, hi, p, beyond noise,
    #: images, groups, method``.
    differences: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: 95% intervals of the stage table's figures: ``{(row, run): (lo, hi)}``.
    intervals: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def markdown(self, digits: int = 4) -> str:
        """All tables as GitHub markdown."""
        first, last = self.names[0], self.names[-1]
        parts = [f"# Runs compared: {', '.join(f'`{n}`' for n in self.names)}", "",
                 "## Stages (weighted log loss: lower is better; AUC: higher is better; [95% interval])", "",
                 _md(self._stages_with_ci(digits), digits), "",
                 f"## Paired differences against `{first}` (same images in both runs)", ""]
        if len(self.differences):
            parts += [_md(self._differences_text(digits), digits), "",
                      "Δ is the later run minus the first (wLL: negative is better; AUC: positive is better). "
                      "wLL: paired bootstrap over patients (studies where no patient id); AUC: DeLong's test on "
                      "the same images. **yes** in *beyond noise*: the 95% interval excludes 0."]
        else:
            parts.append("(no paired differences: a run lacks predictions.parquet; rerun notebook 05)")
        parts += ["", DRIFT_NOTE, *[f"\n{n}" for n in self.notes], "",
                  f"## Per-class OOF log loss, difference against `{first}` (negative: better than `{first}`)", "",
                  _md(self.per_class, digits, signed=True) if len(self.per_class) else "(no stage in common)", "",
                  "## Wall time per notebook (seconds, last real run)", "",
                  _md(self.times, 0) if len(self.times) else "(no timings.json: runs made before timings were kept)",
                  "", "## Params that differ", ""]
        if self.params is None or not len(self.params):
            parts.append("(none)" if self.params is not None else "(params.yaml missing in a reports folder)")
        else:
            parts.append(_md(self.params, digits))
        if len(self.names) > 2:
            parts += ["", f"Differences (Δ) in the stage table are `{last}` minus `{first}`."]
        return "\n".join(parts) + "\n"

    def _stages_with_ci(self, digits: int) -> pd.DataFrame:
        """The stage table as text: each figure with its interval from metrics.json where there is one."""
        out = self.stages.astype(object).copy()
        for (row, run), (lo, hi) in self.intervals.items():
            v = self.stages.loc[row, run]
            if v is not None and not pd.isna(v):
                out.loc[row, run] = f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
        return out

    def _differences_text(self, digits: int) -> pd.DataFrame:
        d = self.differences
        rows = []
        for _, r in d.iterrows():
            ci = "" if r["lo"] is None or pd.isna(r["lo"]) else f"[{r['lo']:+.{digits}f}, {r['hi']:+.{digits}f}]"
            rows.append({"Δ": r["Δ"], "95% CI": ci, "p": _p_text(r["p"]),
                         "beyond noise": "**yes**" if r["beyond noise"] else "no", "images": r["images"],
                         "patients": r["groups"]})
        idx = [f"{r['stage']} | {r['metric']}" if len(self.names) == 2 else f"{r['run']}: {r['stage']} | {r['metric']}"
               for _, r in d.iterrows()]
        return pd.DataFrame(rows, index=pd.Index(idx, name="stage | metric"))

    def figure(self) -> Any:
        """OOF and test weighted log loss per stage, one point per run with its 95% interval (the axis spans the
        data, not 0), and the paired differences with their intervals against a line at 0."""
        import matplotlib.pyplot as plt  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

        metric = self.stages.index.str.split(" | ", regex=False).str[1]
        stage = self.stages.index.str.split(" | ", regex=False).str[0]
        cols = [c for c in ("OOF wLL", "test wLL") if ((metric == c) & (stage != "prior")).any()]
        has_diff = len(self.differences) and self.differences["metric"].str.contains("wLL").any()
        fig, axes = plt.subplots(1, len(cols) + bool(has_diff), figsize=(5.2 * (len(cols) + bool(has_diff)), 3.8),
                                 squeeze=False)
        axes = list(axes[0])
        for ax, col in zip(axes, cols, strict=False):
            t = self.stages[(metric == col) & (stage != "prior")][self.names]
            rows = list(t.index)
            x = np.arange(len(t))
            w = 0.7 / len(self.names)
            for j, n in enumerate(self.names):
                vals = pd.to_numeric(t[n], errors="coerce").to_numpy(dtype=float)
                ci = [self.intervals.get((r, n)) for r in rows]
                err = np.array([[v - c[0], c[1] - v] if c else [0, 0] for v, c in zip(vals, ci, strict=True)]).T
                ax.errorbar(x + (j - (len(self.names) - 1) / 2) * w, vals, yerr=np.nan_to_num(err), fmt="o", ms=5,
                            capsize=3, label=n)
            ax.set_xticks(x, [r.split(" | ")[0] for r in rows], rotation=20, ha="right", fontsize=8)
            ax.set(title=f"{col} with 95% interval (lower is better)", ylabel="weighted log loss")
            ax.margins(y=0.15)
            ax.legend(fontsize=8)
        if not has_diff:
            fig.tight_layout()
            return fig
        from matplotlib.ticker import MaxNLocator  # noqa: PLC0415  (plotting loads only to draw)

        ax = axes[-1]
        d = self.differences[self.differences["metric"].str.contains("wLL")]
        y = np.arange(len(d))[::-1]
        err = np.nan_to_num(np.vstack([d["Δ"] - d["lo"].astype(float), d["hi"].astype(float) - d["Δ"]]))
        colours = ["tab:red" if b else "tab:grey" for b in d["beyond noise"]]
        for k, c in enumerate(colours):
            ax.errorbar(d["Δ"].iloc[k], y[k], xerr=err[:, k:k + 1], fmt="o", color=c, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        labels = [f"{r['stage']} {r['metric'].split()[0]}" + (f" ({r['run']})" if len(self.names) > 2 else "")
                  for _, r in d.iterrows()]
        ax.set_yticks(y, labels, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.margins(y=0.2)
        ax.set(xlabel=f"Δ wLL (later run − {self.names[0]}), 95% CI",
               title="paired differences (red: beyond noise)")
        fig.tight_layout()
        return fig


def _p_text(p: Any) -> str:
    if p is None or pd.isna(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _md(df: pd.DataFrame, digits: int, signed: bool = False) -> str:
    """A markdown table; None/NaN as blanks; ``signed`` (or a ``Δ`` column) prints differences with a sign."""
    if isinstance(df.columns, pd.MultiIndex):
        cols = [" ".join(str(c) for c in col if c) for col in df.columns]
    else:
        cols = [str(c) for c in df.columns]

    def cell(v: Any, col: str) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
        if isinstance(v, float):
            return f"{v:+.{digits}f}" if signed or col.endswith("Δ") else f"{v:.{digits}f}"
        return str(v)

    head = [str(df.index.name or "")] + cols
    ncols = len(head) + str(df.index.name or "").count(" | ")  # "stage | metric" is two columns
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * ncols]
    for idx, row in zip(df.index, df.itertuples(index=False), strict=True):
        lines.append("| " + " | ".join([str(idx)] + [cell(v, c) for v, c in zip(row, cols, strict=True)]) + " |")
    return "\n".join(lines)


def compare_runs(*specs: str | Path, tracking_uri: str | None = None, n_boot: int = 1000,
                 seed: int = 0) -> Comparison:
    """Compare two or more runs (reports folders, params files, run names or MLflow run ids); see
    :class:`Comparison`. ``n_boot`` and ``seed``: the paired bootstrap of the wLL differences."""
    if len(specs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(specs)}")
    runs = [load_run(s, tracking_uri) for s in specs]
    names = _unique_names(runs)
    stage_names = list(dict.fromkeys(s for r in runs for s in (["prior"] + list(r.metrics["stages"]))))

    def entry(r: Run, stage: str, split: str) -> dict[str, Any]:
        node = _get(r.metrics, "prior", split) if stage == "prior" else _get(r.metrics, "stages", stage, split)
        return node if isinstance(node, dict) else {}

    def metric(r: Run, stage: str, split: str, path: tuple[str, ...]) -> float | None:
        if stage == "prior" and path != ("wll",):
            return None
        return _num(_get(entry(r, stage, split), *path))

    def interval(r: Run, stage: str, split: str, path: tuple[str, ...]) -> tuple[float, float] | None:
        ci = _get(entry(r, stage, split), path[0] + "_ci", *path[1:])
        return (float(ci[0]), float(ci[1])) if isinstance(ci, list) and len(ci) == 2 and None not in ci else None

    rows_: list[dict[str, Any]] = []
    intervals: dict[tuple[str, str], tuple[float, float]] = {}
    for st in stage_names:
        for split, path, label in STAGE_METRICS:
            vals = [metric(r, st, split, path) for r in runs]
            if all(v is None for v in vals):
                continue
            a, b = vals[0], vals[-1]
            rows_.append({"stage": st, "metric": label, **dict(zip(names, vals, strict=True)),
                          "Δ": None if a is None or b is None else b - a})
            for n, r in zip(names, runs, strict=True):
                ci = interval(r, st, split, path)
                if ci:
                    intervals[(f"{st} | {label}", n)] = ci
    stages = pd.DataFrame(rows_, columns=["stage", "metric", *names, "Δ"])
    stages.index = pd.Index([f"{s} | {m}" for s, m in zip(stages["stage"], stages["metric"], strict=True)],
                            name="stage | metric")
    stages = stages[[*names, "Δ"]]
    differences, notes = paired_differences(runs, names, n_boot=n_boot, seed=seed)

    common = [s for s in runs[0].metrics["stages"] if all(s in r.metrics["stages"] for r in runs[1:])]
    rows = []
    for n, r in zip(names[1:], runs[1:], strict=True):
        for st in common:
            row: dict[str, Any] = {"run": n, "stage": st}
            for c in LABELS:
                a = _num(_get(runs[0].metrics, "stages", st, "oof", "per_class_ll", c))
                b = _num(_get(r.metrics, "stages", st, "oof", "per_class_ll", c))
                row[c] = None if a is None or b is None else b - a
            rows.append(row)
    per_class = pd.DataFrame(rows, columns=["run", "stage", *LABELS])
    per_class.index = pd.Index([f"{r} {s}" if len(names) > 2 else s for r, s in zip(per_class["run"],
                                per_class["stage"], strict=True)], name="stage")
    per_class = per_class[list(LABELS)]

    nbs = sorted({k for r in runs for k in r.timings})
    times = pd.DataFrame({n: [r.timings.get(k) for k in nbs] for n, r in zip(names, runs, strict=True)},
                         index=pd.Index([k.removesuffix(".ipynb") for k in nbs], name="notebook"))
    if len(times):
        times.loc["total"] = [sum(t) if len(t := [v for v in times[n].iloc[:len(nbs)] if pd.notna(v)]) == len(nbs)
                              else None for n in names]

    if all(r.params is not None for r in runs):
        keys = sorted({k for r in runs for k in r.params or {}})
        keys = [k for k in keys if not (k in IGNORED_PARAMS or k.startswith(tuple(p for p in IGNORED_PARAMS
                                                                                    if p.endswith("."))))]
        diff = {k: [_show((r.params or {}).get(k, "(unset)")) for r in runs] for k in keys}
        diff = {k: v for k, v in diff.items() if len(set(v)) > 1}
        params = pd.DataFrame.from_dict(diff, orient="index", columns=names)
        params.index.name = "param"
    else:
        params = None  # type: ignore[assignment]
    return Comparison(names, stages, per_class, times, params, differences, intervals, notes)


DIFF_COLUMNS = ["run", "stage", "metric", "Δ", "lo", "hi", "p", "beyond noise", "images", "groups", "method"]


def paired_differences(runs: list[Run], names: list[str], n_boot: int = 1000,
                       seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Each later run minus the first, per stage both scored and split: wLL by a paired bootstrap over the
    first run's patients (:func:`ichdlib.stats.paired_wll`), AUC of ``any`` by DeLong's paired test, on the
    images both runs predicted with the same truth. Returns the table and notes on what was left out."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    base = runs[0]
    if base.predictions is None:
        return pd.DataFrame(columns=DIFF_COLUMNS), [f"`{names[0]}` has no predictions.parquet (rerun notebook 05)"]
    for n, r in zip(names[1:], runs[1:], strict=True):
        if r.predictions is None:
            notes.append(f"`{n}` has no predictions.parquet (rerun notebook 05): no paired differences")
            continue
        same = r.reports.resolve() == base.reports.resolve()
        for split in ("oof", "test"):
            fa, fb = base.predictions.get(split), r.predictions.get(split)
            if fa is None or fb is None:
                continue
            ids = fa.index.intersection(fb.index, sort=False)
            ya = fa.loc[ids, [f"y|{c}" for c in LABELS]].to_numpy(np.float64)
            yb = fb.loc[ids, [f"y|{c}" for c in LABELS]].to_numpy(np.float64)
            agree = (ya == yb).all(axis=1)
            if not agree.all():
                notes.append(f"{split}: {int((~agree).sum())} image(s) have different truth in `{n}`; left out")
            ids, y = ids[agree], ya[agree]
            if len(ids) < max(len(fa), len(fb)):
                notes.append(f"{split}: {len(ids)} image(s) in common of {len(fa)} (`{names[0]}`) and {len(fb)} "
                             f"(`{n}`)")
            if not len(ids):
                continue
            groups = fa.loc[ids, "group"].to_numpy(str)
            for stage in [s for s in stages_in(fa) if s in stages_in(fb)]:
                pa, pb = stage_arrays(fa.loc[ids], stage), stage_arrays(fb.loc[ids], stage)
                common = {"run": n, "stage": stage, "images": int(len(ids)), "groups": int(len(set(groups)))}
                w = stats.paired_wll(y, pb, pa, groups=groups, n_boot=n_boot, seed=seed)
                rows.append({**common, "metric": f"{'OOF' if split == 'oof' else 'test'} wLL", "Δ": w["delta"],
                             "lo": w["lo"], "hi": w["hi"], "p": w["p_value"], "beyond noise": w["excludes_zero"],
                             "method": f"paired bootstrap over patients ({n_boot})"})
                if 0 < y[:, 0].sum() < len(y):
                    d = stats.delong_paired(y[:, 0], pb[:, 0], pa[:, 0])
                    rows.append({**common, "metric": f"{'OOF' if split == 'oof' else 'test'} AUC any",
                                 "Δ": d["delta"], "lo": d["lo"], "hi": d["hi"], "p": d["p_value"],
                                 "beyond noise": d["excludes_zero"], "method": "DeLong (paired)"})
        if same:
            notes.append(f"`{n}` is the same run as `{names[0]}`: identical predictions, every difference is 0.")
    return pd.DataFrame(rows, columns=DIFF_COLUMNS), notes


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="two or more reports folders (reports/<run>), params files or "
                                                 "run names")
    parser.add_argument("--out", type=Path, help="figure path (default: compare_<runs>.png next to the first "
                                                 "run's reports folder)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--tracking-uri", help="MLflow store to find run ids in (default: MLFLOW_TRACKING_URI, "
                                                "then reports/*/mlflow.db)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the paired wLL "
                                                                  "differences (default 1000)")


def cli(args: argparse.Namespace) -> int:
    import matplotlib  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

    matplotlib.use("Agg")
    cmp = compare_runs(*args.runs, tracking_uri=args.tracking_uri, n_boot=args.n_boot)
    text = cmp.markdown()
    print(text)
    first = resolve_reports(args.runs[0], args.tracking_uri)
    folder = Path("reports") if str(args.runs[0]) in _FETCHED else first.parent
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in "_vs_".join(cmp.names))
    out = args.out or folder / f"compare_{safe}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = cmp.figure()
    fig.savefig(out, bbox_inches="tight", dpi=110)
    print(f"figure: {out}")
    if args.markdown:
        args.markdown.write_text(text)
        print(f"markdown: {args.markdown}")
    return 0
