"""``ichd train PARAMS [--stage cnn|features|seq] [--backbone NAME] [--folds 0,2]``: one stage's work outside
the notebooks, alone or under ``torchrun`` (see ``docs/distributed.md``).

- ``cnn`` (default): the 2D CNN folds of every backbone (or ``--backbone``), DDP across the ranks; OOF/test
  tables are assembled once every fold is in, by whichever job finishes last.
- ``features``: pooled features + TTA probabilities, rows sharded across ranks, written by rank 0.
- ``seq``: the sequence models; their folds fan out across ranks.
- ``cnn3d``: the 3D CNN member (:mod:`ichdlib.cnn3d.train_cli`, which ``ichd train`` runs).

Missing inputs are made first (phantom when ``synth.enabled``, ingest, cache) by rank 0 while the others
wait. Notebooks 02-04 then load what this wrote (their summaries say where the models came from).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ichdlib.config import load_params, parse_overrides
from ichdlib.ingest.catalog import ensure_cache, ingest
from ichdlib.locks import output_lock
from ichdlib.runtime import cpu_threads

STAGES = ("cnn", "features", "seq")
ORIGIN = "ichd train"


def add_arguments(parser: argparse.ArgumentParser, stages: tuple[str, ...] = STAGES) -> None:
    parser.add_argument("params", help="params YAML (e.g. params/rsna_gpu.yaml)")
    parser.add_argument("--stage", choices=stages, default="cnn", help="which stage to run (default: cnn)")
    parser.add_argument("--backbone", action="append", metavar="NAME",
                        help="only this backbone (name or key such as densenet121_256; repeatable)")
    parser.add_argument("--folds", metavar="K[,K...]", help="only these folds, e.g. 0,2 (cnn stage)")
    parser.add_argument("--force", action="store_true", help="recompute outputs that exist")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set cnn.num_workers=8 (repeatable)")


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
    from ichdlib.cnn import distributed as D

    if D.is_main():

        # fold jobs started side by side: the first prepares, the others wait and then find it done
        with output_lock(P.work_dir / "inputs", what="ichd train: prepare inputs", wait=True):
            if P.synth.enabled:
                from ichdlib.phantom.synth import ensure_phantom

                ensure_phantom(P)
            ingest(P)
            for size in sorted({b.size for b in backbones} | set(sizes)):
                ensure_cache(P, size)
    D.barrier()


def _say(*args: Any) -> None:
    from ichdlib.cnn import distributed as D

    if D.is_main():
        print(*args, flush=True)


def run_stage(P: Any, stage: str, backbones: list[Any], folds: list[int] | None = None,
              force: bool = False) -> list[dict[str, Any]]:
    """Run one stage in this process (one rank of a torchrun job or alone); returns the summaries."""
    from ichdlib.cnn import distributed as D

    out: list[dict[str, Any]] = []
    if stage == "cnn":
        from ichdlib.cnn.train import train_cnn

        prepare_inputs(P, backbones)
        for b in backbones:
            s = train_cnn(P, b, folds=folds, force=force, origin=ORIGIN)
            for k, f in s["folds"].items():
                _say(f"{b.key} fold {k}: {f['status']}, best epoch {f['best_epoch']}, val wLL {f['best_wll']:.4f}")
            _say(f"{b.key}: " + (f"OOF wLL {s['oof_wll']:.4f} (prior {s['prior_wll']:.4f}) -> {s['oof']}"
                                 if s.get("oof") else f"folds done {s['folds_done']}; oof.parquet once every "
                                                      "fold is in"))
            out.append(s)
    elif stage == "features":
        from ichdlib.cnn.features import extract_features

        prepare_inputs(P, backbones)  # (a no-op when the cnn stage ran here; ranks must not build caches at once)
        for b in backbones:
            s = extract_features(P, b, force=force)
            _say(f"{b.key}: features {s['status']}, dim {s['dim']}, OOF wLL (TTA) {s['oof_wll']:.4f} -> {s['dir']}")
            out.append(s)
    elif stage == "seq":
        from ichdlib.seq.train import train_seq

        for m in P.seq.models:
            r = train_seq(P, m, force=force)
            _say(f"{m}: {len(r.oof)} OOF rows, {len(r.test)} test rows -> {r.out_dir}")
            out.append({"model": m, "dir": str(r.out_dir)})
    else:
        raise ValueError(f"--stage {stage!r}: expected one of {', '.join(STAGES)}")
    D.barrier()
    return out


def cli(args: argparse.Namespace) -> int:
    """``ichd train``: load params, join the torchrun job (if any), run the stage."""
    from ichdlib.cnn import distributed as D

    P = load_params(args.params, parse_overrides(args.overrides))
    folds = parse_folds(args.folds)
    if folds is not None and args.stage != "cnn":
        raise ValueError(f"--folds applies to --stage cnn (the {args.stage} stage uses every fold)")
    if args.backbone and args.stage == "seq":
        raise ValueError("--backbone does not apply to --stage seq (the sequence models read every backbone)")
    backbones = select_backbones(P, args.backbone)
    with D.session(P.torch_device()) as d:
        if d.world > 1:
            _say(f"ichd train: {P.run}: stage {args.stage} on {d.world} ranks ({P.torch_device()})")
        with cpu_threads(P):
            run_stage(P, args.stage, backbones, folds, args.force)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ichdlib.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
