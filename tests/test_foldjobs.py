"""``cnn.fold_jobs`` / ``seq.fold_jobs``: folds trained side by side in spawned worker processes give the results of training them
one after another, report their epochs through the parent, fail loudly per fold, and change no stamp."""

from __future__ import annotations

import os

import pytest

TIMING = ["images_per_s", "seconds", "val_images_per_s"]


def _params(repo, root, fold_jobs: int):
    from ichdlib.config import load_params

    over = {"root": str(root), "device": "cpu", "seed": 5,
            "cnn": {"backbones": [{"name": "test_efficientnet", "size": 32, "batch": 16, "epochs": 2, "lr": 0.003}],
                    "sampler": "study", "max_steps_per_epoch": 2, "schedule": "cosine", "augment": {},
                    "cpu_threads": 1, "fold_jobs": fold_jobs}}
    return load_params(repo / "params" / "smoke.yaml", over)


def _spy(module, pools: list):
    """``module.run_fold_jobs`` recording each pool's jobs and workers (the run goes on as usual)."""
    real = module.run_fold_jobs

    def spied(target, jobs, workers, *args, **kw):
        pools.append((sorted(jobs), workers))
        return real(target, jobs, workers, *args, **kw)
    return spied


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Two folds of a tiny toy catalog; the cache as a read-only map (as ``open_slices`` gives it), which the
    workers open again rather than receive pickled."""
    import numpy as np
    from builders import toy_catalog

    cat, cache = toy_catalog(studies=8, slices=8, size=32, folds=2, test_studies=1, seed=3)
    path = tmp_path_factory.mktemp("cache") / "cache_32.npy"
    np.save(path, cache)
    return cat, np.load(path, mmap_mode="r")


@pytest.fixture(scope="module")
def both(repo, toy, tmp_path_factory):
    """The same training with ``fold_jobs`` 1 and 2, and what each printed."""
    import contextlib
    import io

    import ichdlib.cnn.train as T

    cat, cache = toy
    out, pools = {}, []
    spied = _spy(T, pools)

    for jobs in (1, 2):
        P = _params(repo, tmp_path_factory.mktemp(f"jobs{jobs}"), jobs)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
            mp.setattr(T, "run_fold_jobs", spied)
            summary = T.train_cnn(P, P.cnn.backbones[0], catalog=cat, cache=cache)
        out[jobs] = (P, summary, buf.getvalue())
    assert pools == [([0, 1], 2)]  # fold_jobs=1 trains in this process, fold_jobs=2 in two workers
    return out


def test_side_by_side_folds_give_the_sequential_results(both):
    import pandas as pd
    import torch

    (P1, s1, _), (P2, s2, _) = both[1], both[2]
    assert s1.keys() == s2.keys() and s1["complete"] and s2["complete"]
    assert [f["status"] for f in s2["folds"].values()] == ["trained", "trained"]
    for k in (0, 1):
        assert {n: v for n, v in s1["folds"][k].items() if n != "provenance"} == \
               {n: v for n, v in s2["folds"][k].items() if n != "provenance"}
    pd.testing.assert_frame_equal(pd.read_parquet(s1["oof"]), pd.read_parquet(s2["oof"]))
    pd.testing.assert_frame_equal(pd.read_parquet(s1["test"]), pd.read_parquet(s2["test"]))
    assert s1["oof_wll"] == s2["oof_wll"]
    d1, d2 = P1.layout.cnn("test_efficientnet_32"), P2.layout.cnn("test_efficientnet_32")
    for k in (0, 1):
        a = torch.load(d1.checkpoint(k), weights_only=True)["state_dict"]
        b = torch.load(d2.checkpoint(k), weights_only=True)["state_dict"]
        assert all(torch.equal(a[n], b[n]) for n in a)
        pd.testing.assert_frame_equal(pd.read_csv(d1.log(k)).drop(columns=TIMING),
                                      pd.read_csv(d2.log(k)).drop(columns=TIMING))


def test_workers_epochs_are_reported_by_the_parent(both):
    printed = both[2][2]
    for k in (0, 1):
        assert f"test_efficientnet_32 fold {k} epoch 2/2" in printed
        assert f"test_efficientnet_32 fold {k}: 2 epoch(s) to 2/2" in printed


def test_finished_folds_are_skipped_without_workers(both, toy):
    from ichdlib.cnn.train import train_cnn

    P, first, _ = both[2]
    cat, cache = toy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ichdlib.cnn.train.run_fold_jobs", None)  # no pool is started for finished folds
        again = train_cnn(P, P.cnn.backbones[0], catalog=cat, cache=cache)
    assert [f["status"] for f in again["folds"].values()] == ["skipped", "skipped"]
    assert again["oof_wll"] == first["oof_wll"]


def test_an_interrupted_run_resumes_in_the_workers(repo, both, toy, tmp_path):
    import pandas as pd

    import ichdlib.cnn.train as T

    cat, cache = toy
    P = _params(repo, tmp_path, 2)
    real = T.run_epoch

    def interrupted(*args, **kwargs):
        if args[3] == 1:  # the epoch argument: stop in fold 0's second epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(T, "run_epoch", interrupted)
        T.train_cnn(P, P.cnn.backbones[0], folds=[0], catalog=cat, cache=cache)
    res = T.train_cnn(P, P.cnn.backbones[0], catalog=cat, cache=cache)
    assert [f["status"] for f in res["folds"].values()] == ["resumed", "trained"]
    pd.testing.assert_frame_equal(pd.read_parquet(res["oof"]), pd.read_parquet(both[1][1]["oof"]))


def test_seq_folds_side_by_side_give_the_sequential_results(tmp_path):
    import contextlib
    import io

    import pandas as pd
    from builders import fabricate_level1, smoke, two_backbones

    import ichdlib.seq.train as S

    out, pools = {}, []
    spied = _spy(S, pools)

    for jobs in (1, 3):
        P = smoke(tmp_path / f"j{jobs}", **two_backbones(), seq={"fold_jobs": jobs})
        fabricate_level1(P)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
            mp.setattr(S, "run_fold_jobs", spied)
            out[jobs] = S.run_stage(P).result, buf.getvalue()
    pairs = [(m, k) for m in P.seq.models for k in range(P.ingest.folds)]
    assert pools == [(sorted(pairs), 3)]  # every (model, fold) of the stage in one pool of three workers
    for m in P.seq.models:
        a, b = out[1][0][m], out[3][0][m]
        pd.testing.assert_frame_equal(a.oof, b.oof)
        pd.testing.assert_frame_equal(a.test, b.test)
        pd.testing.assert_frame_equal(a.history.drop(columns="seconds"), b.history.drop(columns="seconds"))
    for m, k in pairs:  # each fold's summary line, printed by this process
        assert f"{m} fold {k}: {P.seq.epochs} epoch(s)" in out[3][1]
    flipped = smoke(tmp_path / "j1", **two_backbones(), seq={"fold_jobs": 3})  # the run with fold_jobs 1
    with pytest.MonkeyPatch.context() as mp:  # finished folds: no workers, nothing retrained
        mp.setattr(S, "run_fold_jobs", None)
        mp.setattr(S, "_train_fold", None)
        again = S.run_stage(flipped).result
    pd.testing.assert_frame_equal(again["seq1"].oof, out[3][0]["seq1"].oof)


def _job(fold: int, events) -> int:
    """A fold job for the pool tests (spawned workers import it from this module, whose imports are light)."""
    events.put(("fold", fold, fold, 1, 0, None))
    if fold == 1:
        raise ValueError("fold one's input is bad\n(second line)")
    if fold == 3:
        os._exit(9)  # as if killed (out of memory)
    events.put(("epoch", fold, 0, 0.5, 0.4, None, 1.0))
    return fold * 10


def _recorder(seen: dict):
    from ichdlib.progress import TrainingProgress

    def progress(fold):
        seen[fold] = TrainingProgress("m", live=False, lines_per_fold=0)
        return seen[fold]
    return progress


def test_a_failing_fold_lets_the_others_finish_then_names_it():
    from ichdlib.foldjobs import run_fold_jobs

    seen: dict = {}
    with pytest.raises(ValueError, match=r"^toy: fold 1: ValueError: fold one's input is bad \(second line\)$"):
        run_fold_jobs(_job, {0: (0,), 1: (1,), 2: (2,)}, 2, _recorder(seen), what="toy")
    assert seen[0].history[0] == [(0, 0.5, 0.4)] and seen[2].history[2] == [(0, 0.5, 0.4)]  # both finished


def test_a_dead_worker_hangs_nothing_and_names_its_fold():
    from ichdlib.foldjobs import FoldJobError, run_fold_jobs

    with pytest.raises(FoldJobError, match=r"^toy: fold\(s\) [0-9, ]*3: the worker process died"):
        run_fold_jobs(_job, {0: (0,), 3: (3,)}, 2, _recorder({}), what="toy")


def test_fold_jobs_change_no_stamp(repo, tmp_path):
    from ichdlib.stages import STAGES, StampStore, decide

    P1, P2 = _params(repo, tmp_path, 1), _params(repo, tmp_path, 2)
    P2.seq.fold_jobs = 3
    known = list(STAGES)
    store = StampStore(P1)
    for number in ("02", "03", "04"):
        first = decide(store, STAGES[number], None, known)
        store.mark_done(number, first.parts, 1.0)
        assert not decide(StampStore(P2), STAGES[number], None, known).run
    other = _params(repo, tmp_path, 1)
    other.cnn.backbones[0].epochs = 3
    assert decide(StampStore(other), STAGES["02"], None, known).run  # a setting that matters still counts
