"""Report defects found reading the demo's reports (issue 24): learning-curve axes and legends."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def _logs(folds: int = 3, epochs: int = 10) -> pd.DataFrame:
    rows = []
    for f in range(folds):
        for e in range(epochs):
            val = 1.7 if e == 0 else (0.87 if e == 1 else 0.2 - 0.005 * e)  # the demo's early spike
            rows.append({"fold": f, "epoch": e, "train_loss": 0.5 / (e + 1), "val_wll": val, "auc_mean": 0.5 + e / 30})
    return pd.DataFrame(rows)


def test_cnn_curves_show_every_validation_point():
    """Notebook 02 cut its validation axis at ~0.6, leaving epochs at 0.87-1.70 without a marker."""
    import matplotlib.pyplot as plt

    from ichdlib.cnn.train import plot_curves

    logs = _logs()
    fig = plot_curves(logs, prior_wll=0.27, title="x")
    ax = fig.axes[1]
    lo, hi = ax.get_ylim()
    assert lo <= logs["val_wll"].min() and hi >= logs["val_wll"].max()
    x = np.concatenate([ln.get_xdata() for ln in ax.lines if len(ln.get_xdata()) > 2])
    assert x.min() == 1 and x.max() == 10  # epochs 1..n, as the log lines say
    plt.close(fig)


def test_sequence_curves_have_y_labels_and_a_fold_legend():
    import matplotlib.pyplot as plt

    from ichdlib.seq.train import plot_history

    logs = _logs(epochs=4)
    fig = plot_history({"seq1": logs, "seq2": logs.assign(val_wll=logs.val_wll * 0.9)})
    assert all(ax.get_ylabel() for ax in fig.axes)
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["seq1", "seq2", "fold 0", "fold 1", "fold 2"]
    assert min(fig.axes[0].lines[0].get_xdata()) == 1
    plt.close(fig)


def test_params_copies_carry_no_absolute_path(tmp_path):
    """The params.yaml copied into reports and work says where the root is relative to itself (and reads back to
    the same root); a bundle's copy has no root at all."""
    from pathlib import Path

    from ichdlib.config import dump_params, load_params

    repo = Path(__file__).resolve().parents[1]
    P = load_params(repo / "params" / "smoke.yaml", {"root": str(tmp_path)})
    for folder in (P.reports_dir, P.work_dir):
        folder.mkdir(parents=True)
        text = dump_params(P, folder / "params.yaml")
        assert str(tmp_path) not in text and "root: .." in text
        (folder / "params.yaml").write_text(text)
        again = load_params(folder / "params.yaml")
        assert again.root.resolve() == tmp_path.resolve() and again.reports_dir.resolve() == P.reports_dir.resolve()
    assert "\nroot:" not in dump_params(P) and str(tmp_path) not in dump_params(P)


@pytest.mark.slow
def test_smoke_reports_name_no_machine_path(smoke_run):
    """The injected parameters cell names the params file relative to the notebooks, and the reports' params.yaml
    has a relative root (tests pass their temp root as an override, which the cell shows as given)."""
    import json

    rep = smoke_run.P.reports_dir
    root = str(smoke_run.P.root)
    nb = json.loads((rep / "02_cnn_training.ipynb").read_text())
    injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    src = "".join(injected["source"])
    assert 'params_path = "../params/smoke.yaml"' in src, src
    assert root not in (rep / "params.yaml").read_text()
