"""The 2D CNN stage on the ingested smoke phantom (real catalog + HU cache), and GPU checks."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pandas as pd
import pytest
import torch

from ichdlib.labels import LABELS


def test_train_and_features_on_the_smoke_phantom(ingested):
    from ichdlib.cnn.features import extract_features, load_features
    from ichdlib.cnn.models import load_cnn
    from ichdlib.cnn.train import train_cnn
    from ichdlib.ingest.table import load_catalog

    P = ingested
    cfg = P.cnn.backbones[0]
    s = train_cnn(P, cfg)
    cat = load_catalog(P.work_dir)
    train, test = cat[cat["split"] == "train"], cat[cat["split"] == "test"]
    assert s["complete"] and sorted(s["folds"]) == sorted(train["fold"].unique().tolist())
    oof = pd.read_parquet(s["oof"])
    assert oof["sop_uid"].tolist() == train["sop_uid"].tolist()
    assert ((oof[list(LABELS)] > 0) & (oof[list(LABELS)] < 1)).all().all()
    assert pd.read_parquet(s["test"])["sop_uid"].tolist() == test["sop_uid"].tolist()
    model, meta = load_cnn(P.work_dir / "cnn" / cfg.key / "fold0.pt")
    assert meta["spec"]["size"] == cfg.size and meta["spec"]["feature_dim"] == model.feature_dim
    f = extract_features(P, cfg)
    feat, prob = load_features(P, cfg, "oof")
    tfeat, tprob = load_features(P, cfg, "test")
    assert feat.shape == (len(train), f["dim"]) and tfeat.shape == (len(test), f["dim"])
    assert feat.dtype == np.float16 and np.isfinite(np.asarray(feat, dtype=np.float32)).all()
    assert prob["sop_uid"].tolist() == train["sop_uid"].tolist()
    assert tprob["sop_uid"].tolist() == test["sop_uid"].tolist()


def _benchmark():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train_throughput.py")
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.gpu
def test_gpu_bf16_channels_last_step():
    from ichdlib.cnn.data import DeviceAugment
    from ichdlib.cnn.models import build_cnn
    from ichdlib.cnn.train import weighted_bce
    from ichdlib.config import load_params
    from ichdlib.runtime import prepare_model

    P = load_params(None, {"device": "cuda"})
    model, runner = prepare_model(build_cnn("densenet121"), P, "cuda")
    assert model.backbone.features.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    aug = DeviceAugment.from_params(P, 256).train()
    hu = torch.randint(-1000, 2000, (16, 3, 256, 256), dtype=torch.int16, device="cuda")
    x = aug(hu).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = runner(x)
    assert logits.dtype == torch.bfloat16
    loss = weighted_bce(logits, torch.zeros(16, 6, device="cuda"), torch.ones(6, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.classifier.weight.grad is not None


@pytest.mark.gpu
def test_gpu_training_loop_keeps_up_with_the_model_alone():
    res = _benchmark().main(["--model", "densenet121", "--size", "256", "--batch", "256", "--steps", "25",
                             "--workers", str(min(12, os.cpu_count() or 1))])
    assert res["loop_vs_model"] >= 0.9, res
    assert res["model_only"] > res["original"]


def test_benchmark_script_runs_on_the_cpu(tmp_path):
    res = _benchmark().main(["--device", "cpu", "--model", "test_efficientnet", "--size", "32",
                             "--batch", "8",
                             "--steps", "3", "--warmup", "1", "--rows", "64", "--threads", "1",
                             "--json", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").is_file()
    assert res["loop"] > 0 and res["model_only"] > 0 and res["original"] > 0
