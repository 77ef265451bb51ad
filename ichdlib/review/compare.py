"""``ichd compare``: two or more runs side by side.

A run is named by its reports folder (``reports/<run>``, holding ``metrics.json``), by its params file, or by
its run name (``demo`` for ``reports/demo``). The comparison has four tables, all
``pandas.DataFrame``: the stage table (OOF / test weighted log loss, AUC of ``any``, ECE), per-class OOF log
loss differences against the first run, wall time per notebook (``timings.json``), and the params that differ
(``params.yaml``, written next to the reports by every notebook). :meth:`Comparison.markdown` prints them;
:meth:`Comparison.figure` draws the stage losses. In a notebook::

    from ichdlib.review.compare import compare_runs
    cmp = compare_runs("../reports/demo", "../reports/demo_seed1")
    display(cmp.stages); cmp.figure()
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ichdlib.config import load_params
from ichdlib.files import nested_get as _get
from ichdlib.labels import LABELS
from ichdlib.layout import RunLayout

#: (split, metric path in metrics.json, column label) of the stage table.
STAGE_METRICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("oof", ("wll",), "OOF wLL"),
    ("test", ("wll",), "test wLL"),
    ("oof", ("auc", "any"), "OOF AUC any"),
    ("test", ("auc", "any"), "test AUC any"),
    ("oof", ("ece",), "OOF ECE"),
    ("test", ("ece",), "test ECE"),
)
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def resolve_reports(spec: str | Path) -> Path:
    """The reports folder of ``spec``: a reports folder, a params YAML, or a run name under ``reports/``."""
    p = Path(spec)
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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def load_run(spec: str | Path) -> Run:
    """Read a run's ``metrics.json``, ``timings.json`` (optional) and ``params.yaml`` (optional)."""

    rep = resolve_reports(spec)
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
        params = _flatten(yaml.safe_load(params_file.read_text()) or {})
    return Run(rep.resolve().name, rep, metrics, timings, params)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _unique_names(runs: list[Run]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.reports.resolve().parent.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name
            for r in runs]


@dataclass
class Comparison:
    """Side-by-side tables of two or more runs (missing values are None, shown as blanks)."""

    names: list[str]
    stages: pd.DataFrame
    per_class: pd.DataFrame
    times: pd.DataFrame
    params: pd.DataFrame

    def markdown(self, digits: int = 4) -> str:
        """All four tables as GitHub markdown."""
        first, last = self.names[0], self.names[-1]
        parts = [f"# Runs compared: {', '.join(f'`{n}`' for n in self.names)}", "",
                 "## Stages (weighted log loss and ECE: lower is better; AUC: higher is better)", "",
                 _md(self.stages, digits), "",
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
            parts += ["", f"Differences (Δ) are `{last}` minus `{first}`."]
        return "\n".join(parts) + "\n"

    def figure(self) -> Any:
        """OOF and test weighted log loss per stage, one bar per run."""
        import matplotlib.pyplot as plt  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=False)
        metric = self.stages.index.str.split(" | ", regex=False).str[1]
        for ax, col in zip(axes, ("OOF wLL", "test wLL"), strict=True):
            t = self.stages[metric == col][self.names]
            if not len(t):
                ax.axis("off")
                continue
            t.index = t.index.str.split(" | ", regex=False).str[0]
            x = np.arange(len(t))
            w = 0.8 / len(self.names)
            for j, n in enumerate(self.names):
                vals = pd.to_numeric(t[n], errors="coerce").to_numpy(dtype=float)
                ax.bar(x + (j - (len(self.names) - 1) / 2) * w, np.nan_to_num(vals), w, label=n)
            ax.set_xticks(x, t.index, rotation=20, ha="right", fontsize=8)
            ax.set(title=col + " (lower is better)", ylabel="weighted log loss")
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


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


def compare_runs(*specs: str | Path) -> Comparison:
    """Compare two or more runs (reports folders, params files or run names); see :class:`Comparison`."""
    if len(specs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(specs)}")
    runs = [load_run(s) for s in specs]
    names = _unique_names(runs)
    stage_names = list(dict.fromkeys(s for r in runs for s in (["prior"] + list(r.metrics["stages"]))))

    def metric(r: Run, stage: str, split: str, path: tuple[str, ...]) -> float | None:
        if stage == "prior":
            return _num(_get(r.metrics, "prior", split, *path)) if path == ("wll",) else None
        return _num(_get(r.metrics, "stages", stage, split, *path))

    rows_: list[dict[str, Any]] = []
    for st in stage_names:
        for split, path, label in STAGE_METRICS:
            vals = [metric(r, st, split, path) for r in runs]
            if all(v is None for v in vals):
                continue
            a, b = vals[0], vals[-1]
            rows_.append({"stage": st, "metric": label, **dict(zip(names, vals, strict=True)),
                          "Δ": None if a is None or b is None else b - a})
    stages = pd.DataFrame(rows_, columns=["stage", "metric", *names, "Δ"])
    stages.index = pd.Index([f"{s} | {m}" for s, m in zip(stages["stage"], stages["metric"], strict=True)],
                            name="stage | metric")
    stages = stages[[*names, "Δ"]]

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
    return Comparison(names, stages, per_class, times, params)


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="two or more reports folders (reports/<run>), params files or "
                                                 "run names")
    parser.add_argument("--out", type=Path, help="figure path (default: compare_<runs>.png next to the first "
                                                 "run's reports folder)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this markdown file")


def cli(args: argparse.Namespace) -> int:
    import matplotlib  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

    matplotlib.use("Agg")
    cmp = compare_runs(*args.runs)
    text = cmp.markdown()
    print(text)
    first = resolve_reports(args.runs[0])
    out = args.out or first.parent / ("compare_" + "_vs_".join(n.replace("/", "-") for n in cmp.names) + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = cmp.figure()
    fig.savefig(out, bbox_inches="tight", dpi=110)
    print(f"figure: {out}")
    if args.markdown:
        args.markdown.write_text(text)
        print(f"markdown: {args.markdown}")
    return 0
