"""Every notebook executes under papermill with params/smoke.yaml, in order, as `ichd run` does."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ichdlib.labels import LABELS
from ichdlib.run import list_notebooks, run_pipeline


@pytest.mark.slow
def test_all_notebooks_run_headless_with_smoke_params(repo, tmp_path):
    """A fresh root: notebook 01 generates the phantom and ingests it, 02-06 train and review."""
    from ichdlib.config import load_params

    over = {"root": str(tmp_path)}
    P = load_params(repo / "params" / "smoke.yaml", over)
    results = run_pipeline(repo / "params" / "smoke.yaml", overrides=over, html=False)
    expected = [p.name for p in list_notebooks()]
    assert [r.notebook for r in results] == expected
    assert all(r.status == "ran" for r in results), results
    rep = P.reports_dir
    for name in expected:
        assert (rep / name).is_file()
    figs = list((rep / "figures").glob("*.png"))
    assert any(f.name.startswith("01_") for f in figs)
    if (rep / "metrics.json").is_file():
        m = json.loads((rep / "metrics.json").read_text())
        assert "stages" in m and m["stages"]
    if (rep / "submission.csv").is_file():
        sub = pd.read_csv(rep / "submission.csv")
        assert list(sub.columns) == ["ID", "Label"] and sub.Label.between(0, 1).all()
        assert len(sub) % len(LABELS) == 0
    summary = (rep / "summary.md").read_text()
    assert "Executed notebooks" in summary
    # a second run skips every stage: nothing recomputed
    again = run_pipeline(repo / "params" / "smoke.yaml", overrides=over, html=False)
    assert all(r.status == "skipped" for r in again)
