"""``ichd run``: execute notebooks 01-06 in order with papermill from one params file.

Executed copies (and an HTML export of each) go to ``reports/<run>/``. The runner walks the stage DAG of
:mod:`ichdlib.stages`: a stage reruns when what it read changed (its params sections, the data, the
outputs of the stages upstream, its notebook, the library version), and everything downstream follows
once its inputs change; an unchanged stage is skipped. An interrupted stage resumes from its checkpoints.
``ichd run --dry-run`` lists what would run and why. On a failure the notebook and the failing cell are
named. Kernels are started by :mod:`ichdlib.procs`; ``summary.md`` and ``timings.json`` are written by
:mod:`ichdlib.report`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ichdlib import stages, tracking
from ichdlib.config import Params, load_params, parse_overrides
from ichdlib.locks import output_lock
from ichdlib.procs import (  # noqa: F401  (the kernel plumbing; re-exported under the runner's old names)
    KERNEL_ENV,
    execute_notebook,
    file_logged_kernel_manager,
    kernel_environment,
    quiet_kernel_config,
)
from ichdlib.report import (  # noqa: F401  (the report files; re-exported under the runner's old names)
    KEY_FIGURES,
    StageResult,
    export_html,
    last_timings,
    record_timing,
    write_summary,
)
from ichdlib.stages import numbered_notebooks, stage_number

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


def list_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks ``NN_name.ipynb`` (and ``NNx_name.ipynb``) in order."""
    nbs = numbered_notebooks(folder)
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


def applicable(nbs: list[Path], known: list[str], P: Params, only: list[str] | None = None) -> list[Path]:
    """Leave out the stages whose params say they do not apply (07 without ``external.data``); asking for
    one of them with ``--only`` is an error naming the key."""
    out = []
    for nb in nbs:
        stage = stages.stage_for(stage_number(nb), known)
        if stages.applies(stage, P):
            out.append(nb)
        elif only and stage.number in only:
            raise ValueError(f"stage {stage.number} ({nb.stem}) needs params {stage.needs}; set it (e.g. "
                             f"--set {stage.needs}=PATH) or use params/demo_external.yaml")
    return out


def _failure_message(nb_name: str, exc: Exception, out_path: Path) -> str:
    cell = getattr(exc, "exec_count", None)
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    where = f"cell [{cell}]" if cell is not None else "a cell"
    return (f"notebook {nb_name} failed in {where}: {ename}: {evalue}\n"
            f"  the executed copy with the full traceback: {out_path}")


