"""One registry per vocabulary: window recipes, CAM methods, sequence models (and the stages, in
:mod:`ichdlib.stages`).

A registry maps a name to an entry; the params schema validates names against the registry's keys at load
time, the CLIs offer them as choices, and the code that uses an entry looks it up here, so a name is spelled
in one place. Entries of the built-in CAM methods and sequence models are references ``"module:attr"``
resolved on first use: the core (and loading params) never imports torch or a stage's code.

Adding to a vocabulary is one call, anywhere before the params are loaded::

    from ichdlib.registry import CAM_METHODS, SEQ_MODELS
    from ichdlib.windows import RECIPES

    RECIPES.register("brain_only", (("brain", -1), ("brain", 0), ("brain", +1)))
    CAM_METHODS.register("eigencam", CamMethod("pytorch_grad_cam:EigenCAM", "Eigen-CAM"))
    SEQ_MODELS.register("my_gru", my_builder)  # (in_dim, n_cnn, x_channels, **arch) -> nn.Module
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "CamMethod", "CAM_METHODS", "SEQ_MODELS", "resolve"]

T = TypeVar("T")


def resolve(ref: Any) -> Any:
    """``"package.module:attr"`` -> the object (imported now); anything else is returned as is."""
    if isinstance(ref, str) and ":" in ref:
        module, attr = ref.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    return ref


class Registry(Generic[T]):
    """Names -> entries, in registration order (the order is part of the contract: e.g. seeds derive
    from a sequence model's position)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, replace: bool = False) -> Any:
        """``reg.register(name, entry)``, or ``@reg.register(name)`` on a function or class. A name taken
        already raises unless ``replace``."""
        if entry is None:
            def deco(obj: T) -> T:
                self.register(name, obj, replace=replace)
                return obj

            return deco
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.what}: a name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.what} {name!r} is registered already (pass replace=True to change it)")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry, replace=True)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def check(self, name: str) -> str:
        """``name`` when registered, else a ``ValueError`` listing the choices."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} {name!r}; choose one of {', '.join(self._entries)}")
        return name

    def __getitem__(self, name: str) -> T:
        return self._entries[self.check(name)]

    def get(self, name: str, default: Any = None) -> Any:
        """The entry (as registered), or ``default``."""
        return self._entries.get(name, default)

    def load(self, name: str) -> Any:
        """The entry with a ``"module:attr"`` reference resolved (imported now)."""
        return resolve(self[name])

    def index(self, name: str) -> int:
        return self.names().index(self.check(name))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


@dataclass(frozen=True)
class CamMethod:
    """A CAM method: its pytorch-grad-cam class (or a ``"module:attr"`` reference) and the name reports
    and DICOM outputs show."""

    cam_class: Any
    label: str

    def cls(self) -> Any:
        return resolve(self.cam_class)


#: CAM methods (``cam.method``): pytorch-grad-cam classes.
CAM_METHODS: Registry[CamMethod] = Registry("CAM method")
CAM_METHODS.register("gradcam", CamMethod("pytorch_grad_cam:GradCAM", "Grad-CAM"))
CAM_METHODS.register("gradcam++", CamMethod("pytorch_grad_cam:GradCAMPlusPlus", "Grad-CAM++"))
CAM_METHODS.register("hirescam", CamMethod("pytorch_grad_cam:HiResCAM", "HiResCAM"))

#: Sequence models (``seq.models``): builders ``(in_dim, n_cnn, x_channels, **arch) -> nn.Module``.
SEQ_MODELS: Registry[Callable[..., Any] | str] = Registry("sequence model")
SEQ_MODELS.register("seq1", "ichdlib.seq.models:build_seq1")
SEQ_MODELS.register("seq2", "ichdlib.seq.models:build_seq2")
