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
    heights = [round(p.get_height(), 4) for p in fig.axes[0].patches]
    oof = st[st.index.str.endswith("| OOF wLL")]
    assert heights == [round(float(v), 4) for n in cmp.names for v in oof[n]]  # one bar per run and stage


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
