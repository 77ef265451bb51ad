"""Seconds per study for ``ichd predict``: whole pipeline (discovery, decoding, models) and models only.

Usage::

    python benchmarks/predict.py                                  # params/demo.yaml's models, untrained
    python benchmarks/predict.py --params params/rsna_gpu.yaml --device cuda   # the original's 4 CNNs x 5 folds
    python benchmarks/predict.py --bundle bundles/demo            # a real exported bundle
    python benchmarks/predict.py --profiles --json OUT.json       # full / ONNX / fast / student (issue 22)

Without ``--bundle`` the models are randomly initialised with the architectures, image sizes and folds of
``--params`` (timing does not depend on the weights). The studies are phantom studies written as 512 x 512
DICOM files (``--size``) and cut to ``--slices`` slices. The first study is a warm-up (model build, first
kernels); the figures are over the ``--repeats`` studies after it. ``--json`` writes the numbers to a file.

``--profiles`` compares the inference profiles (``ichdlib.serve.profiles``) in one run:

- timing, on one ``--slices``-slice study (default 31) with **untrained** networks of the
  ``--timing-params`` architecture (default ``params/rsna_gpu.yaml``: four backbones x 5 folds x 4 TTA
  views; timing does not depend on the weights): each backbone's forward pass over the study in torch, in
  ONNX Runtime and (if installed) OpenVINO is measured on its first fold model, the study's DICOM read and
  the sequence models too; a profile's seconds are read + its passes x the measured pass times + its
  sequence folds x the measured sequence time (``timing: "passes"``). The fast profile (with the fold count
  and TTA views the demo's selection kept) and the student are also run end to end through
  ``predict_dir`` (``e2e_seconds_per_study``), which checks the sum;
- accuracy, on the trained demo run (``--accuracy-params``, default ``params/demo.yaml``, which must be
  finished, and for ``student`` ``ichd train params/demo.yaml --stage distill``): OOF and test weighted log
  loss and AUC any of each profile, as ratios and differences to ``full_torch``
  (:class:`ichdlib.serve.profiles.RunEvaluator`; ``full_onnx`` runs the same models exported to ONNX).

JSON contract: ``{"profiles": {NAME: {"seconds_per_study", "slices", "forward_passes", "oof_wll_ratio",
"test_wll_ratio", "auc_any_delta", ...}}}`` for ``full_torch``, ``full_onnx``, ``fast`` and ``student``
(``auc_any_delta``: the lower of the OOF and test differences).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def make_studies(out: Path, n: int, slices: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` phantom studies of ``slices`` slices (fewer if a study is shorter), one folder each."""
    import pandas as pd

    from ichdlib.phantom.synth import generate_phantom

    raw = out / "phantom"
    generate_phantom(raw, studies=max(2, 2 * n), seed=seed, size=size, progress=False)
    rows = []
    for split in ("stage_2_train", "stage_2_test"):
        from ichdlib.ingest.dicom import read_header

        for p in sorted((raw / split).glob("*.dcm")):
            m = read_header(p)
            rows.append({"path": p, "study": m["study_uid"], "z": m["z"]})
    table = pd.DataFrame(rows).sort_values(["study", "z"])
    # the longest studies first, so that most reach ``slices`` (phantom studies have 24-40 slices)
    groups = sorted((g for _, g in table.groupby("study", sort=True)), key=len, reverse=True)
    folders = []
    for k, g in enumerate(groups[:n]):
        folder = out / f"study{k}"
        folder.mkdir()
        for p in g["path"].iloc[:slices]:
            shutil.copy(p, folder / Path(p).name)
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=REPO / "params" / "demo.yaml",
                    help="architectures for untrained models (default params/demo.yaml)")
    ap.add_argument("--bundle", type=Path, help="an exported bundle instead of untrained models")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--slices", type=int, default=None, help="slices per study (default 32; 31 with --profiles)")
    ap.add_argument("--size", type=int, default=512, help="DICOM rows/cols of the phantom studies")
    ap.add_argument("--repeats", type=int, default=3, help="timed studies after one warm-up study")
    ap.add_argument("--folds", type=int, help="folds of untrained models (default: the params' folds)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--profiles", action="store_true", help="compare full/ONNX/fast/student (module docstring)")
    ap.add_argument("--timing-params", type=Path, default=REPO / "params" / "rsna_gpu.yaml")
    ap.add_argument("--accuracy-params", type=Path, default=REPO / "params" / "demo.yaml")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of torch and the ONNX engines")
    ap.add_argument("--max-studies", type=int, default=None,
                    help="--profiles: score a seeded sample of this many studies per split (quick checks)")
    args = ap.parse_args(argv)
    if args.profiles:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from profiles_bench import run_profiles

        return run_profiles(args, make_studies)

    args.slices = args.slices or 32
    import torch

    from ichdlib.config import load_params
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.predict import Predictor, predict_dir

    if args.bundle:
        bundle = Bundle.load(args.bundle)
        what = f"bundle {args.bundle}"
    else:
        P = load_params(args.params)
        bundle = Bundle.untrained(P, folds=args.folds)
        what = f"untrained models of {args.params.name}"
    t0 = time.perf_counter()
    predictor = Predictor(bundle, args.device)
    t_build = time.perf_counter() - t0
    spec = ", ".join(f"{b['key']} x{len(b['folds'])} folds" for b in bundle.manifest["backbones"])
    spec += "; " + ", ".join(f"{m['key']} x{len(m['folds'])}" for m in bundle.manifest["seq"]["models"])
    device = predictor.device
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"{what}: {spec}; TTA views {len(predictor.views)}; device {device} ({name}, "
          f"{torch.get_num_threads()} CPU threads); models built in {t_build:.1f} s")

    with tempfile.TemporaryDirectory(prefix="ichd_bench_") as tmp:
        folders = make_studies(Path(tmp), args.repeats + 1, args.slices, args.size)
        runs = []
        for k, folder in enumerate(folders):
            pred = predict_dir(folder, bundle, predictor=predictor)
            if len(pred.problems):
                print(pred.problems.to_string())
            s = pred.seconds
            runs.append({"study": k, "slices": len(pred.slices), "read_s": s["read"], "model_s": s["model"],
                         "total_s": s["read"] + s["model"], "warmup": k == 0})
            print(f"  study {k}{' (warm-up)' if k == 0 else ''}: {len(pred.slices)} slices, read+decode "
                  f"{s['read']:.2f} s, models {s['model']:.2f} s")
    timed = [r for r in runs if not r["warmup"]] or runs
    result = {
        "what": what, "models": spec, "device": device, "device_name": name, "tta": len(predictor.views),
        "threads": torch.get_num_threads(), "slices_per_study": statistics.mean(r["slices"] for r in timed),
        "seconds_per_study": statistics.median(r["total_s"] for r in timed),
        "model_seconds_per_study": statistics.median(r["model_s"] for r in timed),
        "read_seconds_per_study": statistics.median(r["read_s"] for r in timed),
        "build_seconds": t_build, "runs": runs,
    }
    print(f"seconds per study ({result['slices_per_study']:.0f} slices, median of {len(timed)}): "
          f"{result['seconds_per_study']:.2f} s total, {result['model_seconds_per_study']:.2f} s models only, "
          f"{result['read_seconds_per_study']:.2f} s DICOM read/decode")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
