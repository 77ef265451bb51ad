"""Sequence models 1 and 2 of the 1st-place RSNA 2019 solution, with padding masked out.

Shapes (B studies, L slices padded, F backbones, D feature width, C probability channels, 6 labels):

- ``fea``: ``(B, L, F, D)`` per-slice pooled CNN features, each backbone zero-padded to width D;
- ``X``: ``(B, C, L, 6)`` CNN probabilities as [mean, cyclic differences, raw] plus the z-spacing channel;
- ``mask``: ``(B, L)`` bool, True on real slices; ``lengths``: ``(B,)`` number of real slices.

Fixes over the original (seed_spec §8 items 9 and 11): BatchNorm statistics are computed over real slices
only (:class:`MaskedBatchNorm`), padded positions are zeroed between layers so a convolution never sees
anything but zeros past a study's end, and the GRUs run on packed sequences, so the outputs at real
positions do not depend on how much padding a batch has.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ichdlib.checkpoints import register_builder
from ichdlib.labels import LABELS, WEIGHTS
from ichdlib.registry import SEQ_MODELS
from ichdlib.spec import SeqSpec

N_LABELS = len(LABELS)


class MaskedBatchNorm(nn.Module):
    """``nn.BatchNorm1d`` over the last axis whose statistics use only the positions where ``mask`` is True.

    ``x`` is ``(B, L, ..., C)`` and ``mask`` ``(B, L)``; padded positions come out as zeros.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = x[mask]  # (n_valid, ..., C)
        flat = valid.reshape(-1, x.shape[-1])
        if self.training and flat.shape[0] < 2:
            # One value per channel has no variance: fall back to the running statistics.
            bn = self.bn
            flat = F.batch_norm(flat, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            flat = self.bn(flat)
        out = x.new_zeros(x.shape)
        out[mask] = flat.reshape(valid.shape)
        return out


def _run_gru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A batch-first GRU over packed sequences: padding never reaches a real position. Returns (B, L, H)."""
    packed = pack_padded_sequence(x, lengths.detach().cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out


class SeqModel1(nn.Module):
    """Per-slice reduction of the CNN features, a linear skip head and a 2-layer BiGRU head, summed.

    (seed_spec §4 'Seq model 1': Conv1x1 D→512→128 with BN/ReLU/dropout per slice and backbone, the
    128·F vector per slice feeds ``Linear(128F→6)`` and ``BiGRU(128F, hidden) → Linear(2·hidden→6)``.)
    """

    def __init__(self, in_dim: int, n_cnn: int, mid: int = 512, reduce_dim: int = 128, hidden: int = 96,
                 layers: int = 2, dropout: float = 0.5, slice_input: str = "pooled", residual: bool = False) -> None:
        super().__init__()
        if slice_input not in ("pooled", "logits"):
            raise ValueError(f"slice_input {slice_input!r}: expected 'pooled' or 'logits'")
        self.slice_input, self.residual = slice_input, residual
        in_dim = N_LABELS if slice_input == "logits" else in_dim
        self.in_dim, self.n_cnn = in_dim, n_cnn
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(in_dim, mid, bias=False)
        self.bn1 = MaskedBatchNorm(mid)
        self.fc2 = nn.Linear(mid, reduce_dim, bias=False)
        self.bn2 = MaskedBatchNorm(reduce_dim)
        width = reduce_dim * n_cnn
        self.skip = nn.Linear(width, N_LABELS)
        self.gru = nn.GRU(width, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, N_LABELS)

    def slice_vectors(self, fea: torch.Tensor, X: torch.Tensor | None) -> torch.Tensor:
        """The per-slice input ``(B, L, F, D)``: the pooled features, or (``slice_input='logits'``) each
        backbone's logits, taken from the raw-probability channels of ``X``."""
        if self.slice_input == "pooled":
            return fea
        if X is None:
            raise ValueError("slice_input='logits' needs the probability channels X")
        n = self.n_cnn
        raw = X[:, 1 + n: 1 + 2 * n].permute(0, 2, 1, 3).clamp(1e-4, 1 - 1e-4)  # (B, L, n, 6)
        return torch.logit(raw)

    def forward(self, fea: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
                X: torch.Tensor | None = None) -> torch.Tensor:
        """``fea (B, L, F, D)`` (or ``X`` for logits input) -> logits ``(B, L, 6)``, zero at padded positions."""
        h = self.drop(self.slice_vectors(fea, X))
        h = self.drop(F.relu(self.bn1(self.fc1(h), mask)))
        h = self.drop(F.relu(self.bn2(self.fc2(h), mask)))
        h = h.flatten(2)  # (B, L, reduce·F)
        out = self.skip(h) + self.head(_run_gru(self.gru, h, lengths))
        if self.residual:
            out = out + input_logits(X)
        return out * mask[..., None]


def input_logits(X: torch.Tensor | None) -> torch.Tensor:
    """The logit of the backbones' mean probability (channel 0 of ``X``), ``(B, L, 6)``: what a residual
    head adds its correction to."""
    if X is None:
        raise ValueError("residual=True needs the probability channels X")
    return torch.logit(X[:, 0].clamp(1e-4, 1 - 1e-4))


class _ConvBlock(nn.Module):
    """Conv along the slice axis (kernel ``(k, 1)``: weights shared across the 6 labels) + masked BN + ReLU."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int) -> None:
        super().__init__()
        pad = dilation * (k - 1) // 2
        self.conv = nn.Conv2d(cin, cout, (k, 1), padding=(pad, 0), dilation=(dilation, 1), bias=False)
        self.bn = MaskedBatchNorm(cout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).permute(0, 2, 3, 1)  # (B, L, 6, C)
        return F.relu(self.bn(h, mask)).permute(0, 3, 1, 2)  # zeros at padded positions


class SeqModel2(nn.Module):
    """Dilated 1D convolutions over the CNN probabilities, the z channel and model 1's output.

    (seed_spec §4 'Seq model 2': conv k5 →512, k3 d2 →256, k3 d4, k3 d2, then a k3 conv →1 (the conv
    head) and a BiGRU over the 256·6 vector per slice → Linear(2·hidden→6) (the GRU head), summed.)
    The class axis is the conv's width with kernel width 1, so the weights are shared across the labels
    as in the original. Contains its own :class:`SeqModel1`, trained jointly with deep supervision.
    ``forward`` returns ``(out, out0)``: model 2's and model 1's logits.
    """

    def __init__(self, in_dim: int, n_cnn: int, x_channels: int, mid: int = 512, reduce_dim: int = 128,
                 hidden: int = 96, layers: int = 2, dropout: float = 0.5, conv: tuple[int, int] = (512, 256),
                 slice_input: str = "pooled", residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.model1 = SeqModel1(in_dim, n_cnn, mid, reduce_dim, hidden, layers, dropout, slice_input, residual)
        c1, c2 = conv
        self.blocks = nn.ModuleList([
            _ConvBlock(x_channels + 1, c1, 5, 1),
            _ConvBlock(c1, c2, 3, 2),
            _ConvBlock(c2, c2, 3, 4),
            _ConvBlock(c2, c2, 3, 2),
        ])
        self.conv_final = nn.Conv2d(c2, 1, (3, 1), padding=(1, 0), bias=False)
        self.gru = nn.GRU(c2 * N_LABELS, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, N_LABELS)

    def forward(self, fea: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out0 = self.model1(fea, mask, lengths, X)
        m4 = mask[:, None, :, None].to(X.dtype)
        h = torch.cat([X, torch.sigmoid(out0)[:, None]], dim=1) * m4  # sigmoid(0)=0.5 masked back to 0
        for block in self.blocks:
            h = block(h, mask)
        conv_out = self.conv_final(h)[:, 0]  # (B, L, 6)
        seq = h.permute(0, 2, 1, 3).flatten(2)  # (B, L, C2·6)
        out = conv_out + self.head(_run_gru(self.gru, seq, lengths))
        if self.residual:
            out = out + input_logits(X)
        return out * mask[..., None], out0


def build_seq1(in_dim: int, n_cnn: int, x_channels: int, *, mid: int = 512, reduce_dim: int = 128,
               hidden: int = 96, dropout: float = 0.5, conv: tuple[int, int] | list[int] = (512, 256),
               slice_input: str = "pooled", residual: bool = False) -> nn.Module:
    """Sequence model 1 (``x_channels`` and ``conv`` are seq2's and unused here)."""
    return SeqModel1(in_dim, n_cnn, mid=mid, reduce_dim=reduce_dim, hidden=hidden, dropout=dropout,
                     slice_input=slice_input, residual=residual)


def build_seq2(in_dim: int, n_cnn: int, x_channels: int, *, mid: int = 512, reduce_dim: int = 128,
               hidden: int = 96, dropout: float = 0.5, conv: tuple[int, int] | list[int] = (512, 256),
               slice_input: str = "pooled", residual: bool = False) -> nn.Module:
    """Sequence model 2."""
    return SeqModel2(in_dim, n_cnn, x_channels, mid=mid, reduce_dim=reduce_dim, hidden=hidden,
                     dropout=dropout, conv=tuple(conv), slice_input=slice_input, residual=residual)


def build_seq_model(name: str, in_dim: int, n_cnn: int, x_channels: int, **arch: Any) -> nn.Module:
    """The sequence model registered as ``name`` in :data:`ichdlib.registry.SEQ_MODELS` (``seq1`` ->
    :class:`SeqModel1`, ``seq2`` -> :class:`SeqModel2`; the original's widths by default). ``arch``:
    ``mid``, ``reduce_dim``, ``hidden``, ``dropout``, ``conv``, ``slice_input``, ``residual`` (every head
    adds its output to the logit of the backbones' mean probability)."""
    return SEQ_MODELS.load(name)(in_dim, n_cnn, x_channels, **arch)


@register_builder("seq")
def build_from_seq_spec(spec: SeqSpec) -> nn.Module:
    """An untrained sequence model of a :class:`ichdlib.spec.SeqSpec` (load a state dict into it)."""
    return build_seq_model(spec.model, spec.in_dim, spec.n_cnn, spec.x_channels, **spec.arch)


def init_output_bias(model: nn.Module, prior: torch.Tensor | list[float]) -> None:
    """Start every output head at the labels' prior log-odds (the GRU heads' linear layers carry the bias;
    the skip/conv heads add none), so training starts from the prior-only prediction. Residual models
    start from their input instead: the output layers are zeroed, so the first prediction is the
    backbones' mean probability."""
    p = torch.as_tensor(prior, dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
    logit = torch.log(p / (1 - p))
    m1 = model.model1 if isinstance(model, SeqModel2) else model
    heads = [m1] + ([model] if isinstance(model, SeqModel2) else [])
    with torch.no_grad():
        m1.skip.bias.zero_()
        for m in heads:
            m.head.bias.copy_(logit)
        if m1.residual:
            outputs = [m1.skip, *(m.head for m in heads)]
            outputs += [model.conv_final] if isinstance(model, SeqModel2) else []
            for layer in outputs:
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()


def model_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run either model on a collated batch; returns the logits of every supervised head, final first."""
    if isinstance(model, SeqModel2):
        out, out0 = model(batch["fea"], batch["X"], batch["mask"], batch["lengths"])
        return [out, out0]
    return [model(batch["fea"], batch["mask"], batch["lengths"], batch["X"])]


def masked_weighted_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted BCE ``Σ_c w_c·BCE / Σ_c w_c`` averaged over real slices only (the competition metric per slice)."""
    if weights is None:
        weights = torch.as_tensor(WEIGHTS, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    per_slice = (bce * weights).sum(-1) / weights.sum()
    m = mask.to(per_slice.dtype)
    return (per_slice * m).sum() / m.sum().clamp_min(1.0)
