"""`ichd compare`: two runs' reports side by side (fabricated metrics.json / timings.json / params.yaml)."""

from __future__ import annotations

import json

import pytest
import yaml

from ichdlib.cli import main
from ichdlib.labels import LABELS
from ichdlib.review.compare import compare_runs


def _stage(wll: float, auc_any: float | None, ece: float, shift: float = 0.0) -> dict:
    split = {"wll": wll, "per_class_ll": {c: wll + shift * i for i, c in enumerate(LABELS)},
             "auc": {c: (auc_any if c == "any" else None) for c in LABELS}, "ece": ece}
    return {"oof": split, "test": None}


def _run(folder, name: str, wll: float, epochs: int, seconds: float, auc_any: float | None = 0.8):
    rep = folder / name
    rep.mkdir(parents=True)
    metrics = {"stages": {"cnn:r18_96": _stage(wll, auc_any, 0.01), "seq2": _stage(wll - 0.02, 0.85, 0.02, 0.001)},
               "prior": {"oof": {"wll": 0.25}, "test": None}}
    (rep / "metrics.json").write_text(json.dumps(metrics))
    (rep / "timings.json").write_text(json.dumps({"02_cnn_training.ipynb": {"seconds": seconds},
                                                  "04_sequence_models.ipynb": {"seconds": 10.0}}))
    params = {"run": name, "root": str(folder), "seed": 1, "cnn": {"backbones": [{"name": "r18", "epochs": epochs}]},
              "paths": {"work": f"work/{name}"}}
    (rep / "params.yaml").write_text(yaml.safe_dump(params))
    return rep


def test_two_runs_side_by_side(tmp_path):
    a = _run(tmp_path, "base", 0.20, 10, 100.0, auc_any=None)
    b = _run(tmp_path, "longer", 0.15, 20, 190.0)
    cmp = compare_runs(a, b)
    st = cmp.stages
    assert list(st.columns) == ["base", "longer", "Δ"]
    assert st.loc["cnn:r18_96 | OOF wLL", "Δ"] == pytest.approx(-0.05)
    assert st.loc["prior | OOF wLL", "base"] == 0.25
    assert "cnn:r18_96 | test wLL" not in st.index  # no answer key: no row, not a NaN
    assert cmp.per_class.loc["seq2", "any"] == pytest.approx(-0.05)
    assert cmp.times.loc["total", "longer"] == 200.0
    assert list(cmp.params.index) == ["cnn.backbones"]  # run, root and paths are where a run lives, not what it did
    md = cmp.markdown()
    assert "| cnn:r18_96 | OOF wLL | 0.2000 | 0.1500 | -0.0500 |" in md
    assert "| cnn:r18_96 | OOF AUC any |  | 0.8000 |  |" in md  # a missing AUC is a blank, never "nan"
    assert "nan" not in md.lower()
    fig = cmp.figure()
    assert fig.axes[0].lines  # one point (with its interval whiskers) per run and stage


def test_cli_prints_the_table_and_writes_the_figure(tmp_path, capsys):
    a = _run(tmp_path, "base", 0.20, 10, 100.0)
    b = _run(tmp_path, "other", 0.18, 12, 120.0)
    out = tmp_path / "cmp.png"
    assert main(["compare", str(a), str(b), "--out", str(out), "--markdown", str(tmp_path / "cmp.md")]) == 0
    text = capsys.readouterr().out
    assert "## Stages" in text and "| seq2 | OOF wLL | 0.1800 | 0.1600 | -0.0200 |" in text
    assert out.stat().st_size > 1000 and (tmp_path / "cmp.md").read_text().startswith("# Runs compared")


def test_clear_errors(tmp_path, capsys):
    a = _run(tmp_path, "base", 0.20, 10, 100.0)
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing: does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="at least two runs"):
        compare_runs(a)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        compare_runs(a, tmp_path / "empty")


