"""Small helpers every notebook uses: setup, figures, interactive/headless detection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ichdlib.config import Params, dump_params, load_params
from ichdlib.runtime import seed_everything


def interactive() -> bool:
    """True in a live Jupyter front end; False under papermill, nbclient or plain Python.

    ``ichd run`` sets ``ICHD_HEADLESS=1``; papermill is detected as well.
    """
    if os.environ.get("ICHD_HEADLESS") == "1" or os.environ.get("PAPERMILL_EXECUTION") == "1":
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    if ip is None or "IPKernelApp" not in ip.config:
        return False
    import matplotlib

    return "inline" in matplotlib.get_backend().lower() or "widget" in matplotlib.get_backend().lower()


def setup(params_path: str | Path | None, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate params, seed everything, prepare output folders and plotting.

    ``overrides`` is a nested dict merged over the file, e.g. ``{"cnn": {"backbones": [...]}}``. A top-level
    ``force`` key is accepted and exposed as ``params_force(P)``; it is not part of the schema.
    """
    overrides = dict(overrides or {})
    force = overrides.pop("force", False)
    P = load_params(params_path, overrides)
    P._force = force
    seed_everything(P.seed)
    P.work_dir.mkdir(parents=True, exist_ok=True)
    (P.reports_dir / "figures").mkdir(parents=True, exist_ok=True)
    # The validated params travel with the run, so `ichd export --run work/<run>` can find them.
    tmp = P.work_dir / "params.yaml.tmp"
    tmp.write_text(dump_params(P))
    tmp.replace(P.work_dir / "params.yaml")
    import matplotlib

    if not interactive() and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 110, "figure.max_open_warning": 0})
    return P


def forced(P: Params, stage: str) -> bool:
    """Whether the notebook was asked to recompute ``stage`` (``force: true`` or ``force: ["02", ...]``)."""
    f = P._force
    if isinstance(f, bool):
        return f
    if isinstance(f, str):
        return f in {stage, "all"}
    return stage in set(map(str, f))


def save_figure(fig: Any, P: Params, name: str) -> Path:
    """Save a matplotlib figure as ``reports/<run>/figures/<name>.png`` and return the path."""
    out = P.reports_dir / "figures" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out
