"""Runtime helpers every stage shares: devices, threads, seeding, mixed precision, torch saving, process pools.

One place for them, so that inference (``serve``) never imports the training loop to get a device or a thread
setting, and ingest and the phantom share one process pool. torch is imported inside the functions that need
it: ingest and the phantom run without it.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ichdlib.devices import resolve_device
from ichdlib.files import atomic_write
from ichdlib.procs import exit_with_parent

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ichdlib.config import Params

__all__ = ["resolve_device", "seed_everything", "derive_seed", "torch_threads", "cpu_threads", "amp_enabled",
           "amp_mode", "autocast", "prepare_model", "save_torch", "resolve_workers", "LazyPool", "run_tasks"]


# -- devices, seeds, threads, precision ----------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (if installed)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch  # noqa: PLC0415  (torch stays out of light modules)
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams per fold / epoch / purpose)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


@contextlib.contextmanager
def torch_threads(n: int | None, device: str) -> Iterator[None]:
    """Run with ``n`` torch CPU threads on a CPU device (``None`` leaves torch's setting), then restore."""
    import torch  # noqa: PLC0415  (torch stays out of light modules)

    if n is None or torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads(P: Params) -> contextlib.AbstractContextManager[None]:
    """Use ``P.cnn.cpu_threads`` torch threads inside the block when running on the CPU."""
    return torch_threads(P.cnn.cpu_threads, P.torch_device())


def amp_enabled(P: Params, device: str) -> bool:
    """Autocast only on CUDA (on the CPU float32 is as fast and simpler)."""
    import torch  # noqa: PLC0415  (torch stays out of light modules)

    return bool(P.cnn.amp) and torch.device(device).type == "cuda"


def amp_mode(P: Params, device: str) -> torch.dtype | bool:
    """The ``amp`` argument of the 2D loops: the autocast dtype (``cnn.amp_dtype``) where autocast is on,
    else False."""
    import torch  # noqa: PLC0415  (torch stays out of light modules)

    if not amp_enabled(P, device):
        return False
    return torch.float16 if P.cnn.amp_dtype == "fp16" else torch.bfloat16


def autocast(device: str, amp: torch.dtype | bool) -> Any:
    """``torch.autocast`` for ``amp`` (a dtype, True for bf16, False for off)."""
    import torch  # noqa: PLC0415  (torch stays out of light modules)

    dtype = amp if isinstance(amp, torch.dtype) else torch.bfloat16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=bool(amp))


def prepare_model(model: Any, P: Params, device: str) -> tuple[Any, Any]:
    """``(model, runner)``: the model on ``device`` (channels_last on CUDA) and what to call (compiled if
    asked for on CUDA)."""
    import torch  # noqa: PLC0415  (torch stays out of light modules)

    model = model.to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda and P.cnn.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if cuda and P.cnn.compile else model
    return model, runner


def save_torch(obj: Any, path: Path) -> Path:
    """``torch.save`` atomically (a crash never leaves half a checkpoint)."""
    import torch  # noqa: PLC0415  (torch stays out of light modules)

    return atomic_write(path, lambda t: torch.save(obj, t))


# -- process pools ---------------------------------------------------------------------------------------
def resolve_workers(workers: int) -> int:
    """``0`` -> the CPUs this process may use; otherwise ``workers``."""
    if workers and workers > 0:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _worker_init(parent: int | None = None) -> None:
    """One OpenCV thread per worker process: the pool already uses every core (no oversubscription).
    The worker ends as soon as ``parent`` (the process that made the pool) is gone, even after ``kill -9``."""
    import cv2  # noqa: PLC0415  (OpenCV loads only where images are resized)

    cv2.setNumThreads(1)
    if parent is not None:

        exit_with_parent(parent)


class LazyPool:
    """A process pool created on first use (``workers == 1`` runs tasks in this process).

    Workers start through forkserver (spawn where there is none) with ``preload`` imported once, run one
    OpenCV thread each, and end with the process that made the pool.
    """

    def __init__(self, workers: int, preload: Sequence[str] = ()) -> None:
        self.workers = resolve_workers(workers)
        self.preload = list(preload)
        self._ex: Executor | None = None

    def get(self) -> Executor | None:
        if self.workers <= 1:
            return None
        if self._ex is None:
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            if method == "forkserver" and self.preload:
                ctx.set_forkserver_preload([*self.preload, "ichdlib.procs"])
            self._ex = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init,
                                           initargs=(os.getpid(),))
        return self._ex

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def __enter__(self) -> LazyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_tasks(fn: Callable[[Any], Any], tasks: Iterable[Any], pool: LazyPool | None) -> Iterator[Any]:
    """``fn(task)`` for each task, in completion order, with a bounded number of tasks in flight."""
    ex = pool.get() if pool is not None else None
    if ex is None:
        for task in tasks:
            yield fn(task)
        return
    it = iter(tasks)
    pending = {ex.submit(fn, t) for t in itertools.islice(it, 4 * pool.workers)}
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            try:
                result = fut.result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    "a worker process died (out of memory or a crash in a decoder); rerun to "
                    "resume, with --workers 1 to find the file, and list it in ingest.skip_ids"
                ) from exc
            pending |= {ex.submit(fn, t) for t in itertools.islice(it, 1)}
            yield result
