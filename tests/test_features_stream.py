"""Streaming assembly of the fold parts (ichdlib.cnn.features.assemble_parts) and plot sampling."""

from __future__ import annotations

import numpy as np

from ichdlib.cnn.features import assemble_parts, feature_sample, sample_rows


def _parts(out, fold_of, n_test, dim, seed=0):
    rng = np.random.default_rng(seed)
    folds = sorted(set(fold_of.tolist()))
    parts = {}
    for k in folds:
        n = int((fold_of == k).sum())
        p = {"f_va": rng.normal(size=(n, dim)).astype(np.float16), "p_va": rng.random((n, 6)),
             "f_te": rng.normal(size=(n_test, dim)).astype(np.float16), "p_te": rng.random((n_test, 6))}
        np.savez(out / f"part_fold{k}.npz", **p)
        parts[k] = p
    return folds, parts


def test_assembly_matches_the_in_memory_result(tmp_path):
    fold_of = np.random.default_rng(1).integers(0, 3, 500)
    folds, parts = _parts(tmp_path, fold_of, 70, 24)
    dim, oof_prob, test_folds = assemble_parts(tmp_path, folds, fold_of, 70)
    assert dim == 24 and test_folds.shape == (3, 70, 6)
    oof = np.load(tmp_path / "oof_feat.npy")
    test = np.load(tmp_path / "test_feat.npy")
    assert oof.dtype == test.dtype == np.float16
    for k in folds:
        np.testing.assert_array_equal(oof[fold_of == k], parts[k]["f_va"])
        np.testing.assert_array_equal(oof_prob[fold_of == k], parts[k]["p_va"])
    want = np.mean([parts[k]["f_te"].astype(np.float32) for k in folds], axis=0).astype(np.float16)
    np.testing.assert_array_equal(test, want)
    assert not list(tmp_path.glob("*.tmp*"))


def test_mismatched_part_names_the_file(tmp_path):
    fold_of = np.array([0, 0, 1, 1, 1])
    folds, _ = _parts(tmp_path, fold_of, 3, 4)
    fold_of[0] = 1
    try:
        assemble_parts(tmp_path, folds, fold_of, 3)
    except ValueError as exc:
        assert "part_fold0.npz" in str(exc) and "force=True" in str(exc)
    else:
        raise AssertionError("a part that does not match the catalog was accepted")
    assert not (tmp_path / "oof_feat.npy").exists()


def test_sample_reads_only_the_sampled_rows(tmp_path):
    arr = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=(1000, 8))
    arr[:] = np.arange(1000)[:, None]
    arr.flush()
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    y = np.arange(1000) % 2
    f, ys = feature_sample(mm, y, n=100, seed=3)
    assert f.shape == (100, 8) and f.dtype == np.float32
    idx = f[:, 0].astype(int)
    assert len(set(idx)) == 100 and (np.diff(idx) > 0).all() and (ys == idx % 2).all()
    assert len(sample_rows(50, 100)) == 50
