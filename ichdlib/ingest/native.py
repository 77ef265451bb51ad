"""Slices at native resolution read straight from the DICOM files: no copy of the data on disk.

At 512 px a resized HU cache of RSNA's 874k slices would take 458 GB (beside 115 GB at 256 px), more than
the DICOM folder itself; a lossless compressed store (CT int16 compresses about 2-3x) would still add
150-230 GB, over the budget of 0.3x the DICOM folder for all derived data. RSNA's files are uncompressed,
so the catalog's ``pixel_offset`` (recorded by ingest) lets a loader worker read a slice with one
``pread`` of 512 KB and turn it into HU in a few vectorised integer operations; compressed or unusual
files (big-endian, 12-bit intercept fix, MONOCHROME1, non-square or other sizes) go through
:func:`ichdlib.ingest.cache.decode_resized` (pydicom plus the same fixes and resize the cache build uses), so a
row equals the cache row at that size.

:class:`DicomSlices` looks like the cache to :class:`ichdlib.cnn.data.SliceDataset`: ``shape``, ``ndim``,
``len``, ``slices[row]`` and a batched ``read_rows(rows, out)``; it pickles small (the catalog columns it
needs, no pixels), so DataLoader workers each open files themselves. :func:`open_slices` picks the cache
or the DICOM reader for a backbone size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ichdlib.ingest.cache import DECODE_COLUMNS, decode_resized
from ichdlib.ingest.catalog import ensure_cache
from ichdlib.ingest.table import load_catalog

if TYPE_CHECKING:
    from ichdlib.config import Params

_I16_MIN, _I16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max


#: Fixes (``meta["fixes"]``) that change stored pixel values: such slices take the general path.
PIXEL_FIXES = ("intercept_wrap_12bit", "monochrome1_inverted")


def _no_pixel_fixes(v: Any) -> bool:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return True
    names = v.split(";") if isinstance(v, str) else list(v)
    return not any(f in PIXEL_FIXES for f in names)


class DicomSlices:
    """int16 HU slices ``(n_rows, size, size)`` read from the DICOM files listed in a catalog.

    ``cat`` needs ``row`` (the cache row each slice has; the catalog's ``prev_row/row/next_row`` refer
    to it) and :data:`ichdlib.ingest.cache.DECODE_COLUMNS`. Rows absent from ``cat`` read as zeros, as in the
    cache. Reads are thread- and process-safe (no shared file handles).
    """

    def __init__(self, cat: pd.DataFrame, size: int, n_rows: int | None = None) -> None:
        missing = [c for c in ("row", *DECODE_COLUMNS) if c not in cat.columns]
        if missing:
            raise ValueError(f"catalog lacks columns {missing} needed to read slices from DICOM; re-run ingest")
        rows = cat["row"].to_numpy(dtype=np.int64)
        if len(rows) and rows.min() < 0:
            raise ValueError(f"catalog row {int(rows.min())} is negative; re-run ingest")
        if len(np.unique(rows)) != len(rows):
            raise ValueError("catalog `row` values repeat; re-run ingest")
        self.size = int(size)
        n = int(n_rows if n_rows is not None else (rows.max() + 1 if len(rows) else 0))
        if len(rows) and rows.max() >= n:
            raise ValueError(f"catalog row {int(rows.max())} >= n_rows {n}")
        self.n_rows = n
        self.shape = (n, self.size, self.size)
        self.ndim, self.dtype = 3, np.dtype(np.int16)
        # row -> index into the per-slice arrays (-1: not in the catalog)
        self._index = np.full(n, -1, dtype=np.int64)
        self._index[rows] = np.arange(len(rows))
        paths = [str(p) for p in cat["path"]]
        root = os.path.commonpath(paths) if len(paths) > 1 else (os.path.dirname(paths[0]) if paths else "")
        if paths and root == paths[0]:
            root = os.path.dirname(root)
        self.root = root
        cut = len(root) + 1 if root else 0
        self._paths = np.array([p[cut:].encode() for p in paths], dtype=bytes)  # compact, pickles small
        off = cat["pixel_offset"].to_numpy(dtype=np.float64)
        slope = cat["slope"].to_numpy(dtype=np.float64)
        icpt = cat["intercept"].to_numpy(dtype=np.float64)
        alloc = cat["bits_allocated"].to_numpy(dtype=np.float64)
        stored = cat["bits_stored"].to_numpy(dtype=np.float64)
        r, c = cat["rows"].to_numpy(dtype=np.float64), cat["cols"].to_numpy(dtype=np.float64)
        fixes_ok = np.array([_no_pixel_fixes(v) for v in cat["fixes"]], dtype=bool)
        # the one-pread path: native 16-bit, all bits stored, the training size, integer rescale, no fixes
        self._fast = ((off >= 0) & (alloc == 16) & (stored == 16) & (r == self.size) & (c == self.size)
                      & (slope == 1.0) & (icpt == np.round(icpt)) & fixes_ok)
        # decode metadata only for the slices off the fast path (few on RSNA): workers unpickle little
        slow = np.flatnonzero(~self._fast)
        self._slow = np.full(len(rows), -1, dtype=np.int64)
        self._slow[slow] = np.arange(len(slow))
        self._meta = {c: cat[c].to_numpy()[slow] for c in DECODE_COLUMNS if c != "path"}
        self._offset = np.where(off >= 0, off, 0).astype(np.int64)
        self._signed = cat["pixel_representation"].to_numpy(dtype=np.float64) > 0
        self._icpt = np.where(np.isfinite(icpt), icpt, 0).astype(np.int32)

    # -- the cache's interface ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_rows

    @property
    def fast_share(self) -> float:
        """Share of the catalog's slices read with one ``pread`` (the rest go through pydicom/resize)."""
        return float(self._fast.mean()) if len(self._fast) else 1.0

    def path(self, i: int) -> str:
        p = self._paths[i].decode()
        return os.path.join(self.root, p) if self.root else p

    def _read_one(self, row: int, out: np.ndarray) -> None:
        i = int(self._index[row]) if 0 <= row < self.n_rows else -2
        if i == -2:
            raise IndexError(f"row {row} out of range 0..{self.n_rows - 1}")
        if i < 0:
            out[...] = 0
            return
        path = self.path(i)
        if self._fast[i]:
            nbytes = self.size * self.size * 2
            fd = os.open(path, os.O_RDONLY)
            try:
                buf = os.pread(fd, nbytes, int(self._offset[i]))
            finally:
                os.close(fd)
            if len(buf) != nbytes:
                raise OSError(f"{path}: truncated pixel data ({len(buf)} of {nbytes} bytes)")
            raw = np.frombuffer(buf, dtype="<i2" if self._signed[i] else "<u2").reshape(self.size, self.size)
            icpt = int(self._icpt[i])
            tmp = raw.astype(np.int32)
            if icpt:
                tmp += icpt
            np.clip(tmp, _I16_MIN, _I16_MAX, out=tmp)
            out[...] = tmp
            return
        j = int(self._slow[i])
        meta = {c: v[j] for c, v in self._meta.items()}
        meta["path"] = path
        out[...] = decode_resized(path, meta, self.size)

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` ``(len(rows), size, size)`` int16 with the HU slices of cache ``rows``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if out.shape != (len(rows), self.size, self.size):
            raise ValueError(f"out must be ({len(rows)}, {self.size}, {self.size}), got {out.shape}")
        for j, r in enumerate(rows):
            self._read_one(int(r), out[j])
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            out = np.empty((self.size, self.size), np.int16)
            self._read_one(int(key), out)
            return out
        rows = np.arange(self.n_rows)[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = np.empty((*rows.shape, self.size, self.size), np.int16)
        self.read_rows(rows.reshape(-1), out.reshape(-1, self.size, self.size))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError("DicomSlices is not an in-memory array (it would read every file); index rows instead")


def open_slices(P: Params, size: int, catalog: pd.DataFrame | None = None) -> Any:
    """What the 2D datasets read for a backbone at ``size``: the HU cache ``cache_<size>.npy`` (built when
    missing) for sizes up to ``ingest.size``; above it (the 512 px model) the DICOM files at native
    resolution through :class:`DicomSlices`, with no copy on disk."""

    if int(size) <= int(P.ingest.size):
        return ensure_cache(P, size)
    if catalog is None:
        catalog = load_catalog(P.layout.work)
    return DicomSlices(catalog, size)


def native_bytes(path: str | os.PathLike) -> int:
    """Bytes under a folder (the DICOM folder's size for the disk budget)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
