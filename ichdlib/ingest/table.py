"""The slice catalog's contract: its columns and files, reading it, and the z order every stage shares.

:mod:`ichdlib.ingest.catalog` builds the catalog; everything that only reads it (training, features,
sequence models, the ensemble, ``ichd predict``'s slice order) imports this small module instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ichdlib.ingest.cache import DECODE_COLUMNS
from ichdlib.labels import LABELS
from ichdlib.layout import CATALOG, INGEST_REPORT, INGEST_STATE, QUARANTINE

CATALOG_COLUMNS = [
    "sop_uid",
    "patient_id",
    "study_uid",
    "series_uid",
    "z",
    "slice_index",
    "n_slices",
    "rows",
    "cols",
    "pixel_spacing",
    "spacing_z",
    "path",
    "split",
    "fold",
    *LABELS,
    "row",
    "prev_row",
    "next_row",
    "dup_z",
]
#: Header fields kept after the contract columns: what the cache pass decodes with
#: (``cache.DECODE_COLUMNS``, one source of truth) plus a few for people and reports.
HEADER_COLUMNS = [
    "modality",
    "instance_number",
    *(c for c in DECODE_COLUMNS if c not in CATALOG_COLUMNS),
    "window_center",
    "window_width",
    "pixel_nbytes",
]
QUARANTINE_COLUMNS = ["sop_uid", "path", "split", "reason"]
#: File names in the work folder (:mod:`ichdlib.layout`, where the run layout is spelled).
REPORT, STATE = INGEST_REPORT, INGEST_STATE
_SPLITS = ("train", "test")


def load_catalog(work: str | os.PathLike) -> pd.DataFrame:
    """Read ``WORK/catalog.parquet``; ``FileNotFoundError`` saying what to run when missing."""
    path = Path(work) / CATALOG
    if not path.is_file():
        raise FileNotFoundError(
            f"no catalog at {path}: run `ichd ingest --root DATA --work {Path(work)}` "
            "or ichdlib.ingest.catalog.ingest(params)"
        )
    return pd.read_parquet(path)


def load_quarantine(work: str | os.PathLike) -> pd.DataFrame:
    """Read ``WORK/quarantine.csv`` (empty frame with the columns when there is none)."""
    path = Path(work) / QUARANTINE
    if not path.is_file():
        return pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def order_slices(cat: pd.DataFrame) -> pd.DataFrame:
    """Sort by split (train first), study, z (missing z last), sop_uid; fill the within-study columns.

    ``slice_index``, ``n_slices``, ``prev_row``/``next_row`` (itself at a study's edge), ``spacing_z``
    (gap to the next slice; the last slice repeats the previous gap; 0 for a single slice) and ``dup_z``.
    ``row`` is kept as it is (it points into the cache).
    """
    cat = cat.assign(_split=cat["split"].map({s: i for i, s in enumerate(_SPLITS)}))
    cat = cat.sort_values(["_split", "study_uid", "z", "sop_uid"], na_position="last", kind="mergesort")
    cat = cat.drop(columns="_split").reset_index(drop=True)
    n = len(cat)
    if n == 0:
        return cat.assign(slice_index=[], n_slices=[], prev_row=[], next_row=[], spacing_z=[], dup_z=[])
    key = cat["split"] + "\x00" + cat["study_uid"]
    start = (key != key.shift()).to_numpy()
    group = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    sizes = np.diff(np.append(first, n))
    pos = np.arange(n)
    idx = pos - first[group]
    count = sizes[group]
    prev_i = np.where(idx == 0, pos, pos - 1)
    next_i = np.where(idx == count - 1, pos, pos + 1)
    row = cat["row"].to_numpy()
    z = cat["z"].to_numpy(dtype=np.float64)
    gap_next = z[next_i] - z
    gap_prev = z - z[prev_i]
    spacing = np.where(idx == count - 1, gap_prev, gap_next)
    cat["slice_index"] = idx
    cat["n_slices"] = count
    cat["prev_row"] = row[prev_i]
    cat["next_row"] = row[next_i]
    cat["spacing_z"] = np.nan_to_num(spacing, nan=0.0)
    cat["dup_z"] = cat.duplicated(["split", "study_uid", "z"], keep=False) & cat["z"].notna()
    return cat


