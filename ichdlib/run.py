"""``ichd run``: execute notebooks 01-06 in order with papermill from one params file.

Executed copies (and an HTML export of each) go to ``reports/<run>/``. The runner walks the stage DAG of
:mod:`ichdlib.stages`: a stage reruns when what it read changed (its params sections, the data, the
outputs of the stages upstream, its notebook, the library version), and everything downstream follows
once its inputs change; an unchanged stage is skipped. An interrupted stage resumes from its checkpoints.
``ichd run --dry-run`` lists what would run and why. On a failure the notebook and the failing cell are
named.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ichdlib import stages
from ichdlib.config import Params, load_params, parse_overrides
from ichdlib.files import nested_get as _get
from ichdlib.files import write_json
from ichdlib.locks import output_lock
from ichdlib.procs import execute_notebook  # the kernel in its own process group, ended with this runner
from ichdlib.procs import kernel_manager_class as group_kernel_manager

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
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


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


_NUMBERED = re.compile(r"^\d\d[a-z]?_")


def stage_number(nb: Path | str) -> str:
    """The stage number of ``NN_name.ipynb`` or ``NNx_name.ipynb`` (``02b_cnn3d_training`` -> ``02b``, run
    after ``02`` and before ``03``)."""
    return Path(nb).name.split("_", 1)[0]


def list_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks ``NN_name.ipynb`` (and ``NNx_name.ipynb``) in order."""
    nbs = sorted(p for p in folder.glob("[0-9][0-9]*_*.ipynb") if _NUMBERED.match(p.name))
    if not nbs:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return nbs


def select(nbs: list[Path], only: list[str] | None = None, start: str | None = None) -> list[Path]:
    """Filter by ``--only 02,03`` and ``--from 03`` (stage numbers)."""
    stages = [stage_number(p) for p in nbs]
    for s in (only or []) + ([start] if start else []):
        if s not in stages:
            raise ValueError(f"unknown stage {s!r}; available: {', '.join(stages)}")
    out = nbs
    if start:
        out = [p for p in out if stage_number(p) >= start]
    if only:
        out = [p for p in out if stage_number(p) in set(only)]
    return out


def _failure_message(nb_name: str, exc: Exception, out_path: Path) -> str:
    cell = getattr(exc, "exec_count", None)
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    where = f"cell [{cell}]" if cell is not None else "a cell"
    return (f"notebook {nb_name} failed in {where}: {ename}: {evalue}\n"
            f"  the executed copy with the full traceback: {out_path}")


def export_html(ipynb: Path) -> Path | None:
    """Write an HTML copy next to an executed notebook (best effort; returns None on failure)."""
    try:
        import nbformat
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nbformat.read(ipynb, as_version=4))
        out = ipynb.with_suffix(".html")
        out.write_text(body, encoding="utf-8")
        return out
    except Exception as exc:  # an export problem must not fail a finished run
        print(f"  warning: HTML export of {ipynb.name} failed: {exc}", file=sys.stderr)
        return None


#: Environment of a headless notebook kernel: static figures instead of widgets, no progress bars
#: (the training loops print one line per epoch), no library chatter.
KERNEL_ENV = {"ICHD_HEADLESS": "1", "TQDM_DISABLE": "1"}


@contextlib.contextmanager
def kernel_environment(extra: dict[str, str] | None = None) -> Iterator[None]:
    """Set :data:`KERNEL_ENV` (the kernel inherits it at start) and restore the caller's environment after.

    ``MPLBACKEND`` is removed: the notebooks pick the inline backend themselves, so figures land in the
    executed notebook (``ichdlib.nb.setup``).
    """
    env = {**KERNEL_ENV, **(extra or {})}
    saved = {k: os.environ.get(k) for k in [*env, "MPLBACKEND"]}
    os.environ.update(env)
    os.environ.pop("MPLBACKEND", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quiet_kernel_config(ipc_dir: Path) -> Any:
    """nbclient config: talk to the kernel over local IPC sockets in ``ipc_dir`` instead of TCP.

    Nothing listens on a network port, and ipykernel has no reason to print its "running over TCP without
    encryption" warning once per notebook.
    """
    from traitlets.config import Config

    cfg = Config()
    cfg.KernelManager.transport = "ipc"
    cfg.KernelManager.ip = str(ipc_dir / "k")
    return cfg


def kernel_manager_class(log_path: Path) -> type:
    """A kernel manager whose kernel writes its own stdout/stderr (start-up and shutdown chatter such as
    "KeyboardInterrupt caught in kernel" or asyncio's "Task was destroyed") to ``log_path``, not the console.

    Cell outputs are unaffected: they travel as messages into the executed notebook.
    """

    class FileLoggedKernelManager(group_kernel_manager()):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")  # noqa: SIM115 - the kernel process owns it; closed when we exit
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            try:
                await super()._async_launch_kernel(kernel_cmd, **kw)
            finally:
                log.close()  # the child holds its own copy of the descriptor

    return FileLoggedKernelManager


def run_notebook(nb: Path, P: Params, params_path: Path, overrides: dict[str, Any], *,
                 html: bool = True, log_output: bool = False) -> Path:
    """Execute one notebook with papermill into ``reports/<run>/``; raises :class:`NotebookFailed`."""
    import papermill as pm

    out = P.reports_dir / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)

    try:
        # one runner per notebook of a run at a time (the lock file lives in work/, not beside the report)
        with output_lock(P.work_dir / "stages" / nb.stem, what="run"), kernel_environment(), \
                tempfile.TemporaryDirectory(prefix="ichd-kernel-") as ipc:
            execute_notebook(
                str(nb), str(out),
                parameters={"params_path": str(params_path), "overrides": overrides},
                cwd=str(nb.parent), kernel_name="python3", progress_bar=False, log_output=log_output,
                config=quiet_kernel_config(Path(ipc)),
                coalesce_streams=True,  # one stream block per cell: the per-epoch lines read as one log
                kernel_manager_class=kernel_manager_class(P.work_dir / "logs" / f"{nb.stem}.kernel.log"),
            )
    except pm.PapermillExecutionError as exc:
        raise NotebookFailed(_failure_message(nb.name, exc, out)) from None
    if html:
        export_html(out)
    return out


