"""MLflow tracking (issue 24) against a real SQLite store, on a copy of the shared smoke run; and with tracking
off, no MLflow import and no store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ichdlib import tracking
from ichdlib.config import load_params

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"


def test_store_uri_defaults_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    P = load_params(SMOKE, {"root": str(tmp_path)})
    assert not tracking.enabled(P) and tracking.enabled(P, True)
    assert tracking.store_uri(P) == f"sqlite:///{tmp_path}/reports/smoke/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://lab:5000")
    assert tracking.store_uri(P) == "http://lab:5000"
    P = load_params(SMOKE, {"root": str(tmp_path), "tracking": {"uri": "reports/all.db"}})
    assert tracking.store_uri(P) == f"sqlite:///{tmp_path}/reports/all.db"  # the params key wins, relative to root
    assert tracking.metric_key("cnn:resnet18_96", "oof", "wll") == "cnn_resnet18_96/oof/wll"
    assert "root" not in tracking.run_params(P) and tracking.run_params(P)["cnn.backbones"].startswith("[{")


@pytest.mark.slow
def test_tracking_off_imports_no_mlflow(smoke_run, tmp_path):
    """With tracking off a run (all stages skipped here) and the epoch hook never import MLflow and leave no store."""
    root = tmp_path / "r"
    shutil.copytree(smoke_run.overrides["root"], root, copy_function=shutil.copy)
    code = ("import sys, io\n"
            "from ichdlib.run import run_pipeline\n"
            "from ichdlib.progress import TrainingProgress\n"
            f"res = run_pipeline({str(SMOKE)!r}, overrides={{'root': {str(root)!r}}}, html=False)\n"
            "assert [r.status for r in res] == [('off' if r.stage == '02b' else 'skipped') for r in res]\n"
            "p = TrainingProgress('m', live=False, stream=io.StringIO()); p.fold(0, 2); p.epoch(0, 0.5, 0.4)\n"
            "from ichdlib.config import load_params\n"
            "from ichdlib.serve.bundle import export\n"
            f"export(load_params({str(SMOKE)!r}, {{'root': {str(root)!r}}}), {str(tmp_path / 'bundle')!r})\n"
            "print('mlflow' in sys.modules)\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("MLFLOW_", "ICHD_MLFLOW"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    for rep in (smoke_run.P.reports_dir, root / "reports" / "smoke"):
        assert not tracking.NOT_ARTIFACTS & {p.name for p in rep.iterdir()}
    assert not list(tmp_path.rglob("mlflow.db")) and not list(tmp_path.rglob("mlruns"))


@pytest.mark.slow
def test_tracked_runs_in_a_real_store(smoke_run, tmp_path, monkeypatch, capsys):
    """A finished run tracked afterwards gets one MLflow run (curves read back from the fold logs); an unchanged
    rerun adds none; a rerun of notebook 04 logs its epochs live from the kernel into a second run; `ichd
    export` logs the bundle to it; `ichd compare` takes the two run ids."""
    from mlflow.tracking import MlflowClient

    from ichdlib.review.compare import compare_runs
    from ichdlib.run import run_pipeline
    from ichdlib.serve.bundle import export

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "r"
    shutil.copytree(smoke_run.overrides["root"], root, copy_function=shutil.copy)
    over = {"root": str(root)}
    P = load_params(SMOKE, over)
    uri = tracking.store_uri(P)
    assert uri == f"sqlite:///{P.reports_dir / 'mlflow.db'}"

    res = run_pipeline(SMOKE, overrides=over, html=False, track=True)
    assert [r.status for r in res] == [("off" if r.stage == "02b" else "skipped") for r in res]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ichd")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    first = runs[0]
    metrics = json.loads((P.reports_dir / "metrics.json").read_text())
    seq2 = metrics["stages"]["seq2"]["oof"]
    assert first.info.run_name == "smoke" and first.info.status == "FINISHED"
    assert first.data.metrics["seq2/oof/wll"] == pytest.approx(seq2["wll"])
    assert first.data.metrics["seq2/oof/wll_ci_lo"] == pytest.approx(seq2["wll_ci"][0])
    ci = metrics["stages"]["ensemble"]["oof"]["auc_ci"]["any"]
    assert ci is None or first.data.metrics["ensemble/oof/auc_any_ci_hi"] == pytest.approx(ci[1])
    assert first.data.metrics["ensemble/test/wll"] == pytest.approx(metrics["stages"]["ensemble"]["test"]["wll"])
    assert first.data.params["seq.epochs"] == str(P.seq.epochs) and "root" not in first.data.params
    tags = first.data.tags
    stamps = tracking.stage_stamps(P)
    assert {f"ichd.stamp.{n}" for n in stamps} <= set(tags) and tags["ichd.stamp.05"] == stamps["05"]
    assert tags["ichd.data_fingerprint"] == tracking.data_fingerprint(P) and tags["ichd.stage.02"].startswith("skipped")
    if tracking.git_commit():
        assert len(tags["mlflow.source.git.commit"]) == 40
    # curves read back from the per-fold logs: one step per epoch
    key = P.cnn.backbones[0].key
    hist = c.get_metric_history(first.info.run_id, f"{key}/fold0/val_wll")
    assert [m.step for m in hist] == list(range(1, P.cnn.backbones[0].epochs + 1))
    assert len(c.get_metric_history(first.info.run_id, "seq2/fold1/train_loss")) == P.seq.epochs
    arts = {a.path for a in c.list_artifacts(first.info.run_id)}
    assert {"metrics.json", "summary.md", "submission.csv", "predictions.parquet", "figures", "notebooks"} <= arts
    nbs = {a.path for a in c.list_artifacts(first.info.run_id, "notebooks")}
    assert "notebooks/05_ensemble_submission.ipynb" in nbs
    assert json.loads(P.layout.mlflow_run.read_text())["run_id"] == first.info.run_id

    # nothing changed: no duplicate run
    run_pipeline(SMOKE, overrides=over, html=False, track=True)
    assert len(c.search_runs([exp.experiment_id])) == 1
    assert "up to date; MLflow run " + first.info.run_id in capsys.readouterr().out

    # a rerun of 04: its epochs reach the store from inside the kernel, as they finish
    res = run_pipeline(SMOKE, overrides=over, html=False, track=True, only=["04"], force=True)
    assert [r.status for r in res] == ["ran"]
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2
    second = runs[0]
    assert second.data.tags["ichd.stage.04"].startswith("ran in")
    live = c.get_metric_history(second.info.run_id, "seq1/fold0/val_wll")
    assert [m.step for m in live] == list(range(1, P.seq.epochs + 1))  # logged once each, live (not read back)
    assert len({m.timestamp for m in live}) > 1  # epoch by epoch (a read-back log shares one timestamp)
    # 02 did not run in this `ichd run`: its curves are read back from its logs, so the run is complete
    assert len(c.get_metric_history(second.info.run_id, f"{key}/fold0/val_wll")) == P.cnn.backbones[0].epochs

    # ichd export logs the bundle's manifest and digest to the run
    bundle = export(P, tmp_path / "bundle")
    manifest = json.loads((bundle / "bundle.json").read_text())
    got = c.get_run(second.info.run_id)
    assert got.data.tags["ichd.bundle.integrity"] == manifest["integrity"]
    assert "bundle/bundle.json" in {a.path for a in c.list_artifacts(second.info.run_id, "bundle")}

    # compare by MLflow run ids (artifacts fetched from the store)
    cmp = compare_runs(first.info.run_id, second.info.run_id, tracking_uri=uri, n_boot=200)
    assert cmp.names == [f"smoke@{first.info.run_id[:8]}", f"smoke@{second.info.run_id[:8]}"]
    assert len(cmp.differences) and "seq2" in set(cmp.differences["stage"])
