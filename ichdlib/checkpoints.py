"""The one checkpoint loader: a fold checkpoint (2D or sequence) -> a model that carries its spec.

As timm attaches ``pretrained_cfg`` to the models it creates, every model built here carries
``model.spec`` (:class:`ichdlib.spec.CnnSpec` or :class:`ichdlib.spec.SeqSpec`) and ``model.meta`` (the
checkpoint's meta dict): code that gets a model reads how to feed it from the model, never from the run's
params.

The model families register their builder (``spec -> untrained nn.Module``) in :data:`BUILDERS` with
:func:`register_builder`; the families' modules are named in :data:`BUILDER_MODULES` and imported when a
checkpoint of theirs is first loaded (as a plugin entry point: the core never imports a stage at load time
of its own module).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ichdlib.spec import CnnSpec, SeqSpec, spec_from_meta

__all__ = ["BUILDERS", "register_builder", "read_checkpoint", "build_model", "load_checkpoint", "attach_spec"]

#: spec kind -> builder of an untrained model from the spec.
BUILDERS: dict[str, Callable[[Any], torch.nn.Module]] = {}
#: spec kind -> the module that registers its builder when imported.
BUILDER_MODULES = {"cnn": "ichdlib.cnn.models", "seq": "ichdlib.seq.models", "cnn3d": "ichdlib.cnn3d.models"}


def register_builder(kind: str) -> Callable[[Callable[[Any], torch.nn.Module]], Callable[[Any], torch.nn.Module]]:
    """Decorator: ``@register_builder("cnn")`` on ``def build(spec) -> nn.Module``."""
    def deco(fn: Callable[[Any], torch.nn.Module]) -> Callable[[Any], torch.nn.Module]:
        BUILDERS[kind] = fn
        return fn

    return deco


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``{"state_dict", "meta"}`` checkpoint (2D or sequence fold) -> ``(state_dict, meta)``, loaded with
    ``weights_only=True``; a missing or foreign file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise ValueError(f"{path}: not a finished fold checkpoint (expected keys 'state_dict' and 'meta')")
    return ckpt["state_dict"], dict(ckpt["meta"])


def attach_spec(model: torch.nn.Module, spec: CnnSpec | SeqSpec, meta: dict[str, Any] | None = None
                ) -> torch.nn.Module:
    """Set ``model.spec`` (and ``model.meta``) and return the model."""
    model.spec = spec
    model.meta = dict(meta or {})
    return model


def build_model(spec_or_meta: CnnSpec | SeqSpec | dict[str, Any],
                state: dict[str, torch.Tensor] | None = None, device: str | torch.device = "cpu"
                ) -> torch.nn.Module:
    """The model a spec (or a checkpoint's meta) describes, with ``state`` loaded when given, in eval mode on
    ``device``, carrying ``.spec`` and ``.meta``."""
    meta = spec_or_meta if isinstance(spec_or_meta, dict) else {}
    spec = spec_from_meta(spec_or_meta) if isinstance(spec_or_meta, dict) else spec_or_meta
    if spec.kind not in BUILDERS:
        importlib.import_module(BUILDER_MODULES[spec.kind])
    model = BUILDERS[spec.kind](spec)
    if state is not None:
        model.load_state_dict(state)
    return attach_spec(model.to(device).eval(), spec, meta)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A trained fold model from ``fold<k>.pt`` (2D or sequence), in eval mode on ``device``, with ``.spec``
    and ``.meta``."""
    state, meta = read_checkpoint(path)
    return build_model(meta, state, device)
