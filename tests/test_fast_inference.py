"""Fast CPU inference: ONNX graphs against the torch reference, the fast profile's selection, and bundles in
either form going through ``ichd predict`` / ``--dicom-out`` unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import study_folder

from ichdlib.app.export_cli import export_bundle
from ichdlib.cli import main as ichd
from ichdlib.serve.bundle import MANIFEST, Bundle, BundleError
from ichdlib.serve.onnx_runtime import OrtNet, export_model, max_prob_diff
from ichdlib.serve.pipeline import Predictor
from ichdlib.serve.predict import predict_dir
from ichdlib.serve.profiles import Profile, Scores, apply_profile, blend_weights, full_profile, select_profile

#: |p_onnx - p_torch| allowed end to end (2D, sequence models, blend): float32 reassociation only
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def onnx_bundle(trained, tmp_path_factory) -> Path:
    return export_bundle(trained, tmp_path_factory.mktemp("onnx") / "b", runtime="onnx")[0]


def test_graph_matches_torch_for_a_learnable_window_model(tmp_path):
    """A model that windows its own HU input exports with the window inside the graph."""
    from ichdlib.cnn.models import build_cnn

    torch.manual_seed(0)
    model = build_cnn("test_resnet", learnable_window="three_window", recipe="three_window").eval()
    x = torch.rand(3, 3, 32, 32) * 1500 - 500
    path = export_model(model, x[:2], tmp_path / "m.onnx")
    net = OrtNet(path, threads=1)
    assert max_prob_diff(model, net, x) < 1e-5  # a batch size other than the export example's
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-4)


def test_onnx_bundle_predicts_what_torch_predicts(trained, onnx_bundle, tmp_path):
    m = json.loads((onnx_bundle / MANIFEST).read_text())
    rt = m["runtime"]
    assert rt["engine"] == "onnxruntime" and rt["max_abs_diff"] < 1e-4
    graphs = [f for k in rt["files"].values() for f in k.values()]
    assert len(graphs) == 2 and all(g in m["files"] for g in graphs)
    bundle = Bundle.load(onnx_bundle)
    folder = study_folder(trained, tmp_path / "study", keep=12)
    ref = predict_dir(folder, bundle, predictor=Predictor(bundle, "cpu", runtime="torch")).slices
    pred = predict_dir(folder, bundle, device="cpu")
    assert Predictor(bundle, "cpu").engine == "onnxruntime" and len(pred.problems) == 0
    num = [c for c in ref.columns if c.startswith(("p2d_", "p_")) or ":" in c]
    assert len(ref) > 10 and not np.allclose(ref[num].to_numpy(float), 0.5)
    np.testing.assert_allclose(pred.slices[num].to_numpy(float), ref[num].to_numpy(float), rtol=0, atol=TOLERANCE)


def test_damaged_graph_is_refused(onnx_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle, copy)
    graph = next((copy / "onnx").rglob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(BundleError, match="checksum differs"):
        Predictor(Bundle.load(copy), "cpu")


def _fake_eval(losses: dict[tuple, float]):
    def evaluate(p: Profile) -> Scores:
        return Scores(losses.get((p.views, p.members), 0.2), 0.9)
    return evaluate


def test_select_profile_keeps_what_the_oof_predictions_need():
    full = Profile("full", {"a": (0, 1, 2), "b": (0, 1, 2)}, (0, 1, 2), ("seq1", "cnn:b"))
    losses = {((0, 1, 2), ("seq1", "cnn:b")): 0.100,
              ((0, 1), ("seq1", "cnn:b")): 0.101,  # view 2 adds little
              ((1, 2), ("seq1", "cnn:b")): 0.150,  # view 0 matters
              ((0, 2), ("seq1", "cnn:b")): 0.130,
              ((0, 1), ("seq1",)): 0.1015,  # cnn:b adds little, and only it reads b: b goes with it
              ((0,), ("seq1", "cnn:b")): 0.140, ((1,), ("seq1", "cnn:b")): 0.140,
              ((0,), ("seq1",)): 0.150, ((1,), ("seq1",)): 0.150}
    cost = lambda p: float(p.passes_per_slice())  # noqa: E731
    sel = select_profile(full, _fake_eval(losses), cost, fold_scores={"a": {0: 0.5, 1: 0.3, 2: 0.4}, "b": {0: 0.2}},
                         seq_backbones=["a"], folds=1, max_wll_ratio=1.02)
    assert sel.profile.folds == {"a": (1,)}  # the best fold by its own held-out loss; b went with cnn:b
    assert sel.profile.views == (0, 1) and sel.profile.members == ("seq1",) and sel.within_bar
    assert sel.cost == 2 and sel.full_cost == 18 and sel.scores.oof_wll == pytest.approx(0.1015)
    assert [t["step"] for t in sel.trace][1:3] == ["drop TTA view 2", "drop blend member cnn:b"]
    assert sel.trace[-1]["step"].startswith("stop") and not any(c["within_bar"] for c in sel.trace[-1]["candidates"])
    # while a kept sequence model reads b, dropping cnn:b saves nothing and costs accuracy: it stays
    both = select_profile(full, _fake_eval(losses), cost, fold_scores={}, seq_backbones=["a", "b"])
    assert both.profile.members == ("seq1", "cnn:b") and both.profile.folds == {"a": (0,), "b": (0,)}
    # a budget below what the bar allows goes on past it, and says so
    tight = select_profile(full, _fake_eval(losses), cost, fold_scores={}, seq_backbones=["a"], budget=1)
    assert tight.cost <= 1 and not tight.within_bar and len(tight.profile.views) == 1


def test_blend_weights_renormalise():
    assert blend_weights({"a": 0.2, "b": 0.6, "c": 0.2}, ["a", "b"]) == pytest.approx({"a": 0.25, "b": 0.75})
    assert blend_weights({"a": 0.0, "b": 1.0}, ["a"]) == {"a": 1.0}


def test_fast_bundle_through_predict_and_dicom_out(trained, tmp_path):
    """``ichd export --profile fast --runtime onnx``: fewer models, the selection in bundle.json, and
    ``ichd predict --dicom-out`` takes it as it takes any bundle."""
    from ichdlib.config import dump_params

    params = tmp_path / "params.yaml"
    params.write_text(dump_params(trained, params))  # root relative to the file
    path = tmp_path / "fast"
    assert ichd(["export", "--run", str(params), "--out", str(path), "--profile", "fast", "--runtime", "onnx",
                 "--max-wll-ratio", "1.5"]) == 0
    report = json.loads((path / MANIFEST).read_text())["profile"]["selection"]
    m = json.loads((path / MANIFEST).read_text())
    (b,) = m["backbones"]
    assert len(b["folds"]) == 1 and m["profile"]["name"] == "fast" and m["runtime"]["engine"] == "onnxruntime"
    assert report["scores"]["oof_wll"] <= 1.5 * report["full"]["oof_wll"] and report["cost"] < report["full_cost"]
    assert m["profile"]["selection"]["trace"][0]["step"].startswith("keep 1 fold")
    assert sum(m["ensemble"]["weights"].values()) == pytest.approx(1.0)
    folder = study_folder(trained, tmp_path / "study", keep=10)
    rc = ichd(["predict", str(folder), "--bundle", str(path), "--out", str(tmp_path / "pred"), "--device", "cpu",
               "--dicom-out", str(tmp_path / "dicom")])
    assert rc == 0 and list((tmp_path / "dicom").rglob("*.dcm"))
    slices = (tmp_path / "pred" / "slices.csv").read_text().splitlines()
    assert len(slices) == 11


def test_apply_profile_keeps_views_of_a_profiled_bundle(trained):
    bundle = Bundle.from_run(trained)
    full = full_profile(bundle)
    first = apply_profile(bundle, Profile("x", {k: f[:1] for k, f in full.folds.items()}, (1,), full.members))
    assert first.manifest["profile"]["views"] == [1] and full_profile(first).views == (0,)
    again = apply_profile(first, full_profile(first))
    assert again.manifest["profile"]["views"] == [1]  # indices stay those of the run's views


def test_student_distils_from_the_ensemble_and_predicts(trained, tmp_path):
    """``ichd train --stage distill`` then ``ichd export --profile student``: one network, one view, trained on
    the blend's OOF probabilities, with honest out-of-fold scores; the bundle predicts like any other."""
    import pandas as pd

    from ichdlib.config import load_params
    from ichdlib.distill import student_dir
    from ichdlib.distill.train import distill, ensemble_targets
    from ichdlib.ingest.table import load_catalog
    from ichdlib.labels import LABELS
    from ichdlib.metrics import weighted_log_loss

    P = load_params(Path(__file__).resolve().parents[1] / "params" / "smoke.yaml",
                    {"root": str(trained.root), "cnn": {"max_steps_per_epoch": 2},
                     "distill": {"backbone": {"name": "test_resnet", "size": 64, "batch": 8, "epochs": 1,
                                              "tag": "student"}}})
    cat = load_catalog(P.work_dir)
    oof_t, test_t = ensemble_targets(P, cat)
    metrics = json.loads(P.layout.metrics.read_text())
    y = cat.loc[cat["split"] == "train", list(LABELS)].to_numpy(float)
    assert weighted_log_loss(y, oof_t) == pytest.approx(metrics["stages"]["ensemble"]["oof"]["wll"], rel=1e-9)
    assert test_t.shape == ((cat["split"] == "test").sum(), 6)
    done = distill(P)
    folds = sorted(cat.loc[cat["split"] == "train", "fold"].unique())
    assert [f["fold"] for f in done["folds"]] == folds and done["deploy_fold"] in folds
    oof = pd.read_parquet(student_dir(P).oof)
    assert list(oof["sop_uid"]) == list(cat.loc[cat["split"] == "train", "sop_uid"])
    assert done["oof_wll"] == pytest.approx(weighted_log_loss(y, oof[list(LABELS)].to_numpy()))
    assert distill(P)["folds"] == done["folds"]  # finished folds are reused, not retrained
    path, _ = export_bundle(P, tmp_path / "student", profile="student", runtime="onnx")
    m = json.loads((path / MANIFEST).read_text())
    (b,) = m["backbones"]
    assert b["key"] == "student" and b["folds"] == [done["deploy_fold"]] and m["seq"]["models"] == []
    assert m["profile"]["views"] == [0] and m["ensemble"]["weights"] == {"cnn:student": 1.0}
    folder = study_folder(trained, tmp_path / "study", keep=8)
    pred = predict_dir(folder, Bundle.load(path), device="cpu")
    assert len(pred.slices) == 8 and len(pred.problems) == 0
    np.testing.assert_allclose(pred.slices["p_any"], pred.slices["cnn:student:any"])


def test_profile_views_are_checked():
    from types import SimpleNamespace

    from ichdlib.serve.onnx_runtime import profile_views

    views = ["val", "hflip", "swap"]
    assert profile_views(SimpleNamespace(manifest={}, source="b"), views) == views
    assert profile_views(SimpleNamespace(manifest={"profile": {"views": [2, 0]}}, source="b"), views) == ["swap", "val"]
    for bad in ([], [3], ["0"]):
        with pytest.raises(ValueError, match="profile.views"):
            profile_views(SimpleNamespace(manifest={"profile": {"views": bad}}, source="b"), views)
