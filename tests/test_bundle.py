"""ichdlib.serve.bundle: export a finished run, load it without pickle, and predict the same numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import study_folder

from ichdlib.cli import main as ichd
from ichdlib.config import dump_params
from ichdlib.labels import LABELS
from ichdlib.serve.bundle import FORMAT, MANIFEST, Bundle, BundleError, export, resolve_run
from ichdlib.serve.predict import predict_dir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return export(trained, tmp_path_factory.mktemp("bundle") / "b1")


def test_bundle_layout(trained, exported):
    P = trained
    m = json.loads((exported / MANIFEST).read_text())
    assert m["format"] == FORMAT and m["format_version"] == 2 and m["labels"] == list(LABELS)
    assert m["run"] == P.run and m["created"].endswith("+00:00")
    assert m["windows"]["recipe"] == P.windows.recipe and m["tta"] == P.features.tta
    (b,) = m["backbones"]
    cfg = P.cnn.backbones[0]
    assert (b["key"], b["name"], b["size"]) == (cfg.key, cfg.name, cfg.size)
    assert b["folds"] == [0, 1] and b["feature_dim"] > 0 and len(b["metas"]) == 2
    feat = np.load(P.work_dir / "features" / cfg.key / "test_feat.npy", mmap_mode="r")
    assert feat.shape[1] == b["feature_dim"]
    assert m["seq"]["backbones"] == [cfg.key]
    assert [s["key"] for s in m["seq"]["models"]] == list(P.seq.models)
    assert m["ensemble"]["members"] == list(P.ensemble.members)
    assert sum(m["ensemble"]["weights"].values()) == pytest.approx(1.0)
    assert {"torch", "timm", "numpy", "pydicom", "safetensors", "python", "ichdlib"} <= set(m["versions"])
    assert m["params"]["run"] == P.run and (exported / "params.yaml").read_text() == dump_params(P)
    # weights only as safetensors, each listed with its checksum; nothing pickled
    files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    weights = [f for f in files if f.endswith(".safetensors")]
    assert set(files) == {MANIFEST, "params.yaml", *weights}
    assert sorted(m["files"]) == weights and len(weights) == 2 + 2 * len(P.seq.models)
    assert f"cnn/{cfg.key}/fold0.safetensors" in weights and "seq/seq1/fold1.safetensors" in weights


def test_round_trip_same_predictions(trained, exported, tmp_path):
    """The run's own checkpoints and the exported bundle give the same numbers."""
    folder = study_folder(trained, tmp_path / "study", keep=12)
    before = predict_dir(folder, Bundle.from_run(trained), device="cpu").slices
    loaded = Bundle.load(exported)
    after = predict_dir(folder, loaded, device="cpu").slices
    assert len(before) > 10 and list(before.columns) == list(after.columns)
    num = [c for c in before.columns if c.startswith(("p2d_", "p_")) or ":" in c]
    assert len(num) == 6 * (3 + len(trained.seq.models))  # 2D, final, the CNN stage, each sequence model
    np.testing.assert_allclose(after[num].to_numpy(float), before[num].to_numpy(float), rtol=0, atol=1e-6)
    assert (before["sop_uid"] == after["sop_uid"]).all()
    # the loaded weights are the checkpoint's tensors exactly
    import torch

    ck = torch.load(trained.work_dir / "cnn" / trained.cnn.backbones[0].key / "fold1.pt", weights_only=True)
    state = loaded.cnn[trained.cnn.backbones[0].key].states[1]
    assert set(state) == set(ck["state_dict"])
    assert all(torch.equal(state[k], ck["state_dict"][k]) for k in state)


def test_damaged_or_foreign_bundles_fail_clearly(exported, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    w = next(bad.rglob("fold0.safetensors"))
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="checksum differs"):
        Bundle.load(bad)
    w.unlink()
    with pytest.raises(BundleError, match="missing weights file"):
        Bundle.load(bad)
    m = json.loads((exported / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(BundleError, match="newer than this ichdlib"):
        Bundle.load(bad)
    with pytest.raises(BundleError, match="not a model bundle"):
        Bundle.load(tmp_path)


def test_export_cli(trained, tmp_path, capsys):
    params = tmp_path / "run.yaml"
    params.write_text(dump_params(trained, params))  # root relative to the file: no absolute path in it
    out = tmp_path / "b2"
    assert ichd(["export", "--run", str(params), "--out", str(out)]) == 0
    assert "bundle written" in capsys.readouterr().out and (out / MANIFEST).is_file()
    # an existing bundle is not overwritten silently; a folder without params is refused with advice
    assert ichd(["export", "--run", str(params), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert ichd(["export", "--run", str(params), "--out", str(out), "--force"]) == 0
    with pytest.raises(BundleError, match="pass the params file"):
        resolve_run(tmp_path)
    # a run that is not trained names the notebook to run
    untrained = trained.model_copy(update={"run": "never_trained"})
    with pytest.raises(BundleError, match="run notebook 02"):
        Bundle.from_run(untrained)


def test_fitted_weights_come_from_notebook_05(trained):
    from ichdlib.serve.bundle import ensemble_spec

    spec = ensemble_spec(trained)
    assert spec["method"] == "mean" and spec["sources"] == {m: "seq" for m in trained.seq.models}
    fit = trained.model_copy(update={"ensemble": trained.ensemble.model_copy(update={"method": "fit"})})
    with pytest.raises(BundleError, match="run notebook 05"):  # metrics.json holds the 'mean' blend
        ensemble_spec(fit)


def test_untrained_bundle_for_timing(smoke_params, tmp_path):
    """Random weights with the params' architectures (what benchmarks/predict.py times) save, load and run."""
    from pydicom.data import get_testdata_file

    b = Bundle.untrained(smoke_params, folds=2)
    assert [m["key"] for m in b.manifest["seq"]["models"]] == list(smoke_params.seq.models)
    assert b.manifest["ensemble"]["sources"] == {m: "seq" for m in smoke_params.seq.models}
    out = b.save(tmp_path / "u")
    pred = predict_dir(get_testdata_file("CT_small.dcm"), Bundle.load(out), device="cpu")
    assert len(pred.slices) == 1 and pred.slices["p_any"].between(0, 1).all()
    assert set(pred.seconds) >= {"read", "model", "total"}