def _with_predictions(rep, seed: int, noise: float, n_patients: int = 40, better: float = 0.0) -> None:
    """A reports folder's predictions.parquet and intervals as notebook 05 writes them: the same images and truth
    for every seed, probabilities that depend on the seed (``better`` pulls one stage towards the truth)."""
    import numpy as np
    import pandas as pd

    from ichdlib.ensemble.intervals import groups_for, score_with_intervals, write_predictions

    truth_rng = np.random.default_rng(0)
    n = n_patients * 10
    ids = pd.Index([f"ID_{i:04x}" for i in range(n)], name="sop_uid")
    cat = pd.DataFrame({"sop_uid": ids, "patient_id": [f"P{i // 10}" for i in range(n)],
                        "study_uid": [f"S{i // 10}" for i in range(n)]})
    y = pd.DataFrame((truth_rng.random((n, 6)) < 0.3).astype(float), index=ids, columns=list(LABELS))
    y["any"] = y.iloc[:, 1:].max(axis=1)
    rng = np.random.default_rng(seed)
    groups = groups_for(ids, cat)
    metrics = json.loads((rep / "metrics.json").read_text())
    preds = {}
    for st, pull in (("cnn:r18_96", 0.0), ("seq2", better)):
        p = np.clip(0.3 + (0.35 + pull) * (y.to_numpy() - 0.3) + rng.normal(0, noise, y.shape), 0.02, 0.98)
        frame = pd.DataFrame(p, index=ids, columns=list(LABELS))
        preds[st] = {"oof": frame}
        metrics["stages"][st]["oof"] = score_with_intervals(y, frame, groups, n_boot=200)
    write_predictions(rep / "predictions.parquet", {"oof": y, "test": None}, preds, groups)
    (rep / "metrics.json").write_text(json.dumps(metrics))


def test_the_same_run_twice(tmp_path, capsys):
    """`ichd compare reports/demo reports/demo` used to fail ("cannot set a row with mismatched columns")."""
    a = _run(tmp_path, "demo", 0.20, 10, 100.0)
    _with_predictions(a, seed=1, noise=0.05)
    cmp = compare_runs(a, a)
    assert cmp.names == ["demo", "demo (2)"] and cmp.times.loc["total", "demo (2)"] == 110.0
    d = cmp.differences
    assert len(d) and (d["Δ"] == 0).all() and not d["beyond noise"].any()
    md = cmp.markdown()
    assert "same run" in md and "Expected run-to-run drift" in md and "| **yes** |" not in md
    assert main(["compare", str(a), str(a), "--out", str(tmp_path / "same.png")]) == 0


def test_paired_differences_say_what_is_beyond_noise(tmp_path):
    """Two seeds: each difference with its paired 95% interval; a real improvement (seq2 pulled towards the
    truth) is beyond noise, seed noise on the CNN is not; the figure's axis spans the data, not 0."""
    from ichdlib import stats

    a = _run(tmp_path, "seed0", 0.20, 10, 100.0)
    b = _run(tmp_path, "seed1", 0.20, 10, 100.0)
    _with_predictions(a, seed=0, noise=0.15)
    _with_predictions(b, seed=1, noise=0.15, better=0.25)
    cmp = compare_runs(a, b, n_boot=300)
    d = cmp.differences.set_index(["stage", "metric"])
    seq, cnn = d.loc[("seq2", "OOF wLL")], d.loc[("cnn:r18_96", "OOF wLL")]
    assert seq["Δ"] < 0 and seq["hi"] < 0 and seq["beyond noise"]
    assert cnn["lo"] < 0 < cnn["hi"] and not cnn["beyond noise"]
    assert seq["groups"] == 40 and seq["images"] == 400
    # the interval is the shared paired bootstrap over patients, the AUC difference DeLong's
    from ichdlib.ensemble.intervals import read_predictions, stage_arrays

    fa, fb = read_predictions(a / "predictions.parquet")["oof"], read_predictions(b / "predictions.parquet")["oof"]
    y = fa[[f"y|{c}" for c in LABELS]].to_numpy(float)
    want = stats.paired_wll(y, stage_arrays(fb, "seq2"), stage_arrays(fa, "seq2"), groups=fa["group"].to_numpy(),
                            n_boot=300, seed=0)
    assert (seq["lo"], seq["hi"]) == pytest.approx((want["lo"], want["hi"]))
    auc = d.loc[("seq2", "OOF AUC any")]
    assert auc["method"].startswith("DeLong") and auc["Δ"] > 0
    md = cmp.markdown()
    assert "| seq2 | OOF wLL |" in md and "| **yes** |" in md and "[" in md  # values with their intervals
    fig = cmp.figure()
    lo, hi = fig.axes[0].get_ylim()
    assert lo > 0.05  # the axis does not start at 0: a 0.004 difference stays visible
    assert fig.axes[-1].get_title().startswith("paired differences")
