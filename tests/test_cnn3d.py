"""The 3D CNN member (``ichdlib.cnn3d``): per-slice outputs for any study length, crops, resume, MedicalNet
weights, DDP on the CPU, the blend's decision, the bundle, and 3D Grad-CAM per slice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import toy_catalog

from ichdlib.cnn3d.data import CropDataset, CropSampler, Studies, VolumeAugment, flip_z
from ichdlib.cnn3d.models import Net3d, WeightsLayoutError, load_medicalnet, shape_trace
from ichdlib.config import ParamsError, load_params
from ichdlib.labels import LABELS
from ichdlib.spec import SpecError, VolumeSpec

REPO = Path(__file__).resolve().parents[1]
TINY = {"enabled": True, "depth": 10, "widen": 0.125, "size": 32, "slices": 6, "epochs": 2, "batch": 4,
        "lr": 0.002, "cpu_threads": 1}


def _params(root: Path, **cnn3d):
    return load_params(REPO / "params/smoke.yaml", {"root": str(root), "device": "cpu", "seed": 5,
                                                    "cnn3d": {**TINY, **cnn3d}})


# --------------------------------------------------------------------------------------------------
# The model: z kept at slice resolution, any study length
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [10, 18])
def test_per_slice_logits_for_studies_of_any_length(depth):
    model = Net3d(depth, widen=0.125).eval()
    with torch.no_grad():
        for n in (1, 2, 7, 23):
            for size in (32, 40):
                assert model(torch.rand(1, 3, n, size, size)).shape == (1, n, len(LABELS))
        assert model(torch.rand(2, 3, 5, 32, 32)).shape == (2, 5, len(LABELS))
    # every stage keeps z; the plane shrinks 32x
    trace = dict(shape_trace(model, 11, 64))
    assert [s[2] for s in trace.values()] == [11] * 6 + [len(LABELS)]
    assert trace["layer4"][-2:] == (2, 2)


def test_each_slice_is_scored_from_its_own_neighbourhood():
    """A change in the last slices of a long study leaves the first slices' logits unchanged: z is not pooled."""
    torch.manual_seed(0)
    model = Net3d(10, widen=0.125).eval()
    x = torch.rand(1, 3, 30, 32, 32)
    y = x.clone()
    y[:, :, -3:] = 0
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10]) and not torch.allclose(a[:, -3:], b[:, -3:])


def test_volume_spec_round_trip_and_errors(tmp_path):
    P = _params(tmp_path)
    spec = VolumeSpec.from_params(P)
    assert VolumeSpec.from_dict(spec.to_dict()) == spec and spec.key == P.cnn3d.key == "resnet10w0.125_32"
    assert VolumeSpec.from_meta({"spec": spec.to_dict()}) == spec
    with pytest.raises(SpecError, match="no 3D model spec"):
        VolumeSpec.from_meta({"spec": {"name": "densenet121"}})
    with pytest.raises(SpecError, match="resnet50 is not resnet10/18/34"):
        VolumeSpec.from_dict({**spec.to_dict(), "depth": 50})
    with pytest.raises(ParamsError, match="cnn3d.depth"):
        load_params(REPO / "params/smoke.yaml", {"cnn3d": {"depth": 50}})
    with pytest.raises(ParamsError, match="'cnn3d' is listed but cnn3d.enabled is false"):
        load_params(REPO / "params/smoke.yaml", {"ensemble": {"members": ["seq1", "cnn3d"]}})


# --------------------------------------------------------------------------------------------------
# Crops and augmentation
# --------------------------------------------------------------------------------------------------
def test_crops_pad_short_studies_with_masked_air_and_stream_from_the_cache():
    cat, cache = toy_catalog(studies=4, slices=8, size=32, folds=2, test_studies=1, seed=1)
    st = Studies.from_catalog(cat)
    assert st.n_slices() == len(cat) and [len(r) for r in st.rows] == cat.groupby("study_uid", sort=False).size().tolist()
    ds = CropDataset(cache, st, k=12)  # longer than any study: padded
    x, y, mask = ds.__getitems__([(0, 0), (1, 0)])
    n0 = len(st.rows[0])
    assert x.shape == (2, 12, 32, 32) and y.shape == (2, 12, 6) and mask.dtype == torch.bool
    assert mask[0, :n0].all() and not mask[0, n0:].any() and (x[0, n0:] == -1024).all()
    np.testing.assert_array_equal(x[0, :n0].numpy(), cache[st.rows[0]])
    s = CropSampler(st.lengths, k=4, batch=3, crops_per_study=2, seed=9)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) == first and len(first) == len(s) == 2  # reproducible per epoch (resume)
    assert all(0 <= start <= max(0, st.lengths[i] - 4) for b in first for i, start in b)
    # z reversal flips labels and mask with the slices
    on = torch.tensor([True, False])
    fx, fy, fm = flip_z(x, y, mask, on)
    assert torch.equal(fx[0], x[0].flip(0)) and torch.equal(fy[0], y[0].flip(0)) and torch.equal(fm[1], mask[1])


