"""The resized HU cache ``WORK/cache_<size>.npy``: int16, ``(n_rows, size, size)``, in catalog ``row`` order.

Built by worker processes that decode and resize slices and write their rows straight into
``cache_<size>.npy.partial`` at the row's offset; nothing holds more than one slice per worker in memory.
A sidecar ``cache_<size>.progress.json`` records the finished chunks (and the slices that failed to
decode), so an interrupted build continues where it stopped; the final name appears (atomic rename, after
an fsync) only when every chunk is done. Rows of slices that are not in the catalog stay zero.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from ichdlib.files import read_json, write_json
from ichdlib.ingest.dicom import DicomReadError, fix_stored, read_hu, read_stored, rescale
from ichdlib.layout import RunLayout
from ichdlib.runtime import LazyPool, run_tasks

if TYPE_CHECKING:
    import pandas as pd


#: Catalog columns a worker needs to decode a slice without parsing its header again.
DECODE_COLUMNS = (
    "path",
    "rows",
    "cols",
    "slope",
    "intercept",
    "bits_allocated",
    "bits_stored",
    "pixel_representation",
    "photometric",
    "transfer_syntax",
    "pixel_offset",
    "fixes",
)
_INT16 = np.iinfo(np.int16)
_SAVE_EVERY_S = 1.0


def cache_path(work: str | os.PathLike, size: int) -> Path:
    """``WORK/cache_<size>.npy``."""
    return RunLayout.of_work(work).cache(size)


def _partial(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def _sidecar(final: Path) -> Path:
    return final.with_name(final.stem + ".progress.json")


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape == (size, size):
        return img
    shrink = img.shape[0] >= size and img.shape[1] >= size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), _INT16.min, _INT16.max).astype(np.int16)


def resize_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """HU slice -> ``(size, size)`` int16: area interpolation when shrinking, bilinear when enlarging.

    Non-square slices are resized to a square (no padding); values are rounded and clipped to int16.
    """
    return _to_int16(_resize(np.asarray(hu, dtype=np.float32), size))


def decode_resized(path: str | os.PathLike, meta: dict[str, Any], size: int) -> np.ndarray:
    """One cache row: ``resize_hu(read_hu(path)[0], size)``, computed faster when the file allows.

    For native files the stored values are read raw, resized, then rescaled (the rescale is affine, so
    it commutes with the interpolation: the same numbers up to float rounding, at most 1 HU apart).
    """
    stored = read_stored(path, meta)
    if stored is None:
        hu = read_hu(path)[0]
        _check_finite(path, hu)
        return resize_hu(hu, size)
    hu = rescale(_resize(fix_stored(stored, meta).astype(np.float32), size), meta)
    _check_finite(path, hu)
    return _to_int16(hu)


def _check_finite(path: str | os.PathLike, hu: np.ndarray) -> None:
    """HU that are not finite (an extreme rescale) never become a clipped, plausible-looking cache row."""
    if not np.isfinite(hu).all():
        raise DicomReadError(path, "pixel values are not finite after the rescale (RescaleSlope/Intercept)")


def open_cache(work: str | os.PathLike, size: int) -> np.memmap:
    """The finished cache as a read-only memmap; ``FileNotFoundError`` saying what to run when missing."""
    final = cache_path(work, size)
    if not final.is_file():
        if _partial(final).exists():
            raise FileNotFoundError(
                f"HU cache {final} is incomplete (an interrupted build left "
                f"{_partial(final).name}); rerun `ichd ingest --size {size}` to finish it"
            )
        raise FileNotFoundError(
            f"no HU cache at {final}: run `ichd ingest --work {Path(work)} --size {size}` "
            f"or ichdlib.ingest.catalog.ensure_cache(params, {size})"
        )
    return np.load(final, mmap_mode="r")


# -- process pool ---------------------------------------------------------------------------------------
# -- building -------------------------------------------------------------------------------------------
class _RowWriter:
    """Writes whole rows into an existing ``.npy`` file (plain writes: a memmap would page-fault per page)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(fh)
            self.offset = fh.tell()
        self.shape = tuple(shape[1:])
        self.row_bytes = int(np.prod(self.shape)) * dtype.itemsize
        self.fh = open(path, "r+b", buffering=0)  # closed by __exit__

    def write(self, row: int, values: np.ndarray) -> None:
        if values.shape != self.shape:
            raise ValueError(f"cache row of shape {values.shape}, expected {self.shape}")
        self.fh.seek(self.offset + int(row) * self.row_bytes)
        self.fh.write(np.ascontiguousarray(values, dtype="<i2").data)

    def __enter__(self) -> _RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def _fill_chunk(task: tuple) -> tuple[int, dict[int, str]]:
    """Worker: decode, resize and write one chunk of rows into the partial cache; return its failures."""
    partial, size, chunk_id, rows, columns = task
    keys = list(columns)
    failures: dict[int, str] = {}
    with _RowWriter(partial) as writer:
        for row, values in zip(rows, zip(*columns.values(), strict=True), strict=True):
            meta = dict(zip(keys, values, strict=True))
            try:
                writer.write(row, decode_resized(meta["path"], meta, size))
                continue
            except DicomReadError as exc:
                failures[int(row)] = f"unreadable: {exc}"
            except Exception as exc:  # one bad slice never stops the build
                failures[int(row)] = f"unreadable: {meta['path']}: {type(exc).__name__}: {exc}"
            writer.write(row, np.zeros((size, size), np.int16))
    return chunk_id, failures


