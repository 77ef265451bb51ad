"""Running under ``torchrun`` (DistributedDataParallel): rank/world helpers, process group set-up from
torchrun's environment, batch sharding and gathering in catalog order.

Everything here is a thin layer over :mod:`torch.distributed`; outside torchrun (no ``WORLD_SIZE`` in the
environment) every helper is a no-op for one process, so the same code runs alone, in a notebook, or on
N ranks.

- :func:`session` initialises the default process group from torchrun's variables (NCCL on CUDA, gloo on
  the CPU), binds each rank to its ``LOCAL_RANK`` GPU, and destroys the group at the end.
- :class:`ShardedBatchSampler` wraps a batch sampler: every rank draws the same *global* batch (the
  params' ``batch``) and keeps its contiguous share, so a run on N ranks sees the same images per step as
  a one-process run.
- :func:`shard_slice` / :func:`gather_rows` split evaluation rows into contiguous blocks per rank and
  put them back together in catalog order.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ichdlib.locks import LockHeld, output_lock

__all__ = ["DistInfo", "info", "session", "is_dist", "rank", "world_size", "is_main", "barrier",
           "all_reduce_sum", "broadcast_object", "shard_slice", "shard_list", "gather_rows",
           "ShardedBatchSampler", "fault_point", "main_lock", "sync_buffers"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global ``rank``, ``world`` size, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_dist() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the rank that writes files)."""
    return rank() == 0


def info() -> DistInfo:
    """The current :class:`DistInfo`."""
    return DistInfo(rank(), world_size(), int(os.environ.get("LOCAL_RANK", 0)) if is_dist() else 0)


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from exc


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[DistInfo]:
    """Join the torchrun job described by the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) for the block, then leave it. One process (no ``WORLD_SIZE`` or 1):
    nothing is initialised. On CUDA the backend is NCCL and each rank uses GPU ``LOCAL_RANK``; else gloo."""
    world = _env_world()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield info()
        return
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; run without torchrun")
    cuda = torch.device(device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                             "start torchrun with --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield info()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place; ``t`` itself for one process)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not is_dist():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_slice(n: int, r: int | None = None, world: int | None = None) -> slice:
    """Rank ``r``'s contiguous block of ``n`` rows (blocks in rank order cover ``0..n`` once)."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return slice(int(bounds[r]), int(bounds[r + 1]))


def shard_list(items: Sequence[Any], r: int | None = None, world: int | None = None) -> list[Any]:
    """Round-robin share of ``items`` for rank ``r`` (independent jobs such as folds)."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    return list(items[r::world])


def gather_rows(local: np.ndarray | None, n: int, to_all: bool = True) -> np.ndarray | None:
    """Concatenate every rank's block (from :func:`shard_slice`) in rank order -> ``n`` rows in catalog
    order. ``to_all=False`` gathers on rank 0 only (others get None): use it for large arrays."""
    if not is_dist():
        return local
    if to_all:
        parts: list[Any] = [None] * world_size()
        dist.all_gather_object(parts, local)
    else:
        parts = [None] * world_size() if is_main() else None  # type: ignore[assignment]
        dist.gather_object(local, parts, dst=0)
        if not is_main():
            return None
    present = [p for p in parts if p is not None]
    if not present:
        return None
    out = np.concatenate(present, axis=0)
    if len(out) != n:
        raise RuntimeError(f"gathered {len(out)} rows from {world_size()} ranks, expected {n}")
    return out


class ShardedBatchSampler:
    """Each rank's share of every global batch of ``sampler`` (a batch sampler with ``set_epoch``).

    All ranks draw the same global batch (same seed and epoch); rank ``r`` keeps block ``r`` of it
    (:func:`shard_slice`), so the union over ranks is exactly the one-process batch.
    """

    def __init__(self, sampler: Any, r: int | None = None, world: int | None = None) -> None:
        self.sampler = sampler
        self.rank = rank() if r is None else r
        self.world = world_size() if world is None else world
        batch = int(getattr(sampler, "batch", self.world))
        if batch < self.world:
            raise ValueError(f"batch {batch} is smaller than the {self.world} ranks; every rank needs images")

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield list(batch[shard_slice(len(batch), self.rank, self.world)])

    def __getattr__(self, name: str) -> Any:  # batch, seed, ... of the wrapped sampler
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


def fault_point(epoch: int, step: int) -> None:
    """Test hook: ``ICHD_FAULT_KILL="<rank>:<epoch>:<step>:<marker file>"`` kills this process with SIGKILL
    at that point, once (the marker file records that it happened). Unset in normal use."""
    spec = os.environ.get("ICHD_FAULT_KILL")
    if not spec:
        return
    r, e, s, marker = spec.split(":", 3)
    if (int(r), int(e), int(s)) == (rank(), epoch, step) and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(f"killed rank {r} at epoch {e} step {s}\n")
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def main_lock(target: Any, what: str = "") -> Iterator[None]:
    """:func:`ichdlib.locks.output_lock` on ``target`` held by rank 0 for the block; when another job holds
    it, every rank raises :class:`ichdlib.locks.LockHeld` (one process: the plain lock)."""

    with contextlib.ExitStack() as stack:
        err = None
        if is_main():
            try:
                stack.enter_context(output_lock(target, what=what))
            except LockHeld as exc:
                err = str(exc)
        err = broadcast_object(err)
        if err:
            raise LockHeld(err)
        yield


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, so that evaluation on
    all ranks uses the model rank ``src`` saves (DDP broadcasts them only before each training forward)."""
    if not is_dist():
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=src)
