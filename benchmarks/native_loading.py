"""Host loading at native resolution: slices/s of one DataLoader worker reading s-1/s/s+1 from DICOM files.

Writes ``--files`` RSNA-like uncompressed 512 px DICOM slices (signed int16, intercept -1024) into a
temporary folder, then times :meth:`ichdlib.cnn.data.SliceDataset.__getitems__` over
:class:`ichdlib.ingest.native.DicomSlices` (what one loader worker does per batch: three ``pread`` s per slice and
the integer rescale to HU, into one int16 batch) beside the same batches gathered from a memory-mapped
512 px cache (the copy we avoid). Windows and augmentation run on the device after the copy; ``--aug``
also times them on this CPU for the record. Files sit in the page cache after writing (a warm read); the
first epoch over a cold disk reads at the disk's speed (16 workers x 300 slices/s x 1.5 MB = 7 GB/s).

    python benchmarks/native_loading.py [--files 600] [--batch 64] [--seconds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ichdlib.cnn.data import SliceDataset
from ichdlib.ingest.cache import DECODE_COLUMNS
from ichdlib.ingest.dicom import read_header
from ichdlib.ingest.native import DicomSlices
from ichdlib.phantom.synth import write_ct_dicom


def write_files(folder: Path, n: int, size: int = 512, per_study: int = 30) -> pd.DataFrame:
    """``n`` RSNA-like DICOM slices and their catalog frame (``row``, neighbour rows, decode columns)."""
    rng = np.random.default_rng(0)
    base = rng.normal(30, 20, size=(size, size))
    recs = []
    for i in range(n):
        hu = np.clip(base + rng.normal(0, 5, size=(size, size)), -1024, 3000)
        p = write_ct_dicom(folder / f"ID_{i:06d}.dcm", hu, encoding="signed", z=float(i % per_study))
        m = read_header(p)
        m["fixes"] = ";".join(m["fixes"])
        recs.append({"path": str(p), "row": i, **{c: m[c] for c in DECODE_COLUMNS if c != "path"}})
    cat = pd.DataFrame(recs)
    study = cat["row"] // per_study
    first, last = study * per_study, np.minimum(study * per_study + per_study - 1, n - 1)
    cat["prev_row"] = np.maximum(cat["row"] - 1, first)
    cat["next_row"] = np.minimum(cat["row"] + 1, last)
    return cat


def rate(ds: SliceDataset, batch: int, seconds: float, aug=None) -> float:
    """Slices (3-channel stacks) per second over random batches for about ``seconds``."""
    rng = np.random.default_rng(1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _, _ = ds.__getitems__(rng.integers(0, len(ds), batch).tolist())
        if aug is not None:
            with torch.no_grad():
                aug(x)
        n += batch
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--aug", action="store_true", help="also time windows + augmentation on this CPU")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ichd_native_") as tmp:
        t0 = time.perf_counter()
        cat = write_files(Path(tmp), args.files, args.size)
        print(f"{args.files} DICOM files of {args.size} px written in {time.perf_counter() - t0:.1f}s")
        table = cat[["prev_row", "row", "next_row"]].to_numpy()
        native = DicomSlices(cat, args.size)
        ds_native = SliceDataset(native, table)
        mm = np.lib.format.open_memmap(Path(tmp) / "cache.npy", mode="w+", dtype=np.int16,
                                       shape=(args.files, args.size, args.size))
        mm[:] = native[np.arange(args.files)]
        mm.flush()
        ds_cache = SliceDataset(np.load(Path(tmp) / "cache.npy", mmap_mode="r"), table)
        rate(ds_native, args.batch, 0.5)  # warm-up
        res = {"size": args.size, "batch": args.batch, "files": args.files, "fast_share": native.fast_share,
               "native_slices_per_s": rate(ds_native, args.batch, args.seconds),
               "cache_slices_per_s": rate(ds_cache, args.batch, args.seconds)}
        if args.aug:
            from ichdlib.cnn.data import DeviceAugment
            from ichdlib.config import load_params

            aug = DeviceAugment.from_params(load_params(None, {}), args.size).train()
            res["native_plus_cpu_aug_slices_per_s"] = rate(ds_native, args.batch, args.seconds, aug)
    res["native_vs_cache"] = res["native_slices_per_s"] / res["cache_slices_per_s"]
    res["mb_per_s"] = res["native_slices_per_s"] * 3 * args.size * args.size * 2 / 1e6
    print(f"one worker, {args.size} px, batch {args.batch}: DICOM {res['native_slices_per_s']:.0f} slices/s "
          f"({res['mb_per_s']:.0f} MB/s read), memmap cache {res['cache_slices_per_s']:.0f} slices/s "
          f"(ratio {res['native_vs_cache']:.2f})")
    if "native_plus_cpu_aug_slices_per_s" in res:
        print(f"  with windows + augmentation on this CPU: {res['native_plus_cpu_aug_slices_per_s']:.0f} slices/s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
