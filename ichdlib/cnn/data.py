"""Feeding the 2D CNN: cached HU stacks, samplers, and windows + augmentation batched on the device.

The host only gathers int16 rows ``(prev_row, row, next_row)`` from the memory-mapped HU cache, a whole
batch at a time (:class:`SliceDataset`, no per-item pandas work). Everything else runs on the device on
the whole batch in :class:`DeviceAugment`: the slice-order swap (s-1 <-> s+1), horizontal flip,
shift/scale/rotate and random crop (one ``affine_grid`` per batch, in HU with air as fill), random erasing,
then the recipe's windows (or nothing when the model has a learnable window). Validation and inference
use :func:`eval_view`: a centre crop (0.8) resized back to the model size.

Samplers yield whole batches of dataset positions and are seeded per epoch, so an interrupted run resumes
with the same batches: :class:`StudyBatchSampler` (the original's: an epoch is ``k`` x the number of
studies; pick a study, then a slice weighted toward the middle, every slice reachable) and
:class:`SliceBatchSampler` (plain shuffled or sequential epochs over slices).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ichdlib.labels import LABELS
from ichdlib.windows import WINDOWS, stack_channels_torch

#: HU used to fill pixels a geometric augmentation or erasing brings in: black in every window.
AIR_HU = -1024.0
STACK_COLUMNS = ["prev_row", "row", "next_row"]


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------
class SliceDataset(torch.utils.data.Dataset):
    """Slices as int16 HU stacks ``(3, H, W)`` (s-1, s, s+1) gathered from a cache, plus labels.

    ``rows`` is ``(n, 3)`` cache rows (the catalog's ``prev_row, row, next_row``); ``labels`` ``(n, 6)``
    or None. ``cache`` is the memory-mapped cache or anything with its shape and a ``read_rows(rows, out)``
    method (:class:`ichdlib.ingest.native.DicomSlices`: native-resolution slices read from the DICOM files). ``ds[i]`` gives one item; ``ds.__getitems__(positions)`` (used by the DataLoader) gathers a
    whole batch with one numpy take into a tensor (in shared memory inside a worker) and returns
    ``(x int16 (B, 3, H, W), y float32 (B, 6), positions int64 (B,))``.
    """

    def __init__(self, cache: np.ndarray, rows: np.ndarray, labels: np.ndarray | None = None) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[1] != 3:
            raise ValueError(f"rows must be (n, 3) cache rows (prev, row, next), got {rows.shape}")
        if cache.ndim != 3:
            raise ValueError(f"cache must be (n_rows, H, W), got shape {cache.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(cache)):
            raise ValueError(f"cache rows out of range: cache has {len(cache)} rows, asked for "
                             f"{rows.min()}..{rows.max()}; rebuild the cache (ingest) for this catalog")
        self.cache = cache
        self.rows = rows
        self.labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.float32)
        if self.labels is not None and self.labels.shape != (len(rows), len(LABELS)):
            raise ValueError(f"labels must be ({len(rows)}, 6), got {self.labels.shape}")

    @classmethod
    def from_catalog(cls, cat: pd.DataFrame, cache: np.ndarray, labels: bool = True) -> SliceDataset:
        """Rows of a catalog frame (any subset, in its order); labels from the six label columns."""
        missing = [c for c in STACK_COLUMNS if c not in cat.columns]
        if missing:
            raise ValueError(f"catalog lacks columns {missing}; re-run ingest")
        y = cat[list(LABELS)].to_numpy(dtype=np.float32) if labels else None
        return cls(cache, cat[STACK_COLUMNS].to_numpy(dtype=np.int64), y)

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.cache.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.asarray(self.cache[self.rows[i]]))
        nan = torch.full((len(LABELS),), float("nan"))
        y = torch.from_numpy(self.labels[i]) if self.labels is not None else nan
        return x, y

    def __getitems__(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = np.asarray(positions, dtype=np.int64)
        flat = self.rows[pos].reshape(-1)
        h, w = self.image_shape
        shape = (len(pos), 3, h, w)
        if torch.utils.data.get_worker_info() is not None:
            # allocate in shared memory: the batch then travels to the main process without another copy
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * 2)
            x = torch.empty(0, dtype=torch.int16).set_(storage, 0, shape)
        else:
            x = torch.empty(shape, dtype=torch.int16)
        if hasattr(self.cache, "read_rows"):  # e.g. ichdlib.ingest.native.DicomSlices: slices read from DICOM files
            self.cache.read_rows(flat, x.numpy().reshape(-1, h, w))
        else:
            np.take(self.cache, flat, axis=0, out=x.numpy().reshape(-1, h, w))
        if self.labels is not None:
            y = torch.from_numpy(self.labels[pos])
        else:
            y = torch.full((len(pos), len(LABELS)), float("nan"))
        return x, y, torch.from_numpy(pos)

    # a memmap must not be pickled into worker processes (that would copy the whole cache): reopen it
    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, cache=mapped_ref(self.cache))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, cache=reopen_mapped(state["cache"]))


def mapped_ref(cache: Any) -> Any:
    """What to send another process for ``cache``: a file-backed memmap as a small reference to its file
    (:func:`reopen_mapped` maps it again read-only), anything else as it is."""
    if isinstance(cache, np.memmap) and getattr(cache, "filename", None):
        return ("memmap", cache.filename, cache.dtype.str, cache.shape, int(cache.offset))
    return cache


def reopen_mapped(ref: Any) -> Any:
    """The array behind a :func:`mapped_ref` reference (mapped read-only); other values unchanged."""
    if isinstance(ref, tuple) and ref and ref[0] == "memmap":
        _, fn, dt, shape, off = ref
        return np.memmap(fn, dtype=np.dtype(dt), mode="r", shape=tuple(shape), offset=off)
    return ref


def _collate_batched(batch: Any) -> Any:
    """The dataset already returns whole batches."""
    return batch


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset: SliceDataset, batch_sampler: Any, num_workers: int = 0, pin_memory: bool = False,
                seed: int = 0, persistent: bool = False, prefetch: int = 4) -> torch.utils.data.DataLoader:
    """A DataLoader over whole-batch positions from ``batch_sampler`` (pinned memory for CUDA copies;
    ``persistent`` keeps the workers between epochs; ``prefetch`` batches ready per worker, see
    :mod:`ichdlib.resources` for the memory they take; the batch order always comes from the sampler in
    the main process)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=int(prefetch), persistent_workers=persistent, worker_init_fn=seed_worker)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=_collate_batched, num_workers=num_workers,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **kwargs)


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------
def epoch_rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    """A numpy generator for one epoch, independent of everything drawn before (resume-safe)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), *map(int, extra)])


class SliceBatchSampler:
    """Batches over ``n`` positions: a seeded permutation per epoch (``shuffle``) or in order."""

    def __init__(self, n: int, batch: int, seed: int = 0, shuffle: bool = True, drop_last: bool | None = None,
                 max_steps: int | None = None) -> None:
        self.n, self.batch, self.seed, self.shuffle = int(n), int(batch), int(seed), shuffle
        # training drops a ragged last batch (BatchNorm) unless it would leave nothing
        self.drop_last = shuffle if drop_last is None else drop_last
        self.max_steps = max_steps
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full = self.drop_last and self.n >= self.batch
        n = self.n // self.batch if full else math.ceil(self.n / self.batch)
        return min(n, self.max_steps) if self.max_steps else n

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_rng(self.seed, self.epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
        for b in range(len(self)):
            yield order[b * self.batch:(b + 1) * self.batch].tolist()


def middle_weights(n: int) -> np.ndarray:
    """The original's slice weights in a study of ``n``: ``max(1, min(i, n-1-i) // 4)``, over all ``n``
    slices (the original passed ``n-1`` and never drew the last slice)."""
    i = np.arange(n)
    return np.maximum(1, np.minimum(i, n - 1 - i) // 4).astype(np.float64)


class StudyBatchSampler:
    """The original's study sampler: ``k`` x (number of studies) draws per epoch; each picks a study
    uniformly, then one of its slices with :func:`middle_weights`.

    ``studies`` gives each dataset position's study; positions of a study are taken in dataset order
    (the catalog's z order).
    """

    def __init__(self, studies: Sequence[Any] | np.ndarray, batch: int, k: int = 4, seed: int = 0,
                 max_steps: int | None = None) -> None:
        codes, _ = pd.factorize(pd.Series(np.asarray(studies)), sort=False)
        self.order = np.argsort(codes, kind="stable")  # positions grouped by study, dataset order inside
        sc = codes[self.order]
        starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
        sizes = np.diff(np.r_[starts, len(sc)])
        self.n_studies = len(starts)
        cdf = np.empty(len(sc), dtype=np.float64)
        for s, (a, n) in enumerate(zip(starts, sizes, strict=True)):
            c = np.cumsum(middle_weights(int(n)))
            c /= c[-1]
            c[-1] = 1.0
            cdf[a:a + n] = s + c  # strictly increasing over the whole array
        self.cdf = cdf
        self.batch, self.k, self.seed, self.max_steps = int(batch), int(k), int(seed), max_steps
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = max(1, math.ceil(self.k * self.n_studies / self.batch))
        return min(n, self.max_steps) if self.max_steps else n

    def draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        """``m`` dataset positions (study uniform, slice by middle weight)."""
        target = rng.integers(0, self.n_studies, size=m) + rng.random(m)
        idx = np.searchsorted(self.cdf, target, side="right")
        return self.order[np.minimum(idx, len(self.order) - 1)]

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.draw(len(self) * self.batch, epoch_rng(self.seed, self.epoch))
        for b in range(len(self)):
            yield pos[b * self.batch:(b + 1) * self.batch].tolist()


# --------------------------------------------------------------------------------------------------
# Device-side views and augmentation
# --------------------------------------------------------------------------------------------------
def center_crop_box(h: int, w: int, crop: float) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the centre crop keeping ``crop`` of each side."""
    ch, cw = max(1, int(round(h * crop))), max(1, int(round(w * crop)))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def eval_view(hu: torch.Tensor, size: int, crop: float = 0.8) -> torch.Tensor:
    """Validation geometry of an HU stack ``(B, 3, H, W)``: centre crop, bilinear resize to ``size``."""
    x = hu.float()
    top, left, ch, cw = center_crop_box(x.shape[-2], x.shape[-1], crop)
    x = x[..., top:top + ch, left:left + cw]
    if (ch, cw) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def swap_slices(hu: torch.Tensor, mask: torch.Tensor | bool = True) -> torch.Tensor:
    """Reverse the slice direction of ``(B, 3, H, W)`` stacks (s-1 <-> s+1) where ``mask`` is True."""
    if isinstance(mask, bool):
        return hu.flip(1) if mask else hu
    return torch.where(mask.view(-1, 1, 1, 1), hu.flip(1), hu)


def affine_resample(hu: torch.Tensor, theta: torch.Tensor, size: int, fill: float = AIR_HU) -> torch.Tensor:
    """Bilinear resample with ``theta`` (``(B, 2, 3)``, output -> input normalised coords); ``fill``
    outside the input."""
    grid = F.affine_grid(theta, [hu.shape[0], hu.shape[1], size, size], align_corners=False)
    return F.grid_sample(hu.float() - fill, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + fill


def _blur_matrix(n: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(n, n)`` matrix ``M`` with ``x @ M`` = a 1-D Gaussian blur of rows of length ``n`` (replicated borders)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    out = torch.zeros(n, n, device=device, dtype=torch.float64)
    src = (torch.arange(n, device=device)[None, :] + torch.arange(-radius, radius + 1, device=device)[:, None])
    cols = torch.arange(n, device=device).expand_as(src)
    out.index_put_((src.clamp(0, n - 1), cols), k[:, None].expand_as(src), accumulate=True)
    return out.to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with ``sigma`` pixels (replicated borders; same shape).
    Two matrix products (a depthwise convolution is several times slower on the CPU)."""
    h, w = x.shape[-2:]
    y = x @ _blur_matrix(w, sigma, x.device, x.dtype)
    return _blur_matrix(h, sigma, x.device, x.dtype).transpose(0, 1) @ y


@dataclass(frozen=True)
class TtaView:
    """One deterministic test-time view: flips, slice swap, and a crop (scale, centre in [-1, 1] coords);
    ``crop is None`` means the validation centre crop."""

    hflip: bool = False
    swap: bool = False
    crop: float | None = None
    center: tuple[float, float] = (0.0, 0.0)


def tta_views(n: int, crop_range: tuple[float, float] = (0.6, 0.99), seed: int = 0) -> list[TtaView]:
    """``n`` views: the validation view, h-flip, slice swap, both; then seeded random crops with random
    flip/swap (the original's TTA, made deterministic)."""
    base = [TtaView(), TtaView(hflip=True), TtaView(swap=True), TtaView(hflip=True, swap=True)]
    views = base[:n]
    rng = epoch_rng(seed, 0, 7)
    while len(views) < n:
        r = float(rng.uniform(*crop_range))
        c = rng.uniform(-(1 - r), 1 - r, size=2)
        views.append(TtaView(hflip=bool(rng.random() < 0.5), swap=bool(rng.random() < 0.5), crop=r,
                             center=(float(c[0]), float(c[1]))))
    return views


class DeviceAugment(nn.Module):
    """HU stacks ``(B, 3, H, W)`` (int16 or float, on the device) -> model input ``(B, 3, size, size)``.

    In ``train()`` mode, per image with the probabilities of ``augment`` (an ``AugmentCfg``): slice-order
    swap (before windowing), h-flip, shift/scale/rotate, random crop resized back (all one affine
    resample), another scanner (kernel blur/sharpening, noise, HU calibration drift), random erasing. In ``eval()`` mode: :func:`eval_view`. Then the recipe's windows, unless
    ``learnable`` (the model windows its own input; HU are returned). Random numbers come from an own
    generator on the input's device, set with :meth:`reseed`.
    """

    def __init__(self, size: int, augment: Any, recipe: str = "seed_3window",
                 single_window: tuple[float, float] = WINDOWS["brain"], learnable: bool = False) -> None:
        super().__init__()
        self.size, self.cfg, self.recipe = int(size), augment, recipe
        self.single_window, self.learnable = tuple(single_window), bool(learnable)
        self._seed = 0
        self._gen: torch.Generator | None = None

    @classmethod
    def from_params(cls, P: Any, size: int) -> DeviceAugment:
        """Built from ``P.cnn.augment`` and ``P.windows``."""
        return cls(size, P.cnn.augment, P.windows.recipe, tuple(P.windows.single_window), P.windows.learnable)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream (done per epoch, so resumed runs repeat it)."""
        self._seed = int(seed) & 0x7FFFFFFFFFFFFFFF
        self._gen = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self._seed)
        return self._gen

    def window(self, hu: torch.Tensor) -> torch.Tensor:
        """The recipe's channels (or the HU themselves with a learnable window)."""
        return hu.float() if self.learnable else stack_channels_torch(hu, self.recipe, self.single_window)

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.window(eval_view(hu, self.size, self.cfg.val_center_crop))
        return self.window(self.augment(hu))

    def augment(self, hu: torch.Tensor) -> torch.Tensor:
        """The random training geometry of a batch, in HU (before windowing)."""
        cfg, dev, b = self.cfg, hu.device, hu.shape[0]
        g = self._generator(dev)
        u = torch.rand(b, 17, generator=g, device=dev, dtype=torch.float32)
        x = swap_slices(hu.float(), u[:, 0] < cfg.slice_swap)
        # sampling map, output -> input coords: input = Flip · SSR · (Crop · out)
        eye = torch.eye(2, device=dev).expand(b, 2, 2)
        crop_on = u[:, 1] < cfg.random_crop
        lo, hi = cfg.crop_range
        r = torch.where(crop_on, lo + (hi - lo) * u[:, 2], torch.ones_like(u[:, 2]))
        c = (2 * u[:, 3:5] - 1) * (1 - r)[:, None]
        ssr_on = (u[:, 5] < cfg.shift_scale_rotate)[:, None, None]
        ang = math.radians(cfg.rotate_deg) * (2 * u[:, 6] - 1)
        s = 1 + cfg.scale * (2 * u[:, 7] - 1)
        q = 1 + cfg.aspect * (2 * u[:, 8] - 1)
        cos, sin = torch.cos(ang), torch.sin(ang)
        rot_inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        scale_inv = torch.diag_embed(torch.stack([1 / (s * q), q / s], -1))
        m = torch.where(ssr_on, scale_inv @ rot_inv, eye)
        shift = cfg.shift * 2 * (2 * u[:, 9:11] - 1)
        t_ssr = torch.where(ssr_on[:, :, 0], -(m @ shift[..., None])[..., 0], torch.zeros_like(shift))
        flip = torch.where(u[:, 11] < cfg.hflip, -1.0, 1.0)
        fmat = torch.diag_embed(torch.stack([flip, torch.ones_like(flip)], -1))
        a = fmat @ m * r[:, None, None]
        t = (fmat @ (m @ c[..., None] + t_ssr[..., None]))[..., 0]
        geometry = crop_on | ssr_on[:, 0, 0] | (flip < 0)
        if bool(geometry.any()) or x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = affine_resample(x, torch.cat([a, t[..., None]], -1), self.size)
        x = self._scanner(x, g)
        return self._erase(x, u[:, 12:17])

    def _scanner(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Another scanner, per image: reconstruction kernel, noise, HU calibration drift (in HU). Draws
        random numbers only when one of them is on, so the other augmentations' stream stays the same."""
        cfg = self.cfg
        if not (cfg.kernel > 0 or cfg.noise > 0 or cfg.intensity > 0):
            return x
        b, dev = x.shape[0], x.device
        u = torch.rand(b, 7, generator=g, device=dev, dtype=torch.float32)
        one, zero = torch.ones_like(u[:, 0]), torch.zeros_like(u[:, 0])
        lo, hi = cfg.kernel_range
        amount = torch.where(u[:, 0] < cfg.kernel, lo + (hi - lo) * u[:, 1], zero)
        std = torch.where(u[:, 2] < cfg.noise, cfg.noise_std * u[:, 3], zero)
        on = u[:, 4] < cfg.intensity
        scale = torch.where(on, 1 + cfg.hu_scale * (2 * u[:, 5] - 1), one)
        offset = torch.where(on, cfg.hu_offset * (2 * u[:, 6] - 1), zero)
        # scale * (x + amount * (x - blur(x)) + std * noise) + offset, in place on a fresh tensor
        blurred = gaussian_blur(x, cfg.kernel_sigma) if cfg.kernel > 0 else None
        x = x.mul((scale * (1 + amount)).view(-1, 1, 1, 1))
        if blurred is not None:
            x.add_(blurred.mul_((-scale * amount).view(-1, 1, 1, 1)))
        if cfg.noise > 0:
            noise = torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype)
            x.add_(noise.mul_((scale * std).view(-1, 1, 1, 1)))
        return x.add_(offset.view(-1, 1, 1, 1))

    def _erase(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cfg, size, dev = self.cfg, self.size, x.device
        on = u[:, 0] < cfg.erase
        a0, a1 = cfg.erase_area
        area = (a0 + (a1 - a0) * u[:, 1]) * size * size
        l0, l1 = math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])
        ratio = torch.exp(l0 + (l1 - l0) * u[:, 2])
        h = torch.sqrt(area * ratio).round().clamp(1, size)
        w = torch.sqrt(area / ratio).round().clamp(1, size)
        y0 = ((size - h + 1) * u[:, 3]).floor()
        x0 = ((size - w + 1) * u[:, 4]).floor()
        ii = torch.arange(size, device=dev, dtype=torch.float32)
        rows = (ii[None] >= y0[:, None]) & (ii[None] < (y0 + h)[:, None])
        cols = (ii[None] >= x0[:, None]) & (ii[None] < (x0 + w)[:, None])
        mask = (rows[:, :, None] & cols[:, None, :] & on[:, None, None])[:, None]
        return torch.where(mask, torch.full_like(x, AIR_HU), x)

    def tta(self, hu: torch.Tensor, view: TtaView) -> torch.Tensor:
        """One deterministic test-time view of a batch (windowed like :meth:`forward`)."""
        x = swap_slices(hu.float(), view.swap)
        if view.crop is None:
            x = eval_view(x, self.size, self.cfg.val_center_crop)
            if view.hflip:
                x = x.flip(-1)
        else:
            f = -1.0 if view.hflip else 1.0
            theta = torch.tensor([[f * view.crop, 0.0, f * view.center[0]], [0.0, view.crop, view.center[1]]],
                                 device=x.device, dtype=torch.float32).expand(x.shape[0], 2, 3)
            x = affine_resample(x, theta, self.size)
        return self.window(x)


def to_device(batch: tuple[torch.Tensor, ...], device: str | torch.device) -> tuple[torch.Tensor, ...]:
    """Move a loader batch to ``device`` (asynchronous from pinned memory)."""
    non_blocking = torch.device(device).type == "cuda"
    return tuple(t.to(device, non_blocking=non_blocking) for t in batch)


# --------------------------------------------------------------------------------------------------
# A toy catalog for tests and benchmarks
# --------------------------------------------------------------------------------------------------
def plot_augmentations(cache: np.ndarray, rows: np.ndarray, augment: DeviceAugment, views: int = 4,
                       seed: int = 0) -> Any:
    """A figure: for a few slices, the validation view and ``views`` random training views (RGB of the
    three windowed channels)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

    ds = SliceDataset(cache, rows)
    x, _, _ = ds.__getitems__(list(range(len(rows))))
    was = augment.training
    fig, axes = plt.subplots(len(rows), views + 1, figsize=(2.1 * (views + 1), 2.1 * len(rows)),
                             squeeze=False)
    shown = [augment.eval()(x)]
    augment.train()
    augment.reseed(seed)
    shown += [augment(x) for _ in range(views)]
    augment.train(was)
    for i in range(len(rows)):
        for j, batch in enumerate(shown):
            img = batch[i]
            if augment.learnable:  # HU: show the recipe's windows for the picture
                img = stack_channels_torch(img[None], augment.recipe, augment.single_window)[0]
            axes[i, j].imshow(img.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title("validation view" if j == 0 else f"training view {j}", fontsize=9)
    fig.tight_layout()
    return fig
