"""The six RSNA labels, their order and weights, and Kaggle long/wide CSV conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: Label order used everywhere (alphabetical after ``any``, as a pandas pivot yields it).
LABELS: tuple[str, ...] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
SUBTYPES: tuple[str, ...] = LABELS[1:]
#: Competition weights: ``any`` counts twice.
WEIGHTS: np.ndarray = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float64)
#: Order of the six rows per image in the Kaggle files.
KAGGLE_ROW_ORDER: tuple[str, ...] = SUBTYPES + ("any",)


class LabelFileError(ValueError):
    """A label or submission CSV that cannot be parsed."""


def short_uid(uid: object, n: int = 8) -> str:
    """The one abbreviation of a study (or image) UID in figure titles: ``…`` and its last ``n`` characters
    (the whole UID when it is that short). Tables, captions and dropdowns show the whole UID."""
    text = str(uid)
    return text if len(text) <= n + 1 else "…" + text[-n:]


def split_id(long_id: str) -> tuple[str, str]:
    """``'ID_abc123_subdural'`` -> ``('ID_abc123', 'subdural')``."""
    parts = long_id.rsplit("_", 1)
    if len(parts) != 2 or parts[1] not in LABELS or not parts[0].startswith("ID_"):
        raise LabelFileError(f"malformed ID {long_id!r}: expected 'ID_<hex>_<label>'")
    return parts[0], parts[1]


def check_values(long: pd.DataFrame, source: str, values: str = "probability") -> np.ndarray:
    """The ``Label`` column as float64, checked: ``binary`` (truth: 0 or 1, also written 0.0/1.0) or
    ``probability`` (a finite number in [0, 1]). Anything else (``2``, ``-1``, ``yes``, empty, NaN) raises
    :class:`LabelFileError` naming the file, the first bad line (1-based, the header is line 1), its ID and
    value, and how many lines are bad."""
    raw = long["Label"]
    num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    if values == "binary":
        ok = (num == 0.0) | (num == 1.0)
        want = "0 or 1"
    else:
        ok = np.isfinite(num) & (num >= 0.0) & (num <= 1.0)
        want = "a probability in [0, 1]"
    if not ok.all():
        bad = np.flatnonzero(~ok)
        i = int(bad[0])
        more = f" ({len(bad)} bad lines in all)" if len(bad) > 1 else ""
        raise LabelFileError(f"{source}: line {i + 2}: Label {raw.iloc[i]!r} for {long['ID'].iloc[i]!r}: "
                             f"expected {want}{more}")
    return num


def long_to_wide(long: pd.DataFrame, *, source: str = "<frame>",
                 values: str = "probability") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pivot long ``ID,Label`` rows into one row per image with the six label columns.

    ``values``: ``binary`` for truth (labels must be 0 or 1), ``probability`` for predictions and the
    sample submission (a finite number in [0, 1]); see :func:`check_values`.

    Exact duplicate rows are dropped; conflicting duplicates keep the maximum value and are reported.
    Returns ``(wide, problems)``: ``wide`` is indexed by ``sop_uid`` with columns :data:`LABELS`;
    ``problems`` lists ``sop_uid, reason`` for images with conflicting or missing label rows
    (missing rows are left as NaN).
    """
    if list(long.columns[:2]) != ["ID", "Label"]:
        raise LabelFileError(f"{source}: expected header 'ID,Label', got {list(long.columns)}")
    ids = long["ID"].astype(str)
    parts = ids.str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2:
        raise LabelFileError(f"{source}: no row has the form 'ID_<hex>_<label>'")
    bad = ~parts[1].isin(LABELS) | ~parts[0].str.startswith("ID_")
    if bad.any():
        first = ids[bad].iloc[0]
        raise LabelFileError(f"{source}: {int(bad.sum())} malformed ID(s), first {first!r}")
    value = check_values(long, source, values)
    frame = pd.DataFrame({"sop_uid": parts[0], "label": parts[1], "value": value})
    frame = frame.drop_duplicates()
    problems = []
    dup = frame.duplicated(["sop_uid", "label"], keep=False)
    if dup.any():
        for sop in frame.loc[dup, "sop_uid"].unique():
            problems.append((sop, "conflicting duplicate label rows; kept the maximum"))
    wide = frame.pivot_table(index="sop_uid", columns="label", values="value", aggfunc="max")
    wide = wide.reindex(columns=list(LABELS))
    missing = wide.isna().any(axis=1)
    for sop in wide.index[missing]:
        problems.append((sop, "missing label rows for " + ",".join(c for c in LABELS if pd.isna(wide.at[sop, c]))))
    wide.columns.name = None
    return wide, pd.DataFrame(problems, columns=["sop_uid", "reason"])


def read_labels(path: str | Path, values: str = "probability") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a Kaggle long-format CSV into ``(wide, problems)``: labels (``stage_2_train.csv``, an answer key)
    with ``values="binary"``, predictions or a sample submission with the default ``probability``."""
    path = Path(path)
    try:
        long = pd.read_csv(path, dtype={"ID": str, "Label": str}, keep_default_na=False)
    except Exception as exc:  # pandas raises many types
        raise LabelFileError(f"{path}: cannot read CSV ({exc})") from exc
    if list(long.columns[:2]) != ["ID", "Label"]:
        raise LabelFileError(f"{path}: expected header 'ID,Label', got {list(long.columns)}")
    return long_to_wide(long, source=str(path), values=values)


def wide_to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """One row per image (index or column ``sop_uid``, columns :data:`LABELS`) -> Kaggle ``ID,Label`` rows.

    Rows come per image in the Kaggle order (subtypes, then ``any``).
    """
    if "sop_uid" in wide.columns:
        wide = wide.set_index("sop_uid")
    missing = [c for c in LABELS if c not in wide.columns]
    if missing:
        raise LabelFileError(f"missing label columns {missing}")
    values = wide[list(KAGGLE_ROW_ORDER)].to_numpy()
    sops = np.repeat(wide.index.to_numpy(dtype=str), len(KAGGLE_ROW_ORDER))
    suffix = np.tile(np.array(KAGGLE_ROW_ORDER, dtype=object), len(wide))
    ids = pd.Series(sops, dtype=object) + "_" + pd.Series(suffix, dtype=object)
    return pd.DataFrame({"ID": ids.to_numpy(), "Label": values.reshape(-1)})


def write_long_csv(wide: pd.DataFrame, path: str | Path, *, float_format: str = "%.6f") -> Path:
    """Write predictions or labels in the exact Kaggle format (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    wide_to_long(wide).to_csv(tmp, index=False, float_format=float_format)
    tmp.replace(path)
    return path
