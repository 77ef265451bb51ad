"""Small helpers every notebook uses: setup, figures, interactive/headless detection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ichdlib.config import Params, ParamsError, dump_params, load_params
from ichdlib.runtime import seed_everything
from ichdlib.stages import forced as _forced


def interactive() -> bool:
    """True in a live Jupyter front end; False under papermill, nbclient or plain Python.

    ``ichd run`` sets ``ICHD_HEADLESS=1``; papermill is detected as well.
    """
    if os.environ.get("ICHD_HEADLESS") == "1" or os.environ.get("PAPERMILL_EXECUTION") == "1":
        return False
    try:
        from IPython import get_ipython  # noqa: PLC0415  (plotting and notebook libraries load only to draw)
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    if ip is None or "IPKernelApp" not in ip.config:
        return False
    import matplotlib  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

    return "inline" in matplotlib.get_backend().lower() or "widget" in matplotlib.get_backend().lower()


def setup(params_path: str | Path | None, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate params, seed everything, prepare output folders and plotting.

    ``overrides`` is a nested dict merged over the file, e.g. ``{"cnn": {"backbones": [...]}}``. Whether to
    recompute is not an override but the notebook's own ``force`` parameter (papermill ``-p force true``),
    passed to its stage's ``run(P, force)``.
    """
    overrides = dict(overrides or {})
    if "force" in overrides:
        raise ParamsError("overrides: 'force' is a notebook parameter of its own (force = True in the parameters "
                          "cell, or papermill -p force true), not a params override")
    P = load_params(params_path, overrides)
    seed_everything(P.seed)
    L = P.layout
    L.work.mkdir(parents=True, exist_ok=True)
    L.figures.mkdir(parents=True, exist_ok=True)
    # The validated params travel with the run, so `ichd export --run work/<run>` can find them.
    # ... and a copy next to the reports, so `ichd compare` can list the params that differ between runs.
    text = dump_params(P)
    for path in L.params_copies():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    use_inline_backend()
    import matplotlib.pyplot as plt  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

    plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 110, "figure.max_open_warning": 0})
    return P


def forced(force: bool | str | list[str] | None, stage: str) -> bool:
    """Whether the notebook's ``force`` parameter (``True``, ``"all"``, a stage number or a list of them) asks
    ``stage`` to recompute (:func:`ichdlib.stages.forced`; a stage's ``run(P, force)`` applies it itself)."""
    return _forced(force, stage)


def in_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill, nbclient), whether or not a front end watches."""
    try:
        from IPython import get_ipython  # noqa: PLC0415  (plotting and notebook libraries load only to draw)
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    return ip is not None and "IPKernelApp" in ip.config


def use_inline_backend() -> str:
    """Figures inline in a kernel (also under papermill, so executed notebooks carry them); Agg elsewhere.

    A kernel's inline (or ipympl ``widget``) backend is kept; a forced non-interactive backend such as
    ``MPLBACKEND=Agg`` inherited from the shell is replaced by ``inline``. Returns the backend in use.
    """
    import matplotlib  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

    backend = matplotlib.get_backend().lower()
    if in_kernel():
        if not any(k in backend for k in ("inline", "widget", "ipympl")):
            from IPython import get_ipython  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

            get_ipython().run_line_magic("matplotlib", "inline")
    elif backend not in {"agg", "pdf", "svg", "cairo", "ps"}:
        matplotlib.use("Agg")
    return matplotlib.get_backend()


class SavedFigure(type(Path())):  # type: ignore[misc]
    """The path of a saved figure; a notebook cell ending in ``save_figure(...)`` shows no path repr."""

    def _ipython_display_(self) -> None:
        return None


def show_figure(fig: Any) -> None:
    """Show ``fig`` once in the cell's output (a kernel only) and close it, so it is not drawn again."""
    if not in_kernel():
        return
    from IPython.display import display  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

    display(fig)
    import matplotlib.pyplot as plt  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

    plt.close(fig)


def save_figure(fig: Any, P: Params, name: str, show: bool = True) -> Path:
    """Save ``fig`` as ``reports/<run>/figures/<name>.png``, show it inline once (in a kernel) and close it.

    Returns the path (whose notebook repr is empty, so it does not clutter the report).
    """
    out = P.layout.figure(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    if show:
        show_figure(fig)
    return SavedFigure(out)
