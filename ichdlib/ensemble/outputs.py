"""What notebook 05 writes: the Kaggle submission (filled with the prior where the catalog lacks an image,
validated against the sample submission) and ``metrics.json`` (merge-updated), and the truth it scores
against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdlib.config import Params
from ichdlib.files import json_ready, write_text
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS, LabelFileError, long_to_wide, read_labels, split_id, write_long_csv
from ichdlib.metrics import prior_baseline

L = list(LABELS)


# ----------------------------------------------------------------------------------------------------
# Submission
# ----------------------------------------------------------------------------------------------------
def read_sample_ids(sample_path: str | Path) -> pd.Index:
    """The image IDs (``ID_<sop>``) of a Kaggle sample submission, in file order."""
    sample_path = Path(sample_path)
    if not sample_path.is_file():
        raise FileNotFoundError(f"{sample_path}: sample submission not found")
    long = pd.read_csv(sample_path, dtype={"ID": str})
    long_to_wide(long, source=str(sample_path))  # checks the format
    order = long["ID"].str.rsplit("_", n=1).str[0].drop_duplicates().to_numpy(str)
    return pd.Index(order, name="sop_uid")


def train_prior(P: Params, catalog: pd.DataFrame | None = None) -> np.ndarray:
    """Each label's frequency over the catalog's training slices (the prior-only prediction)."""
    if catalog is None:
        catalog = load_catalog(P.layout.work)
    y = catalog.loc[catalog["split"] == "train", L].to_numpy(float)
    return prior_baseline(y, 1)[0]


def fill_prior(pred: pd.DataFrame, ids: pd.Index, prior: np.ndarray) -> tuple[pd.DataFrame, list[str]]:
    """``pred`` reindexed to ``ids``; images without a prediction get ``prior``. Returns (frame, filled IDs)."""
    out = pred[L].astype(np.float64).reindex(ids)
    missing = out.index[out.isna().any(axis=1)]
    out.loc[missing, L] = np.tile(prior, (len(missing), 1))
    out.index.name = "sop_uid"
    return out, [str(m) for m in missing]


def validate_submission(path: str | Path, sample_path: str | Path, max_report: int = 5) -> pd.DataFrame:
    """Check a submission against the sample: header ``ID,Label``, the same IDs (none missing, none extra,
    no duplicates), well-formed IDs, probabilities in [0, 1] and no NaN. Raises ValueError naming the file
    and the first problems; returns the file as a DataFrame when it is valid."""
    path, sample_path = Path(path), Path(sample_path)
    try:
        sub = pd.read_csv(path, dtype={"ID": str})
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as CSV ({exc})") from exc
    sample = pd.read_csv(sample_path, dtype={"ID": str})
    problems: list[str] = []
    if list(sub.columns) != ["ID", "Label"]:
        raise ValueError(f"{path}: invalid submission: header must be 'ID,Label', got {','.join(map(str, sub.columns))!r}")
    ids = sub["ID"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        problems.append(f"{len(dup)} duplicate ID(s), first {dup.iloc[0]!r}")
    bad = []
    for i in ids:
        try:
            split_id(i)
        except LabelFileError:
            bad.append(i)
    if bad:
        problems.append(f"{len(bad)} malformed ID(s), first {bad[0]!r} (expected 'ID_<hex>_<label>')")
    want, got = set(sample["ID"].astype(str)), set(ids)
    missing = [i for i in sample["ID"].astype(str) if i not in got]
    extra = [i for i in ids if i not in want]
    if missing:
        problems.append(f"{len(missing)} ID(s) of the sample submission missing, first {missing[:max_report]}")
    if extra:
        problems.append(f"{len(extra)} ID(s) not in the sample submission, first {extra[:max_report]}")
    label = pd.to_numeric(sub["Label"], errors="coerce")
    nan = ids[label.isna()]
    if len(nan):
        problems.append(f"{len(nan)} Label(s) empty, NaN or not a number, first at {nan.iloc[0]!r}")
    out = ids[(label < 0) | (label > 1)]
    if len(out):
        problems.append(f"{len(out)} Label(s) outside [0, 1], first at {out.iloc[0]!r} "
                        f"({label[(label < 0) | (label > 1)].iloc[0]})")
    if problems:
        raise ValueError(f"{path}: invalid submission ({len(sub)} rows, sample {sample_path.name} has "
                         f"{len(sample)}):\n  - " + "\n  - ".join(problems[:max_report]))
    return sub


def write_submission(P: Params, test: pd.DataFrame, prior: np.ndarray) -> tuple[Path, list[str]]:
    """Write ``reports/<run>/submission.csv`` for every image of the sample submission (images the catalog
    lacks, e.g. a quarantined corrupt file, get ``prior``), validate it, and return (path, filled IDs)."""
    sample_path = P.data_root / P.paths.sample_submission
    ids = read_sample_ids(sample_path)
    extra = test.index.difference(ids)
    if len(extra):
        raise ValueError(f"{len(extra)} predicted test image(s) are not in {sample_path}, e.g. {list(extra[:3])}")
    wide, filled = fill_prior(test, ids, prior)
    path = write_long_csv(np.clip(wide, 0.0, 1.0), P.layout.submission)
    validate_submission(path, sample_path)
    return path, filled


# ----------------------------------------------------------------------------------------------------
# Scores and metrics.json
# ----------------------------------------------------------------------------------------------------
def update_metrics(P: Params, updates: dict[str, Any]) -> dict:
    """Merge ``updates`` into ``reports/<run>/metrics.json`` (dicts merged one level deep, other keys such as
    ``pointing_game`` kept) and write it atomically. Returns the merged content."""
    path = P.layout.metrics
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); move it away to start afresh") from exc
    for key, val in updates.items():
        if isinstance(val, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **val}
        else:
            data[key] = val
    data = json_ready(data)
    write_text(path, json.dumps(data, indent=2))
    return data


def read_truth(P: Params, catalog: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(OOF truth from the catalog's training slices, test truth from ``paths.answer_key`` or None)."""
    tr = catalog[catalog["split"] == "train"].set_index("sop_uid")[L].astype(float)
    test = None
    if P.paths.answer_key:
        key = P.data_root / P.paths.answer_key
        if key.is_file():
            test, _ = read_labels(key, values="binary")
            test = test.dropna()
    return tr, test
