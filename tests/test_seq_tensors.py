"""Pre-assembled study tensors (ichdlib.seq.inputs.StudyTensors, epoch_plan) give what item + collate give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichdlib.seq.inputs import SeqInputs, collate, epoch_plan


def _inputs(lengths=(5, 12, 1, 30, 9), seed=0, shuffle=True):
    rng = np.random.default_rng(seed)
    N = sum(lengths)
    study = np.concatenate([[f"s{i}"] * L for i, L in enumerate(lengths)])
    z = np.concatenate([np.sort(rng.normal(size=L)) * 5 for L in lengths])
    order = rng.permutation(N) if shuffle else np.arange(N)  # rows need not be in study order
    return SeqInputs(sop_uid=np.array([f"ID_{i}" for i in range(N)])[order], study_uid=study[order],
                     patient_id=study[order], fold=np.zeros(N, int), z=z[order],
                     feats=[rng.normal(size=(N, d)).astype(np.float16) for d in (8, 5)],
                     probs=rng.random((N, 2, 6)).astype(np.float32), y=(rng.random((N, 6)) < 0.3).astype(np.float32))


def _same(a, b):
    assert a["fea"].shape == b["fea"].shape and a["X"].shape == b["X"].shape
    for k in ("fea", "X", "y", "mask", "lengths"):
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-6, atol=1e-6, msg=k)
    for r1, r2 in zip(a["rows"], b["rows"], strict=True):
        np.testing.assert_array_equal(r1, r2)


@pytest.mark.parametrize("reverse", [False, True])
def test_whole_studies_match_collate(reverse):
    inp = _inputs()
    st = inp.tensors("cpu")
    studies = np.array([3, 0, 2, 1])
    idx, lens = st.whole(studies, reverse=reverse)
    _same(st.batch(idx, lens), collate([inp.item(int(s), reverse=reverse) for s in studies]))


def test_epoch_plan_crops_match_items():
    inp = _inputs(lengths=(30, 11, 4, 25, 10, 13))
    st = inp.tensors("cpu")
    idx, lens = epoch_plan(st, np.arange(6), np.random.default_rng(5), crop=8, subsample_p=0.5, reverse_p=0.5)
    assert (lens <= 8).all() and sorted(len(set(r[:n])) for r, n in zip(idx, lens, strict=True)) == sorted(lens)
    b = st.batch(idx, lens)
    items = []
    for r in b["rows"]:
        s = int(np.flatnonzero([inp.study_uid[r[0]] == inp.study_uid[q[0]] for q in inp.study_rows])[0])
        items.append(inp.item(s, rows=r))  # the rows in the order fed: item recomputes z steps for them
    _same(b, collate(items))
    # each crop is a contiguous run of the study (step 1 or 2 in z order, maybe reversed)
    seen_sub = seen_rev = False
    for r in b["rows"]:
        s = [q for q in inp.study_rows if inp.study_uid[q[0]] == inp.study_uid[r[0]]][0]
        where = np.array([np.flatnonzero(s == x)[0] for x in r])
        d = np.diff(where)
        assert len(set(d.tolist())) <= 1 and (len(d) == 0 or abs(d[0]) in (1, 2))
        seen_sub |= bool(len(d) and abs(d[0]) == 2)
        seen_rev |= bool(len(d) and d[0] < 0)
    assert seen_sub and seen_rev


def test_memmap_features_stay_on_disk_and_match(tmp_path):
    inp = _inputs(shuffle=False)
    ref = collate([inp.item(s) for s in range(5)])
    feats = []
    for k, f in enumerate(inp.feats):
        mm = np.lib.format.open_memmap(tmp_path / f"f{k}.npy", mode="w+", dtype=np.float16, shape=f.shape)
        mm[:] = f
        mm.flush()
        feats.append(np.load(tmp_path / f"f{k}.npy", mmap_mode="r"))
    inp.feats = feats
    st = inp.tensors("cpu")
    assert all(isinstance(f, np.memmap) for f in st.feats)
    idx, lens = st.whole(np.arange(5))
    _same(st.batch(idx, lens), ref)
