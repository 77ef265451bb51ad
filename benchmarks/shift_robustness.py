"""External figures of a model bundle on phantoms drawn by other scanners (``ichd synth --shift``).

Usage::

    python benchmarks/shift_robustness.py --bundle bundles/demo                     # none, scannerB, scannerC
    python benchmarks/shift_robustness.py --bundle bundles/demo --shift scannerB --studies 28 --json out.json

For each profile it writes a phantom of ``--studies`` studies with ``--seed`` (not the training phantom's
seed: unseen patients; every study is external, train and test folders alike) under ``--work``, runs the
bundle's whole pipeline on it as ``ichd predict`` does, and scores the slices against the phantom's labels
with :func:`ichdlib.external.score_predictions`: slice AUC any, mean probability any vs prevalence, weighted
log loss, and study AUC any (max over slices), for the final blend and the 2D CNNs alone. ``none`` is the
control: same scanner as the training phantom, new patients. A phantom already there with the same settings
is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def phantom(root: Path, shift: str, studies: int, seed: int, size: int) -> Path:
    """The external phantom for ``shift`` under ``root`` (generated unless an identical one is there)."""
    from ichdlib.phantom.synth import COMPLETE_MARKER, _config, generate_phantom

    out = root / f"{shift}_s{seed}_n{studies}_{size}"
    marker = out / COMPLETE_MARKER
    if not (marker.exists() and json.loads(marker.read_text()) == _config(studies, seed, size, False, False,
                                                                          shift=shift)):
        generate_phantom(out, studies, seed, size, progress=False, shift=shift)
    return out


def evaluate(bundle: Path, shifts: list[str], studies: int, seed: int, size: int, work: Path,
             device: str = "auto", fov_norm: bool = True) -> dict:
    """``{shift: {"final": scores, "cnn2d": scores, "seconds": s, "resampled": n}}`` for one bundle (``fov_norm``:
    the in-plane field-of-view normalisation, :mod:`ichdlib.serve.inplane`; ``resampled``: studies it resampled)."""
    import time

    from ichdlib.external import phantom_truth, score_predictions
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.predict import Predictor, predict_dir

    b = Bundle.load(bundle)
    predictor = Predictor(b, device, fov_norm=fov_norm)
    results = {}
    for shift in shifts:
        root = phantom(work, shift, studies, seed, size)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pred = predict_dir(root, b, predictor=predictor)
        truth = phantom_truth(root)
        results[shift] = {"final": score_predictions(pred.slices, truth, "p_"),
                          "cnn2d": score_predictions(pred.slices, truth, "p2d_"),
                          "problems": len(pred.problems), "seconds": round(time.perf_counter() - t0, 1),
                          "resampled": int((pred.studies["inplane"] != "").sum()) if len(pred.studies) else 0}
    return results


def table(results: dict) -> str:
    """A markdown table of :func:`evaluate`'s results."""
    lines = ["| phantom | studies (pos) | slices | prevalence | mean p any | slice AUC any | slice wLL | "
             "study AUC any | study sens / spec at 0.5 | 2D slice AUC | 2D study AUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shift, r in results.items():
        f, c = r["final"], r["cnn2d"]
        lines.append(f"| {shift} | {f['study']['n_studies']} ({f['study']['n_positive']}) | {f['n_slices']} | "
                     f"{f['prevalence']:.3f} | {f['mean_p_any']:.3f} | {_fmt(f['auc_any'])} | {f['wll']:.3f} | "
                     f"{_fmt(f['study']['auc_any'])} | {_fmt(f['study']['sensitivity_05'])} / "
                     f"{_fmt(f['study']['specificity_05'])} | {_fmt(c['auc_any'])} | {_fmt(c['study']['auc_any'])} |")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle written by 'ichd export'")
    ap.add_argument("--shift", action="append", default=None,
                    help="scanner profile(s) (repeatable; default: none, scannerB, scannerC)")
    ap.add_argument("--studies", type=int, default=28, help="studies per phantom (default 28)")
    ap.add_argument("--seed", type=int, default=1, help="phantom seed (default 1; the demo trains on seed 0)")
    ap.add_argument("--size", type=int, default=256, help="DICOM rows/cols (default 256, as the demo)")
    ap.add_argument("--work", type=Path, default=REPO / "work" / "shift_phantoms", help="where phantoms go")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--no-fov-norm", action="store_true", help="without the in-plane field-of-view normalisation")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    shifts = args.shift or ["none", "scannerB", "scannerC"]
    res = evaluate(args.bundle, shifts, args.studies, args.seed, args.size, args.work, args.device,
                   fov_norm=not args.no_fov_norm)
    print(table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