def test_volume_augment_windows_as_channels(tmp_path):
    P = _params(tmp_path)
    aug = VolumeAugment.from_params(P).eval()
    hu = torch.full((2, 5, 40, 40), 40.0)
    out = aug(hu)
    assert out.shape == (2, 3, 5, 32, 32)
    # seed_3window: brain (40/80) -> 0.5, subdural (80/200) -> 0.3, bone (600/2800) -> ~0.29
    np.testing.assert_allclose(out[0, :, 0, 16, 16].numpy(), [0.5, 0.3, (40 - (600 - 1400)) / 2800], atol=1e-5)
    aug.train()
    aug.reseed(3)
    assert aug(hu).shape == (2, 3, 5, 32, 32)


# --------------------------------------------------------------------------------------------------
# MedicalNet weights
# --------------------------------------------------------------------------------------------------
def _medicalnet_file(path: Path, depth: int) -> Path:
    from monai.networks.nets import resnet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    bias, shortcut = get_medicalnet_pretrained_resnet_args(depth)
    build = {10: resnet.resnet10, 18: resnet.resnet18}[depth]
    net = build(spatial_dims=3, n_input_channels=1, shortcut_type=shortcut, bias_downsample=bias, feed_forward=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)  # MedicalNet's form
    return path


def test_medicalnet_file_loads_and_a_mismatched_one_fails_in_one_line(tmp_path):
    model = Net3d(10)
    good = _medicalnet_file(tmp_path / "resnet_10_23dataset.pth", 10)
    info = load_medicalnet(model, good)
    assert info["adapted"] == ["conv1.weight"] and info["loaded"] > 10
    src = torch.load(good, weights_only=True)["state_dict"]
    assert torch.equal(model.trunk.layer3[0].conv1.weight, src["module.layer3.0.conv1.weight"])
    assert torch.allclose(model.trunk.conv1.weight[:, 1:2], src["module.conv1.weight"])  # spread over 3 windows
    wrong = _medicalnet_file(tmp_path / "resnet_18_23dataset.pth", 18)
    with pytest.raises(WeightsLayoutError) as err:
        load_medicalnet(Net3d(10), wrong)
    msg = str(err.value)
    assert "\n" not in msg and str(wrong) in msg and "not the MedicalNet layout of resnet10" in msg
    with pytest.raises(WeightsLayoutError, match="shape mismatch"):
        load_medicalnet(Net3d(10, widen=0.5), good)
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    with pytest.raises(WeightsLayoutError, match="junk.pth: cannot read weights"):
        load_medicalnet(model, junk)
    with pytest.raises(WeightsLayoutError, match="never downloaded"):
        load_medicalnet(model, tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------------------
# Training: outputs in the 2D layout, resume after an interruption
# --------------------------------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


def test_training_writes_the_2d_layout_and_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from ichdlib.cnn import distributed as D
    from ichdlib.cnn3d.train import cnn3d_dir, read_logs3d, train_cnn3d

    cat, cache = toy_catalog(studies=8, slices=8, size=32, folds=2, test_studies=2, seed=4)
    ref_P = _params(tmp_path / "ref")
    ref = train_cnn3d(ref_P, catalog=cat, cache=cache)
    out = cnn3d_dir(ref_P)
    train, test = cat[cat["split"] == "train"], cat[cat["split"] == "test"]
    oof = pd.read_parquet(out / "oof.parquet")
    assert oof["sop_uid"].tolist() == train["sop_uid"].tolist() and oof["fold"].tolist() == train["fold"].tolist()
    te = pd.read_parquet(out / "test.parquet")
    assert te["sop_uid"].tolist() == test["sop_uid"].tolist()
    assert np.isfinite(oof[list(LABELS)].to_numpy()).all() and te[list(LABELS)].stack().between(0, 1).all()
    meta = torch.load(out / "fold0.pt", weights_only=True)["meta"]
    assert VolumeSpec.from_meta(meta).key == ref_P.cnn3d.key
    assert len(read_logs3d(ref_P)) == 4 and np.isfinite(ref["oof_wll"])

    # interrupted at epoch 1 of fold 0, then rerun: same weights and tables as the uninterrupted run
    P = _params(tmp_path / "kill")
    real = D.fault_point

    def fault(epoch, step):
        if epoch == 1 and step == 0:
            raise _Interrupt
        real(epoch, step)

    monkeypatch.setattr(D, "fault_point", fault)
    with pytest.raises(_Interrupt):
        train_cnn3d(P, catalog=cat, cache=cache)
    state = torch.load(cnn3d_dir(P) / "fold0_last.pt", weights_only=True)
    assert state["meta"]["epoch"] == 0 and not state["meta"]["finished"]
    monkeypatch.setattr(D, "fault_point", real)
    again = train_cnn3d(P, catalog=cat, cache=cache)
    assert again["folds"][0]["status"] == "resumed" and again["folds"][1]["status"] == "trained"
    for name in ("fold0.pt", "fold1.pt"):
        a = torch.load(out / name, weights_only=True)["state_dict"]
        b = torch.load(cnn3d_dir(P) / name, weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    pd.testing.assert_frame_equal(oof, pd.read_parquet(cnn3d_dir(P) / "oof.parquet"))
    # a finished run is skipped; other settings are refused, naming them
    assert train_cnn3d(P, catalog=cat, cache=cache)["folds"][0]["status"] == "skipped"
    with pytest.raises(ValueError, match="other settings .*slices: 6 -> 5"):
        train_cnn3d(_params(tmp_path / "kill", slices=5), catalog=cat, cache=cache)


# --------------------------------------------------------------------------------------------------
# The blend's decision
# --------------------------------------------------------------------------------------------------
def test_blend_takes_the_member_when_it_helps_and_says_so():
    from ichdlib.ensemble.optional import offer_member
    from ichdlib.ensemble.weights import blend
    from ichdlib.predictions import StagePredictions as Stage

    rng = np.random.default_rng(0)
    n = 600
    ids = pd.Index([f"ID_{i}" for i in range(n)], name="sop_uid")
    y = pd.DataFrame((rng.random((n, 6)) < 0.2).astype(float), index=ids, columns=list(LABELS))
    fold = np.arange(n) % 3

    def stage(name, noise, sign=1.0):
        p = np.clip(0.5 + sign * (y.to_numpy() * 0.6 - 0.3) + rng.normal(0, noise, (n, 6)), 0.01, 0.99)
        oof = pd.DataFrame(p, index=ids, columns=list(LABELS)).assign(fold=fold)
        return Stage(name, oof, pd.DataFrame(p[:10], index=ids[:10], columns=list(LABELS)))

    for method in ("fit", "mean"):
        stages = {"seq1": stage("seq1", 0.25), "cnn3d": stage("cnn3d", 0.05)}
        bl, members, d = offer_member(stages, ["seq1"], "cnn3d", method, y, blend)
        assert d["taken"] and members == ["seq1", "cnn3d"] and d["oof_wll_with"] < d["oof_wll_without"]
        assert d["note"].startswith("cnn3d taken: the blend scores") and "cnn3d" in bl.weights
        assert d["difference"]["hi"] < 0 and "95% CI" in d["note"] and "resampling slices" in d["note"]
        stages["cnn3d"] = stage("cnn3d", 0.05, sign=-1.0)  # confidently wrong: left out
        bl, members, d = offer_member(stages, ["seq1"], "cnn3d", method, y, blend)
        assert not d["taken"] and members == ["seq1"] and list(bl.weights) == ["seq1"]
        assert d["note"].startswith("cnn3d left out")


# --------------------------------------------------------------------------------------------------
# Grad-CAM per slice
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam3d_gives_one_map_per_slice_and_class_at_the_slice_geometry(tmp_path, method):
    from ichdlib.cnn3d.models import build_net3d
    from ichdlib.review.cam3d import compute_cams3d

    spec = VolumeSpec.from_params(_params(tmp_path))
    model = build_net3d(spec).train()
    hu = np.random.default_rng(0).normal(40, 30, (7, 48, 48)).astype(np.int16)
    maps = compute_cams3d(model, spec, hu, ["any", "subdural"], method, out_size=(64, 60))
    assert maps.shape == (7, 2, 64, 60) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0
    assert model.training and all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# The run: notebook 05's decision in metrics.json, the bundle, ichd predict, the viewer
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run3d(trained, tmp_path_factory):
    """The smoke run copied to run ``smoke3d`` with the 3D member trained and notebook 05 rerun."""
    from ichdlib.cnn3d.train import train_cnn3d
    from ichdlib.ensemble.blend import run_ensemble

    P = load_params(REPO / "params/smoke.yaml", {"root": str(trained.root), "run": "smoke3d",
                                                  "paths": {"data_root": str(trained.data_root)},
                                                  "cnn3d": {"enabled": True, "epochs": 2}})
    shutil.copytree(trained.work_dir, P.work_dir, ignore=shutil.ignore_patterns("phantom", "stages", "*.lock"),
                    dirs_exist_ok=True)
    summary = train_cnn3d(P)
    return P, summary, run_ensemble(P)


def test_the_run_scores_the_member_and_records_the_blend_decision(run3d):
    P, summary, rep = run3d
    assert summary["complete"] and np.isfinite(summary["oof_wll"])
    m = rep.metrics
    assert "cnn3d" in m["stages"] and m["stages"]["cnn3d"]["oof"]["wll"] == pytest.approx(summary["oof_wll"])
    assert m["stages"]["cnn3d"]["test"] is not None and "cnn3d" in rep.table.index
    d = m["submission"]["offered"]["cnn3d"]
    assert d["note"].startswith(("cnn3d taken", "cnn3d left out"))
    assert ("cnn3d" in m["submission"]["members"]) == d["taken"]


def test_bundle_predicts_with_the_member_and_round_trips(run3d, tmp_path):
    from builders import study_folder

    from ichdlib.serve.bundle import Bundle, export
    from ichdlib.serve.predict import predict_dir

    P, _, rep = run3d
    out = export(P, tmp_path / "b3d")
    loaded = Bundle.load(out)
    (entry,) = loaded.manifest["cnn3d"]
    assert entry["key"] == "cnn3d" and entry["folds"] == [0, 1] and VolumeSpec.from_dict(entry["spec"]).size == 48
    assert "cnn3d/cnn3d/fold1.safetensors" in loaded.manifest["files"]
    assert loaded.ensemble["members"] == rep.metrics["submission"]["members"]
    folder = study_folder(P, tmp_path / "study", keep=9)
    before = predict_dir(folder, Bundle.from_run(P), device="cpu").slices
    after = predict_dir(folder, loaded, device="cpu").slices
    cols = [f"cnn3d:{c}" for c in LABELS]
    assert len(after) == 9 and set(cols) <= set(after.columns)
    assert np.isfinite(after[cols].to_numpy(float)).all()
    np.testing.assert_allclose(after[cols].to_numpy(float), before[cols].to_numpy(float), atol=1e-6)


def test_viewer_shows_the_3d_maps_and_strip(run3d):
    from ichdlib.review.cam3d import Cam3dEngine
    from ichdlib.review.cases import review_table
    from ichdlib.review.engine import CamEngine
    from ichdlib.review.viewer import run_state

    P, _, _ = run3d
    table = review_table(P)
    uid = table["study_uid"].iloc[0]
    oof3d = pd.read_parquet(P.work_dir / "cnn3d" / P.cnn3d.key / "oof.parquet").set_index("sop_uid")
    engine3d = Cam3dEngine(P, CamEngine(P).catalog)
    state = run_state(P, CamEngine(P), table, [uid], cams=engine3d, series={"3D": oof3d})
    study = state.study_obj(uid)
    assert list(study.probs) == ["2D", "3D", "final"]
    maps = state.cams(uid)
    assert len(maps) == study.n and maps[0].shape == (len(LABELS), *study.hu[0].shape)
    assert state.image().ndim == 3


# --------------------------------------------------------------------------------------------------
# ichd run: the stage is optional; ichd train --stage cnn3d under torchrun (gloo)
# --------------------------------------------------------------------------------------------------
def test_the_stage_is_off_unless_enabled(tmp_path):
    from ichdlib import stages
    from ichdlib.run import list_notebooks, select, stage_number

    nbs = list_notebooks()
    assert [stage_number(p) for p in nbs][:4] == ["01", "02", "02b", "03"]
    assert [p.name for p in select(nbs, only=["02b"])] == ["02b_cnn3d_training.ipynb"]
    st = stages.STAGES["02b"]
    assert not stages.stage_enabled(load_params(REPO / "params/demo.yaml"), st)
    assert stages.stage_enabled(load_params(REPO / "params/demo.yaml", {"cnn3d": {"enabled": True}}), st)
    assert "02b" in stages.STAGES["05"].upstream and "cnn3d" in stages.STAGES["05"].sections


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    env.pop("ICHD_FAULT_KILL", None)
    return env


@pytest.mark.slow
def test_torchrun_two_ranks_gloo_matches_one_process(ingested, tmp_path):
    from ichdlib.cnn3d.train import cnn3d_dir, train_cnn3d
    from ichdlib.ingest.table import load_catalog

    sets = {"epochs": 1, "batch": 4}
    roots = {}
    for name in ("one", "ddp"):
        roots[name] = tmp_path / name
        shutil.copytree(ingested.work_dir, roots[name] / "work" / "smoke",
                        ignore=shutil.ignore_patterns("phantom", "cnn", "features", "seq", "stages", "*.lock"))
    over = {"root": str(roots["one"]), "paths": {"data_root": str(ingested.data_root)},
            "cnn3d": {"enabled": True, **sets}}
    P1 = load_params(REPO / "params/smoke.yaml", over)
    ref = train_cnn3d(P1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ichdlib",
           "train", str(REPO / "params/smoke.yaml"), "--stage", "cnn3d", "--set", f"root={roots['ddp']}",
           "--set", f"paths.data_root={ingested.data_root}", "--set", "cnn3d.enabled=true",
           *sum((["--set", f"cnn3d.{k}={v}"] for k, v in sets.items()), [])]
    res = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "stage cnn3d on 2 ranks" in res.stdout
    P2 = load_params(REPO / "params/smoke.yaml", {**over, "root": str(roots["ddp"])})
    out = cnn3d_dir(P2)
    cat = load_catalog(P2.work_dir)
    oof = pd.read_parquet(out / "oof.parquet")
    assert oof["sop_uid"].tolist() == cat.loc[cat["split"] == "train", "sop_uid"].tolist()
    for k in (0, 1):
        meta = torch.load(out / f"fold{k}_last.pt", weights_only=True)["meta"]
        assert meta["finished"] and meta["provenance"]["world_size"] == 2
        a = ref["folds"][k]["best_wll"]
        assert abs(meta["best_wll"] - a) <= 0.05 * a, (k, a, meta["best_wll"])


@pytest.mark.slow
def test_notebook_02b_runs_headless_when_enabled(smoke_run, tmp_path):
    """``ichd run --only 02b`` with ``cnn3d.enabled`` on a copy of the smoke run: one line per epoch, figures."""
    import json
    import re

    from ichdlib.run import run_pipeline

    shutil.copytree(smoke_run.P.root / "work", tmp_path / "work")
    over = {"root": str(tmp_path), "cnn3d": {"enabled": True}}
    (res,) = run_pipeline(REPO / "params/smoke.yaml", overrides=over, only=["02b"], html=False)
    assert res.status == "ran" and res.stage == "02b"
    nb = json.loads((tmp_path / "reports/smoke/02b_cnn3d_training.ipynb").read_text())
    outs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    text = "".join("".join(o.get("text", "")) for o in outs if o["output_type"] == "stream")
    assert re.search(r"3D resnet10w0.125_48 fold 1 epoch 1/1 +train loss \d\.\d{4} +val wLL \d\.\d{4}", text), text
    assert sum("image/png" in o.get("data", {}) for o in outs) >= 2
    assert (tmp_path / "work/smoke/cnn3d/resnet10w0.125_48/oof.parquet").is_file()


def test_throughput_benchmark_reports_memory_and_rates(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cnn3d_throughput", REPO / "benchmarks/cnn3d_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--params", str(REPO / "params/smoke.yaml"), "--steps", "1", "--batch", "2",
                    "--json", str(tmp_path / "t.json")])
    assert out["train_slices_per_s"] > 0 and out["study60_forward_s"] > 0 and out["peak_gpu_gb"] is None
    # saved activations grow with the crop (the weights autograd keeps are a fixed part)
    big = mod.main(["--params", str(REPO / "params/smoke.yaml"), "--steps", "1", "--batch", "2", "--slices", "12"])
    assert 1.2 < big["saved_activation_bytes_per_crop"] / out["saved_activation_bytes_per_crop"] < 2.2
