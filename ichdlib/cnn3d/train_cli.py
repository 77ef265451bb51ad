"""``ichd train PARAMS --stage cnn3d [--folds 0,2]``: the 3D CNN member outside the notebooks, alone or under
``torchrun`` (DDP; gloo on the CPU, NCCL on GPUs). The other stages (``cnn``, ``features``, ``seq``) go to
:mod:`ichdlib.cnn.train_cli` unchanged; this module only adds ``cnn3d`` (it sits above ``cnn`` in the import
order, so the 2D command line does not import it)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ichdlib.cnn import train_cli as base

STAGES = (*base.STAGES, "cnn3d")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    base.add_arguments(parser, STAGES)


def run_cnn3d(P: Any, folds: list[int] | None = None, force: bool = False) -> dict[str, Any]:
    """Inputs (phantom, catalog, the cache at ``cnn3d.size``), then the 3D folds; one line per fold."""
    from ichdlib.cnn3d.train import train_cnn3d

    if not P.cnn3d.enabled:
        raise ValueError("--stage cnn3d: cnn3d.enabled is false in the params (add --set cnn3d.enabled=true)")
    base.prepare_inputs(P, [], (P.cnn3d.size,))
    s = train_cnn3d(P, folds=folds, force=force, origin=base.ORIGIN)
    for k, f in s["folds"].items():
        base._say(f"cnn3d {s['key']} fold {k}: {f['status']}, best epoch {f['best_epoch']}, "
                  f"val wLL {f['best_wll']:.4f}")
    base._say(f"cnn3d {s['key']}: " + (f"OOF wLL {s['oof_wll']:.4f} (prior {s['prior_wll']:.4f}) -> {s['oof']}"
                                       if s.get("oof") else f"folds done {s['folds_done']}"))
    return s


def cli(args: argparse.Namespace) -> int:
    """``ichd train``: ``--stage cnn3d`` here, every other stage in :func:`ichdlib.cnn.train_cli.cli`."""
    if args.stage != "cnn3d":
        return base.cli(args)
    from ichdlib.cnn import distributed as D
    from ichdlib.config import load_params, parse_overrides

    if args.backbone:
        raise ValueError("--backbone does not apply to --stage cnn3d (its model is the params' cnn3d section)")
    P = load_params(args.params, parse_overrides(args.overrides))
    folds = base.parse_folds(args.folds)
    with D.session(P.torch_device()) as d:
        if d.world > 1:
            base._say(f"ichd train: {P.run}: stage cnn3d on {d.world} ranks ({P.torch_device()})")
        run_cnn3d(P, folds, args.force)
        D.barrier()
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ichdlib.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
