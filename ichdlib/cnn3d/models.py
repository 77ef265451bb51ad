"""MONAI's ResNet (MedicalNet layout) adapted to per-slice logits.

``monai.networks.nets.resnet10/18/34`` downsample every spatial axis: conv1 (stride 2 in plane, ``conv1_t_stride``
along the first axis), a 3x3x3 max-pool with stride 2 and stride-2 first blocks in layers 2-4, 32x in all. A
study has 20-60 slices, so z would shrink to 1-2 positions and the model could not score the competition's
slice rows. :func:`build_net3d` keeps the MedicalNet weights' shapes and sets **every z stride to 1**
(conv1, max-pool, the first convolution and the shortcut of layers 2-4); in plane the strides stay 2. Input
``(B, C, n, H, W)`` (z first, as MONAI's ``conv1_t_*`` axis), output ``(B, n, 6)`` logits: the features are
averaged in plane only and a per-slice linear head reads them. Any ``n >= 1`` works (z is padded like x/y).

z at full resolution costs about 3x the in-plane work of the 2D ResNet of the same depth per slice (3x3x3
kernels); the alternative (z strides, then upsampling back) blurs the slice boundaries the labels follow.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import resnet
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args
from torch import nn

from ichdlib.checkpoints import register_builder
from ichdlib.cnn.models import WeightsError, read_state_dict
from ichdlib.labels import LABELS
from ichdlib.spec import NORMALISATION, VolumeSpec


class WeightsLayoutError(ValueError):
    """A weights file whose layout does not fit the 3D model (one line, naming the file)."""


def _z_stride_one(net: nn.Module) -> None:
    """Set the z (first spatial axis) stride of every strided module of a MONAI ResNet to 1."""
    net.conv1.stride = (1, *net.conv1.stride[1:])
    net.maxpool = nn.MaxPool3d(kernel_size=3, stride=(1, 2, 2), padding=1)
    for layer in (net.layer2, net.layer3, net.layer4):
        block = layer[0]
        block.conv1.stride = (1, 2, 2)
        ds = block.downsample
        if isinstance(ds, nn.Sequential):
            ds[0].stride = (1, 2, 2)
        elif isinstance(ds, partial):  # shortcut "A": strided average pool + zero channels
            block.downsample = partial(ds.func, *ds.args, **{**ds.keywords, "stride": (1, 2, 2)})


class Net3d(nn.Module):
    """A MONAI ResNet trunk with z kept and a per-slice head: ``(B, C, n, H, W)`` windowed [0, 1] channels ->
    ``(B, n, 6)`` logits. Normalises inside like the 2D models (``(x - 0.456) / 0.224``)."""

    def __init__(self, depth: int = 18, in_chans: int = 3, num_classes: int = len(LABELS), widen: float = 1.0) -> None:
        super().__init__()
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        build = {10: resnet.resnet10, 18: resnet.resnet18, 34: resnet.resnet34}[int(depth)]
        self.trunk = build(spatial_dims=3, n_input_channels=in_chans, num_classes=num_classes, conv1_t_size=7,
                           conv1_t_stride=2, shortcut_type=shortcut, bias_downsample=bias_downsample, feed_forward=False,
                           widen_factor=float(widen))
        _z_stride_one(self.trunk)
        self.depth, self.in_chans, self.widen = int(depth), int(in_chans), float(widen)
        self.feature_dim = int(self.trunk.layer4[-1].conv2.out_channels)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.register_buffer("mean", torch.tensor(NORMALISATION["mean"]), persistent=False)
        self.register_buffer("std", torch.tensor(NORMALISATION["std"]), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, n, H, W)`` -> the last stage's map ``(B, F, n, h, w)``."""
        t = self.trunk
        x = (x - self.mean) / self.std
        x = t.maxpool(t.act(t.bn1(t.conv1(x))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).mean(dim=(3, 4))  # pool in plane only: (B, F, n)
        return self.head(f.transpose(1, 2))    # (B, n, 6)


@register_builder("cnn3d")
def build_net3d(spec: VolumeSpec) -> Net3d:
    """The architecture a spec describes (random weights); the 3D builder of :func:`ichdlib.checkpoints.build_model`
    (checkpoints of kind ``cnn3d`` load through :func:`ichdlib.checkpoints.load_checkpoint`)."""
    return Net3d(spec.depth, spec.in_chans, spec.num_classes, spec.widen)


def load_medicalnet(model: Net3d, path: str | Path) -> dict[str, Any]:
    """Initialise ``model``'s trunk from a local MedicalNet checkpoint (``{"state_dict": ...}`` or a plain state
    dict, ``module.`` prefixes allowed; never downloaded). MedicalNet's conv1 reads one channel: its kernel is
    spread over the window channels (divided by their number). Raises :class:`WeightsLayoutError` (one line)
    when the file is not a MedicalNet ResNet of this depth. Returns ``{"loaded", "adapted"}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsLayoutError(f"{path}: cnn3d.pretrained weights file not found (it is never downloaded)")
    try:
        state = read_state_dict(path)  # the 2D reader: wrappers ("state_dict") and "module." prefixes removed
    except WeightsError as exc:
        raise WeightsLayoutError(str(exc).splitlines()[0].split(";")[0]) from None
    own = model.trunk.state_dict()
    wanted = {k for k in own if not k.startswith("fc.")}
    missing = sorted(wanted - set(state))
    bad = sorted(k for k in wanted & set(state) if k != "conv1.weight" and state[k].shape != own[k].shape)
    c1 = state.get("conv1.weight")
    if c1 is not None and (c1.shape[0] != own["conv1.weight"].shape[0] or c1.shape[2:] != own["conv1.weight"].shape[2:]):
        bad.insert(0, "conv1.weight")
    if missing or bad:
        what = (f"{len(missing)} of its {len(wanted)} keys missing (e.g. {missing[0]})" if missing else
                f"{len(bad)} shape mismatch(es) (e.g. {bad[0]}: {tuple(state[bad[0]].shape)} vs "
                f"{tuple(own[bad[0]].shape)})")
        raise WeightsLayoutError(f"{path}: not the MedicalNet layout of resnet{model.depth}: {what}; "
                                 f"give a resnet{model.depth} MedicalNet file (cnn3d.widen 1.0) or set cnn3d.pretrained: null")
    adapted = []
    if c1.shape[1] != own["conv1.weight"].shape[1]:
        state = dict(state)
        state["conv1.weight"] = c1.mean(dim=1, keepdim=True).repeat(1, own["conv1.weight"].shape[1], 1, 1, 1)
        adapted.append("conv1.weight")
    model.trunk.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return {"loaded": len(wanted), "adapted": adapted}


def cam_target_layer3d(model: Net3d) -> nn.Module:
    """The 3D CAM layer: the last stage (``trunk.layer4``), whose map keeps z at slice resolution."""
    return model.trunk.layer4


def shape_trace(model: Net3d, slices: int, size: int, in_chans: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``[(stage, output shape)]`` of a forward pass over one ``slices``-slice study at ``size`` px: shows z
    kept at slice resolution through every stage (notebook 02b's table)."""
    t = model.trunk
    x = torch.zeros(1, in_chans or model.in_chans, slices, size, size)
    out = []
    was = model.training
    model.eval()
    with torch.no_grad():
        x = t.act(t.bn1(t.conv1(x)))
        out.append(("conv1", tuple(x.shape)))
        x = t.maxpool(x)
        out.append(("maxpool", tuple(x.shape)))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(t, name)(x)
            out.append((name, tuple(x.shape)))
        out.append(("head (pool in plane, per slice)", tuple(model.head(x.mean(dim=(3, 4)).transpose(1, 2)).shape)))
    model.train(was)
    return out
