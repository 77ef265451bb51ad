"""Benchmark: slices/s of ``ichd ingest`` against the original's PNG conversion and a bare DICOM decode.

On the same phantom DICOMs (``ichdlib.phantom.synth.generate_phantom`` at 512 px by default) and the same number
of worker processes (same start method, same chunked tasks):

- ``ingest``: ``ichdlib.ingest.catalog.build_catalog`` from scratch (header pass, labels, z order, folds,
  quarantine, the int16 HU cache at ``--size``);
- ``original``: the 1st-place ``prepare_data.py`` approach (seed_spec section 2): ``dcmread``, HU, clip to
  the header's own window, per-image min-max to [0, 255], uint8 (not its int8 bug), one 8-bit PNG per
  slice at native size with cv2;
- ``bare``: ``dcmread(path).pixel_array`` and nothing else.

Prints slices/s and the ratios ingest/original and ingest/bare (targets: >= 3 and >= 0.5). The page cache
is warmed first, so this measures CPU work, not the disk. A script, not a test::

    python benchmarks/ingest.py --studies 8 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ichdlib.runtime import resolve_workers

#: Paths per task for the two baselines (ingest picks its own, of the same order).
CHUNK = 64


def _quiet() -> None:
    warnings.simplefilter("ignore")
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _first(value: object) -> float:
    """The original's ``get_first_of_dicom_field_as_int``: first value of a multi-valued field."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return int(float(value))


def original_task(job: tuple[list[str], str]) -> int:
    """seed_spec section 2: header window, per-image min-max, 8-bit PNG at native size (uint8, not int8)."""
    import cv2
    import pydicom

    _quiet()
    paths, out = job
    for p in paths:
        try:
            ds = pydicom.dcmread(p)
            img = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            img = np.clip(img, center - width // 2, center + width // 2)
            with np.errstate(invalid="ignore", divide="ignore"):
                img = (img - img.min()) / (img.max() - img.min())
            img = np.nan_to_num(img * 255.0).astype(np.uint8)
            cv2.imwrite(os.path.join(out, f"{ds.SOPInstanceUID}.png"), img)
        except Exception as exc:  # the original logged and went on (its bare except)
            print(f"original: {p}: {exc}")
    return len(paths)


def bare_task(paths: list[str]) -> int:
    """Decode only."""
    import pydicom

    _quiet()
    pixels = 0
    for p in paths:
        try:
            pixels += pydicom.dcmread(p).pixel_array.size
        except Exception:  # the corrupt phantom file
            pass
    return pixels


def _noop(_: int) -> int:
    return 0


def _context() -> mp.context.BaseContext:
    """The start method ichdlib's pool uses, with the same preloads (started once, before timing)."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["ichdlib.ingest.dicom", "ichdlib.ingest.cache", "ichdlib.ingest.catalog"])
    return ctx


def _pooled(fn, jobs: list, workers: int) -> float:
    t0 = time.perf_counter()
    if workers == 1:
        for j in jobs:
            fn(j)
    else:
        with ProcessPoolExecutor(workers, mp_context=_context()) as ex:
            list(ex.map(fn, jobs))
    return time.perf_counter() - t0


def run(
    studies: int,
    size: int,
    cache_size: int,
    workers: int,
    seed: int,
    repeats: int,
    keep: str | None,
    verbose: bool = False,
) -> dict:
    from ichdlib.ingest.catalog import build_catalog
    from ichdlib.phantom.synth import generate_phantom

    workers = resolve_workers(workers)
    tmp = Path(keep or tempfile.mkdtemp(prefix="ichd_bench_"))
    data = tmp / "phantom"
    try:
        if not (data / ".phantom_complete").exists():
            t0 = time.perf_counter()
            generate_phantom(
                data,
                studies=studies,
                seed=seed,
                size=size,
                quirks=True,
                masks=False,
                workers=workers,
                progress=False,
            )
            print(f"phantom: {time.perf_counter() - t0:.1f} s")
        paths = sorted(str(p) for d in ("stage_2_train", "stage_2_test") for p in (data / d).glob("*.dcm"))
        n = len(paths)
        for p in paths:  # warm the page cache: time CPU work, not the disk
            Path(p).read_bytes()
        _pooled(_noop, list(range(workers)), workers)  # start the fork server before timing
        chunks = [paths[i : i + CHUNK] for i in range(0, n, CHUNK)]
        best: dict[str, float] = {}
        for _ in range(repeats):
            png = tmp / "png"
            shutil.rmtree(png, ignore_errors=True)
            png.mkdir()
            t = _pooled(original_task, [(c, str(png)) for c in chunks], workers)
            best["original"] = min(best.get("original", np.inf), t)
            t = _pooled(bare_task, chunks, workers)
            best["bare"] = min(best.get("bare", np.inf), t)
            work = tmp / "work"
            shutil.rmtree(work, ignore_errors=True)
            t0 = time.perf_counter()
            build_catalog(data, work, size=cache_size, workers=workers, folds=2, seed=0, progress=False)
            t = time.perf_counter() - t0
            if verbose:
                phases_now = json.loads((work / "ingest_report.json").read_text())["seconds"]
                rates = f"original {n / best['original']:.0f}/s, bare {n / best['bare']:.0f}/s, ingest {n / t:.0f}/s"
                print(f"  run: {rates} {phases_now}")
            if t < best.get("ingest", np.inf):
                best["ingest"] = t
                phases = json.loads((work / "ingest_report.json").read_text())["seconds"]
        rate = {k: n / v for k, v in best.items()}
        result = {
            "slices": n,
            "input_px": size,
            "cache_px": cache_size,
            "workers": workers,
            "repeats": repeats,
            "cpu": os.cpu_count(),
            "slices_per_s": {k: round(v, 1) for k, v in rate.items()},
            "ingest_over_original": round(rate["ingest"] / rate["original"], 2),
            "ingest_over_bare": round(rate["ingest"] / rate["bare"], 2),
            "ingest_phases_s": phases,
        }
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=80,
                    help="phantom studies (about 30 slices each); fewer make fixed start-up costs dominate")
    ap.add_argument("--size", type=int, default=512, help="phantom image size (input px)")
    ap.add_argument("--cache-size", type=int, default=256, help="ingest cache size")
    ap.add_argument(
        "--workers", type=int, default=0, help="worker processes for every approach (0 = all cores)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per approach")
    ap.add_argument("--keep", default=None, help="folder to keep the phantom in (reused when present)")
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run")
    args = ap.parse_args()
    res = run(
        args.studies,
        args.size,
        args.cache_size,
        args.workers,
        args.seed,
        args.repeats,
        args.keep,
        args.verbose,
    )
    r = res["slices_per_s"]
    print(
        f"{res['slices']} slices at {res['input_px']} px, cache {res['cache_px']} px, {res['workers']} workers,"
    )
    print(f"best of {res['repeats']} runs each (page cache warm)")
    for k in ("ingest", "original", "bare"):
        print(f"  {k:<9} {r[k]:8.1f} slices/s")
    print(f"  ingest / original = {res['ingest_over_original']:.2f}x (target >= 3)")
    print(f"  ingest / bare     = {res['ingest_over_bare']:.2f}x (target >= 0.5)")
    print(f"  ingest phases (s): {res['ingest_phases_s']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
