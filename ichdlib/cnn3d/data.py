"""Feeding the 3D CNN: studies as slice ranges of the HU cache, K-slice crops, and volume augmentation.

Studies are read from the memory-mapped HU cache (``work/<run>/cache_<size>.npy``, rows in catalog order) one
crop or one study at a time: nothing holds more than a batch of volumes in RAM, whatever the number of
studies. :class:`Studies` lists each study's cache rows in z order and its labels; :class:`CropDataset` gathers
``(B, K, H, W)`` int16 crops (shorter studies padded with air and masked); :class:`CropSampler` draws
``crops_per_study`` crops per study and epoch from a seeded per-epoch generator (a resumed epoch repeats its
batches). :class:`VolumeAugment` is the 2D stage's :class:`ichdlib.cnn.data.DeviceAugment` applied to the
slices of a crop as one image (same flip / shift-scale-rotate / crop / erasing for every slice), then the
recipe's windows as channels ``(B, C, K, size, size)``. Reversing z is done with the labels
(:func:`flip_z`), never inside the augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ichdlib.cnn.data import AIR_HU, DeviceAugment, SliceDataset, epoch_rng
from ichdlib.labels import LABELS
from ichdlib.windows import recipe_windows, window_torch


@dataclass
class Studies:
    """Studies of a catalog frame: ``rows[i]`` the cache rows of study ``i`` in z order, ``labels[i]`` its
    ``(n, 6)`` labels (NaN for test slices), ``sop[i]`` its slice IDs, ``uids`` the study UIDs."""

    uids: list[str]
    rows: list[np.ndarray]
    labels: list[np.ndarray]
    sop: list[np.ndarray]

    @classmethod
    def from_catalog(cls, cat: pd.DataFrame) -> Studies:
        """Group ``cat`` (any subset, catalog order) by study, keeping the frame's slice order."""
        if "row" not in cat.columns:
            raise ValueError("catalog lacks the 'row' column (cache rows); re-run ingest")
        uids, rows, labels, sop = [], [], [], []
        y = cat[list(LABELS)].to_numpy(dtype=np.float32)
        r = cat["row"].to_numpy(np.int64)
        s = cat["sop_uid"].to_numpy(str)
        codes, names = pd.factorize(cat["study_uid"], sort=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0, True])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            idx = order[a:b]
            uids.append(str(names[codes[idx[0]]]))
            rows.append(r[idx])
            labels.append(y[idx])
            sop.append(s[idx])
        return cls(uids, rows, labels, sop)

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.rows], dtype=np.int64)

    def n_slices(self) -> int:
        return int(self.lengths.sum())

    def subset(self, sel: slice | Sequence[int]) -> Studies:
        idx = range(len(self))[sel] if isinstance(sel, slice) else list(sel)
        return Studies([self.uids[i] for i in idx], [self.rows[i] for i in idx], [self.labels[i] for i in idx],
                       [self.sop[i] for i in idx])


def read_volume(cache: Any, rows: np.ndarray) -> np.ndarray:
    """``(n, H, W)`` int16 slices of ``cache`` (memmap, or anything with ``read_rows``) for ``rows``."""
    h, w = cache.shape[1:]
    out = np.empty((len(rows), h, w), dtype=np.int16)
    if hasattr(cache, "read_rows"):
        cache.read_rows(np.asarray(rows), out)
    elif len(rows) and np.all(np.diff(rows) == 1):  # a study's rows are one contiguous block in catalog order
        out[:] = cache[int(rows[0]):int(rows[-1]) + 1]
    else:
        np.take(cache, rows, axis=0, out=out)
    return out


