"""``ichd train PARAMS [--stage cnn|features|seq|cnn3d] [--backbone NAME] [--folds 0,2]``: one stage's work outside
the notebooks, alone or under ``torchrun`` (see ``docs/distributed.md``).

- ``cnn`` (default): the 2D CNN folds of every backbone (or ``--backbone``), DDP across the ranks; OOF/test
  tables are assembled once every fold is in, by whichever job finishes last.
- ``features``: pooled features + TTA probabilities, rows sharded across ranks, written by rank 0.
- ``seq``: the sequence models; their folds fan out across ranks.
- ``cnn3d``: the 3D CNN member's folds (``cnn3d.enabled``; notebook 02b), DDP across the ranks like ``cnn``.

Missing inputs are made first (phantom when ``synth.enabled``, ingest, cache) by rank 0 while the others
wait. Notebooks 02-04 then load what this wrote (their summaries say where the models came from).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ichdlib import tracking
from ichdlib.cnn import distributed as D
from ichdlib.config import load_params, parse_overrides
from ichdlib.ingest.catalog import ensure_cache, ingest
from ichdlib.locks import output_lock
from ichdlib.runtime import cpu_threads
from ichdlib.stages import stage_named

#: The stages ``ichd train --stage`` runs, by their names in :data:`ichdlib.stages.STAGES`.
TRAIN_STAGES = ("cnn", "features", "seq", "cnn3d", "distill")
ORIGIN = "ichd train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("params", help="params YAML (e.g. params/rsna_gpu.yaml)")
    parser.add_argument("--stage", choices=TRAIN_STAGES, default="cnn", help="which stage to run (default: cnn)")
    parser.add_argument("--backbone", action="append", metavar="NAME",
                        help="only this backbone (name or key such as densenet121_256; repeatable)")
    parser.add_argument("--folds", metavar="K[,K...]", help="only these folds, e.g. 0,2 (cnn and cnn3d stages)")
    parser.add_argument("--force", action="store_true", help="recompute outputs that exist")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set cnn.num_workers=8 (repeatable)")
    parser.add_argument("--track", action="store_true", help="record this training in MLflow (docs/tracking.md)")


def parse_folds(text: str | None) -> list[int] | None:
    """``"0,2"`` -> ``[0, 2]``; None stays None."""
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--folds {text!r}: expected fold numbers separated by commas, e.g. 0,2") from None


def select_backbones(P: Any, names: list[str] | None) -> list[Any]:
    """The backbones of ``P.cnn.backbones`` whose name or key is in ``names`` (all when None)."""
    if not names:
        return list(P.cnn.backbones)
    chosen = [b for b in P.cnn.backbones if b.key in names or b.name in names]
    unknown = [n for n in names if not any(n in (b.key, b.name) for b in P.cnn.backbones)]
    if unknown:
        have = ", ".join(b.key for b in P.cnn.backbones)
        raise ValueError(f"--backbone {', '.join(unknown)}: not in the params' cnn.backbones ({have})")
    return chosen


def prepare_inputs(P: Any, backbones: list[Any], sizes: tuple[int, ...] = ()) -> None:
    """Phantom (if ``synth.enabled``), catalog and caches for ``backbones`` (and ``sizes``): made by rank 0,
    others wait."""
    if D.is_main():
        # fold jobs started side by side: the first prepares, the others wait and then find it done
        with output_lock(P.layout.inputs_lock, what="ichd train: prepare inputs", wait=True):
            if P.synth.enabled:
                from ichdlib.phantom.synth import ensure_phantom  # noqa: PLC0415  (the phantom only for synth)

                ensure_phantom(P)
            ingest(P)
            for size in sorted({b.size for b in backbones} | set(sizes)):
                ensure_cache(P, size)
    D.barrier()


def _say(*args: Any) -> None:
    if D.is_main():
        print(*args, flush=True)


def run_stage(P: Any, stage: str, backbones: list[Any], folds: list[int] | None = None,
              force: bool = False) -> list[dict[str, Any]]:
    """Run one stage in this process (one rank of a torchrun job or alone) through its one entry,
    ``STAGES[...].run`` (what the notebooks call); returns the summaries."""
    if stage not in TRAIN_STAGES:
        raise ValueError(f"--stage {stage!r}: expected one of {', '.join(TRAIN_STAGES)}")
    if stage == "cnn3d" and not P.cnn3d.enabled:
        raise ValueError("--stage cnn3d: cnn3d.enabled is false in the params (add --set cnn3d.enabled=true)")
    if stage in ("cnn", "features", "cnn3d"):  # ranks must not build caches at once (a no-op when already made)
        prepare_inputs(P, backbones if stage != "cnn3d" else [], (P.cnn3d.size,) if stage == "cnn3d" else ())
    options: dict[str, Any] = {}
    if stage == "cnn":
        options = {"backbones": backbones, "folds": folds, "origin": ORIGIN}
    elif stage == "cnn3d":
        options = {"folds": folds, "origin": ORIGIN}
    elif stage == "features":
        options = {"backbones": backbones}
    report = stage_named(stage).run(P, force, **options)
    out: list[dict[str, Any]] = []
    if stage == "cnn":
        for b, s in zip(backbones, report.result, strict=True):
            for k, f in s["folds"].items():
                _say(f"{b.key} fold {k}: {f['status']}, best epoch {f['best_epoch']}, val wLL {f['best_wll']:.4f}")
            _say(f"{b.key}: " + (f"OOF wLL {s['oof_wll']:.4f} (prior {s['prior_wll']:.4f}) -> {s['oof']}"
                                 if s.get("oof") else f"folds done {s['folds_done']}; oof.parquet once every "
                                                      "fold is in"))
            out.append(s)
    elif stage == "cnn3d":
        s = report.result
        for k, f in s["folds"].items():
            _say(f"cnn3d {s['key']} fold {k}: {f['status']}, best epoch {f['best_epoch']}, val wLL {f['best_wll']:.4f}")
        _say(f"cnn3d {s['key']}: " + (f"OOF wLL {s['oof_wll']:.4f} (prior {s['prior_wll']:.4f}) -> {s['oof']}"
                                      if s.get("oof") else f"folds done {s['folds_done']}"))
        out.append(s)
    elif stage == "features":
        for s in report.result:
            _say(f"{s['key']}: features {s['status']}, dim {s['dim']}, OOF wLL (TTA) {s['oof_wll']:.4f} -> {s['dir']}")
            out.append(s)
    elif stage == "distill":
        _say(report.result["summary"])
        out.append(report.result)
    else:
        for m, r in report.result.items():
            _say(f"{m}: {len(r.oof)} OOF rows, {len(r.test)} test rows -> {r.out_dir}")
            out.append({"model": m, "dir": str(r.out_dir)})
    D.barrier()
    return out


def cli(args: argparse.Namespace) -> int:
    """``ichd train``: load params, join the torchrun job (if any), run the stage."""
    P = load_params(args.params, parse_overrides(args.overrides))
    folds = parse_folds(args.folds)
    if folds is not None and args.stage not in ("cnn", "cnn3d"):
        raise ValueError(f"--folds applies to --stage cnn and cnn3d (the {args.stage} stage uses every fold)")
    if args.backbone and args.stage in ("seq", "cnn3d"):
        raise ValueError(f"--backbone does not apply to --stage {args.stage} (it reads every backbone or none)")
    backbones = select_backbones(P, args.backbone)
    # one MLflow run for this `ichd train` (rank 0 only; docs/tracking.md), its epochs logged as they finish
    tracker = tracking.RunTracker(P, f"ichd train --stage {args.stage}") if tracking.enabled(P, args.track) else None
    if tracker:
        tracker.begin()
    failed = True
    try:
        with D.session(P.torch_device()) as d:
            if d.world > 1:
                _say(f"ichd train: {P.run}: stage {args.stage} on {d.world} ranks ({P.torch_device()})")
            with cpu_threads(P):
                run_stage(P, args.stage, backbones, folds, args.force)
        failed = False
    finally:
        if tracker:
            tracker.stage({"cnn": "02", "features": "03", "seq": "04"}[args.stage], "failed" if failed else "ran")
            tracker.finish(failed=failed, record=False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ichdlib.cli import main  # noqa: PLC0415  (only when run as a script)

    sys.exit(main(["train", *sys.argv[1:]]))
