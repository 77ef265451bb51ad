"""Training throughput of the 2D CNN: the real loop beside the model alone and the original's regime.

Three numbers, images/s at the same model, size and batch:

1. ``loop``: the real training loop of :mod:`ichdlib.cnn.train` (:func:`ichdlib.cnn.train.run_epoch`): int16 HU
   rows gathered from a memory-mapped cache by DataLoader workers, pinned copies to the device, windows and
   the original's augmentations batched on the device, bf16 autocast + channels_last on CUDA (optionally
   ``--compile``), loss, backward, clipping, Adam;
2. ``model``: the same model step (same precision and memory format) on random tensors already on the
   device, i.e. the ceiling for the loop;
3. ``original``: the model step in the original's regime: float32, TF32 off, contiguous (NCHW) memory.

The loop runs exactly ``--steps`` steps after a warm-up epoch of ``--warmup`` steps (counted at the
optimizer and reported as ``loop_steps``), the model alone runs ``--steps`` steps after ``--warmup``, and
validation throughput (``val``: :func:`ichdlib.cnn.train.predict` at twice the batch with the same loader
settings) is timed on ``--val-steps`` batches. It builds its own random int16 cache (no DICOM needed). Defaults: on a GPU densenet121 at 256 px, batch
256, 12 workers; on the CPU lcnet_050 at 96 px, batch 32, no workers (about a minute).

    .venv/bin/python benchmarks/train_throughput.py                      # defaults for the machine
    .venv/bin/python benchmarks/train_throughput.py --model densenet121 --size 256 --batch 256 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ichdlib.cnn.data import DeviceAugment, SliceBatchSampler, SliceDataset, StudyBatchSampler, make_loader
from ichdlib.cnn.infer import predict
from ichdlib.cnn.models import build_cnn
from ichdlib.cnn.train import run_epoch, weighted_bce
from ichdlib.config import load_params
from ichdlib.runtime import prepare_model


def random_cache(folder: Path, rows: int, size: int,
                 seed: int = 0) -> tuple[np.memmap, np.ndarray, np.ndarray]:
    """A random int16 HU cache ``(rows, size, size)`` as a memmap, the ``(rows, 3)`` neighbour table
    (studies of 32 slices) and a study id per row."""
    path = folder / f"cache_{size}.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(rows, size, size))
    rng = np.random.default_rng(seed)
    for a in range(0, rows, 256):
        b = min(rows, a + 256)
        mm[a:b] = rng.integers(-1024, 2000, size=(b - a, size, size), dtype=np.int16)
    mm.flush()
    del mm
    study = np.arange(rows) // 32
    row = np.arange(rows)
    first, last = study * 32, np.minimum(study * 32 + 31, rows - 1)
    table = np.stack([np.maximum(row - 1, first), row, np.minimum(row + 1, last)], 1)
    return np.load(path, mmap_mode="r"), table, study


def _params(args: argparse.Namespace, original: bool = False):
    device = "cuda" if args.device == "cuda" else "cpu"
    cnn = {
        "backbones": [{"name": args.model, "size": args.size, "batch": args.batch, "epochs": 2, "lr": 5e-4}],
        "amp": not original, "channels_last": not original, "compile": bool(args.compile and not original),
        "num_workers": args.workers, "max_steps_per_epoch": args.steps, "sampler": "study",
    }
    return load_params(None, {"device": device, "seed": 0, "cnn": cnn})


def _tf32(on: bool) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        torch.backends.cudnn.benchmark = True


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def model_only(args: argparse.Namespace, original: bool) -> float:
    """Images/s of the train step on random device tensors (ours, or the original's regime)."""
    P = _params(args, original)
    device = P.torch_device()
    _tf32(not original)
    model, runner = prepare_model(build_cnn(args.model), P, device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    w = torch.tensor(P.cnn.class_weights, device=device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    if device == "cuda" and P.cnn.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(args.batch, 6, device=device) < 0.2).float()
    amp = P.cnn.amp and device == "cuda"

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            logits = runner(x)
        loss = weighted_bce(logits, y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return args.steps * args.batch / (time.perf_counter() - t0)


def loop(args: argparse.Namespace, cache: np.ndarray, table: np.ndarray, study: np.ndarray) -> dict:
    """Images/s of :func:`ichdlib.cnn.train.run_epoch` over the cache: a warm-up epoch of ``--warmup`` steps
    (workers, cuDNN autotuning, compilation), then a measured epoch of exactly ``--steps`` steps (counted
    at the optimizer), then validation throughput (:func:`ichdlib.cnn.train.predict`, batch x 2, the same
    loader settings; a warm-up pass, then a timed one)."""
    P = _params(args)
    device = P.torch_device()
    _tf32(True)
    cfg = P.cnn.backbones[0]
    model, runner = prepare_model(build_cnn(args.model), P, device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    steps_done = [0]
    opt.register_step_post_hook(lambda *_: steps_done.__setitem__(0, steps_done[0] + 1))
    labels = (np.random.default_rng(1).random((len(table), 6)) < 0.2).astype(np.float32)
    ds = SliceDataset(cache, table, labels)
    if args.sampler == "study":
        # an epoch of k x studies draws: k large enough that the epoch has the steps asked for
        k = max(1, -(-max(args.steps, args.warmup) * args.batch // len(np.unique(study))))
        sampler = StudyBatchSampler(study, args.batch, k=k, seed=0, max_steps=args.warmup)
    else:
        if len(ds) < max(args.steps, args.warmup) * args.batch:
            raise ValueError(f"--rows {len(ds)} too few for {args.steps} steps of {args.batch}")
        sampler = SliceBatchSampler(len(ds), args.batch, seed=0, max_steps=args.warmup)
    loader = make_loader(ds, sampler, args.workers, pin_memory=device == "cuda", persistent=True,
                         prefetch=args.prefetch)
    aug = DeviceAugment.from_params(P, args.size).to(device)
    w = torch.tensor(P.cnn.class_weights, device=device)
    amp = P.cnn.amp and device == "cuda"
    run_epoch(P, cfg, 0, 0, model, runner, opt, aug, loader, sampler, w, device, amp)  # warm-up
    _sync(device)
    sampler.max_steps = args.steps
    if len(sampler) != args.steps:
        raise RuntimeError(f"the sampler's epoch has {len(sampler)} steps, not the {args.steps} asked for")
    steps_done[0] = 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = run_epoch(P, cfg, 0, 1, model, runner, opt, aug, loader, sampler, w, device, amp)
    _sync(device)
    res = {"loop": float(row["images_per_s"]), "loop_steps": steps_done[0],
           "loop_images": int(round(row["images_per_s"] * row["seconds"])), "loop_seconds": row["seconds"]}
    if device == "cuda":  # GPU memory of training at this model, size and batch (README sizing table)
        res["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.val_steps:
        n_val = min(len(ds), args.val_steps * 2 * args.batch)
        vds = SliceDataset(cache, table[:n_val], labels[:n_val])
        cl = device == "cuda" and P.cnn.channels_last
        val = dict(batch=2 * args.batch, device=device, amp=amp, num_workers=args.workers, channels_last=cl)
        predict(runner, aug, SliceDataset(cache, table[:2 * args.batch], labels[:2 * args.batch]), **val)
        _sync(device)
        t0 = time.perf_counter()
        p, _ = predict(runner, aug, vds, **val)
        _sync(device)
        res.update(val=len(p) / (time.perf_counter() - t0), val_images=len(p))
    return res


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="densenet121" if cuda else "lcnet_050")
    ap.add_argument("--size", type=int, default=256 if cuda else 96)
    ap.add_argument("--batch", type=int, default=256 if cuda else 32)
    ap.add_argument("--steps", type=int, default=30 if cuda else 15, help="measured steps (one epoch)")
    ap.add_argument("--warmup", type=int, default=5 if cuda else 2)
    ap.add_argument("--rows", type=int, default=0, help="cache rows (default: enough for 2 epochs, >= 2048)")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1) if cuda else 0)
    ap.add_argument("--prefetch", type=int, default=4, help="batches ready per loader worker")
    ap.add_argument("--val-steps", type=int, default=10 if cuda else 2,
                    help="validation batches (of batch x 2) to time; 0 = skip")
    ap.add_argument("--sampler", default="study", choices=["study", "slice"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    rows = args.rows or max(2048, args.batch * max(args.steps, args.warmup), 2 * args.batch * args.val_steps)
    with tempfile.TemporaryDirectory(prefix="ichd_bench_") as tmp:
        t0 = time.perf_counter()
        cache, table, study = random_cache(Path(tmp), rows, args.size)
        print(f"random int16 cache {cache.shape} built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "model": args.model, "size": args.size, "batch": args.batch, "workers": args.workers,
               "compile": args.compile, "threads": torch.get_num_threads()}
        res.update(loop(args, cache, table, study))
        res["model_only"] = model_only(args, original=False)
        res["original"] = model_only(args, original=True)
    res["loop_vs_model"] = res["loop"] / res["model_only"]
    res["loop_vs_original"] = res["loop"] / res["original"]
    print(f"{res['device']}: {args.model} {args.size}px batch {args.batch}, {args.workers} workers"
          f"{', compiled' if args.compile else ''}")
    print(f"  training loop (cache -> loader -> device aug -> model -> Adam): {res['loop']:8.1f} img/s "
          f"({res['loop_steps']} steps measured after {args.warmup} warm-up steps)")
    if "val" in res:
        print(f"  validation (predict, batch {2 * args.batch}, same loader settings): {res['val']:8.1f} img/s")
    print(f"  model alone on random device tensors, same regime:          {res['model_only']:8.1f} img/s")
    print(f"  original regime (fp32, no TF32, NCHW), model alone:          {res['original']:8.1f} img/s")
    print(f"  loop / model alone = {res['loop_vs_model']:.2f}x; loop / original regime = "
          f"{res['loop_vs_original']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
