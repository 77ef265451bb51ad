"""Memory the 2D data loaders need, and a check before training that fails with the fix.

Each DataLoader worker keeps ``prefetch`` whole batches ready in shared memory (``/dev/shm``): int16 HU
stacks ``(batch, channels, size, size)`` plus labels and positions. With ``pin_memory`` the main process
copies every batch it takes into page-locked (pinned) host memory, and up to as many batches wait there as
the workers hold. Docker's default ``/dev/shm`` is 64 MB: 12 workers x 4 batches of 256 x 3 x 256 x 256
int16 need 4.8 GB, and the workers die with a bus error that names nothing. :func:`check_loader_memory`
compares the need with ``/dev/shm`` free space and available RAM first and raises :class:`ResourceError`
naming the fix (fewer workers, a smaller prefetch, ``--shm-size`` / ``--ipc=host``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ichdlib.config import BackboneCfg, Params

GB = 1e9
LABEL_BYTES = 6 * 4 + 8  # float32 labels + int64 position per image


class ResourceError(ValueError):
    """Not enough shared or host memory for the configured loaders; the message names the fix."""


@dataclass(frozen=True)
class LoaderMemory:
    """What one DataLoader needs: bytes in ``/dev/shm`` (worker batches) and pinned host memory."""

    name: str
    workers: int
    prefetch: int
    batch: int
    batch_bytes: int
    shm_bytes: int
    pinned_bytes: int

    def describe(self) -> str:
        return (f"{self.name}: {self.workers} workers x prefetch {self.prefetch} x batch {self.batch} "
                f"({self.batch_bytes / 1e6:.0f} MB each) = {self.shm_bytes / GB:.2f} GB shm, "
                f"{self.pinned_bytes / GB:.2f} GB pinned")


def loader_memory(workers: int, prefetch: int, batch: int, size: int, channels: int = 3, itemsize: int = 2,
                  pin: bool = True, name: str = "loader") -> LoaderMemory:
    """Bytes of ``/dev/shm`` and pinned memory a loader with these settings holds at most.

    ``workers`` x ``prefetch`` batches of ``batch`` x ``channels`` x ``size``^2 x ``itemsize`` bytes sit in
    shared memory (none with ``workers == 0``: batches are made in the main process); with ``pin`` as
    many again (at least one batch) in pinned memory.
    """
    for k, v in (("workers", workers), ("prefetch", prefetch), ("batch", batch), ("size", size)):
        if int(v) < 0 or (k != "workers" and int(v) < 1):
            raise ValueError(f"{k} must be {'>= 0' if k == 'workers' else '>= 1'}, got {v}")
    per = int(batch) * (int(channels) * int(size) ** 2 * int(itemsize) + LABEL_BYTES)
    held = int(workers) * int(prefetch)
    return LoaderMemory(name, int(workers), int(prefetch), int(batch), per, held * per,
                        max(held, 1) * per if pin else 0)


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory filesystem (None where there is none, e.g. not Linux)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def ram_available_bytes() -> int | None:
    """Host RAM available to new allocations (``MemAvailable``), None when unknown."""
    try:
        import psutil  # noqa: PLC0415  (psutil loads only to size memory)

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported platform
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_loader_memory(loaders: list[LoaderMemory], *, margin: float = 1.2, shm_path: str = "/dev/shm",
                        shm_free: int | None = None, ram_free: int | None = None) -> dict[str, Any]:
    """Raise :class:`ResourceError` when the loaders (all alive at once) need more ``/dev/shm`` or RAM than
    is free (times ``margin`` for headroom); return the figures otherwise.

    Shared memory is host RAM too, so RAM must hold both the shm and the pinned bytes.
    ``shm_free``/``ram_free`` override the measured values (tests).
    """
    shm_need = sum(x.shm_bytes for x in loaders)
    pin_need = sum(x.pinned_bytes for x in loaders)
    shm = shm_free_bytes(shm_path) if shm_free is None else shm_free
    ram = ram_available_bytes() if ram_free is None else ram_free
    detail = "; ".join(x.describe() for x in loaders)
    workers = max((x.workers for x in loaders), default=0)
    prefetch = max((x.prefetch for x in loaders), default=0)
    fix = (f"lower cnn.num_workers (now {workers}) or cnn.prefetch (now {prefetch}), or a smaller batch")
    if shm is not None and shm_need * margin > shm:
        raise ResourceError(
            f"the data loaders need {shm_need * margin / GB:.2f} GB of shared memory ({shm_path}) but "
            f"{shm / GB:.2f} GB is free ({detail}): {fix}; in Docker give the container more with "
            f"`docker run --shm-size={max(1, int(shm_need * margin / GB + 1))}g` or `--ipc=host`")
    if ram is not None and (shm_need + pin_need) * margin > ram:
        raise ResourceError(
            f"the data loaders need {(shm_need + pin_need) * margin / GB:.2f} GB of host memory (shared + "
            f"pinned) but {ram / GB:.2f} GB is available ({detail}): {fix}")
    return {"shm_need_gb": shm_need / GB, "pinned_need_gb": pin_need / GB,
            "shm_free_gb": None if shm is None else shm / GB, "ram_free_gb": None if ram is None else ram / GB}


def training_loaders(P: Params, cfg: BackboneCfg, cuda: bool, val_batch: int | None = None) -> list[LoaderMemory]:
    """The training loader and the validation loader of one backbone under ``P.cnn`` (validation at
    twice the batch, as :func:`ichdlib.cnn.train.train_fold` runs it), counted as alive together."""
    w, pf = int(P.cnn.num_workers), int(P.cnn.prefetch)
    return [loader_memory(w, pf, cfg.batch, cfg.size, pin=cuda, name="training"),
            loader_memory(w, pf, val_batch or 2 * cfg.batch, cfg.size, pin=cuda, name="validation")]


def check_training_memory(P: Params, cfg: BackboneCfg, cuda: bool | None = None) -> dict[str, Any]:
    """:func:`check_loader_memory` for one backbone's training (call before building the loaders)."""
    if cuda is None:
        import torch  # noqa: PLC0415  (torch stays out of light modules)

        cuda = torch.device(P.torch_device()).type == "cuda"
    return check_loader_memory(training_loaders(P, cfg, bool(cuda)))


def requirements_table(P: Params) -> list[dict[str, Any]]:
    """Per backbone: shm and pinned GB its loaders need under ``P`` (for the README's sizing table)."""
    rows = []
    for cfg in P.cnn.backbones:
        ls = training_loaders(P, cfg, cuda=True)
        rows.append({"backbone": cfg.key, "batch": cfg.batch, "workers": P.cnn.num_workers,
                     "prefetch": P.cnn.prefetch, "shm_gb": round(sum(x.shm_bytes for x in ls) / GB, 2),
                     "pinned_gb": round(sum(x.pinned_bytes for x in ls) / GB, 2)})
    return rows
