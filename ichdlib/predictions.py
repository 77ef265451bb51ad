"""A stage's predictions as the ensemble, the review and the sequence notebook read them.

Stages are named ``cnn:<key>`` (one per 2D backbone, ``work/cnn/<key>/``) and by their registered sequence
model (``work/seq/<model>/``); each has an OOF frame (``sop_uid, fold`` + six labels, training slices) and a
test frame (``sop_uid`` + six labels). Where the files are comes from :mod:`ichdlib.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ichdlib.config import Params
from ichdlib.labels import LABELS
from ichdlib.layout import ModelDir
from ichdlib.registry import SEQ_MODELS

L = list(LABELS)


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------
def stage_names(P: Params) -> list[str]:
    """Every stage this run produces: ``cnn:<key>`` per backbone, then the sequence models, then ``cnn3d`` (the
    3D member, when ``cnn3d.enabled``)."""
    return [f"cnn:{b.key}" for b in P.cnn.backbones] + list(P.seq.models) + (["cnn3d"] if P.cnn3d.enabled else [])


def stage_dir(P: Params, name: str) -> Path:
    """Folder holding a stage's ``oof.parquet`` and ``test.parquet``."""
    if name.startswith("cnn:"):
        return P.layout.cnn(name[4:]).path
    if name in SEQ_MODELS:
        return P.layout.seq(name).path
    if name == "cnn3d":
        return P.layout.cnn3d(P.cnn3d.key).path
    raise ValueError(f"unknown stage {name!r}: expected 'cnn:<key>', 'cnn3d' or a sequence model "
                     f"({', '.join(SEQ_MODELS)})")


@dataclass
class StagePredictions:
    """One stage's predictions as wide frames indexed by ``sop_uid`` (``oof`` also has ``fold``)."""

    name: str
    oof: pd.DataFrame
    test: pd.DataFrame
    source: str = ""


def stage_files(P: Params, name: str) -> tuple[Path, Path]:
    """A stage's OOF and test files. For a 2D backbone these are notebook 03's TTA probabilities (what the
    sequence models read, and the stronger 2D baseline) when they exist, else notebook 02's tables."""
    if name.startswith("cnn:"):
        f = P.layout.features(name[4:])
        if f.oof_prob.is_file() and f.test_prob.is_file():
            return f.oof_prob, f.test_prob
    d = ModelDir(stage_dir(P, name))
    return d.oof, d.test


def load_stage(P: Params, name: str, catalog: pd.DataFrame | None = None) -> StagePredictions:
    """Read a stage's OOF and test predictions; a missing file names the notebook that writes it. An OOF
    table without ``fold`` gets it from ``catalog``."""
    frames = []
    paths = stage_files(P, name)
    for path in paths:
        if not path.is_file():
            nb = ("02 (2D CNN)" if name.startswith("cnn:") else "02b (3D CNN)" if name == "cnn3d"
                  else "04 (sequence models)")
            raise FileNotFoundError(f"{path}: missing; run notebook {nb} first")
        df = pd.read_parquet(path)
        missing = [c for c in ["sop_uid", *L] if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        if df["sop_uid"].duplicated().any():
            raise ValueError(f"{path}: duplicate sop_uid, e.g. {df.sop_uid[df.sop_uid.duplicated()].iloc[0]!r}")
        frames.append(df.set_index("sop_uid"))
    oof = frames[0]
    if "fold" not in oof.columns and catalog is not None:
        oof["fold"] = catalog.set_index("sop_uid")["fold"].reindex(oof.index).to_numpy()
    work = P.layout.work
    source = str(paths[0].parent.relative_to(work)) if paths[0].is_relative_to(work) else str(paths[0])
    return StagePredictions(name, oof, frames[1], source)


def resolve_members(P: Params) -> list[str]:
    """``ensemble.members`` with ``cnn:*`` expanded to every backbone."""
    out: list[str] = []
    for m in P.ensemble.members:
        names = [f"cnn:{b.key}" for b in P.cnn.backbones] if m == "cnn:*" else [m]
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("ensemble.members is empty")
    return out