def plan(params_path: str | Path, *, only: list[str] | None = None, start: str | None = None,
         force: bool = False, overrides: dict[str, Any] | None = None,
         notebooks: Path = NOTEBOOK_DIR) -> list[stages.Decision]:
    """What ``ichd run`` would do now, stage by stage, and why (``ichd run --dry-run``).

    Stages are decided in order as if the earlier ones had not run yet: a stage behind one that will rerun
    is listed as "after upstream NN reruns" because its inputs are only known then.
    """
    P = load_params(Path(params_path).resolve(), dict(overrides or {}))
    all_nbs = list_notebooks(notebooks)
    known = [stage_number(p) for p in all_nbs]
    chosen = select(all_nbs, only, start)
    store = stages.StampStore(P)
    out: list[stages.Decision] = []
    pending: set[str] = set()
    for nb in chosen:
        st = stages.stage_for(stage_number(nb), known)
        if not stages.stage_enabled(P, st):
            out.append(stages.Decision(st, run=False, force=False, reasons=[f"off ({st.enabled_by} is false)"]))
            continue
        d = stages.decide(store, st, nb, known, force=force, report_exists=(P.reports_dir / nb.name).is_file())
        waiting = sorted(set(st.upstream) & pending)
        if waiting and not d.run:
            d.run, d.reasons = True, [f"after upstream {', '.join(waiting)} reruns (if its outputs change)"]
        if d.run:
            pending.add(st.number)
        out.append(d)
    return out


def run_pipeline(params_path: str | Path, *, only: list[str] | None = None, start: str | None = None,
                 force: bool = False, overrides: dict[str, Any] | None = None, html: bool = True,
                 notebooks: Path = NOTEBOOK_DIR, log_output: bool = False) -> list[StageResult]:
    """Walk the stage DAG in order; run each stage whose stamp changed (see :mod:`ichdlib.stages`).

    Stops at the first failure (raised as :class:`NotebookFailed`).
    """
    params_path = Path(params_path).resolve()
    overrides = dict(overrides or {})
    P = load_params(params_path, overrides)
    all_nbs = list_notebooks(notebooks)
    known = [stage_number(p) for p in all_nbs]
    chosen = select(all_nbs, only, start)
    store = stages.StampStore(P)
    timings = last_timings(P)  # the skip lines say how long each skipped notebook took when it last ran
    results: list[StageResult] = []
    print(f"ichd run: {P.run}: {len(chosen)} notebook(s) -> {P.reports_dir}", flush=True)
    for i, nb in enumerate(chosen, 1):
        stage = stages.stage_for(stage_number(nb), known)
        head = f"[{i}/{len(chosen)}] {nb.stem}"
        if not stages.stage_enabled(P, stage):
            print(f"{head}: off ({stage.enabled_by} is false) 0 s", flush=True)
            results.append(StageResult(stage.number, nb.name, "off", 0.0, f"{stage.enabled_by} is false"))
            continue
        d = stages.decide(store, stage, nb, known, force=force,
                          report_exists=(P.reports_dir / nb.name).is_file())
        if not d.run:
            last = timings.get(nb.name)
            note = "" if last is None else f"last ran in {last:.0f} s"
            print(f"{head}: skipped, up to date{'; ' + note if note else ''} (--force to rerun)", flush=True)
            results.append(StageResult(stage.number, nb.name, "skipped", 0.0, note))
            continue
        print(f"{head}: {d.explain()} ...", end="\n" if log_output else "", flush=True)
        t0 = time.perf_counter()
        nb_over = dict(overrides)
        if d.force:
            nb_over["force"] = True
        store.mark_started(stage.number, d)
        try:
            run_notebook(nb, P, params_path, nb_over, html=html, log_output=log_output)
        except NotebookFailed as exc:
            print(" failed", flush=True)
            store.mark_failed(stage.number, time.perf_counter() - t0, str(exc))
            results.append(StageResult(stage.number, nb.name, "failed", time.perf_counter() - t0, str(exc)))
            raise
        dt = time.perf_counter() - t0
        # Recomputed after the run: a stage may create what it reads (notebook 01 generates the phantom).
        store.mark_done(stage.number, store.parts(stage, nb, known), dt)
        record_timing(P, nb.name, dt)
        print(f"{head}: done in {dt:.0f} s" if log_output else f" {dt:.0f} s", flush=True)
        results.append(StageResult(stage.number, nb.name, "ran", dt))
    if only or start:
        later = [d for d in plan(params_path, overrides=overrides, notebooks=notebooks)
                 if d.run and d.stage.number not in {r.stage for r in results}]
        if later:
            print("ichd run: now out of date (run `ichd run` without --only/--from to update): "
                  + ", ".join(f"{d.stage.number} ({d.explain()})" for d in later), flush=True)
    summary = write_summary(P, results)
    if summary:
        print(f"summary: {summary}", flush=True)
    return results


