"""HU windows and the channel recipes that turn a slice and its z-neighbours into a 3-channel image.

numpy and torch versions give the same numbers (tested); the torch versions run on the GPU during training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ichdlib.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Window presets as (center, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "bone": (600.0, 2800.0),
    "soft": (40.0, 380.0),
}


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU to [0, 1]: ``center - width/2`` -> 0, ``center + width/2`` -> 1, clipped outside."""
    lo = center - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0)


#: The window recipe registry (``windows.recipe``): each recipe as data, per output channel the window (a
#: preset name of :data:`WINDOWS`, or ``single`` for the recipe's one configurable window) and the slice it
#: reads (-1 = s-1, 0 = s, +1 = s+1). numpy, torch and the learnable window all stack channels from it, and
#: the params schema accepts its names: ``RECIPES.register(name, channels)`` adds a recipe.
RECIPES: Registry[tuple[tuple[str, int], ...]] = Registry("channel recipe")
RECIPES.register("seed_3window", (("brain", -1), ("subdural", 0), ("bone", +1)))
RECIPES.register("adjacent_header", (("single", -1), ("single", 0), ("single", +1)))
RECIPES.register("three_window", (("brain", 0), ("subdural", 0), ("bone", 0)))
#: The older name of :data:`RECIPES`.
RECIPE_TABLE = RECIPES


def recipe_plan(recipe: str, single_window: tuple[float, float] = WINDOWS["brain"]
                ) -> list[tuple[float, float, int]]:
    """``[(center, width, slice offset), ...]`` for each channel of ``recipe``."""
    out = []
    for name, offset in RECIPES[recipe]:
        c, w = tuple(single_window) if name == "single" else WINDOWS[name]
        out.append((float(c), float(w), offset))
    return out


def recipe_windows(recipe: str, single_window: tuple[float, float] = WINDOWS["brain"]) -> list[tuple[float, float]]:
    """The (center, width) applied to each of the three channels of ``recipe``."""
    return [(c, w) for c, w, _ in recipe_plan(recipe, single_window)]


def recipe_offsets(recipe: str) -> list[int]:
    """The slice each channel of ``recipe`` reads (-1, 0, +1)."""
    return [o for *_, o in recipe_plan(recipe)]


def _stack(prev, cur, nxt, recipe: str, single_window, window_fn, stack_fn):
    src = {-1: prev, 0: cur, 1: nxt}
    return stack_fn([window_fn(src[o], c, w) for c, w, o in recipe_plan(recipe, single_window)])


def channels(
    prev: np.ndarray,
    cur: np.ndarray,
    nxt: np.ndarray,
    recipe: str = "seed_3window",
    single_window: tuple[float, float] = WINDOWS["brain"],
) -> np.ndarray:
    """Stack three windowed images into ``(..., 3, H, W)`` float32, as :data:`RECIPE_TABLE` says.

    - ``seed_3window``: brain(40/80) on s-1, subdural(80/200) on s, bone(600/2800) on s+1 (the write-up);
    - ``adjacent_header``: s-1, s, s+1 in one window (the released code's variant);
    - ``three_window``: brain, subdural and bone on the same slice s.
    At a study's edge pass the slice itself as the missing neighbour (the catalog's ``prev_row``/``next_row``
    already point to itself there).
    """
    return _stack(prev, cur, nxt, recipe, single_window, window, lambda xs: np.stack(xs, axis=-3))


def window_torch(hu: torch.Tensor, center: float, width: float) -> torch.Tensor:
    """Torch version of :func:`window` (any device, float output)."""
    hu = hu.float()
    return ((hu - (center - width / 2.0)) / width).clamp_(0.0, 1.0)


def channels_torch(
    prev: torch.Tensor,
    cur: torch.Tensor,
    nxt: torch.Tensor,
    recipe: str = "seed_3window",
    single_window: tuple[float, float] = WINDOWS["brain"],
) -> torch.Tensor:
    """Torch version of :func:`channels`: ``(..., H, W)`` tensors -> ``(..., 3, H, W)`` float."""
    import torch  # noqa: PLC0415  (torch stays out of light modules)

    return _stack(prev, cur, nxt, recipe, single_window, window_torch, lambda xs: torch.stack(xs, dim=-3))


def stack_channels_torch(stack: torch.Tensor, recipe: str = "seed_3window",
                         single_window: tuple[float, float] = WINDOWS["brain"]) -> torch.Tensor:
    """``(B, 3, H, W)`` HU stack ordered (s-1, s, s+1) -> ``(B, 3, H, W)`` windowed channels."""
    return channels_torch(stack[:, 0], stack[:, 1], stack[:, 2], recipe, single_window)


def _make_learnable_window():
    import torch  # noqa: PLC0415  (torch stays out of light modules)
    from torch import nn  # noqa: PLC0415

    class LearnableWindow(nn.Module):
        """A learnable input layer: per-channel ``sigmoid(a * hu + b)``, initialised at the recipe's windows.

        Takes the ``(B, 3, H, W)`` HU stack (s-1, s, s+1) and returns three channels in (0, 1). With the
        slope ``a = k / width`` and bias ``b = -k * center / width`` (k = 4.0), the sigmoid at init maps the
        window's low/high edge to ~0.12/0.88, i.e. a smooth version of the fixed window; training may move
        both. For ``three_window`` every channel reads slice s, as in the fixed recipe.
        """

        def __init__(self, recipe: str = "seed_3window",
                     single_window: tuple[float, float] = WINDOWS["brain"], k: float = 4.0) -> None:
            super().__init__()
            wins = recipe_windows(recipe, single_window)
            self.recipe = recipe
            #: stack channel (0 = s-1, 1 = s, 2 = s+1) each output channel reads, from RECIPE_TABLE
            self.register_buffer("source", torch.tensor([o + 1 for o in recipe_offsets(recipe)]), persistent=False)
            self.conv = nn.Conv2d(3, 3, kernel_size=1, groups=3, bias=True)
            with torch.no_grad():
                for i, (c, w) in enumerate(wins):
                    self.conv.weight[i, 0, 0, 0] = k / w
                    self.conv.bias[i] = -k * c / w

        def forward(self, stack: torch.Tensor) -> torch.Tensor:
            x = stack.float().index_select(1, self.source)
            return torch.sigmoid(self.conv(x))

    return LearnableWindow


def __getattr__(name: str):
    # LearnableWindow is built lazily so that importing this module does not import torch.
    if name == "LearnableWindow":
        cls = _make_learnable_window()
        globals()["LearnableWindow"] = cls
        return cls
    raise AttributeError(name)
