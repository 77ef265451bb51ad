"""The headless runner: order, selection, skipping, failure messages, summary."""

from __future__ import annotations

import json

import nbformat
import pytest

from ichdlib.cli import main
from ichdlib.run import NotebookFailed, list_notebooks, run_pipeline, select, write_summary


def _nb(path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('params_path = ""\noverrides = {}\nforce = False')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def toy(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    (tmp_path / "params").mkdir()
    params = tmp_path / "params" / "p.yaml"
    params.write_text("run: toy\n")
    marker = tmp_path / "ran.txt"
    _nb(nbs / "01_first.ipynb",
        "from ichdlib import nb\n"
        "P = nb.setup(params_path, overrides)\n"
        f"open({str(marker)!r}, 'a').write(P.run + ' ' + str(nb.forced(force, '01')) + '\\n')")
    _nb(nbs / "02_second.ipynb", "x = 1\ny = x + 1")
    return tmp_path, nbs, params, marker


def test_selection_by_only_and_from(toy):
    _, nbs, _, _ = toy
    found = list_notebooks(nbs)
    assert [p.name[:2] for p in select(found, start="02")] == ["02"]
    assert [p.name[:2] for p in select(found, only=["01"])] == ["01"]
    with pytest.raises(ValueError, match="unknown stage '07'"):
        select(found, only=["07"])


def test_runs_in_order_skips_when_done_and_forces(toy):
    root, nbs, params, marker = toy
    res = run_pipeline(params, notebooks=nbs, html=False)
    assert [r.status for r in res] == ["ran", "ran"]
    assert marker.read_text() == "toy False\n"
    assert (root / "reports" / "toy" / "01_first.ipynb").is_file()
    res = run_pipeline(params, notebooks=nbs, html=False)
    assert [r.status for r in res] == ["skipped", "skipped"]
    res = run_pipeline(params, notebooks=nbs, html=False, only=["01"], force=True)
    assert [r.status for r in res] == ["ran"]
    assert marker.read_text().splitlines()[-1] == "toy True"
    # changed params are not "the same run": the stage reruns
    res = run_pipeline(params, notebooks=nbs, html=False, only=["02"], overrides={"seed": 1})
    assert [r.status for r in res] == ["ran"]


def test_failure_names_the_notebook_and_cell(toy):
    _, nbs, params, _ = toy
    _nb(nbs / "02_second.ipynb", "raise ValueError('bad slice ID_123')")
    with pytest.raises(NotebookFailed) as e:
        run_pipeline(params, notebooks=nbs, html=False, force=True)
    msg = str(e.value)
    assert "02_second.ipynb" in msg and "ValueError: bad slice ID_123" in msg and "cell" in msg


def test_cli_reports_bad_params_without_traceback(tmp_path, capsys):
    (tmp_path / "params").mkdir()
    bad = tmp_path / "params" / "bad.yaml"
    bad.write_text("cnn:\n  batchsize: 3\n")
    assert main(["run", str(bad)]) == 2
    assert "cnn.batchsize: unknown key" in capsys.readouterr().err


def test_summary_table_from_metrics(tmp_path):
    from ichdlib.config import load_params

    P = load_params(None, {"root": str(tmp_path), "run": "s"})
    P.reports_dir.mkdir(parents=True)
    (P.reports_dir / "metrics.json").write_text(json.dumps({
        "prior": {"oof": {"wll": 0.3}, "test": {"wll": 0.31}},
        "stages": {"cnn:resnet18_96": {"oof": {"wll": 0.12, "auc": {"any": 0.9}}, "test": {"wll": 0.13}},
                   "ensemble": {"oof": {"wll": 0.1}, "test": None}},
        "pointing_game": {"method": "gradcam", "per_class": {"any": 0.75, "epidural": None},
                          "n": {"any": 4, "epidural": 0}, "overall": 0.75,
                          "standard_tolerance": {"per_class": {"any": 1.0}, "overall": 1.0}}}))
    text = write_summary(P).read_text()
    assert "| cnn:resnet18_96 | 0.1200 | 0.1300 | 0.9000 |" in text
    assert "| prior (label frequency) | 0.3000 | 0.3100 |" in text
    assert "| ensemble | 0.1000 |  |" in text  # no truth for the test split: blank, no crash
    assert "| any | 0.7500 | 1.0000 | 4 |" in text and "| **all** | 0.7500 | 1.0000 | 4 |" in text
