"""The 2D CNN: a timm backbone with six logits and its pooled per-slice feature.

Input convention (shared with :mod:`ichdlib.cnn.data` and :mod:`ichdlib.review.cam`): the model takes the recipe's
three windowed channels in [0, 1], ``(B, 3, H, W)``; with a learnable window (``learnable_window``) it takes
the HU stack (s-1, s, s+1) instead and windows it itself. Inside, the channels are normalised with the
original's ``mean 0.456, std 0.224`` before the backbone.

Weights: ``pretrained=True`` loads timm's ImageNet weights from the Hugging Face hub (fails fast and clearly
when offline); a path loads a local ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``) or
``.safetensors`` file through timm's own filters, ignoring the classifier.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ichdlib.checkpoints import load_checkpoint, register_builder
from ichdlib.labels import LABELS
from ichdlib.spec import CnnSpec
from ichdlib.windows import LearnableWindow

#: The original's input normalisation (albumentations ``Normalize(mean=0.456, std=0.224)`` on [0, 1]).
NORM_MEAN = 0.456
NORM_STD = 0.224
#: Prefixes stripped from keys of local weight files (wrappers: DDP, compile, our own checkpoints).
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.")


class WeightsError(ValueError):
    """Pretrained weights that cannot be obtained or do not fit the model; the message says what to do."""


class CnnNet(nn.Module):
    """timm backbone + (optional learnable window) + normalisation; six logits, pooled features."""

    def __init__(self, backbone: nn.Module, window: nn.Module | None = None) -> None:
        super().__init__()
        self.window = window
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(NORM_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(NORM_STD), persistent=False)

    @property
    def feature_dim(self) -> int:
        """Size of the pooled per-slice feature (1024 densenet121, 1664 densenet169, 2048 seresnext101)."""
        b = self.backbone
        return int(getattr(b, "head_hidden_size", None) or b.num_features)

    @property
    def learnable_window(self) -> bool:
        return self.window is not None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.window is not None:
            x = self.window(x)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, 6)``."""
        return self.backbone(self._prepare(x))

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> pooled per-slice features ``(B, D)`` (the classifier's input)."""
        b = self.backbone
        return b.forward_head(b.forward_features(self._prepare(x)), pre_logits=True)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and logits from one pass (equal to ``forward`` in eval mode)."""
        pooled = self.forward_pooled(x)
        return pooled, self.backbone.get_classifier()(pooled)


def _timm():
    import timm  # noqa: PLC0415  (model libraries load only to build or save a model)

    return timm


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_weights(name: str, **kwargs: Any) -> nn.Module:
    """timm ImageNet weights from the hub (or its local cache), failing fast with advice when offline."""
    timm = _timm()
    advice = (
        f"pretrained: true for {name!r} needs the Hugging Face hub (or weights already in its cache). "
        "Offline, download the weights elsewhere and set `pretrained:` to the local file instead, e.g. "
        f"pretrained: /models/{name}.safetensors (a .pth/.pt/.bin or .safetensors state dict)."
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if not offline and not _hub_reachable():
        raise WeightsError(f"no network to huggingface.co. {advice}")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # hub / cache errors come in many types
        raise WeightsError(f"could not load ImageNet weights ({type(exc).__name__}: {exc}). "
                           f"{advice}") from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local weights file as a clean state dict: ``.safetensors`` or a ``torch.save`` file loaded with
    ``weights_only=True``; wrapper dicts (``state_dict``/``model``) and prefixes (``module.``, ``backbone.``,
    ...) are removed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415  (model libraries load only to build or save a model)

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc}); expected a "
                           ".pth/.pt/.bin state dict saved with torch.save, or a .safetensors file") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _file_weights(name: str, path: str | Path, **kwargs: Any) -> nn.Module:
    """Build ``name`` with the weights of a local file through timm's loader (its key filters, classifier
    dropped), then check that every convolution / linear weight outside the classifier was loaded."""
    timm = _timm()
    sd = read_state_dict(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = timm.create_model(name, pretrained=False, **kwargs)
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd},
                                      **kwargs)
        except RuntimeError as exc:
            raise WeightsError(f"{path}: weights do not fit {name!r} ({exc})") from exc
    classifier = str(fresh.pretrained_cfg.get("classifier") or "")
    before = fresh.state_dict()
    missing = [k for k, v in model.state_dict().items()
               if v.ndim >= 2 and not k.startswith(classifier + ".") and torch.equal(v, before[k])]
    if missing:
        raise WeightsError(
            f"{path}: {len(missing)} weight tensors of {name!r} were not found in the file "
            f"(first: {', '.join(missing[:3])}); is it a checkpoint of another architecture?")
    return model


def build_cnn(
    name: str,
    pretrained: bool | str | Path = False,
    num_classes: int = len(LABELS),
    in_chans: int = 3,
    learnable_window: str | bool | None = None,
    *,
    recipe: str = "seed_3window",
    single_window: tuple[float, float] = (40.0, 80.0),
) -> CnnNet:
    """A timm backbone (any timm name: ``densenet121``, ``densenet169``, ``seresnext101_32x4d``, ...) with
    ``num_classes`` logits and :meth:`CnnNet.forward_pooled`.

    ``pretrained``: ``False`` (random init), ``True`` (timm hub) or a local weights file.
    ``learnable_window``: a recipe name (or ``True`` for ``recipe``) puts a
    :class:`ichdlib.windows.LearnableWindow` first; the model then takes HU stacks instead of windows.
    """
    timm = _timm()
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if pretrained is True:
        backbone = _hub_weights(name, **kwargs)
    elif pretrained:
        backbone = _file_weights(name, pretrained, **kwargs)
    else:
        backbone = timm.create_model(name, pretrained=False, **kwargs)
    window = None
    if learnable_window:

        rec = recipe if learnable_window is True else str(learnable_window)
        window = LearnableWindow(rec, tuple(single_window))
    return CnnNet(backbone, window)


@register_builder("cnn")
def build_from_spec(spec: CnnSpec, pretrained: bool | str | Path = False) -> CnnNet:
    """An untrained model of the architecture a :class:`CnnSpec` names (load a state dict into it)."""
    return build_cnn(spec.name, pretrained=pretrained, num_classes=spec.num_classes, in_chans=spec.in_chans,
                     learnable_window=spec.recipe if spec.learnable_window else None,
                     recipe=spec.recipe, single_window=spec.single_window)


def build_from_meta(meta: dict[str, Any]) -> CnnNet:
    """An untrained model with the architecture a checkpoint's ``meta`` describes (its :class:`CnnSpec`)."""
    return build_from_spec(CnnSpec.from_meta(meta))


def load_cnn(path: str | Path, device: str | torch.device = "cpu") -> tuple[CnnNet, dict[str, Any]]:
    """A trained fold model ``work/cnn/<key>/fold<k>.pt`` -> ``(model in eval mode on device, meta)``; the
    model carries ``.spec`` (:func:`ichdlib.checkpoints.load_checkpoint`)."""
    model = load_checkpoint(path, device)
    if not isinstance(model.spec, CnnSpec):
        raise ValueError(f"{path}: a {model.spec.kind} checkpoint, not a 2D CNN")
    return model, model.meta