class CropDataset(torch.utils.data.Dataset):
    """K-slice crops of studies: items are ``(study, start)``; a batch is ``(x int16 (B, K, H, W),
    y float32 (B, K, 6), mask bool (B, K))``. Slices past a short study's end are air and masked out."""

    def __init__(self, cache: Any, studies: Studies, k: int) -> None:
        if cache.ndim != 3:
            raise ValueError(f"cache must be (n_rows, H, W), got shape {cache.shape}")
        hi = max((int(r.max()) for r in studies.rows if len(r)), default=-1)
        if hi >= len(cache):
            raise ValueError(f"cache rows out of range: cache has {len(cache)} rows, a study asks for row {hi}; "
                             "rebuild the cache (ingest) for this catalog")
        self.cache, self.studies, self.k = cache, studies, int(k)

    def __len__(self) -> int:
        return len(self.studies)

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = self.cache.shape[1:]
        x = np.full((len(items), self.k, h, w), int(AIR_HU), dtype=np.int16)
        y = np.zeros((len(items), self.k, len(LABELS)), dtype=np.float32)
        mask = np.zeros((len(items), self.k), dtype=bool)
        for b, (s, start) in enumerate(items):
            rows = self.studies.rows[s][start:start + self.k]
            x[b, :len(rows)] = read_volume(self.cache, rows)
            y[b, :len(rows)] = self.studies.labels[s][start:start + self.k]
            mask[b, :len(rows)] = True
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)

    # a memmap must not be pickled into worker processes: reopen it there (as the 2D dataset does)
    def __getstate__(self) -> dict[str, Any]:
        return SliceDataset.__getstate__(self)  # type: ignore[arg-type]

    def __setstate__(self, state: dict[str, Any]) -> None:
        SliceDataset.__setstate__(self, state)  # type: ignore[arg-type]


def collate_crops(batch: Any) -> Any:
    """The dataset already returns whole batches."""
    return batch


class CropSampler:
    """Batches of ``(study, start)`` crops: every study ``crops_per_study`` times per epoch in a seeded order,
    each crop's first slice uniform over the study (0 when the study is not longer than ``k``)."""

    def __init__(self, lengths: np.ndarray, k: int, batch: int, crops_per_study: int = 1, seed: int = 0) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.k, self.batch, self.crops, self.seed = int(k), int(batch), int(crops_per_study), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.lengths) * self.crops
        return n // self.batch if n >= self.batch else 1  # training drops a ragged last batch (BatchNorm)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = epoch_rng(self.seed, self.epoch, 3)
        study = np.tile(np.arange(len(self.lengths)), self.crops)[rng.permutation(len(self.lengths) * self.crops)]
        room = np.maximum(self.lengths[study] - self.k, 0) + 1
        start = np.floor(rng.random(len(study)) * room).astype(np.int64)
        items = list(zip(study.tolist(), start.tolist(), strict=True))
        for b in range(len(self)):
            yield items[b * self.batch:(b + 1) * self.batch]


def flip_z(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, on: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reverse the slice order of crops where ``on`` (``(B,)`` bool), labels and mask with them; padded slices
    then come first, which the mask keeps out of the loss."""
    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.where(on.view(-1, *([1] * (t.dim() - 1))), t.flip(1), t)

    return f(x), f(y), f(mask)


class VolumeAugment(DeviceAugment):
    """``(B, n, H, W)`` HU crops -> ``(B, C, n, size, size)`` windowed channels: the 2D augmentation with the
    slices of a crop as the channels of one image (one geometry per crop), the validation view in ``eval()``,
    then one channel per window of the recipe. Its own ``slice_swap`` is off: see :func:`flip_z`."""

    def __init__(self, size: int, augment: Any, windows: Sequence[tuple[float, float]]) -> None:
        super().__init__(size, augment.model_copy(update={"slice_swap": 0.0}))
        self.windows = [tuple(float(v) for v in w) for w in windows]

    @classmethod
    def from_spec(cls, spec: Any, augment: Any) -> VolumeAugment:
        """The augmentation (and evaluation view) a 3D model spec was trained with."""
        return cls(spec.size, augment.model_copy(update={"val_center_crop": spec.val_center_crop}), spec.windows)

    @classmethod
    def from_params(cls, P: Any, size: int | None = None) -> VolumeAugment:  # type: ignore[override]
        wins = recipe_windows(P.windows.recipe, tuple(P.windows.single_window))
        return cls(size or P.cnn3d.size, P.cnn.augment, wins)

    def window(self, hu: torch.Tensor) -> torch.Tensor:
        return torch.stack([window_torch(hu, c, w) for c, w in self.windows], dim=1)
