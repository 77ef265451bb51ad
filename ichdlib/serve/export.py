"""Bundles in a profile and a runtime: the student's bundle, and writing any bundle with ONNX graphs.

``ichd export`` (:mod:`ichdlib.app.export_cli`) composes: ``--profile full`` (default) every fold model, TTA
view and blend member; ``--profile fast`` what :func:`ichdlib.serve.profiles.select_profile` picks on the
run's out-of-fold predictions; ``--profile student`` the distilled network of ``ichd train --stage distill``
(:func:`student_bundle`). ``--runtime onnx`` adds the ONNX graphs the serve pipeline then runs on the CPU
(:func:`save_bundle`, :mod:`ichdlib.serve.onnx_runtime`). Every consumer of a bundle (``ichd predict``,
``--dicom-out``, validation) runs what the bundle holds, unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ichdlib.distill import student_dir
from ichdlib.serve import bundle as B
from ichdlib.serve.bundle_build import _collect, _manifest
from ichdlib.serve.onnx_runtime import ENGINES, add_onnx

PROFILES = ("full", "fast", "student")


def student_bundle(P: Any) -> Any:
    """The distilled student (:mod:`ichdlib.distill`) as a bundle: its deployed fold network, the validation
    view only, no sequence model, blend weight 1."""
    d = student_dir(P)
    if not d.done.is_file():
        raise B.BundleError(f"{d.done}: no finished student; run 'ichd train PARAMS --stage distill' first")
    fold = int(json.loads(d.done.read_text())["deploy_fold"])
    member = _collect(d.path, "cnn", d.path.name, [fold], "run 'ichd train PARAMS --stage distill' first")
    name = f"cnn:{member.key}"
    ensemble = {"method": "mean", "members": [name], "weights": {name: 1.0}, "sources": {name: "cnn"}}
    bundle = B.Bundle(_manifest(P, {member.key: member}, {}, [], ensemble), {member.key: member}, {},
                      source=str(d.path))
    bundle.manifest["profile"] = {"name": "student", "folds": {member.key: [fold]}, "views": [0],
                                  "members": [name]}
    return bundle


def save_bundle(bundle: Any, out: str | os.PathLike, *, runtime: str = "torch", engine: str = "onnxruntime",
                force: bool = False) -> Path:
    """Write ``bundle`` to ``out`` with, for ``runtime="onnx"``, its ONNX graphs for ``engine`` (atomically:
    built in a sibling folder, renamed into place)."""
    if runtime not in ("torch", "onnx"):
        raise ValueError(f"--runtime {runtime!r}: expected torch or onnx")
    if runtime == "onnx" and engine not in ENGINES[1:]:
        raise ValueError(f"--engine {engine!r}: expected one of {', '.join(ENGINES[1:])}")
    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):
        raise B.BundleError(f"{out}: exists and is not empty (choose another --out, or --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build.", dir=out.parent))
    try:
        bundle.save(tmp / "b")
        if runtime == "onnx":
            add_onnx(tmp / "b", engine=engine)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "b", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