def run_notebook(nb: Path, P: Params, params_path: Path, overrides: dict[str, Any], *, force: bool = False,
                 html: bool = True, log_output: bool = False, env: dict[str, str] | None = None) -> Path:
    """Execute one notebook with papermill into ``reports/<run>/`` with the parameters ``params_path``,
    ``overrides`` and ``force`` (whether its stage recomputes); raises :class:`NotebookFailed`."""
    import papermill as pm  # noqa: PLC0415  (notebook machinery loads only to run notebooks)

    out = P.layout.report(nb.name)
    out.parent.mkdir(parents=True, exist_ok=True)

    try:
        # one runner per notebook of a run at a time (the lock file lives in work/, not beside the report)
        with output_lock(P.layout.stage_lock(nb.stem), what="run"), kernel_environment(env), \
                tempfile.TemporaryDirectory(prefix="ichd-kernel-") as ipc:
            execute_notebook(
                str(nb), str(out),
                # relative to the kernel's folder: the printed parameters cell names no path of this machine
                parameters={"params_path": os.path.relpath(params_path, nb.parent), "overrides": overrides,
                            "force": bool(force)},
                cwd=str(nb.parent), kernel_name="python3", progress_bar=False, log_output=log_output,
                config=quiet_kernel_config(Path(ipc)),
                coalesce_streams=True,  # one stream block per cell: the per-epoch lines read as one log
                kernel_manager_class=file_logged_kernel_manager(P.layout.kernel_log(nb.stem)),
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
    chosen = applicable(select(all_nbs, only, start), known, P, only)
    store = stages.StampStore(P)
    out: list[stages.Decision] = []
    pending: set[str] = set()
    for nb in chosen:
        st = stages.stage_for(stage_number(nb), known)
        if not stages.stage_enabled(P, st):
            out.append(stages.Decision(st, run=False, force=False, reasons=[f"off ({st.enabled_by} is false)"]))
            continue
        d = stages.decide(store, st, nb, known, force=force, report_exists=P.layout.report(nb.name).is_file())
        waiting = sorted(set(st.upstream) & pending)
        if waiting and not d.run:
            d.run, d.reasons = True, [f"after upstream {', '.join(waiting)} reruns (if its outputs change)"]
        if d.run:
            pending.add(st.number)
        out.append(d)
    return out


def run_pipeline(params_path: str | Path, *, only: list[str] | None = None, start: str | None = None,
                 force: bool = False, overrides: dict[str, Any] | None = None, html: bool = True,
                 notebooks: Path = NOTEBOOK_DIR, log_output: bool = False, track: bool = False) -> list[StageResult]:
    """Walk the stage DAG in order; run each stage whose stamp changed (see :mod:`ichdlib.stages`).

    Stops at the first failure (raised as :class:`NotebookFailed`). ``track`` (or ``tracking.enabled``) records
    the run in MLflow (:mod:`ichdlib.tracking`).
    """
    params_path = Path(params_path).resolve()
    overrides = dict(overrides or {})
    P = load_params(params_path, overrides)
    all_nbs = list_notebooks(notebooks)
    known = [stage_number(p) for p in all_nbs]
    chosen = applicable(select(all_nbs, only, start), known, P, only)
    store = stages.StampStore(P)
    timings = last_timings(P)  # the skip lines say how long each skipped notebook took when it last ran
    results: list[StageResult] = []
    tracker = tracking.RunTracker(P) if tracking.enabled(P, track) else None
    print(f"ichd run: {P.run}: {len(chosen)} notebook(s) -> {P.layout.reports}", flush=True)
    for i, nb in enumerate(chosen, 1):
        stage = stages.stage_for(stage_number(nb), known)
        head = f"[{i}/{len(chosen)}] {nb.stem}"
        if not stages.stage_enabled(P, stage):
            print(f"{head}: off ({stage.enabled_by} is false) 0 s", flush=True)
            results.append(StageResult(stage.number, nb.name, "off", 0.0, f"{stage.enabled_by} is false"))
            continue
        d = stages.decide(store, stage, nb, known, force=force,
                          report_exists=P.layout.report(nb.name).is_file())
        if not d.run:
            last = timings.get(nb.name)
            note = "" if last is None else f"last ran in {last:.0f} s"
            print(f"{head}: skipped, up to date{'; ' + note if note else ''} (--force to rerun)", flush=True)
            results.append(StageResult(stage.number, nb.name, "skipped", 0.0, note))
            if tracker:
                tracker.stage(stage.number, "skipped (up to date)")
            continue
        print(f"{head}: {d.explain()} ...", end="\n" if log_output else "", flush=True)
        t0 = time.perf_counter()
        store.mark_started(stage.number, d)
        try:
            run_notebook(nb, P, params_path, dict(overrides), force=d.force, html=html, log_output=log_output,
                         env=tracker.begin() if tracker else None)
        except NotebookFailed as exc:
            print(" failed", flush=True)
            if tracker:
                tracker.stage(stage.number, "failed")
                tracker.finish(failed=True)
            store.mark_failed(stage.number, time.perf_counter() - t0, str(exc))
            results.append(StageResult(stage.number, nb.name, "failed", time.perf_counter() - t0, str(exc)))
            raise
        dt = time.perf_counter() - t0
        # Recomputed after the run: a stage may create what it reads (notebook 01 generates the phantom).
        store.mark_done(stage.number, store.parts(stage, nb, known), dt)
        record_timing(P, nb.name, dt)
        print(f"{head}: done in {dt:.0f} s" if log_output else f" {dt:.0f} s", flush=True)
        results.append(StageResult(stage.number, nb.name, "ran", dt))
        if tracker:
            tracker.stage(stage.number, "ran", dt)
    if only or start:
        later = [d for d in plan(params_path, overrides=overrides, notebooks=notebooks)
                 if d.run and d.stage.number not in {r.stage for r in results}]
        if later:
            print("ichd run: now out of date (run `ichd run` without --only/--from to update): "
                  + ", ".join(f"{d.stage.number} ({d.explain()})" for d in later), flush=True)
    summary = write_summary(P, results)
    if summary:
        print(f"summary: {summary}", flush=True)
    if tracker:
        tracker.finish()
    return results


def dry_run(params_path: str | Path, **kwargs: Any) -> str:
    """The plan as text: one line per stage with the reason it would run, or "up to date"."""
    lines = []
    for d in plan(params_path, **kwargs):
        verb = ("run (recompute)" if d.force else "run") if d.run else "skip"
        lines.append(f"{d.stage.number:<3} {d.stage.name:<9} {verb:<15} "
                     f"{'; '.join(d.reasons) if d.run or d.reasons else 'up to date'}")
    return "\n".join(lines)


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
    parser.add_argument("--track", action="store_true", help="record the run in MLflow (docs/tracking.md)")


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
                     log_output=args.log_output, track=args.track)
    except NotebookFailed as exc:
        print(f"ichd run: {exc}", file=sys.stderr)
        return 1
    print(f"ichd run: finished in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0
