"""``ichd export --run PARAMS --out BUNDLE [--profile full|fast|student] [--runtime torch|onnx]``: a finished
run's bundle in a profile and a runtime (docs/fast_inference.md). Composes the bundle (:mod:`ichdlib.serve`),
the fast selection on the run (:mod:`ichdlib.app.profile_select`) and the student (:mod:`ichdlib.distill`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ichdlib.app.profile_select import select_for_run
from ichdlib.serve import bundle_cli
from ichdlib.serve.bundle import MANIFEST, Bundle, BundleError, resolve_run
from ichdlib.serve.export import save_bundle, student_bundle
from ichdlib.serve.onnx_runtime import ENGINES
from ichdlib.serve.profiles import apply_profile

PROFILES = ("full", "fast", "student")


def build_bundle(P: Any, profile: str = "full", **select: Any) -> tuple[Any, dict[str, Any] | None]:
    """The in-memory bundle of ``profile`` for the run ``P`` and, for ``fast``, the selection report."""
    if profile not in PROFILES:
        raise ValueError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
    if profile == "student":
        return student_bundle(P), None
    bundle = Bundle.from_run(P)
    if profile == "full":
        return bundle, None
    sel, _ = select_for_run(P, bundle, **select)
    report = sel.to_dict()
    return apply_profile(bundle, sel.profile, report), report


def export_bundle(run: Any, out: str | os.PathLike, *, profile: str = "full", runtime: str = "torch",
                  engine: str = "onnxruntime", force: bool = False,
                  **select: Any) -> tuple[Path, dict[str, Any] | None]:
    """Write the bundle of a finished run (params file, run folder or Params) in ``profile`` and ``runtime``
    to ``out``; returns the folder and, for ``fast``, the selection report."""
    P = run if hasattr(run, "work_dir") else resolve_run(run)
    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):  # said before any selection work
        raise BundleError(f"{out}: exists and is not empty (choose another --out, or --force)")
    bundle, report = build_bundle(P, profile, **select)
    return save_bundle(bundle, out, runtime=runtime, engine=engine, force=force), report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd export``."""
    bundle_cli.add_arguments(parser)
    parser.add_argument("--profile", choices=PROFILES, default="full",
                        help="full (everything), fast (folds/views/members picked on the OOF predictions) or "
                             "student (the distilled network; ichd train --stage distill first)")
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                        help="onnx: add ONNX graphs that ichd predict runs with ONNX Runtime on the CPU")
    parser.add_argument("--engine", choices=ENGINES[1:], default="onnxruntime",
                        help="with --runtime onnx: the engine ichd predict uses (default onnxruntime)")
    parser.add_argument("--folds-kept", type=int, default=1, help="fast: fold models kept per 2D member")
    parser.add_argument("--max-wll-ratio", type=float, default=1.02,
                        help="fast: largest OOF wLL allowed, relative to the full profile's (default 1.02)")
    parser.add_argument("--max-auc-drop", type=float, default=0.005,
                        help="fast: largest drop of OOF AUC any allowed (default 0.005)")
    parser.add_argument("--budget", type=float, default=None,
                        help="fast: 2D seconds per slice to reach even past the accuracy bar (default none)")
    parser.add_argument("--max-studies", type=int, default=None,
                        help="fast: score a seeded sample of this many studies per split (RSNA-sized runs: "
                             "the 2D models run once per fold model and view on the sample)")


def cli(args: argparse.Namespace) -> int:
    """``ichd export``."""
    select = {}
    if args.profile == "fast":
        select = {"folds": args.folds_kept, "max_wll_ratio": args.max_wll_ratio, "max_auc_drop": args.max_auc_drop,
                  "budget": args.budget, "max_studies": args.max_studies}
    out, report = export_bundle(args.run, args.out, profile=args.profile, runtime=args.runtime, engine=args.engine,
                                force=args.force, **select)
    manifest = json.loads((out / MANIFEST).read_text())
    size = sum((out / f).stat().st_size for f in manifest["files"]) / 1e6
    if report:
        full, got = report["full"], report["scores"]
        print(f"profile fast: OOF wLL {got['oof_wll']:.4f} (full {full['oof_wll']:.4f}), AUC any "
              f"{got['oof_auc_any']:.3f} (full {full['oof_auc_any']:.3f}); 2D cost {report['cost'] * 1e3:.1f} ms/slice "
              f"(full {report['full_cost'] * 1e3:.1f}){'' if report['within_bar'] else ' [past the accuracy bar]'}")
        for step in report["trace"]:
            print(f"  {step['step']}: OOF wLL {step['oof_wll']:.4f}, AUC any {step['oof_auc_any']:.3f}")
    folds = ", ".join(f"{b['key']} x{len(b['folds'])}" for b in manifest["backbones"])
    print(f"bundle written: {out} ({len(manifest['files'])} files, {size:.1f} MB; 2D {folds}; sequence models "
          f"{', '.join(m['key'] for m in manifest['seq']['models']) or 'none'}; runtime "
          f"{(manifest.get('runtime') or {}).get('engine', 'torch')})")
    return 0
