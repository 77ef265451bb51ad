import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from ichdlib.cli import main
from ichdlib.labels import LABELS, WEIGHTS, wide_to_long, write_long_csv
from ichdlib.metrics import (
    calibration,
    per_class_auc,
    per_class_log_loss,
    prior_baseline,
    weighted_log_loss,
)


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < [0.14, 0.01, 0.05, 0.04, 0.05, 0.06]).astype(float)
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.7 * y + 0.3 * rng.random((n, 6)), 0, 1)
    p[0, 0] = 0.0  # exercises clipping
    p[1, 1] = 1.0
    return y, p


def test_weighted_log_loss_equals_sklearn_over_long_rows():
    y, p = _data()
    w = np.tile(WEIGHTS, (len(y), 1))
    ref = log_loss(y.ravel(), np.clip(p, 1e-7, 1 - 1e-7).ravel(), sample_weight=w.ravel(), labels=[0, 1])
    assert weighted_log_loss(y, p) == pytest.approx(ref, rel=1e-9)


def test_any_counts_twice():
    y = np.zeros((1, 6))
    p_any = np.full((1, 6), 1e-7)
    p_any[0, 0] = 0.5
    p_sub = np.full((1, 6), 1e-7)
    p_sub[0, 1] = 0.5
    assert weighted_log_loss(y, p_any) == pytest.approx(2 * weighted_log_loss(y, p_sub), rel=1e-3)


def test_per_class_log_loss_and_auc():
    y, p = _data()
    ll = per_class_log_loss(y, p)
    assert list(ll) == list(LABELS)
    assert sum(WEIGHTS[k] * ll[c] for k, c in enumerate(LABELS)) / WEIGHTS.sum() == pytest.approx(
        weighted_log_loss(y, p))
    auc = per_class_auc(y, p)
    assert all(v is None or v > 0.8 for v in auc.values())
    y2 = y.copy()
    y2[:, 1] = 0
    assert per_class_auc(y2, p)["epidural"] is None


def test_calibration_is_zero_for_perfect_frequencies_and_positive_otherwise():
    rng = np.random.default_rng(1)
    p = rng.random((20000, 6))
    y = (rng.random((20000, 6)) < p).astype(float)
    ece, curve = calibration(y, p, bins=10)
    assert ece < 0.02
    assert set(curve["label"]) == set(LABELS) and len(curve) == 60
    ece_bad, _ = calibration(y, np.clip(p * 0.3, 0, 1))
    assert ece_bad > 0.2


def test_prior_baseline_predicts_training_frequency():
    y, _ = _data()
    p = prior_baseline(y, 5)
    np.testing.assert_allclose(p[3], np.clip(y.mean(axis=0), 1e-7, 1 - 1e-7))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        weighted_log_loss(np.zeros((3, 5)), np.zeros((3, 5)))


def test_score_command_reads_kaggle_files(tmp_path, capsys):
    y, p = _data(50)
    ids = [f"ID_{i:09x}" for i in range(50)]
    truth = pd.DataFrame(y, columns=LABELS, index=pd.Index(ids, name="sop_uid"))
    pred = pd.DataFrame(p, columns=LABELS, index=pd.Index(ids, name="sop_uid"))
    long_truth = wide_to_long(truth)
    # duplicated label rows are tolerated, as in the real stage_2_train.csv
    pd.concat([long_truth, long_truth.iloc[:7]]).to_csv(tmp_path / "t.csv", index=False)
    write_long_csv(pred, tmp_path / "p.csv", float_format="%.10f")
    assert main(["score", "--truth", str(tmp_path / "t.csv"), "--pred", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert f"weighted log loss: {weighted_log_loss(y, p):.5f}" in out
    assert "subdural" in out
    write_long_csv(pred.iloc[:10], tmp_path / "short.csv")
    assert main(["score", "--truth", str(tmp_path / "t.csv"), "--pred", str(tmp_path / "short.csv")]) == 2
    assert "40 image(s) have no prediction" in capsys.readouterr().err


def test_score_refuses_a_truth_file_that_is_not_0_or_1(tmp_path, capsys):
    """An answer key is labels: 0.5 or 'yes' there is a one-line error naming the file and row, not a score."""
    from ichdlib.cli import main

    truth = tmp_path / "truth.csv"
    truth.write_text("ID,Label\nID_a_epidural,0\nID_a_intraparenchymal,0\nID_a_intraventricular,0\n"
                     "ID_a_subarachnoid,0\nID_a_subdural,0.5\nID_a_any,1\n")
    pred = tmp_path / "pred.csv"
    pred.write_text(truth.read_text().replace(",0.5\n", ",0.4\n"))
    assert main(["score", "--truth", str(truth), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err
    assert "truth.csv" in err and "0.5" in err and len(err.strip().splitlines()) == 1
