"""Sequence models: masking, flip TTA, shapes, level-2 folds, training/resume on fabricated level-1 outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import fabricate_level1, smoke, two_backbones

from ichdlib.config import Params
from ichdlib.labels import LABELS
from ichdlib.seq.infer import predict_studies
from ichdlib.seq.inputs import (
    SeqInputs,
    StudyDataset,
    apply_fold_norm,
    collate,
    fold_norm_stats,
    get_X,
    load_inputs,
    normalize_test,
    z_steps,
)
from ichdlib.seq.models import SeqModel2, build_seq_model, init_output_bias, masked_weighted_bce, model_logits
from ichdlib.seq.train import _signature, check_level2_folds, fold_split, train_fold, train_seq

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Fabricated level-1 outputs (the contract's files), shared with test_ensemble.py
# ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def fake(tmp_path) -> tuple[Params, dict]:
    P = smoke(tmp_path, **two_backbones())
    return P, fabricate_level1(P)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------
def test_get_X_mean_cyclic_differences_raw():
    p = np.random.default_rng(0).random((4, 3, 6)).astype(np.float32)
    X = get_X(p)
    assert X.shape == (4, 7, 6)
    np.testing.assert_allclose(X[:, 0], p.mean(1), rtol=1e-6)
    np.testing.assert_allclose(X[:, 1], p[:, 0] - p[:, 1])
    np.testing.assert_allclose(X[:, 3], p[:, 2] - p[:, 0])  # cyclic
    np.testing.assert_allclose(X[:, 4:], p)


def test_z_steps_units_and_sign():
    z = np.array([0.0, 5.0, 10.0, 20.0])
    np.testing.assert_allclose(z_steps(z, 5.0), [1, 1, 2, 2])
    np.testing.assert_allclose(z_steps(z[::-1], 5.0), [-2, -1, -1, -1])
    assert z_steps(np.array([3.0]), 1.0).tolist() == [0.0]


def test_inputs_alignment_and_fold_check(fake):
    P, info = fake
    inp = load_inputs(P, "train")
    assert inp.n_cnn == 2 and inp.dim == 32 and inp.x_channels == 6
    cat = info["catalog"]
    assert len(inp.study_rows) == cat[cat.split == "train"].study_uid.nunique()
    for rows in inp.study_rows:  # each study's rows in z order
        assert np.all(np.diff(inp.z[rows]) > 0)
    # a probability file out of catalog order is refused with the file named
    path = P.work_dir / "features" / "resnet18_48" / "oof_prob.parquet"
    pd.read_parquet(path).iloc[::-1].to_parquet(path, index=False)
    with pytest.raises(ValueError, match="oof_prob.parquet.*catalog order"):
        load_inputs(P, "train")


def test_level2_folds_share_no_patient(fake):
    P, _ = fake
    inp = load_inputs(P, "train")
    check_level2_folds(inp)
    for k in sorted(set(inp.fold)):
        tr, va = fold_split(inp, k)
        pt = {inp.patient_id[inp.study_rows[s][0]] for s in tr}
        pv = {inp.patient_id[inp.study_rows[s][0]] for s in va}
        assert tr.size and va.size and not (pt & pv)
        assert set(inp.fold[np.concatenate([inp.study_rows[s] for s in va])]) == {k}
    inp.fold = inp.fold.copy()
    inp.fold[inp.study_rows[0][0]] = 1 - inp.fold[inp.study_rows[0][0]]  # one slice moved to another fold
    with pytest.raises(ValueError, match="leak"):
        check_level2_folds(inp)


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
def _toy_inputs(n_cnn: int, lengths=(5, 9, 13), seed: int = 0, dims=None) -> SeqInputs:
    rng = np.random.default_rng(seed)
    N = sum(lengths)
    dims = dims or [16 + 4 * k for k in range(n_cnn)]
    study = np.concatenate([[f"s{i}"] * L for i, L in enumerate(lengths)])
    z = np.concatenate([np.arange(L) * 2.5 for L in lengths])
    return SeqInputs(sop_uid=np.array([f"ID_{i}" for i in range(N)]), study_uid=study, patient_id=study,
                     fold=np.zeros(N, int), z=z, feats=[rng.normal(size=(N, d)).astype(np.float16) for d in dims],
                     probs=rng.random((N, n_cnn, 6)).astype(np.float32),
                     y=(rng.random((N, 6)) < 0.3).astype(np.float32))


@pytest.mark.parametrize("n_cnn", [1, 2, 3])
@pytest.mark.parametrize("name", ["seq1", "seq2"])
def test_shapes_for_one_to_three_backbones(name, n_cnn):
    inp = _toy_inputs(n_cnn)
    b = collate([inp.item(s) for s in range(3)])
    assert b["fea"].shape == (3, 13, n_cnn, inp.dim) and b["X"].shape == (3, 2 * n_cnn + 2, 13, 6)
    model = build_seq_model(name, inp.dim, n_cnn, inp.x_channels, mid=16, reduce_dim=8, hidden=6, conv=(16, 8))
    outs = model_logits(model, b)
    assert len(outs) == (2 if name == "seq2" else 1)
    for o in outs:
        assert o.shape == (3, 13, 6)
        assert torch.all(o[0, 5:] == 0)  # padded positions are zero


def _pad_more(b: dict, extra: int, garbage: float = 0.0) -> dict:
    """The same batch with ``extra`` more padded positions, filled with ``garbage``."""
    out = dict(b)
    B, L = b["mask"].shape
    out["fea"] = torch.cat([b["fea"], torch.full((B, extra, *b["fea"].shape[2:]), garbage)], 1)
    out["X"] = torch.cat([b["X"], torch.full((B, b["X"].shape[1], extra, 6), garbage)], 2)
    out["y"] = torch.cat([b["y"], torch.ones(B, extra, 6)], 1)
    out["mask"] = torch.cat([b["mask"], torch.zeros(B, extra, dtype=torch.bool)], 1)
    # padding inside the original length too: fill the shorter studies' padding with garbage
    for j, n in enumerate(b["lengths"].tolist()):
        out["fea"][j, n:] = garbage
        out["X"][j, :, n:] = garbage
    return out


@pytest.mark.parametrize("slice_input", ["pooled", "logits"])
@pytest.mark.parametrize("name", ["seq1", "seq2"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_padding_changes_neither_outputs_nor_loss(name, train_mode, slice_input):
    torch.manual_seed(0)
    inp = _toy_inputs(2)
    model = build_seq_model(name, inp.dim, 2, inp.x_channels, mid=16, reduce_dim=8, hidden=6, conv=(16, 8),
                            dropout=0.0, slice_input=slice_input)
    model.train(train_mode)  # in train mode BatchNorm uses batch statistics: they must ignore padding
    b1 = collate([inp.item(s) for s in range(3)])
    b2 = _pad_more(b1, 11, garbage=7.0)
    o1, o2 = model_logits(model, b1), model_logits(model, b2)
    for j, n in enumerate(b1["lengths"].tolist()):
        for a, c in zip(o1, o2, strict=True):
            torch.testing.assert_close(a[j, :n], c[j, :n], rtol=1e-5, atol=1e-5)
    l1 = sum(masked_weighted_bce(o, b1["y"], b1["mask"]) for o in o1)
    l2 = sum(masked_weighted_bce(o, b2["y"], b2["mask"]) for o in o2)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    if not train_mode:  # eval: a study alone equals the same study padded in a batch
        alone = model_logits(model, collate([inp.item(0)]))[0]
        torch.testing.assert_close(alone[0], o1[0][0, :5], rtol=1e-5, atol=1e-5)


def test_masked_batchnorm_ignores_padding_in_running_stats():
    torch.manual_seed(0)
    inp = _toy_inputs(1)
    m1 = SeqModel2(inp.dim, 1, inp.x_channels, mid=16, reduce_dim=8, hidden=6, conv=(16, 8), dropout=0.0)
    m2 = SeqModel2(inp.dim, 1, inp.x_channels, mid=16, reduce_dim=8, hidden=6, conv=(16, 8), dropout=0.0)
    m2.load_state_dict(m1.state_dict())
    b = collate([inp.item(s) for s in range(3)])
    model_logits(m1.train(), b)
    model_logits(m2.train(), _pad_more(b, 20, garbage=-3.0))
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        if "running" in k:
            torch.testing.assert_close(v1, v2, msg=k)


def test_loss_is_the_weighted_log_loss_of_real_slices():
    from ichdlib.metrics import weighted_log_loss

    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(2, 7, 6)))
    y = torch.tensor((rng.random((2, 7, 6)) < 0.4).astype(float))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :7], mask[1, :3] = True, True
    got = float(masked_weighted_bce(logits, y, mask))
    p = torch.sigmoid(logits)[mask].numpy()
    assert got == pytest.approx(weighted_log_loss(y[mask].numpy(), p), rel=1e-6)


@pytest.mark.parametrize("name", ["seq1", "seq2"])
def test_flip_tta_averages_probabilities_of_both_directions(name):
    """TTA = mean of the forward probabilities and the flipped-back probabilities of the reversed study,
    whose inputs are the same slices in the other order with the z channel recomputed (negative)."""
    torch.manual_seed(0)
    inp = _toy_inputs(2, lengths=(9, 4))
    model = build_seq_model(name, inp.dim, 2, inp.x_channels, mid=16, reduce_dim=8, hidden=6, conv=(16, 8)).eval()
    p = predict_studies([model], inp, batch=2)
    fwd, bwd = inp.item(0), inp.item(0, reverse=True)
    np.testing.assert_array_equal(bwd["rows"], fwd["rows"][::-1])
    np.testing.assert_array_equal(bwd["fea"], fwd["fea"][::-1])
    np.testing.assert_array_equal(bwd["X"][:-1], fwd["X"][:-1, ::-1])
    np.testing.assert_allclose(bwd["X"][-1, :, 0], -fwd["X"][-1, ::-1, 0][np.r_[1:9, 8]])
    np.testing.assert_allclose(fwd["X"][-1, :, 0], 1.0)
    with torch.no_grad():
        pf = torch.sigmoid(model_logits(model, collate([fwd]))[0])[0].numpy()
        pb = torch.sigmoid(model_logits(model, collate([bwd]))[0])[0].numpy()[::-1]
    np.testing.assert_allclose(p[fwd["rows"]], (pf + pb) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(pf, pb, atol=1e-4)  # the directions really differ: the average matters
    # TTA is symmetric: swapping the roles of the two directions gives the same, flipped
    with torch.no_grad():
        qf = torch.sigmoid(model_logits(model, collate([bwd]))[0])[0].numpy()
        qb = torch.sigmoid(model_logits(model, collate([fwd]))[0])[0].numpy()[::-1]
    np.testing.assert_allclose(((qf + qb) / 2)[::-1], p[fwd["rows"]], rtol=1e-5, atol=1e-6)
    # several models: the mean of each model's TTA probabilities
    m2 = build_seq_model(name, inp.dim, 2, inp.x_channels, mid=16, reduce_dim=8, hidden=6, conv=(16, 8)).eval()
    both = predict_studies([model, m2], inp)
    np.testing.assert_allclose(both, (p + predict_studies([m2], inp)) / 2, rtol=1e-6)


def test_train_augmentations_crop_subsample_reverse():
    inp = _toy_inputs(1, lengths=(30,))
    ds = StudyDataset(inp, np.array([0]), train=True, crop=8, subsample_p=1.0, reverse_p=1.0, seed=3)
    it = ds[0]
    assert len(it["rows"]) == 8
    steps = np.diff(it["rows"])
    assert np.all(steps == -2)  # every other slice, reversed
    np.testing.assert_allclose(it["X"][-1, :, 0], -2.0)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def test_train_seq_writes_outputs_skips_and_resumes(fake):
    P, info = fake
    res = train_seq(P, "seq2")
    cat = info["catalog"]
    out = P.work_dir / "seq" / "seq2"
    for k in range(P.ingest.folds):
        assert (out / f"fold{k}.pt").is_file() and (out / f"fold{k}_last.pt").is_file()
    assert res.oof.sop_uid.tolist() == cat[cat.split == "train"].sop_uid.tolist()
    assert res.test.sop_uid.tolist() == cat[cat.split == "test"].sop_uid.tolist()
    assert list(res.oof.columns) == ["sop_uid", "fold", *LABELS] and list(res.test.columns) == ["sop_uid", *LABELS]
    v = res.oof[list(LABELS)].to_numpy()
    assert np.isfinite(v).all() and (v > 0).all() and (v < 1).all()
    assert set(res.history.fold) == set(range(P.ingest.folds)) and len(res.history) == P.seq.epochs * P.ingest.folds
    # finished: skipped (files untouched)
    mtime = (out / "oof.parquet").stat().st_mtime_ns
    again = train_seq(P, "seq2")
    assert (out / "oof.parquet").stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again.oof, res.oof)
    # interrupted after the last epoch checkpoint: the fold is finished from fold0_last.pt, not retrained
    (out / "fold0.pt").unlink()
    (out / "fold0_log.csv").unlink()
    inp = load_inputs(P, "train")
    log = train_fold(P, "seq2", inp, 0, out, signature=_signature(P, "seq2", inp))
    pd.testing.assert_frame_equal(log, res.history[res.history.fold == 0].reset_index(drop=True))
    # changed settings retrain; force retrains
    P2 = smoke(Path(P.root), **two_backbones(), seq={"epochs": 1})
    res2 = train_seq(P2, "seq2")
    assert len(res2.history) == P.ingest.folds


def test_training_is_seeded(fake):
    P, _ = fake
    a = train_seq(P, "seq1")
    b = train_seq(P, "seq1", force=True)
    pd.testing.assert_frame_equal(a.oof, b.oof)


def test_interrupted_fold_resumes_to_the_same_result(fake, monkeypatch):
    """A fold killed after its first epoch resumes from ``fold<k>_last.pt`` and ends exactly where an
    uninterrupted run ends (same weights, same log)."""
    import ichdlib.seq.train as seq

    P0, _ = fake
    P = smoke(Path(P0.root), **two_backbones(), seq={"epochs": 3})
    inp = load_inputs(P, "train")
    sig = _signature(P, "seq2", inp)
    full_dir, cut_dir = P.work_dir / "full", P.work_dir / "cut"
    full_dir.mkdir(parents=True)
    cut_dir.mkdir(parents=True)
    full = train_fold(P, "seq2", inp, 1, full_dir, signature=sig)

    real, calls = seq.predict_studies, {"n": 0}

    def dies_in_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(seq, "predict_studies", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_fold(P, "seq2", inp, 1, cut_dir, signature=sig)
    assert not (cut_dir / "fold1.pt").exists()
    assert torch.load(cut_dir / "fold1_last.pt", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(seq, "predict_studies", real)
    resumed = train_fold(P, "seq2", inp, 1, cut_dir, signature=sig)
    cols = ["fold", "epoch", "lr", "train_loss", "val_wll"]
    pd.testing.assert_frame_equal(resumed[cols], full[cols])
    a = torch.load(full_dir / "fold1.pt", weights_only=True)["state_dict"]
    b = torch.load(cut_dir / "fold1.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_output_heads_start_at_the_prior():
    from ichdlib.seq.models import init_output_bias

    prior = [0.15, 0.01, 0.05, 0.04, 0.04, 0.07]
    m = build_seq_model("seq2", 16, 1, 4, mid=16, reduce_dim=8, hidden=6, conv=(16, 8))
    init_output_bias(m, prior)
    for head in (m.head, m.model1.head):
        torch.testing.assert_close(torch.sigmoid(head.bias), torch.tensor(prior))
    assert torch.all(m.model1.skip.bias == 0)


def test_logits_slice_input_reads_the_backbones_logits():
    """With ``slice_input='logits'`` seq1 ignores the pooled features and reads each backbone's logits
    from the raw-probability channels of X."""
    torch.manual_seed(0)
    inp = _toy_inputs(2)
    m = build_seq_model("seq1", inp.dim, 2, inp.x_channels, mid=16, reduce_dim=8, hidden=6, slice_input="logits")
    assert m.fc1.in_features == 6
    b = collate([inp.item(s) for s in range(3)])
    vec = m.slice_vectors(b["fea"], b["X"])
    n = int(b["lengths"][0])
    torch.testing.assert_close(torch.sigmoid(vec[0, :n]), torch.from_numpy(inp.probs[inp.study_rows[0]]))
    m.eval()
    out = model_logits(m, b)[0]
    b2 = dict(b, fea=torch.randn_like(b["fea"]))  # the pooled features do not matter
    torch.testing.assert_close(model_logits(m, b2)[0], out)


@pytest.mark.parametrize("name", ["seq1", "seq2"])
def test_residual_heads_start_at_the_backbones_mean(name):
    """``residual=True``: after init_output_bias every head outputs the logit of the backbones' mean
    probability (channel 0 of X), and training moves it away from there."""
    torch.manual_seed(0)
    inp = _toy_inputs(2)
    m = build_seq_model(name, inp.dim, 2, inp.x_channels, mid=16, reduce_dim=8, hidden=6, conv=(8, 8),
                        slice_input="logits", residual=True)
    init_output_bias(m, [0.1] * 6)
    m.eval()
    b = collate([inp.item(s) for s in range(3)])
    want = torch.logit(b["X"][:, 0].clamp(1e-4, 1 - 1e-4)) * b["mask"][..., None]
    for out in model_logits(m, b):
        torch.testing.assert_close(out, want)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    masked_weighted_bce(model_logits(m, b)[0], torch.ones_like(b["y"]), b["mask"]).backward()
    opt.step()
    m.eval()
    assert not torch.allclose(model_logits(m, b)[0], want)


def test_fold_norm_aligns_fold_models_and_maps_test_rows_per_fold():
    """Fold models with different logit scales come out with the same per-class mean and spread (the pooled
    ones); a test row from fold model k gets fold k's transform, the same as its OOF rows."""
    rng = np.random.default_rng(0)
    fold = np.repeat([0, 1, 2], 200)
    scale, shift = np.array([3.0, 1.0, 2.0])[fold], np.array([-1.0, 0.5, 0.0])[fold]
    logit = rng.normal(size=(600, 2, 6)) * scale[:, None, None] + shift[:, None, None] - 2
    probs = 1 / (1 + np.exp(-logit))
    stats = fold_norm_stats(probs, fold)
    out = np.empty_like(probs, dtype=np.float32)
    for k in range(3):
        out[fold == k] = apply_fold_norm(probs[fold == k], stats, k)
    lo = np.log(out / (1 - out))
    for k in range(3):
        np.testing.assert_allclose(lo[fold == k].mean(0), stats["ref_mu"], atol=1e-3)
        np.testing.assert_allclose(lo[fold == k].std(0), stats["ref_sd"], rtol=1e-3)
    assert stats["folds"][0]["sd"][0][0] > 2 * stats["folds"][1]["sd"][0][0]
    # JSON round trip (bundle meta): string fold keys work the same
    js = json.loads(json.dumps(stats))
    np.testing.assert_allclose(apply_fold_norm(probs[:5], js, 0), out[:5], rtol=1e-5)
    # test rows: fold k's model output gets fold k's transform, then the fold mean
    te = probs[[0, 200, 400]]  # one row from each fold model, as if all three predicted the same slice
    fold_probs = np.stack([np.repeat(te[k: k + 1], 4, axis=0) for k in range(3)])  # (3, 4, 2, 6)
    got = normalize_test(fold_probs, stats, [0, 1, 2])
    np.testing.assert_allclose(got[0], np.mean([out[0], out[200], out[400]], axis=0), rtol=1e-5)


