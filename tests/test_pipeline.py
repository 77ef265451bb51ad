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


@pytest.mark.slow
def test_stage_dag_reruns_what_changed_and_keeps_the_rest(repo, tmp_path):
    """The stage contract end to end: a copied checkout keeps its stages; a retrained CNN makes 03-06 stale;
    corrected labels rerun ingest and everything after it, and the final metrics change."""
    import shutil
    import time

    import torch

    from ichdlib.config import load_params
    from ichdlib.run import plan

    smoke = repo / "params" / "smoke.yaml"
    first = tmp_path / "a"
    over = {"root": str(first)}
    assert all(r.status == "ran" for r in run_pipeline(smoke, overrides=over, html=False))
    P = load_params(smoke, over)
    metrics_before = json.loads((P.reports_dir / "metrics.json").read_text())

    # A plain copy (new mtimes) of the whole root keeps every finished stage.
    second = tmp_path / "b"
    shutil.copytree(first, second, copy_function=shutil.copy)
    over = {"root": str(second)}
    P = load_params(smoke, over)
    t0 = time.perf_counter()
    again = run_pipeline(smoke, overrides=over, html=False)
    print(f"unchanged rerun of a copied root: {time.perf_counter() - t0:.2f} s")
    assert [r.status for r in again] == ["skipped"] * len(again)

    # New CNN weights (as after a code change and `--only 02 --force`, or `ichd train`): 03-06 are stale.
    ckpt = next((P.work_dir / "cnn").glob("*/fold0.pt"))
    blob = torch.load(ckpt, weights_only=True)
    first_key = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][first_key] = blob["state_dict"][first_key] + 0.01
    torch.save(blob, ckpt)
    decisions = {d.stage.number: d for d in plan(smoke, overrides=over)}
    assert not decisions["01"].run and not decisions["02"].run
    assert decisions["03"].run and decisions["03"].force and "upstream 02 changed" in decisions["03"].explain()
    for later in ("04", "05", "06"):
        assert decisions[later].run, later

    # Corrected labels: ingest reruns, then everything after it, and the metrics change.
    csv = P.data_root / "stage_2_train.csv"
    rows = csv.read_text().splitlines()
    flipped = [rows[0]] + [r[:-1] + ("0" if r.endswith("1") else "1") if i % 7 == 0 else r
                           for i, r in enumerate(rows[1:], 1)]
    csv.write_text("\n".join(flipped) + "\n")
    decisions = {d.stage.number: d for d in plan(smoke, overrides=over)}
    assert decisions["01"].run and "the data changed" in decisions["01"].explain()
    res = run_pipeline(smoke, overrides=over, html=False)
    assert [r.status for r in res] == ["ran"] * len(res)
    metrics_after = json.loads((P.reports_dir / "metrics.json").read_text())
    assert metrics_after["stages"] != metrics_before["stages"]
    assert [r.status for r in run_pipeline(smoke, overrides=over, html=False)] == ["skipped"] * len(res)
