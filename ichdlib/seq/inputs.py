"""What the sequence models read (notebook 04 and ``ichd predict`` alike).

Level-2 inputs come from notebook 03 (``work/features/<key>/``): the pooled features and TTA probabilities
of every 2D backbone, out-of-fold for training slices and the fold mean for test slices. Each study is a
sequence of slices in z order (the catalog's order). Per slice:

- ``fea`` ``(F, D)``: each backbone's feature vector zero-padded to the widest backbone, stacked;
- ``X`` ``(2n+2, 6)``: [mean of the n backbones' probabilities, n cyclic differences ``p_i - p_{i+1 mod n}``,
  n raw probabilities] (``get_X``) and the z-spacing channel: the z step to the next slice in units of the
  study's median spacing, negative when the slices run the other way (reversal).

Each split is assembled once on the device (:class:`StudyTensors`, studies contiguous, per-batch padding by
index) and an epoch's training crops are drawn vectorised (:func:`epoch_plan`), so the host work per epoch
is milliseconds even at RSNA's size. :meth:`SeqInputs.item` + :func:`collate` remain the reference the
tensors are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ichdlib.config import Params
from ichdlib.ingest.table import load_catalog
from ichdlib.labels import LABELS
from ichdlib.registry import SEQ_MODELS

#: The sequence model registry (:data:`ichdlib.registry.SEQ_MODELS`; the older name).
MODELS = SEQ_MODELS
SD_FLOOR = 0.1  # logit units


def get_X(probs: np.ndarray) -> np.ndarray:
    """``(N, n, 6)`` backbone probabilities -> ``(N, 2n+1, 6)``: [mean, cyclic differences, raw]."""
    probs = np.asarray(probs, dtype=np.float32)
    diffs = probs - np.roll(probs, -1, axis=1)
    return np.concatenate([probs.mean(axis=1, keepdims=True), diffs, probs], axis=1)


def z_steps(z: np.ndarray, scale: float) -> np.ndarray:
    """z step to the next slice (the last repeats the previous), divided by ``scale`` (the study's median)."""
    z = np.asarray(z, dtype=np.float64)
    if len(z) < 2:
        return np.zeros(len(z), dtype=np.float32)
    d = np.diff(z)
    return (np.append(d, d[-1]) / scale).astype(np.float32)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def fold_norm_stats(probs: np.ndarray, fold: np.ndarray) -> dict[str, Any]:
    """Per-fold input normalisation statistics from OOF probabilities ``(N, n, 6)`` and each row's fold:
    the mean and standard deviation of every backbone's logits over each fold model's own OOF rows, and
    over all rows (the reference). JSON-ready (stored in the sequence checkpoints' meta). Spreads are floored
    at ``SD_FLOOR``: a class a fold model predicts as a constant is shifted, not blown up (dividing by a
    near-zero spread would turn float rounding between runs into large differences)."""
    lg = _logit(probs)

    def sd(x: np.ndarray) -> list:
        return np.maximum(x.std(0), SD_FLOOR).tolist()

    folds = {int(k): {"mu": lg[fold == k].mean(0).tolist(), "sd": sd(lg[fold == k])} for k in np.unique(fold)}
    return {"ref_mu": lg.mean(0).tolist(), "ref_sd": sd(lg), "folds": folds}


def apply_fold_norm(probs: np.ndarray, stats: dict[str, Any], fold: int) -> np.ndarray:
    """Fold model ``fold``'s probabilities ``(N, n, 6)`` with their logits standardised by that fold's OOF
    statistics and mapped back onto the reference (pooled) statistics, so every fold model's outputs have
    the same per-class location and spread."""
    f = stats["folds"].get(fold, stats["folds"].get(str(fold)))
    if f is None:
        raise ValueError(f"no input normalisation statistics for fold {fold} (have {list(stats['folds'])})")
    z = (_logit(probs) - np.asarray(f["mu"])) / np.asarray(f["sd"])
    return (1 / (1 + np.exp(-(np.asarray(stats["ref_mu"]) + np.asarray(stats["ref_sd"]) * z)))).astype(np.float32)


def normalize_test(fold_probs: np.ndarray, stats: dict[str, Any], folds: list[int]) -> np.ndarray:
    """Test probabilities from each fold model ``(n_folds, N, n, 6)`` (in the order of ``folds``): each
    normalised with its fold's statistics, then averaged over the folds."""
    return np.mean([apply_fold_norm(p, stats, k) for p, k in zip(fold_probs, folds, strict=True)], axis=0)


@dataclass
class SeqInputs:
    """One split's level-2 inputs, rows in catalog order, with the slices of each study in z order."""

    sop_uid: np.ndarray
    study_uid: np.ndarray
    patient_id: np.ndarray
    fold: np.ndarray
    z: np.ndarray
    feats: list[np.ndarray]  # per backbone (N, D_i), may be memory-mapped float16
    probs: np.ndarray  # (N, n, 6) float32
    y: np.ndarray | None = None  # (N, 6) or None for test
    keys: list[str] = field(default_factory=list)
    norm: dict[str, Any] | None = None  # fold_norm_stats of the OOF inputs when seq.input_norm == "fold"
    study_rows: list[np.ndarray] = field(init=False)
    study_scale: np.ndarray = field(init=False)
    _tensors: dict = field(init=False, default_factory=dict, repr=False)  # device -> StudyTensors

    def __post_init__(self) -> None:
        n = len(self.sop_uid)
        if self.probs.ndim != 3 or self.probs.shape[0] != n or self.probs.shape[2] != len(LABELS):
            raise ValueError(f"probs must be (N={n}, n_backbones, 6), got {self.probs.shape}")
        if len(self.feats) != self.probs.shape[1]:
            raise ValueError(f"{len(self.feats)} feature arrays but {self.probs.shape[1]} probability sets")
        for k, f in enumerate(self.feats):
            if f.ndim != 2 or f.shape[0] != n:
                raise ValueError(f"feature array {k} must be (N={n}, D), got {f.shape}")
        codes, first = pd.factorize(pd.Series(self.study_uid))
        order = np.lexsort((np.asarray(self.z, dtype=np.float64), codes))
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        self.study_rows = np.split(order, bounds) if n else []
        scales = []
        for rows in self.study_rows:
            d = np.abs(np.diff(np.asarray(self.z, dtype=np.float64)[rows]))
            d = d[d > 0]
            scales.append(float(np.median(d)) if len(d) else 1.0)
        self.study_scale = np.asarray(scales, dtype=np.float64)

    @property
    def n_cnn(self) -> int:
        return len(self.feats)

    @property
    def dim(self) -> int:
        return max(f.shape[1] for f in self.feats)

    @property
    def x_channels(self) -> int:
        return 2 * self.n_cnn + 2

    def tensors(self, device: str | torch.device = "cpu") -> StudyTensors:
        """The split pre-assembled on ``device`` (built once, reused by every epoch and prediction)."""
        key = (str(device), id(self.probs), id(self.y))
        if key not in self._tensors:
            self._tensors.clear()
            self._tensors[key] = StudyTensors(self, device)
        return self._tensors[key]

    def study_fold(self) -> np.ndarray:
        """The fold of each study (its slices share one fold)."""
        return np.array([self.fold[r[0]] for r in self.study_rows], dtype=int)

    def item(self, study: int, rows: np.ndarray | None = None, reverse: bool = False) -> dict[str, Any]:
        """Arrays for one study (``rows``: a subset/crop of its rows, in the order to feed)."""
        if rows is None:
            rows = self.study_rows[study]
        if reverse:
            rows = rows[::-1]
        D = self.dim
        fea = np.zeros((len(rows), self.n_cnn, D), dtype=np.float32)
        for k, f in enumerate(self.feats):
            fea[:, k, : f.shape[1]] = np.asarray(f[rows], dtype=np.float32)
        X = get_X(self.probs[rows])  # (L, 2n+1, 6)
        zc = z_steps(self.z[rows], self.study_scale[study])
        X = np.concatenate([X, np.repeat(zc[:, None, None], len(LABELS), axis=2)], axis=1).transpose(1, 0, 2)
        y = None if self.y is None else np.asarray(self.y[rows], dtype=np.float32)
        return {"fea": fea, "X": np.ascontiguousarray(X), "y": y, "rows": np.asarray(rows)}


class StudyTensors:
    """A split's level-2 inputs assembled once on the device, studies contiguous in z order.

    Per backbone a float16 ``(N + 1, D_k)`` feature tensor (row ``N`` is the zero padding row), the
    ``get_X`` channels ``(N + 1, 2n+1, 6)``, labels, z and each row's study spacing. A batch is a padded
    ``(B, L)`` matrix of packed row indices: :meth:`batch` gathers it on the device into exactly what
    :func:`collate` of :meth:`SeqInputs.item` gives for the same rows (z steps recomputed for the order
    fed), so an epoch's host work is drawing the crops (:func:`epoch_plan`, vectorised) and slicing index
    matrices. On CUDA the features take ``N x sum(D_k) x 2`` bytes of GPU memory (8.7 GB at RSNA's size for
    the four backbones); on the CPU memory-mapped features stay on disk when already in study order.
    """

    def __init__(self, inputs: SeqInputs, device: str | torch.device = "cpu", chunk: int = 65536) -> None:
        self.device = torch.device(device)
        rows = inputs.study_rows
        self.lengths = np.array([len(r) for r in rows], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64) if len(rows) else \
            np.zeros(0, np.int64)
        perm = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.perm = perm  # packed position -> SeqInputs row
        n = len(perm)
        self.pad = n
        identity = bool(np.array_equal(perm, np.arange(n)))
        dev = self.device
        self.dims = [int(f.shape[1]) for f in inputs.feats]
        self.D = max(self.dims) if self.dims else 0
        self.feats: list[Any] = []
        for f in inputs.feats:
            if dev.type == "cpu" and identity and isinstance(f, np.memmap):
                self.feats.append(f)  # gathered per batch from the page cache, padding row handled there
                continue
            dt = np.float16 if f.dtype == np.float16 else np.float32  # the notebook-03 arrays are float16
            t = torch.zeros(n + 1, f.shape[1], dtype=torch.from_numpy(np.zeros(0, dt)).dtype, device=dev)
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                t[a:b] = torch.from_numpy(np.asarray(f[perm[a:b]], dtype=dt)).to(dev)
            self.feats.append(t)
        Xb = get_X(inputs.probs[perm]) if n else np.zeros((0, 2 * inputs.n_cnn + 1, len(LABELS)), np.float32)
        self.X = torch.zeros(n + 1, *Xb.shape[1:], dtype=torch.float32, device=dev)
        self.X[:n] = torch.from_numpy(Xb).to(dev)
        self.y = torch.zeros(n + 1, len(LABELS), dtype=torch.float32, device=dev)
        if inputs.y is not None:
            self.y[:n] = torch.from_numpy(np.asarray(inputs.y[perm], dtype=np.float32)).to(dev)
        study_of = np.repeat(np.arange(len(rows)), self.lengths)
        self.z = torch.zeros(n + 1, dtype=torch.float64, device=dev)
        self.z[:n] = torch.from_numpy(np.asarray(inputs.z, dtype=np.float64)[perm]).to(dev)
        self.scale = torch.ones(n + 1, dtype=torch.float64, device=dev)
        self.scale[:n] = torch.from_numpy(inputs.study_scale[study_of]).to(dev)

    def whole(self, studies: np.ndarray, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Index matrix ``(len(studies), L)`` of whole studies (reversed when asked) and their lengths."""
        studies = np.asarray(studies, dtype=np.int64)
        lens = self.lengths[studies]
        L = int(lens.max()) if len(lens) else 0
        j = np.arange(L)[None, :]
        local = (lens[:, None] - 1 - j) if reverse else np.broadcast_to(j, (len(studies), L))
        idx = np.where(j < lens[:, None], self.starts[studies][:, None] + local, self.pad)
        return idx.astype(np.int64), lens

    def _gather_feats(self, idx: torch.Tensor, B: int, L: int) -> torch.Tensor:
        fea = torch.zeros(B, L, len(self.feats), self.D, device=self.device)
        for k, f in enumerate(self.feats):
            if isinstance(f, np.ndarray):
                flat = idx.reshape(-1).cpu().numpy()
                vals = np.zeros((len(flat), f.shape[1]), np.float32)
                ok = flat < self.pad
                vals[ok] = f[flat[ok]]
                fea[:, :, k, : f.shape[1]] = torch.from_numpy(vals).view(B, L, -1)
            else:
                fea[:, :, k, : f.shape[1]] = f[idx].float()
        return fea

    def batch(self, idx: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
        """Padded batch of the rows ``idx`` ``(B, L)`` (``self.pad`` past each length), as :func:`collate`
        gives it: ``fea (B,L,F,D)``, ``X (B,C,L,6)``, ``y``, ``mask``, ``lengths``, ``rows`` (SeqInputs rows)."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        B = len(idx)
        L = int(lengths.max()) if B else 0
        idx = idx[:, :L]
        it = torch.from_numpy(np.ascontiguousarray(idx)).to(self.device)
        lt = torch.from_numpy(lengths).to(self.device)
        mask = torch.arange(L, device=self.device)[None, :] < lt[:, None]
        # z step to the next slice in the order fed, the last repeating the previous; 0 for a single slice
        z = self.z[it]
        d = torch.zeros_like(z)
        if L > 1:
            d[:, :-1] = z[:, 1:] - z[:, :-1]
            last = (lt - 1).clamp(min=0)
            prev = (lt - 2).clamp(min=0)
            d[torch.arange(B, device=self.device), last] = torch.where(
                lt > 1, d[torch.arange(B, device=self.device), prev], torch.zeros((), dtype=d.dtype, device=d.device))
        zc = torch.where(mask, d / self.scale[it], torch.zeros_like(d)).float()
        X = torch.cat([self.X[it], zc[:, :, None, None].expand(B, L, 1, len(LABELS))], dim=2).permute(0, 2, 1, 3)
        rows = [self.perm[r[:n]] for r, n in zip(idx, lengths, strict=True)]
        return {"fea": self._gather_feats(it, B, L), "X": X.contiguous(), "y": self.y[it], "mask": mask,
                "lengths": lt.cpu(), "rows": rows}


def epoch_plan(st: StudyTensors, studies: np.ndarray, rng: np.random.Generator, *, crop: int, subsample_p: float,
               reverse_p: float) -> tuple[np.ndarray, np.ndarray]:
    """One training epoch's crops of ``studies`` (vectorised :class:`StudyDataset` augmentations): with p
    ``subsample_p`` every other slice (odd or even at random) of studies over 10 slices, a random
    contiguous crop of ``crop`` slices, with p ``reverse_p`` reversed. Returns the index matrix
    ``(n, crop)`` in a shuffled study order and the lengths."""
    studies = np.asarray(studies, dtype=np.int64)
    order = studies[rng.permutation(len(studies))]
    u = rng.random((len(order), 4))
    n = st.lengths[order]
    sub = (n > 10) & (u[:, 0] < subsample_p)
    parity = np.where(sub, (u[:, 1] * 2).astype(np.int64), 0)
    step = np.where(sub, 2, 1)
    m = np.where(sub, (n - parity + 1) // 2, n)
    length = np.minimum(m, crop)
    start = np.where(m > crop, np.floor(u[:, 2] * (m - crop + 1)).astype(np.int64), 0)
    rev = u[:, 3] < reverse_p
    j = np.arange(int(length.max()) if len(length) else 0)[None, :]
    jj = np.where(rev[:, None], length[:, None] - 1 - j, j)
    local = (start[:, None] + jj) * step[:, None] + parity[:, None]
    idx = np.where(j < length[:, None], st.starts[order][:, None] + local, st.pad)
    return idx.astype(np.int64), length


def _load_catalog(P: Params) -> pd.DataFrame:
    return load_catalog(P.layout.work)


def backbone_keys(P: Params) -> list[str]:
    """The 2D backbones whose outputs feed the sequence models (``seq.backbones`` or all of ``cnn``)."""
    keys = [b.key for b in P.cnn.backbones]
    if P.seq.backbones:
        unknown = [k for k in P.seq.backbones if k not in keys]
        if unknown:
            raise ValueError(f"seq.backbones {unknown} are not among cnn.backbones {keys}")
        keys = list(P.seq.backbones)
    return keys


def load_inputs(P: Params, split: str, catalog: pd.DataFrame | None = None) -> SeqInputs:
    """Read notebook 03's arrays for ``split`` ('train' uses the OOF arrays) and check their alignment.
    With ``seq.input_norm: fold`` the probabilities are normalised per fold model (:func:`apply_fold_norm`
    with the statistics of the OOF probabilities; test rows per fold model before the fold mean)."""
    inputs = _load_inputs(P, split, catalog)
    if P.seq.input_norm == "none":
        return inputs
    train = inputs if split == "train" else _load_inputs(P, "train", catalog)
    stats = fold_norm_stats(train.probs, train.fold)
    if split == "train":
        out = np.empty_like(inputs.probs)
        for k in np.unique(inputs.fold):
            out[inputs.fold == k] = apply_fold_norm(inputs.probs[inputs.fold == k], stats, int(k))
    else:
        per_fold = []
        for key in inputs.keys:
            path = P.layout.features(key).test_prob_folds
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; rerun notebook 03 (features) for backbone {key!r}")
            arr = np.load(path)
            if arr.shape[1:] != (len(inputs.sop_uid), len(LABELS)):
                raise ValueError(f"{path}: shape {arr.shape}, expected (folds, {len(inputs.sop_uid)}, 6); "
                                 "rerun notebook 03")
            per_fold.append(arr)
        folds = sorted(int(k) for k in stats["folds"])
        if len(per_fold) and per_fold[0].shape[0] != len(folds):
            raise ValueError(f"{P.layout.features_root}: {per_fold[0].shape[0]} fold models' test outputs, "
                             f"but the OOF rows come from folds {folds}; rerun notebook 03")
        out = normalize_test(np.stack(per_fold, axis=2), stats, folds) if per_fold else inputs.probs
    inputs.probs, inputs.norm = out.astype(np.float32), stats
    return inputs


def _load_inputs(P: Params, split: str, catalog: pd.DataFrame | None = None) -> SeqInputs:
    cat = _load_catalog(P) if catalog is None else catalog
    rows = cat[cat["split"] == split].reset_index(drop=True)
    feats, probs = [], []
    keys = backbone_keys(P)
    for key in keys:
        fd = P.layout.features(key)
        d = fd.path
        fpath, ppath = (fd.oof_feat, fd.oof_prob) if split == "train" else (fd.test_feat, fd.test_prob)
        for p in (fpath, ppath):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing; run notebook 03 (features) for backbone {key!r}")
        feat = np.load(fpath, mmap_mode="r")
        prob = pd.read_parquet(ppath)
        if feat.shape[0] != len(rows) or len(prob) != len(rows):
            raise ValueError(f"{d}: {feat.shape[0]} feature rows and {len(prob)} probability rows, but the "
                             f"catalog has {len(rows)} {split} slices; rerun notebook 03")
        if not np.array_equal(prob["sop_uid"].to_numpy(str), rows["sop_uid"].to_numpy(str)):
            raise ValueError(f"{ppath}: rows are not in catalog order; rerun notebook 03")
        feats.append(feat)
        probs.append(prob[list(LABELS)].to_numpy(np.float32))
    y = rows[list(LABELS)].to_numpy(np.float32) if split == "train" else None
    return SeqInputs(
        sop_uid=rows["sop_uid"].to_numpy(str), study_uid=rows["study_uid"].to_numpy(str),
        patient_id=rows["patient_id"].to_numpy(str), fold=rows["fold"].to_numpy(int),
        z=rows["z"].to_numpy(np.float64), feats=feats, probs=np.stack(probs, axis=1), y=y, keys=keys)


class StudyDataset(Dataset):
    """Whole studies (validation/test, optionally reversed) or augmented crops (training).

    Training augmentations (seed_spec §4): with p ``subsample_p`` keep every other slice (odd or even at
    random) when the study has more than 10 slices; a random contiguous crop of ``crop`` slices; with p
    ``reverse_p`` reverse the slice order. z steps are recomputed after the augmentations, so they change
    sign under reversal and double under subsampling.
    """

    def __init__(self, inputs: SeqInputs, studies: np.ndarray, *, train: bool = False, crop: int = 24,
                 subsample_p: float = 0.5, reverse_p: float = 0.5, reverse: bool = False, seed: int = 0) -> None:
        self.inputs, self.studies = inputs, np.asarray(studies, dtype=int)
        self.train, self.crop, self.reverse = train, crop, reverse
        self.subsample_p, self.reverse_p = subsample_p, reverse_p
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = int(self.studies[i])
        rows = self.inputs.study_rows[s]
        reverse = self.reverse
        if self.train:
            if len(rows) > 10 and self.rng.random() < self.subsample_p:
                rows = rows[int(self.rng.integers(2)):: 2]
            if len(rows) > self.crop:
                start = int(self.rng.integers(len(rows) - self.crop + 1))
                rows = rows[start: start + self.crop]
            reverse = bool(self.rng.random() < self.reverse_p)
        return self.inputs.item(s, rows, reverse=reverse)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of study items to the longest: tensors ``fea (B,L,F,D)``, ``X (B,C,L,6)``, ``y``,
    ``mask (B,L)``, ``lengths (B,)``; ``rows`` keeps each study's catalog rows for writing predictions."""
    lengths = [len(it["rows"]) for it in items]
    B, L = len(items), max(lengths)
    f0, x0 = items[0]["fea"], items[0]["X"]
    fea = torch.zeros(B, L, *f0.shape[1:])
    X = torch.zeros(B, x0.shape[0], L, x0.shape[2])
    y = torch.zeros(B, L, len(LABELS))
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, it in enumerate(items):
        n = lengths[b]
        fea[b, :n] = torch.from_numpy(it["fea"])
        X[b, :, :n] = torch.from_numpy(it["X"])
        if it["y"] is not None:
            y[b, :n] = torch.from_numpy(it["y"])
        mask[b, :n] = True
    return {"fea": fea, "X": X, "y": y, "mask": mask, "lengths": torch.tensor(lengths),
            "rows": [it["rows"] for it in items]}


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def seq_arch(P: Params) -> dict[str, Any]:
    """The keyword arguments of :func:`ichdlib.seq.models.build_seq_model` from ``P.seq`` (stored as
    ``meta["arch"]`` in every checkpoint)."""
    s = P.seq
    return {"mid": s.mid, "reduce_dim": s.reduce_dim, "hidden": s.hidden, "dropout": s.dropout,
            "conv": list(s.conv), "slice_input": s.slice_input, "residual": s.residual}


