"""The run's report files: ``summary.md`` (the stage table from ``metrics.json``, key figures, executed
notebooks, this run's timings), ``timings.json`` (the seconds each notebook last really took) and the HTML
copies of the executed notebooks. Paths from :mod:`ichdlib.layout`."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ichdlib.config import Params
from ichdlib.files import nested_get as _get
from ichdlib.files import write_json
from ichdlib.stages import numbered_notebooks

#: Figure name prefixes listed in summary.md (everything else stays one click away in figures/).
KEY_FIGURES = ("01_composite", "02_curves", "02b_curves", "04_learning", "05_", "cam_any", "cam_viewer")


@dataclass
class StageResult:
    """What happened to one notebook."""

    stage: str
    notebook: str
    status: str  # "ran", "skipped", "failed"
    seconds: float = 0.0
    message: str = ""


def export_html(ipynb: Path) -> Path | None:
    """Write an HTML copy next to an executed notebook (best effort; returns None on failure)."""
    try:
        import nbformat  # noqa: PLC0415  (notebook machinery loads only to run notebooks)
        from nbconvert import HTMLExporter  # noqa: PLC0415

        body, _ = HTMLExporter().from_notebook_node(nbformat.read(ipynb, as_version=4))
        out = ipynb.with_suffix(".html")
        out.write_text(body, encoding="utf-8")
        return out
    except Exception as exc:  # an export problem must not fail a finished run
        print(f"  warning: HTML export of {ipynb.name} failed: {exc}", file=sys.stderr)
        return None


def last_timings(P: Params) -> dict[str, float]:
    """Seconds each notebook took the last time it really ran (``reports/<run>/timings.json``)."""
    path = P.layout.timings
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v["seconds"]) for k, v in data.items() if isinstance(v, dict) and "seconds" in v}


def record_timing(P: Params, notebook: str, seconds: float) -> None:
    """Merge one notebook's wall time into ``reports/<run>/timings.json`` (other entries kept)."""
    path = P.layout.timings
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[notebook] = {"seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(path, data)


def _fmt(v: Any) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_summary(P: Params, results: list[StageResult] | None = None) -> Path | None:
    """``reports/<run>/summary.md``: the stage table from metrics.json, key figures, executed notebooks."""
    L = P.layout
    rep = L.reports
    metrics_path = L.metrics
    lines = [f"# Run `{P.run}`", ""]
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        lines += ["## Weighted log loss by stage (lower is better)", "",
                  "| stage | OOF wLL | test wLL | OOF AUC any | test AUC any |", "|---|---|---|---|---|"]
        prior = m.get("prior") or {}
        if prior:
            lines.append(f"| prior (label frequency) | {_fmt(_get(prior, 'oof', 'wll'))} | "
                         f"{_fmt(_get(prior, 'test', 'wll'))} | | |")
        for name, s in (m.get("stages") or {}).items():
            lines.append(f"| {name} | {_fmt(_get(s, 'oof', 'wll'))} | {_fmt(_get(s, 'test', 'wll'))} | "
                         f"{_fmt(_get(s, 'oof', 'auc', 'any'))} | {_fmt(_get(s, 'test', 'auc', 'any'))} |")
        if any(str(name).startswith("cnn:") for name in (m.get("stages") or {})):
            lines += ["", f"`cnn:` rows score the test-time-augmented (TTA) probabilities of notebook 03 "
                          f"(`features.tta` = {P.features.tta} views); notebook 02 reports the single-view OOF loss "
                          f"of the same models, which differs slightly."]
        offered = (m.get("submission") or {}).get("offered") or {}
        lines += [""] + [f"Blend: {d['note']}." for d in offered.values() if d.get("note")] if offered else []
        pg = m.get("pointing_game") or {}
        if pg.get("per_class"):
            std = pg.get("standard_tolerance") or {}
            lines += ["", "## Grad-CAM pointing game (true-positive slices whose CAM peak falls in the lesion)", "",
                      f"{pg.get('method', '')} on `{pg.get('target_layer', '')}`; chance (lesion area share): "
                      f"{_fmt(_get(pg, 'chance', 'overall'))}", "",
                      "| label | strict hit rate | within 15 px @ 224 | slices |", "|---|---|---|---|"]
            for k, v in pg["per_class"].items():
                lines.append(f"| {k} | {_fmt(v)} | {_fmt(_get(std, 'per_class', k))} | {_fmt(_get(pg, 'n', k))} |")
            lines.append(f"| **all** | {_fmt(pg.get('overall'))} | {_fmt(std.get('overall'))} | "
                         f"{sum(v for v in (pg.get('n') or {}).values() if isinstance(v, int))} |")
    figs = sorted(L.figures.glob("*.png")) if L.figures.is_dir() else []
    key = [f for f in figs if f.stem.startswith(KEY_FIGURES)]
    if figs:
        lines += ["", "## Key figures", ""] + [f"- [{f.stem}](figures/{f.name})" for f in key or figs]
        lines += ["", f"All {len(figs)} figures are in [figures/](figures/)."]
    nbs = numbered_notebooks(rep)
    if nbs:
        lines += ["", "## Executed notebooks", ""]
        for nb in nbs:
            html = nb.with_suffix(".html")
            link = f" ([html]({html.name}))" if html.is_file() else ""
            lines.append(f"- [{nb.name}]({nb.name}){link}")
    if results:
        lines += ["", "## This run", "", "| notebook | status | seconds |", "|---|---|---|"]
        lines += [_timing_row(r, last_timings(P)) for r in results]
    if L.submission.is_file():
        lines += ["", "Submission: [submission.csv](submission.csv)"]
    rep.mkdir(parents=True, exist_ok=True)
    out = L.summary
    out.write_text("\n".join(lines) + "\n")
    return out


def _timing_row(r: StageResult, last: dict[str, float]) -> str:
    """A summary row; a skipped notebook shows when it last really ran instead of 0 s."""
    if r.status == "skipped":
        t = last.get(r.notebook)
        status = f"skipped; last ran in {t:.0f} s" if t is not None else "skipped"
        return f"| {r.notebook} | {status} | {'' if t is None else f'{t:.0f}'} |"
    return f"| {r.notebook} | {r.status} | {r.seconds:.0f} |"
