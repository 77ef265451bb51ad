"""What other tools write, read leniently but never silently: label CSVs and the folders around a dataset.

Copies of CQ500 and CT-ICH pass through spreadsheets, unzip tools and conversion scripts before they reach
``ichd validate``. This module accepts what such copies look like and refuses the rest with one line:

- **CSV headers** (:func:`read_table`): a UTF-8 byte-order mark, spaces around names, another column order,
  extra columns and another letter case are accepted; required columns are renamed to their canonical
  spelling. Every row keeps its line number in the file (column ``_row``) for messages.
- **0/1 values** (:func:`binary_values`): ``0``/``1``, ``0.0``/``1.0``, ``True``/``False`` (any case,
  surrounding spaces) are read as 0/1; anything else (``2``, ``yes``, an empty cell) is refused, and the
  caller names the row and the column.
- **Dataset roots** (:func:`subdirs`, :func:`find_root`, :func:`child`): a download unzipped into a top folder
  of its own (``ct-ich-1.3.1/ct_scans/...``) is found one level down; file and folder names match in any
  letter case (``CT_Scans``, ``Reads.csv``).
- **Blank rows** (``,,,,`` left by spreadsheets) are not data and are not read.
- **Numbered files** (:func:`numbered_files`): ``049.nii``, ``49.nii`` and ``049.nii.gz`` all name patient 49;
  two files for one number are listed, the first (sorted) is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

#: Column holding each row's line number in its file (header = line 1).
ROW = "_row"
_WORDS = {"true": 1.0, "false": 0.0}


def read_table(path: Path, required: Iterable[str] = (), optional: Iterable[str] = ()) -> pd.DataFrame:
    """A CSV as strings (no NA guessing) with stripped headers, ``required`` (and ``optional``) columns matched
    case-insensitively and renamed to their given spelling, and the file line number of each row in
    :data:`ROW`. A missing required column raises ``ValueError`` naming the file."""
    required = list(required)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", skipinitialspace=True,
                            skip_blank_lines=False)  # empty lines kept (and dropped below) so row numbers are lines
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: cannot read ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    frame.columns = [str(c).replace("\ufeff", "").strip() for c in frame.columns]
    frame = rename_columns(frame, [*required, *optional])
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(frame.columns[:12])})")
    frame[ROW] = np.arange(len(frame)) + 2
    blank = frame.drop(columns=ROW).apply(lambda c: c.str.strip() == "").all(axis=1)
    return frame.loc[~blank]


def canonical_names(columns: Iterable[str], wanted: Iterable[str]) -> dict[str, str]:
    """``{column: wanted name}`` for the columns that spell a wanted name in another case (or with other
    spaces, ``_`` or ``-``); a wanted name present as written is left alone."""
    cols = list(columns)

    def key(name: str) -> str:
        return "".join(ch for ch in name.lower() if ch.isalnum() or ch == ":")

    by_key: dict[str, str] = {}
    for c in cols:
        by_key.setdefault(key(c), c)
    out = {}
    for w in wanted:
        c = by_key.get(key(w))
        if c is not None and c != w and w not in cols:
            out[c] = w
    return out


def rename_columns(frame: pd.DataFrame, wanted: Iterable[str]) -> pd.DataFrame:
    """``frame`` with the columns that spell a ``wanted`` name otherwise renamed to it (:func:`canonical_names`);
    the names as written stay in ``frame.attrs["as_written"]`` for messages (:func:`as_written`)."""
    names = canonical_names(frame.columns, wanted)
    written = {**frame.attrs.get("as_written", {}), **{v: k for k, v in names.items()}}
    out = frame.rename(columns=names)
    out.attrs["as_written"] = written
    return out


def as_written(frame: pd.DataFrame, column: str) -> str:
    """A column's name as the file spells it."""
    return frame.attrs.get("as_written", {}).get(column, column)


def binary_values(frame: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """``cols`` as floats: numbers as written (``1``, ``1.0``, `` 0 ``), ``True``/``False`` as 1/0, anything
    else NaN. The caller keeps the rows whose values are all 0 or 1."""
    text = frame[cols].astype(str).apply(lambda c: c.str.strip().str.lower())
    numbers = text.apply(pd.to_numeric, errors="coerce")
    return numbers.fillna(text.apply(lambda c: c.map(_WORDS))).astype(float)


def row_numbers(frame: pd.DataFrame) -> np.ndarray:
    """Each row's line number in its file (:data:`ROW`; the position + 2 for a frame not read from a file)."""
    if ROW in frame.columns:
        return frame[ROW].to_numpy(int)
    return np.arange(len(frame)) + 2


#: Folders that unzip tools add and that hold no data (macOS resource forks).
JUNK_FOLDERS = ("__MACOSX",)


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted, without :data:`JUNK_FOLDERS` (none when it cannot be read)."""
    try:
        with os.scandir(folder) as entries:  # file types from the directory listing: no stat per file
            return sorted(Path(e.path) for e in entries
                          if not e.name.startswith(".") and e.name not in JUNK_FOLDERS and e.is_dir())
    except OSError:
        return []


def child(folder: Path, name: str) -> Path:
    """``folder / name``, or the entry of ``folder`` that spells ``name`` in another letter case."""
    path = folder / name
    if path.exists():
        return path
    try:
        with os.scandir(folder) as entries:
            return min((Path(e.path) for e in entries if e.name.lower() == name.lower()), default=path)
    except OSError:
        return path


def find_root(root: Path, is_root: Callable[[Path], bool]) -> Path:
    """``root`` if ``is_root(root)``, else its only visible sub-folder for which ``is_root`` holds (a download
    unzipped into a top folder of its own), else ``root``."""
    if is_root(root):
        return root
    below = [d for d in subdirs(root)[:50] if is_root(d)]
    return below[0] if len(below) == 1 else root


def numbered_files(folder: Path, suffixes: tuple[str, ...] = (".nii", ".nii.gz")
                   ) -> tuple[dict[int, Path], list[tuple[Path, str]]]:
    """Files ``<number><suffix>`` in ``folder`` keyed by the number (``049`` and ``49`` are 49), and
    ``[(path, why)]`` for those left out: hidden files, names that are not a number, a second file for one
    number."""
    found: dict[int, Path] = {}
    left: list[tuple[Path, str]] = []
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return found, left
    for p in files:
        suffix = next((s for s in suffixes if p.name.lower().endswith(s)), None)
        if suffix is None:
            continue
        stem = p.name[: -len(suffix)]
        if p.name.startswith("."):
            left.append((p, "hidden file (e.g. macOS ._ metadata), not a volume"))
        elif not stem.isdigit():
            left.append((p, "file name is not a patient number"))
        elif int(stem) in found:
            left.append((p, f"a second file for number {int(stem)} (used {found[int(stem)].name})"))
        else:
            found[int(stem)] = p
    return found, left