def pending_failures(work: str | os.PathLike, size: int) -> dict[int, str]:
    """Decode failures of a finished cache not yet applied to the catalog (empty when none)."""
    final = cache_path(work, size)
    side = read_json(_sidecar(final))
    if final.is_file() and side.get("complete"):
        return {int(k): v for k, v in side.get("failures", {}).items()}
    return {}


def finish_cache(work: str | os.PathLike, size: int) -> None:
    """Forget the sidecar once the catalog reflects the cache's failures."""
    final = cache_path(work, size)
    if final.is_file():
        _sidecar(final).unlink(missing_ok=True)


def remove_caches(work: str | os.PathLike) -> None:
    """Delete every cache, partial cache and sidecar in ``work`` (they belong to an older catalog)."""
    for p in RunLayout.of_work(work).caches():
        if p.is_file() and (p.suffix in {".npy", ".partial", ".json", ".tmp"}):
            p.unlink()


def build_cache(
    cat: pd.DataFrame,
    work: str | os.PathLike,
    size: int,
    *,
    n_rows: int,
    fingerprint: str,
    pool: LazyPool | None = None,
    force: bool = False,
    progress: bool = True,
    chunk: int = 0,
    before_publish: Callable[[dict[int, str]], None] | None = None,
) -> dict[int, str]:
    """Build ``WORK/cache_<size>.npy`` for the catalog's rows (resuming an interrupted build).

    Returns ``{row: reason}`` for slices that failed to decode (their rows are zero). The caller drops
    them from the catalog in ``before_publish(failures)`` (called before the final rename, and again for a
    finished cache whose failures may not have been applied: it must be idempotent), then calls
    :func:`finish_cache`. A finished cache is not rebuilt unless ``force``.
    """
    final = cache_path(work, size)
    partial, side_path = _partial(final), _sidecar(final)
    if force:
        for p in (final, partial, side_path):
            p.unlink(missing_ok=True)
    if final.is_file():
        failures = pending_failures(work, size)
        if failures and before_publish is not None:
            before_publish(failures)
        return failures
    order = np.argsort(cat["row"].to_numpy(), kind="stable")
    rows = cat["row"].to_numpy(dtype=np.int64)[order]
    side = read_json(side_path)
    if not (
        partial.is_file()
        and side.get("fingerprint") == fingerprint
        and side.get("n_rows") == n_rows
        and side.get("size") == size
    ):
        n_workers = pool.workers if pool is not None else 1
        chunk = chunk or int(np.clip(len(rows) // (8 * n_workers), 4, 256))
        side = {
            "fingerprint": fingerprint,
            "n_rows": int(n_rows),
            "size": int(size),
            "chunk": chunk,
            "done": [],
            "failures": {},
            "complete": False,
        }
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.int16, shape=(n_rows, size, size)).flush()
        write_json(side_path, side, indent=None)
    chunk = int(side["chunk"])
    done = set(side["done"])
    columns = {c: cat[c].to_numpy()[order] for c in DECODE_COLUMNS}
    n_chunks = (len(rows) + chunk - 1) // chunk
    todo = [c for c in range(n_chunks) if c not in done]

    def tasks() -> Iterator[tuple]:
        for c in todo:
            sel = slice(c * chunk, (c + 1) * chunk)
            yield str(partial), size, c, rows[sel].tolist(), {k: v[sel].tolist() for k, v in columns.items()}

    bar = tqdm(
        total=len(rows),
        initial=min(len(done) * chunk, len(rows)),
        desc=f"cache {size}px",
        unit="slice",
        disable=not progress,
        mininterval=1.0,
    )
    last = time.monotonic()
    try:
        for chunk_id, failures in run_tasks(_fill_chunk, tasks(), pool):
            side["done"].append(chunk_id)
            side["failures"].update({str(k): v for k, v in failures.items()})
            bar.update(len(rows[chunk_id * chunk : (chunk_id + 1) * chunk]))
            if time.monotonic() - last > _SAVE_EVERY_S:
                write_json(side_path, side, indent=None)
                last = time.monotonic()
    finally:
        bar.close()
        if partial.exists():
            write_json(side_path, side, indent=None)
    failures = {int(k): v for k, v in side["failures"].items()}
    # The workers' writes sit in the page cache: put them on disk (in the background, while the caller
    # drops the failed slices from the catalog), then publish the cache under its final name.
    syncer = threading.Thread(target=_fsync, args=(partial,))
    syncer.start()
    try:
        if before_publish is not None:
            before_publish(failures)
    finally:
        syncer.join()
    side["complete"] = True
    write_json(side_path, side, indent=None)
    os.replace(partial, final)
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows
        fd = os.open(final.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return failures


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