def dry_run(params_path: str | Path, **kwargs: Any) -> str:
    """The plan as text: one line per stage with the reason it would run, or "up to date"."""
    lines = []
    for d in plan(params_path, **kwargs):
        verb = ("run (recompute)" if d.force else "run") if d.run else "skip"
        lines.append(f"{d.stage.number:<3} {d.stage.name:<9} {verb:<15} "
                     f"{'; '.join(d.reasons) if d.run or d.reasons else 'up to date'}")
    return "\n".join(lines)


TIMINGS = "timings.json"


def last_timings(P: Params) -> dict[str, float]:
    """Seconds each notebook took the last time it really ran (``reports/<run>/timings.json``)."""
    path = P.reports_dir / TIMINGS
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v["seconds"]) for k, v in data.items() if isinstance(v, dict) and "seconds" in v}


def record_timing(P: Params, notebook: str, seconds: float) -> None:
    """Merge one notebook's wall time into ``reports/<run>/timings.json`` (other entries kept)."""

    path = P.reports_dir / TIMINGS
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
    rep = P.reports_dir
    metrics_path = rep / "metrics.json"
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
    figs = sorted((rep / "figures").glob("*.png")) if (rep / "figures").is_dir() else []
    key = [f for f in figs if f.stem.startswith(KEY_FIGURES)]
    if figs:
        lines += ["", "## Key figures", ""] + [f"- [{f.stem}](figures/{f.name})" for f in key or figs]
        lines += ["", f"All {len(figs)} figures are in [figures/](figures/)."]
    nbs = sorted(p for p in rep.glob("[0-9][0-9]*_*.ipynb") if _NUMBERED.match(p.name))
    if nbs:
        lines += ["", "## Executed notebooks", ""]
        for nb in nbs:
            html = nb.with_suffix(".html")
            link = f" ([html]({html.name}))" if html.is_file() else ""
            lines.append(f"- [{nb.name}]({nb.name}){link}")
    if results:
        lines += ["", "## This run", "", "| notebook | status | seconds |", "|---|---|---|"]
        lines += [_timing_row(r, last_timings(P)) for r in results]
    if (rep / "submission.csv").is_file():
        lines += ["", "Submission: [submission.csv](submission.csv)"]
    rep.mkdir(parents=True, exist_ok=True)
    out = rep / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _timing_row(r: StageResult, last: dict[str, float]) -> str:
    """A summary row; a skipped notebook shows when it last really ran instead of 0 s."""
    if r.status == "skipped":
        t = last.get(r.notebook)
        status = f"skipped; last ran in {t:.0f} s" if t is not None else "skipped"
        return f"| {r.notebook} | {status} | {'' if t is None else f'{t:.0f}'} |"
    return f"| {r.notebook} | {r.status} | {r.seconds:.0f} |"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("params", type=Path, help="params YAML, e.g. params/demo.yaml")
    parser.add_argument("--only", help="comma-separated stages to run, e.g. 02,03")
    parser.add_argument("--from", dest="start", help="start at this stage, e.g. 03")
    parser.add_argument("--force", action="store_true", help="recompute stages whose outputs exist")
    parser.add_argument("--dry-run", action="store_true", help="list what would run and why, run nothing")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set seq.epochs=2 (repeatable)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    parser.add_argument("--log-output", action="store_true", help="stream notebook output to the terminal")


def cli(args: argparse.Namespace) -> int:
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if args.dry_run:
        print(dry_run(args.params, only=only, start=args.start, force=args.force,
                      overrides=parse_overrides(args.overrides)))
        return 0
    t0 = time.perf_counter()
    try:
        run_pipeline(args.params, only=only, start=args.start, force=args.force,
                     overrides=parse_overrides(args.overrides), html=not args.no_html,
                     log_output=args.log_output)
    except NotebookFailed as exc:
        print(f"ichd run: {exc}", file=sys.stderr)
        return 1
    print(f"ichd run: finished in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0
