"""``ichd predict``: a folder of DICOM files (or a DICOMweb server) in, per-slice and per-study
probabilities out, as CSV/JSON and optionally DICOM.

``ichd predict DIR --bundle BUNDLE --out OUT [--cam] [--device cpu|cuda] [--dicom-out DIR] [--dicomweb URL ...]``

The work is done by :mod:`ichdlib.serve.discover` (which files, which series, which slices, their pixels) and
:mod:`ichdlib.serve.pipeline` (the models: 2D CNNs with TTA, sequence models, blend; Grad-CAM overlays); this
module writes the output files and holds the command line. :func:`predict_dir` and :func:`predict_study` are
re-exported here as the Python entry points.

Nothing here raises on bad input: each problem becomes a row of ``problems.csv`` (study, series, file,
severity, message) and the readable slices are still predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ichdlib.files import json_ready, write_text
from ichdlib.labels import LABELS
from ichdlib.serve.bundle import Bundle
from ichdlib.serve.dicom_out import DicomWriter
from ichdlib.serve.dicomweb_run import run as run_dicomweb
from ichdlib.serve.discover import PROBLEM_COLUMNS, discover, problem
from ichdlib.serve.pipeline import Prediction, Predictor, label_thresholds, predict_dir, predict_study
from ichdlib.serve.transport import add_arguments as add_transport_arguments

__all__ = ["predict_dir", "predict_study", "Predictor", "Prediction", "discover", "write_outputs", "PROBLEM_COLUMNS",
           "problem"]


# --------------------------------------------------------------------------------------------------
# Output files and command line
# --------------------------------------------------------------------------------------------------
def write_outputs(pred: Prediction, out: str | os.PathLike, bundle: Any = None,
                  threshold: float | dict[str, float] | None = 0.5) -> dict[str, Path]:
    """``slices.csv``, ``studies.csv``, ``series.csv`` (every series: role, read or not, why),
    ``problems.csv`` and ``predictions.json`` under ``out``. ``threshold``: one number, one per label, or
    None for the bundle's operating point."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    thr = label_thresholds(threshold, bundle)
    paths = {name: out / f"{name}.csv" for name in ("slices", "studies", "series", "problems")}
    write_text(paths["slices"], pred.slices.to_csv(index=False))
    write_text(paths["studies"], pred.studies.to_csv(index=False))
    write_text(paths["series"], pred.series.to_csv(index=False))
    write_text(paths["problems"], pred.problems.to_csv(index=False))
    labels = list(LABELS)
    studies = []
    read = pred.series[pred.series["read"].astype(bool)] if len(pred.series) else pred.series
    why = dict(zip(read["study"], read["reason"], strict=True)) if len(read) else {}
    for st in pred.studies.to_dict("records"):
        g = pred.slices[pred.slices["study_uid"] == st["study_uid"]]
        studies.append({
            "study_uid": st["study_uid"], "series_uid": st["series_uid"], "n_slices": int(st["n_slices"]),
            "series_reason": why.get(st["study_uid"], ""),
            "fov_mm": st.get("fov_mm"), "inplane": st.get("inplane") or "",
            "max_any": st["max_any"], "positive": st["positive"],
            "findings": [{"label": c, "max_prob": st[f"max_{c}"], "slices": st[f"slices_{c}"]}
                         for c in labels[1:] if st[f"max_{c}"] >= thr[c]],
            "max": {c: st[f"max_{c}"] for c in labels},
            "slices": [{"sop_uid": r["sop_uid"], "slice_index": int(r["slice_index"]), "slice": int(r["slice_index"]) + 1, "z": r["z"],
                        "p2d": {c: r[f"p2d_{c}"] for c in labels}, "p": {c: r[f"p_{c}"] for c in labels}}
                       for r in g.to_dict("records")],
        })
    doc = {"threshold": thr, "labels": labels, "studies": studies,
           "problems": pred.problems.to_dict("records"), "cams": pred.cams,
           "seconds": {k: round(float(v), 3) for k, v in pred.seconds.items()}}
    if bundle is not None:
        m = bundle.manifest
        doc["bundle"] = {"source": str(bundle.source), "run": m.get("run"), "created": m.get("created"),
                         "format_version": m.get("format_version")}
    paths["predictions"] = out / "predictions.json"
    write_text(paths["predictions"], json.dumps(json_ready(doc), indent=1, allow_nan=False))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd predict``."""
    parser.add_argument("dir", type=Path, nargs="?", default=None,
                        help="a folder of DICOM files (one study, or many; searched recursively); not with --dicomweb")
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder written by 'ichd export'")
    parser.add_argument("--out", type=Path, required=True, help="output folder (slices.csv, studies.csv, ...)")
    parser.add_argument("--cam", action="store_true", help="write Grad-CAM overlay PNGs for positive slices")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run the models (default: cuda when available)")
    parser.add_argument("--no-fov-norm", action="store_true",
                        help="do not resample series whose in-plane field of view lies outside the training range "
                             "(docs/validation.md)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability for a finding, every label (default: the bundle's operating point per "
                             "label, chosen at export on the out-of-fold studies; 0.5 for older bundles)")
    dicom = parser.add_argument_group("DICOM outputs and PACS (docs/pacs.md)")
    dicom.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                       help="write a DICOM SR per study (and, with --cam, a Grad-CAM Secondary Capture series) here")
    dicom.add_argument("--pmap", action="store_true",
                       help="with --cam and --dicom-out: also the raw Grad-CAM maps as DICOM Parametric Maps "
                            "(one per label; needs sources with a FrameOfReferenceUID)")
    dicom.add_argument("--dicomweb", default=None, metavar="URL",
                       help="read the studies from this DICOMweb server (QIDO/WADO-RS) instead of a folder; "
                            "URL may end in /studies/<StudyInstanceUID>")
    dicom.add_argument("--study", action="append", default=None, metavar="UID",
                       help="StudyInstanceUID to predict (repeatable; with --dicomweb)")
    dicom.add_argument("--since", default=None, metavar="YYYYMMDD",
                       help="with --dicomweb: also every study with a StudyDate from this day on")
    dicom.add_argument("--filter", action="append", default=None, metavar="KEY=VALUE",
                       help="with --dicomweb: also every study QIDO-RS finds with this attribute (repeatable)")
    dicom.add_argument("--store", action="store_true",
                       help="send the DICOM outputs back to the --dicomweb server (STOW-RS); default --dicom-out "
                            "OUT/dicom")
    add_transport_arguments(dicom)


def cli(args: argparse.Namespace) -> int:
    """``ichd predict``: exit 0 when at least one study was predicted, 1 when none could be (with --dicomweb:
    1 when a study failed, 2 when the run stopped on an error every request would repeat)."""
    dicomweb = getattr(args, "dicomweb", None)
    if dicomweb and args.dir is not None:
        raise ValueError(f"give a folder ({args.dir}) or --dicomweb, not both")
    if getattr(args, "pmap", False) and not (args.cam and (args.dicom_out or getattr(args, "store", False))):
        raise ValueError("--pmap needs --cam and --dicom-out (or --store)")
    if not dicomweb:
        if (args.store or args.study or args.since or args.filter or getattr(args, "netrc", None)
                or getattr(args, "ca_bundle", None) or getattr(args, "insecure", False)):
            raise ValueError("--store, --study, --since, --filter, --netrc, --ca-bundle and --insecure need "
                             "--dicomweb URL")
        if args.dir is None:
            raise ValueError("give a folder of DICOM files, or --dicomweb URL --study UID")
        if not args.dir.exists():
            raise FileNotFoundError(f"{args.dir}: no such file or folder")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # also refuses nan
        raise ValueError(f"--threshold {args.threshold}: expected a probability between 0 and 1")
    bundle = Bundle.load(args.bundle)
    given = args.threshold is not None
    thr = label_thresholds(args.threshold, bundle)
    args.threshold = thr  # per label from here on (the DICOM outputs use the "any" threshold)
    if dicomweb:  # study by study from the PACS, resumable (ichdlib.serve.dicomweb_run)
        result = run_dicomweb(args, bundle)
        pred, writer = result.pred, result.writer
    else:
        dicom_out = getattr(args, "dicom_out", None)
        writer = None
        if dicom_out is not None:
            # with --cam the writer also writes the PNGs, so that each Grad-CAM is computed once
            writer = DicomWriter(dicom_out, bundle, thr["any"], cam=args.cam,
                                 png_dir=args.out / "cam" if args.cam else None, pmap=getattr(args, "pmap", False))
        cam_dir = args.out / "cam" if args.cam and writer is None else None
        pred = predict_dir(args.dir, bundle, device=args.device, threshold=thr, cam_dir=cam_dir,
                           progress=True, on_study=writer, fov_norm=not getattr(args, "no_fov_norm", False))
    if writer is not None and args.cam and not dicomweb:
        pred.cams = writer.pngs
    paths = write_outputs(pred, args.out, bundle, thr)
    n_pos = int(pred.studies["positive"].sum()) if len(pred.studies) else 0
    print(f"{len(pred.studies)} stud{'y' if len(pred.studies) == 1 else 'ies'} predicted "
          f"({len(pred.slices)} slices, {n_pos} with a finding) in {pred.seconds['total']:.1f} s; "
          f"{len(pred.problems)} problem(s) listed in {paths['problems']}")
    source = "--threshold" if given else "the bundle's operating point"
    print(f"thresholds ({source}): " + ", ".join(f"{c} {t:.3g}" for c, t in thr.items()))
    read = pred.series[pred.series["read"].astype(bool)].set_index("study") if len(pred.series) else None
    for st in pred.studies.head(20).itertuples():
        print(f"  {st.study_uid}: max any {st.max_any:.3f}" + (f"; {st.findings}" if st.findings else ""))
        if read is not None and st.study_uid in read.index:
            print(f"    series {st.series_uid}: {read.loc[st.study_uid, 'reason']}")
        if getattr(st, "inplane", ""):  # (--dicomweb gathers studies from parts: its problems.csv says it)
            print(f"    in plane: {st.inplane}")
    if len(pred.studies) > 20:
        print(f"  ... {len(pred.studies) - 20} more in {paths['studies']}")
    for p in pred.problems.head(10).itertuples():
        print(f"  [{p.severity}] {p.path or p.study_uid}: {p.message}")
    if len(pred.problems) > 10:
        print(f"  ... {len(pred.problems) - 10} more in {paths['problems']}")
    print(f"outputs: {args.out}")
    if writer is not None:
        print(f"DICOM outputs: {len(writer.paths)} file(s) for {len(writer.written)} stud"
              f"{'y' if len(writer.written) == 1 else 'ies'} in {writer.out}")
    if dicomweb:
        if result.stopped:
            print(f"ichd predict: error: {result.stopped}", file=sys.stderr)
        return result.rc
    return 0 if len(pred.studies) else 1
