"""Ensemble: blending, the submission writer and validator, metrics.json, figures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from builders import fabricate_level1, smoke, two_backbones

from ichdlib.cli import main as ichd
from ichdlib.ensemble.blend import (
    blend,
    fit_weights,
    plot_reliability,
    plot_roc,
    plot_stages,
    run_ensemble,
    update_metrics,
    validate_submission,
)
from ichdlib.labels import LABELS, write_long_csv
from ichdlib.metrics import weighted_log_loss
from ichdlib.predictions import StagePredictions

L = list(LABELS)


def _fake_seq_outputs(P, rng) -> None:
    """seq1/seq2 outputs as the sequence stage writes them: a sharper version of the CNN probabilities."""
    cat = pd.read_parquet(P.catalog_path)
    key = P.cnn.backbones[0].key
    for name, sharp in (("seq1", 1.5), ("seq2", 2.0)):
        d = P.work_dir / "seq" / name
        d.mkdir(parents=True, exist_ok=True)
        for split in ("oof", "test"):
            df = pd.read_parquet(P.work_dir / "cnn" / key / f"{split}.parquet")
            p = df[L].to_numpy()
            if split == "oof":  # sharpen towards the truth
                y = cat.set_index("sop_uid").loc[df.sop_uid, L].to_numpy()
                p = np.clip(p + (y - p) * (1 - 1 / sharp) + rng.normal(0, 0.02, p.shape), 0.01, 0.99)
            df[L] = p
            df.to_parquet(d / f"{split}.parquet", index=False)


@pytest.fixture()
def fake_run(tmp_path):
    P = smoke(tmp_path, **two_backbones())
    info = fabricate_level1(P)
    _fake_seq_outputs(P, np.random.default_rng(0))
    return P, info


# ----------------------------------------------------------------------------------------------------
# Validator
# ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def sample(tmp_path):
    wide = pd.DataFrame(0.5, index=pd.Index(["ID_aa", "ID_bb", "ID_cc"], name="sop_uid"), columns=L)
    return write_long_csv(wide, tmp_path / "sample.csv"), wide


def _write(tmp_path, df, name="sub.csv"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_valid_submission_passes(tmp_path, sample):
    spath, wide = sample
    good = write_long_csv(wide * 0 + 0.1, tmp_path / "good.csv")
    got = validate_submission(good, spath)
    assert len(got) == 18
    shuffled = _write(tmp_path, pd.read_csv(good).sample(frac=1, random_state=0))  # row order is free
    validate_submission(shuffled, spath)


@pytest.mark.parametrize("case, pattern", [
    ("header", "header must be 'ID,Label'"),
    ("missing", r"1 ID\(s\) of the sample submission missing, first \['ID_bb_epidural'\]"),
    ("nan", "NaN or not a number, first at 'ID_aa_subdural'"),
    ("range", r"outside \[0, 1\], first at 'ID_cc_any' \(1.5\)"),
    ("duplicate", "1 duplicate ID"),
    ("malformed", "malformed ID"),
    ("extra", "not in the sample submission"),
])
def test_validator_rejects_malformed_files(tmp_path, sample, case, pattern):
    spath, _ = sample
    df = pd.read_csv(spath)
    df["Label"] = 0.2
    if case == "header":
        df = df.rename(columns={"Label": "label"})
    elif case == "missing":
        df = df[df.ID != "ID_bb_epidural"]
    elif case == "nan":
        df.loc[df.ID == "ID_aa_subdural", "Label"] = np.nan
    elif case == "range":
        df.loc[df.ID == "ID_cc_any", "Label"] = 1.5
    elif case == "duplicate":
        df = pd.concat([df, df.iloc[[3]]])
    elif case == "malformed":
        df.loc[0, "ID"] = "ID_aa_epidurall"
    elif case == "extra":
        df = pd.concat([df, pd.DataFrame({"ID": ["ID_zz_any"], "Label": [0.1]})])
    path = _write(tmp_path, df)
    with pytest.raises(ValueError, match=pattern) as err:
        validate_submission(path, spath)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------------
# Blending
# ----------------------------------------------------------------------------------------------------
def _stage(name, oof, test, fold):
    o = pd.DataFrame(oof, columns=L, index=pd.Index([f"ID_{i}" for i in range(len(oof))], name="sop_uid"))
    o["fold"] = fold
    t = pd.DataFrame(test, columns=L, index=pd.Index([f"ID_t{i}" for i in range(len(test))], name="sop_uid"))
    return StagePredictions(name, o, t)


def test_blend_mean_and_fitted_weights():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 6)) < 0.3).astype(float)
    good = np.clip(0.15 + 0.7 * y + rng.normal(0, 0.05, y.shape), 0.01, 0.99)
    noise = rng.uniform(0.01, 0.99, y.shape)
    fold = np.arange(400) % 4
    stages = [_stage("good", good, good[:10], fold), _stage("noise", noise, noise[:10], fold)]
    m = blend(stages, "mean")
    np.testing.assert_allclose(m.oof[L].to_numpy(), (good + noise) / 2)
    assert m.weights == {"good": 0.5, "noise": 0.5}
    truth = pd.DataFrame(y, columns=L, index=stages[0].oof.index)
    f = blend(stages, "fit", truth)
    assert f.weights["good"] > 0.9 and sum(f.weights.values()) == pytest.approx(1)
    assert weighted_log_loss(y, f.oof[L].to_numpy()) < weighted_log_loss(y, m.oof[L].to_numpy())
    # Two stages with independent errors: the fitted blend beats either alone, cross-fitted fold by fold.
    a, b = (1 / (1 + np.exp(-(2.5 * (2 * y - 1) + rng.normal(0, 1.5, y.shape)))) for _ in range(2))
    pair = [_stage("a", a, a[:10], fold), _stage("b", b, b[:10], fold)]
    f = blend(pair, "fit", truth)
    assert 0.2 < f.weights["a"] < 0.8 and f.note == "" and set(f.fold_weights) == {0, 1, 2, 3}
    assert weighted_log_loss(y, f.oof[L].to_numpy()) < min(weighted_log_loss(y, a), weighted_log_loss(y, b))
    np.testing.assert_allclose(f.test[L].to_numpy(), f.weights["a"] * a[:10] + f.weights["b"] * b[:10])
    w = fit_weights(np.stack([good, noise]), y)
    assert (w >= 0).all()


def test_fit_falls_back_to_the_best_member_when_the_blend_does_not_carry_over_between_folds():
    rng = np.random.default_rng(1)
    y = (rng.random((300, 6)) < 0.3).astype(float)
    fold = np.arange(300) % 3
    steady = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.05, y.shape), 0.01, 0.99)
    fickle = np.where((fold == 2)[:, None], 1 - y, y) * 0.9 + 0.05  # sharp on folds 0-1, inverted on fold 2
    stages = [_stage("steady", steady, steady[:5], fold), _stage("fickle", fickle, fickle[:5], fold)]
    truth = pd.DataFrame(y, columns=L, index=stages[0].oof.index)
    f = blend(stages, "fit", truth)
    assert f.weights == {"steady": 1.0, "fickle": 0.0} and f.fold_weights == {}
    assert "worse than its best member steady" in f.note
    np.testing.assert_allclose(f.oof[L].to_numpy(), steady)
    np.testing.assert_allclose(f.test[L].to_numpy(), steady[:5])
    assert blend(stages[:1], "fit", truth).note == ""


# ----------------------------------------------------------------------------------------------------
# The whole stage
# ----------------------------------------------------------------------------------------------------
def test_run_ensemble_submission_metrics_and_score(fake_run, capsys):
    P, info = fake_run
    update_metrics(P, {"pointing_game": {"hit_rate": 0.5}})  # written by notebook 06: must survive
    rep = run_ensemble(P)
    sub = pd.read_csv(rep.submission)
    sample = pd.read_csv(P.data_root / P.paths.sample_submission)
    assert list(sub.columns) == ["ID", "Label"] and set(sub.ID) == set(sample.ID) and len(sub) == len(sample)
    # the quarantined test image got the prior, and this is reported
    assert rep.filled_with_prior == info["quarantined"]
    cat = info["catalog"]
    prior = cat[cat.split == "train"][L].mean().to_numpy()
    q = sub[sub.ID.str.startswith(info["quarantined"][0] + "_")].set_index("ID")["Label"]
    for c, v in zip(L, prior, strict=True):
        assert q[f"{info['quarantined'][0]}_{c}"] == pytest.approx(v, abs=1e-6)
    m = json.loads((P.reports_dir / "metrics.json").read_text())
    assert m["pointing_game"] == {"hit_rate": 0.5}
    assert m["submission"]["filled_with_prior"] == info["quarantined"]
    # 2D stages are scored on notebook 03's TTA probabilities (what the sequence models read)
    assert m["submission"]["sources"]["cnn:resnet18_48"] == "features/resnet18_48"
    assert m["submission"]["sources"]["seq2"] == "seq/seq2"
    assert set(m["stages"]) == {"cnn:lcnet_050_48", "cnn:resnet18_48", "seq1", "seq2", "ensemble"}
    for s in m["stages"].values():
        for split in ("oof", "test"):
            assert {"wll", "per_class_ll", "auc", "ece"} <= set(s[split])
    # the ensemble's test score is the submission scored by `ichd score`
    assert ichd(["score", "--truth", str(P.data_root / "answer_key.csv"), "--pred", str(rep.submission), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["wll"] == pytest.approx(m["stages"]["ensemble"]["test"]["wll"], rel=1e-6)
    # stages improve on the prior, and the mean of seq1+seq2 is no worse than the worse of them
    t = rep.table
    assert t.loc["seq2", "oof_wll"] < t.loc["prior", "oof_wll"]
    assert t.loc["ensemble", "oof_wll"] <= max(t.loc["seq1", "oof_wll"], t.loc["seq2", "oof_wll"])
    # rerun: merge-update keeps everything consistent
    rep2 = run_ensemble(P)
    pd.testing.assert_frame_equal(rep.table, rep2.table)


def test_figures(fake_run):
    P, _ = fake_run
    rep = run_ensemble(P)
    y = rep.y_oof.to_numpy()
    p = rep.blend.oof.loc[rep.y_oof.index, L].to_numpy()
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score

    from ichdlib.metrics import calibration

    # stages: one OOF bar per stage at its loss, the prior as a dashed line at its loss
    fig = plot_stages(rep.table)
    ax = fig.axes[0]
    stages = rep.table.drop(index="prior")
    oof_bars = ax.containers[0]
    np.testing.assert_allclose([b.get_height() for b in oof_bars], stages["oof_wll"].astype(float), rtol=1e-9)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(stages.index)
    assert any(np.allclose(line.get_ydata(), rep.table.loc["prior", "oof_wll"]) for line in ax.lines)
    # ROC: per label with both classes, a curve from (0, 0) to (1, 1) whose area is the reported AUC
    fig = plot_roc(y, {"ensemble": p})
    for k, ax in enumerate(fig.axes):
        if 0 < y[:, k].sum() < len(y):
            fpr, tpr = (np.asarray(a, float) for a in ax.lines[1].get_data())
            assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
            assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y[:, k], p[:, k]), abs=1e-9)
            assert ax.get_legend().get_texts()[0].get_text().endswith(f"{roc_auc_score(y[:, k], p[:, k]):.3f}")
    # reliability: the title carries the ECE the metrics module computes; one curve per label
    ece, _ = calibration(y, p, 10)
    fig = plot_reliability(y, p)
    assert f"ECE {ece:.4f}" in fig.axes[0].get_title() and len(fig.axes[0].lines) == 1 + len(L)

    plt.close("all")


@pytest.mark.slow
def test_notebooks_04_05_run_headless_on_fabricated_inputs(tmp_path, repo):
    """Notebooks 04 and 05 under papermill (as `ichd run` does) with the smoke params on fabricated
    level-1 outputs: sequence models trained, submission and metrics.json written, figures saved."""
    from ichdlib.run import run_pipeline

    over = {"root": str(tmp_path), **two_backbones()}
    P = smoke(tmp_path, **two_backbones())
    fabricate_level1(P)
    res = run_pipeline(repo / "params" / "smoke.yaml", only=["04", "05"], overrides=over, html=False)
    assert [r.status for r in res] == ["ran", "ran"]
    for m in P.seq.models:
        assert (P.work_dir / "seq" / m / "oof.parquet").is_file()
    m = json.loads((P.reports_dir / "metrics.json").read_text())
    assert {"seq1", "seq2", "ensemble"} <= set(m["stages"])
    figs = {f.name for f in (P.reports_dir / "figures").glob("*.png")}
    assert {"04_learning_curves.png", "05_stages.png", "05_roc.png", "05_reliability.png"} <= figs
    validate_submission(P.reports_dir / "submission.csv", P.data_root / P.paths.sample_submission)
