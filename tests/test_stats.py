"""ichdlib.stats: the fast bootstrap paths equal the generic one, DeLong matches its definition, rates."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ichdlib import stats
from ichdlib.metrics import weighted_log_loss


def _data(n_groups=40, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, size=n_groups)
    groups = np.repeat([f"P{g:03d}" for g in rng.permutation(n_groups)], sizes)
    n = len(groups)
    y = (rng.random((n, 6)) < 0.3).astype(float)
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.6 * y + rng.random((n, 6)) * 0.5, 0, 1)
    p[:5, 0] = p[5, 0]  # ties
    return y, p, groups


def test_wll_ci_equals_generic_bootstrap_over_groups():
    y, p, groups = _data()
    fast = stats.wll_ci(y, p, groups=groups, n_boot=200, seed=3)
    slow = stats.bootstrap_ci(weighted_log_loss, y, p, groups=groups, n_boot=200, seed=3)
    assert fast == pytest.approx(slow, abs=1e-12)
    assert fast[0] < weighted_log_loss(y, p) < fast[1]


def test_auc_ci_equals_generic_bootstrap_with_ties():
    y, p, groups = _data(seed=1)
    fast = stats.auc_ci(y[:, 0], p[:, 0], groups=groups, n_boot=150, seed=7)
    slow = stats.bootstrap_ci(roc_auc_score, y[:, 0], p[:, 0], groups=groups, n_boot=150, seed=7)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_group_bootstrap_is_wider_than_row_bootstrap_when_groups_are_clustered():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 20)
    level = rng.random(30)[groups]  # each group shares its predictions: strongly clustered
    y = (rng.random(len(groups)) < 0.5).astype(float)
    p = np.clip(level + 0.05 * rng.random(len(groups)), 0, 1)
    rows = stats.wll_ci(y, p, n_boot=300)
    grouped = stats.wll_ci(y, p, groups=groups, n_boot=300)
    assert grouped[1] - grouped[0] > 1.5 * (rows[1] - rows[0])


def test_interval_is_seeded_and_none_when_undefined():
    y, p, groups = _data()
    assert stats.wll_ci(y, p, groups, n_boot=50, seed=1) == stats.wll_ci(y, p, groups, n_boot=50, seed=1)
    assert stats.wll_ci(y, p, groups, n_boot=50, seed=1) != stats.wll_ci(y, p, groups, n_boot=50, seed=2)
    assert stats.auc_ci(np.zeros(10), np.linspace(0, 1, 10), n_boot=20) is None


def test_delong_matches_sklearn_and_the_variance_definition():
    rng = np.random.default_rng(4)
    y = rng.random(60) < 0.4
    p = np.clip(0.3 * y + rng.random(60), 0, 1)
    auc, lo, hi = stats.delong_ci(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p))
    # structural components by brute force
    x, z = p[y], p[~y]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = np.sqrt(v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(z))
    assert (hi - lo) / 2 == pytest.approx(1.959964 * se, rel=1e-5)


def test_delong_paired_identical_models_and_a_clear_difference():
    rng = np.random.default_rng(5)
    y = rng.random(200) < 0.5
    good = np.clip(0.5 * y + 0.5 * rng.random(200), 0, 1)
    bad = rng.random(200)
    same = stats.delong_paired(y, good, good)
    assert same["delta"] == 0 and same["p_value"] == 1.0 and not same["excludes_zero"]
    diff = stats.delong_paired(y, good, bad)
    assert diff["delta"] > 0.3 and diff["excludes_zero"] and diff["p_value"] < 1e-6
    assert diff["auc1"] == pytest.approx(roc_auc_score(y, good))


def test_paired_bootstrap_and_paired_wll_agree_in_sign_and_zero_for_self():
    y, p, groups = _data(seed=2)
    worse = np.clip(p * 0.5 + 0.25, 0, 1)
    fast = stats.paired_wll(y, p, worse, groups=groups, n_boot=200)
    slow = stats.paired_bootstrap(weighted_log_loss, [y, p], [y, worse], groups=groups, n_boot=200)
    assert fast["delta"] == pytest.approx(slow["delta"])
    assert (fast["lo"], fast["hi"]) == pytest.approx((slow["lo"], slow["hi"]), abs=1e-12)
    assert fast["excludes_zero"] and fast["hi"] < 0
    self_cmp = stats.paired_wll(y, p, p, groups=groups, n_boot=50)
    assert self_cmp["delta"] == 0 and not self_cmp["excludes_zero"]


def test_binary_rates_counts_and_wilson():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.3, 0.2, 0.6])
    r = stats.binary_rates(y, p, 0.5)
    assert (r["tp"], r["fn"], r["tn"], r["fp"]) == (3, 1, 3, 1)
    assert r["sensitivity"] == 0.75 and r["specificity"] == 0.75 and r["ppv"] == 0.75
    lo, hi = r["sensitivity_ci"]
    assert lo < 0.75 < hi and 0 <= lo and hi <= 1
    assert stats.binary_rates(np.zeros(4), np.ones(4), 0.5)["sensitivity"] is None
    assert stats.wilson_ci(0, 0) is None


def test_groups_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="groups has 3 entries for 4 rows"):
        stats.wll_ci(np.zeros(4), np.zeros(4), groups=[1, 2, 3])
