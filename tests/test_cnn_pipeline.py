"""End-to-end 2D CNN stage on toy data (no DICOM): learning, OOF coverage, checkpoints, resume, features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from builders import toy_catalog

from ichdlib.config import load_params
from ichdlib.labels import LABELS
from ichdlib.spec import ModelSpec

REPO_PARAMS = "params/smoke.yaml"
LIGHT = dict(slice_swap=0.5, hflip=0.5, shift_scale_rotate=0.0, erase=0.0, random_crop=0.0)


def _params(repo, root, **cnn):
    backbone = {"name": "test_efficientnet", "size": 48, "batch": 32, "epochs": 8, "lr": 0.003}
    backbone.update(cnn.pop("backbone", {}))
    over = {"root": str(root), "device": "cpu", "seed": 11,
            "cnn": {"backbones": [backbone], "augment": LIGHT, "sampler": "slice", "schedule": "cosine",
                    "max_steps_per_epoch": None, **cnn},
            "features": {"tta": 1, "batch": 64}}
    return load_params(repo / REPO_PARAMS, over)


@pytest.fixture(scope="module")
def toy():
    return toy_catalog(studies=30, slices=12, size=48, folds=2, test_studies=3, seed=0)


@pytest.fixture(scope="module")
def trained(repo, toy, tmp_path_factory):
    """Two folds of a tiny backbone, ~40 steps each."""
    from ichdlib.cnn.train import train_cnn

    cat, cache = toy
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        P = _params(repo, tmp_path_factory.mktemp("cnn"))
        summary = train_cnn(P, P.cnn.backbones[0], catalog=cat, cache=cache)
    finally:
        torch.set_num_threads(n)
    return P, summary


def test_learns_below_the_prior_baseline(trained):
    _, s = trained
    assert s["complete"] and s["folds"][0]["status"] == "trained"
    print(f"toy OOF weighted log loss {s['oof_wll']:.4f} vs prior {s['prior_wll']:.4f}")
    assert s["oof_wll"] < 0.85 * s["prior_wll"]
    assert s["oof_auc"]["any"] > 0.8


def test_oof_covers_every_training_slice_once_in_catalog_order(trained, toy):
    P, s = trained
    cat, _ = toy
    train = cat[cat["split"] == "train"]
    oof = pd.read_parquet(s["oof"])
    assert list(oof.columns) == ["sop_uid", "fold", *LABELS]
    assert oof["sop_uid"].tolist() == train["sop_uid"].tolist()
    assert oof["fold"].tolist() == train["fold"].tolist()
    assert oof[list(LABELS)].notna().all().all() and oof["sop_uid"].is_unique
    test = pd.read_parquet(s["test"])
    assert test["sop_uid"].tolist() == cat.loc[cat["split"] == "test", "sop_uid"].tolist()
    d = P.work_dir / "cnn" / "test_efficientnet_48"
    per_fold = [pd.read_parquet(d / f"fold{k}_test.parquet")[list(LABELS)].to_numpy() for k in (0, 1)]
    assert np.allclose(test[list(LABELS)].to_numpy(), np.mean(per_fold, axis=0))


def test_checkpoints_load_with_weights_only_and_reproduce_the_oof(trained, toy):
    from ichdlib.cnn.data import DeviceAugment, SliceDataset
    from ichdlib.cnn.infer import predict
    from ichdlib.cnn.models import load_cnn

    P, s = trained
    cat, cache = toy
    d = P.work_dir / "cnn" / "test_efficientnet_48"
    raw = torch.load(d / "fold1.pt", map_location="cpu", weights_only=True)
    meta = raw["meta"]
    spec = ModelSpec.from_meta(meta)
    assert meta["fold"] == 1 and spec.name == "test_efficientnet" and spec.size == 48
    assert meta["epoch"] == meta["best_epoch"] == s["folds"][1]["best_epoch"]
    assert spec.recipe == "seed_3window" and spec.learnable_window is False
    assert spec.windows == ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)) and spec.labels == LABELS
    assert meta["best_wll"] == pytest.approx(s["folds"][1]["best_wll"])
    model, meta2 = load_cnn(d / "fold1.pt")
    va = cat[(cat["split"] == "train") & (cat["fold"] == 1)]
    aug = DeviceAugment.from_params(P, 48)
    p, _ = predict(model, aug, SliceDataset.from_catalog(va, cache), 64, "cpu")
    oof = pd.read_parquet(s["oof"]).set_index("sop_uid").loc[va["sop_uid"], list(LABELS)].to_numpy()
    assert np.allclose(p, oof, atol=1e-5)
    log = pd.read_csv(d / "fold1_log.csv")
    assert log["epoch"].tolist() == list(range(8))
    assert {"lr", "train_loss", "val_wll", "auc_any", "images_per_s"} <= set(log.columns)
    assert log["val_wll"].min() == pytest.approx(meta["best_wll"])
    assert log["lr"].is_monotonic_decreasing


def test_rerun_skips_finished_folds_and_refuses_changed_settings(trained, toy, repo):
    from ichdlib.cnn.train import train_cnn

    P, s = trained
    cat, cache = toy
    again = train_cnn(P, P.cnn.backbones[0], catalog=cat, cache=cache)
    assert {f["status"] for f in again["folds"].values()} == {"skipped"}
    assert again["oof_wll"] == pytest.approx(s["oof_wll"])
    cnn = {**P.cnn.model_dump(mode="json"), "class_weights": [1] * 6}
    other = load_params(repo / REPO_PARAMS, {**P.model_dump(mode="json"), "root": str(P.root), "cnn": cnn})
    with pytest.raises(ValueError, match="class_weights.*force=True"):
        train_cnn(other, other.cnn.backbones[0], catalog=cat, cache=cache)
    # Regenerated or relabelled data: the finished folds are stale, not reused.
    relabelled = cat.copy()
    flip = relabelled.index[relabelled["split"] == "train"][0]
    relabelled.loc[flip, "any"] = 1.0 - relabelled.loc[flip, "any"]
    with pytest.raises(ValueError, match="data: .*force=True"):
        train_cnn(P, P.cnn.backbones[0], catalog=relabelled, cache=cache)


def test_features_align_with_the_catalog(trained, toy):
    from ichdlib.cnn.features import extract_features, load_features

    P, s = trained
    cat, cache = toy
    train, test = cat[cat["split"] == "train"], cat[cat["split"] == "test"]
    f = extract_features(P, P.cnn.backbones[0], catalog=cat, cache=cache)
    d = P.work_dir / "features" / "test_efficientnet_48"
    oof_feat, oof_prob = load_features(P, P.cnn.backbones[0], "oof")
    test_feat, test_prob = load_features(P, P.cnn.backbones[0], "test")
    assert oof_feat.dtype == np.float16 and oof_feat.shape == (len(train), f["dim"])
    assert test_feat.shape == (len(test), f["dim"]) and np.isfinite(test_feat).all()
    assert oof_prob["sop_uid"].tolist() == train["sop_uid"].tolist()
    assert test_prob["sop_uid"].tolist() == test["sop_uid"].tolist()
    # with one TTA view (the validation view) the probabilities are the training stage's OOF and test ones
    oof = pd.read_parquet(s["oof"])
    assert np.allclose(oof_prob[list(LABELS)].to_numpy(), oof[list(LABELS)].to_numpy(), atol=1e-5)
    tst = pd.read_parquet(s["test"])
    assert np.allclose(test_prob[list(LABELS)].to_numpy(), tst[list(LABELS)].to_numpy(), atol=1e-5)
    assert not list(d.glob("part_fold*"))
    assert extract_features(P, P.cnn.backbones[0], catalog=cat, cache=cache)["status"] == "skipped"
    # more views: recomputed automatically, deterministic, still aligned
    P.features.tta = 3
    a = extract_features(P, P.cnn.backbones[0], catalog=cat, cache=cache)
    feat_a = np.load(d / "oof_feat.npy")
    b = extract_features(P, P.cnn.backbones[0], catalog=cat, cache=cache, force=True)
    assert a["status"] == b["status"] == "computed" and np.array_equal(feat_a, np.load(d / "oof_feat.npy"))
    assert a["oof_wll"] < a["prior_wll"]
    P.features.tta = 1


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(repo, tmp_path, monkeypatch):
    import ichdlib.cnn.train as T

    cat, cache = toy_catalog(studies=8, slices=8, size=32, folds=2, test_studies=1, seed=4)
    kw = dict(backbone={"size": 32, "batch": 16, "epochs": 3}, max_steps_per_epoch=2, sampler="study",
              augment={}, schedule="seed_restarts", flat_epochs=1, restart_epochs=2)
    A = _params(repo, tmp_path / "a", **dict(kw))
    B = _params(repo, tmp_path / "b", **dict(kw))
    T.train_cnn(A, A.cnn.backbones[0], folds=[0], catalog=cat, cache=cache)

    real = T.run_epoch

    def interrupted(*args, **kwargs):
        if args[3] == 2:  # the epoch argument: stop during the third epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train_cnn(B, B.cnn.backbones[0], folds=[0], catalog=cat, cache=cache)
    d = B.work_dir / "cnn" / "test_efficientnet_32"
    assert torch.load(d / "fold0_last.pt", weights_only=True)["meta"]["epoch"] == 1
    assert not (d / "fold0_test.parquet").exists()
    epochs_run = []

    def counted(*args, **kwargs):
        epochs_run.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "run_epoch", counted)
    res = T.train_cnn(B, B.cnn.backbones[0], folds=[0], catalog=cat, cache=cache)
    assert res["folds"][0]["status"] == "resumed" and epochs_run == [2]  # only the missing epoch
    assert not res["complete"]  # fold 1 not trained: no oof.parquet yet
    da = A.work_dir / "cnn" / "test_efficientnet_32"
    for name in ("fold0_last.pt", "fold0.pt"):
        sa = torch.load(da / name, weights_only=True)["state_dict"]
        sb = torch.load(d / name, weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    la, lb = pd.read_csv(da / "fold0_log.csv"), pd.read_csv(d / "fold0_log.csv")
    timing = ["images_per_s", "seconds", "val_images_per_s"]
    pd.testing.assert_frame_equal(la.drop(columns=timing), lb.drop(columns=timing))


def test_dataloader_workers_give_the_same_training(repo, tmp_path):
    from ichdlib.cnn.train import train_cnn

    cat, cache = toy_catalog(studies=8, slices=8, size=32, folds=2, test_studies=1, seed=4)
    weights = []
    for w in (0, 2):
        P = _params(repo, tmp_path / f"w{w}", backbone={"size": 32, "batch": 8, "epochs": 2}, num_workers=w,
                    max_steps_per_epoch=3, sampler="study")
        train_cnn(P, P.cnn.backbones[0], folds=[0], catalog=cat, cache=cache)
        last = P.work_dir / "cnn" / "test_efficientnet_32" / "fold0_last.pt"
        weights.append(torch.load(last, weights_only=True)["state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