def test_load_inputs_with_fold_norm(fake):
    """``seq.input_norm: fold`` normalises OOF rows with their fold's stats and test rows per fold model
    from notebook 03's ``test_prob_folds.npy``; the file missing is an error naming it."""
    P, _ = fake
    P.seq.input_norm = "none"
    raw_tr = load_inputs(P, "train")
    P.seq.input_norm = "fold"
    folds = sorted(set(raw_tr.fold.tolist()))
    d0 = P.work_dir / "features" / raw_tr.keys[0]
    (d0 / "test_prob_folds.npy").unlink()
    with pytest.raises(FileNotFoundError, match="test_prob_folds.npy"):
        load_inputs(P, "test")
    for key in raw_tr.keys:
        d = P.work_dir / "features" / key
        te = pd.read_parquet(d / "test_prob.parquet")[list(LABELS)].to_numpy()
        np.save(d / "test_prob_folds.npy", np.stack([te] * len(folds)))
    tr, te = load_inputs(P, "train"), load_inputs(P, "test")
    assert tr.norm == te.norm and tr.norm is not None
    k = folds[0]
    m = tr.fold == k
    np.testing.assert_allclose(tr.probs[m], apply_fold_norm(raw_tr.probs[m], tr.norm, k), rtol=1e-6)
    raw_te = np.stack([pd.read_parquet(P.work_dir / "features" / key / "test_prob.parquet")[list(LABELS)]
                       .to_numpy() for key in raw_tr.keys], axis=1)
    want = np.mean([apply_fold_norm(raw_te, tr.norm, f) for f in folds], axis=0)
    np.testing.assert_allclose(te.probs, want, rtol=1e-5)
    assert not np.allclose(tr.probs, raw_tr.probs)
