"""``ichd export``: a finished run's bundle, in a profile (``full``, ``fast``, ``student``) and a runtime
(``torch``, ``onnx``).

``--profile full`` (default) holds every fold model, TTA view and blend member; ``--profile fast`` keeps
what :func:`ichdlib.serve.profiles.select_profile` picks on the run's out-of-fold predictions (its trace is
printed and stored in ``bundle.json``); ``--profile student`` holds the distilled student network of
``ichd train --stage distill`` (:mod:`ichdlib.distill`) alone. ``--runtime onnx`` adds the ONNX graphs the
serve pipeline then runs with ONNX Runtime on the CPU (:mod:`ichdlib.serve.onnx_runtime`). Every consumer of
a bundle (``ichd predict``, ``--dicom-out``, validation) runs what the bundle holds, unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ichdlib.serve import bundle as B
from ichdlib.serve.onnx_runtime import ENGINES, add_onnx
from ichdlib.serve.profiles import apply_profile, select_for_run

PROFILES = ("full", "fast", "student")


def build_bundle(P: Any, profile: str = "full", **select: Any) -> tuple[Any, dict[str, Any] | None]:
    """The in-memory bundle of ``profile`` for the run ``P`` and, for ``fast``, the selection report."""
    if profile not in PROFILES:
        raise ValueError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
    if profile == "student":
        return student_bundle(P), None
    bundle = B.Bundle.from_run(P)
    if profile == "full":
        return bundle, None
    sel, _ = select_for_run(P, bundle, **select)
    report = sel.to_dict()
    return apply_profile(bundle, sel.profile, report), report


def student_bundle(P: Any) -> Any:
    """The distilled student (:mod:`ichdlib.distill`) as a bundle: its deployed fold network, the validation
    view only, no sequence model, blend weight 1."""
    from ichdlib.distill import student_dir

    folder = student_dir(P)
    done = folder / "done.json"
    if not done.is_file():
        raise B.BundleError(f"{done}: no finished student; run 'ichd train PARAMS --stage distill' first")
    fold = int(json.loads(done.read_text())["deploy_fold"])
    member = B._collect(folder, "cnn", folder.name, [fold], "run 'ichd train PARAMS --stage distill' first")
    name = f"cnn:{member.key}"
    ensemble = {"method": "mean", "members": [name], "weights": {name: 1.0}, "sources": {name: "cnn"}}
    bundle = B.Bundle(B._manifest(P, {member.key: member}, {}, [], ensemble), {member.key: member}, {},
                      source=str(folder))
    bundle.manifest["profile"] = {"name": "student", "folds": {member.key: [fold]}, "views": [0],
                                  "members": [name]}
    return bundle


def export_bundle(run: Any, out: str | os.PathLike, *, profile: str = "full", runtime: str = "torch",
                  engine: str = "onnxruntime", force: bool = False,
                  **select: Any) -> tuple[Path, dict[str, Any] | None]:
    """Write the bundle of a finished run (params file, run folder or Params) in ``profile`` and ``runtime``
    to ``out`` (atomically: built in a sibling folder, renamed into place)."""
    P = run if hasattr(run, "work_dir") else B.resolve_run(run)
    if runtime not in ("torch", "onnx"):
        raise ValueError(f"--runtime {runtime!r}: expected torch or onnx")
    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):
        raise B.BundleError(f"{out}: exists and is not empty (choose another --out, or --force)")
    bundle, report = build_bundle(P, profile, **select)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build.", dir=out.parent))
    try:
        bundle.save(tmp / "b")
        if runtime == "onnx":
            if engine not in ENGINES[1:]:
                raise ValueError(f"--engine {engine!r}: expected one of {', '.join(ENGINES[1:])}")
            add_onnx(tmp / "b", engine=engine)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "b", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd export``."""
    B.add_arguments(parser)
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
    manifest = json.loads((out / B.MANIFEST).read_text())
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
