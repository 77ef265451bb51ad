"""``ichd train`` under torchrun (DDP on the CPU with gloo), fold jobs side by side, notebooks that attach,
and the loop's validation cadence / provenance."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import toy_catalog

from ichdlib.cnn import distributed as D
from ichdlib.cnn.data import SliceBatchSampler, StudyBatchSampler
from ichdlib.config import ParamsError, load_params
from ichdlib.labels import LABELS

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "[{name: lcnet_050, size: 48, batch: 32, epochs: 2, lr: 0.001}]"
SETS = ["cnn.max_steps_per_epoch=4", f"cnn.backbones={BACKBONE}"]
KEY = "lcnet_050_48"


# --------------------------------------------------------------------------------------------------
# Helpers (fast)
# --------------------------------------------------------------------------------------------------
def test_sharded_sampler_splits_each_global_batch_between_ranks():
    base = StudyBatchSampler(np.repeat(np.arange(10), 6), batch=10, k=4, seed=3)
    base.set_epoch(2)
    whole = list(base)
    shards = [D.ShardedBatchSampler(StudyBatchSampler(np.repeat(np.arange(10), 6), 10, 4, 3), r, 3)
              for r in range(3)]
    for s in shards:
        s.set_epoch(2)
        assert len(s) == len(base)
    per_rank = [list(s) for s in shards]
    for step, batch in enumerate(whole):
        assert sum((p[step] for p in per_rank), []) == batch  # the union, in order, is the global batch
    assert [len(b) for b in per_rank[0][:1] + per_rank[1][:1] + per_rank[2][:1]] == [3, 4, 3]
    with pytest.raises(ValueError, match="smaller than the 4 ranks"):
        D.ShardedBatchSampler(SliceBatchSampler(10, 2), 0, 4)


def test_shard_slices_cover_the_rows_once_in_order_and_one_process_is_a_no_op():
    for n, world in [(0, 2), (1, 2), (7, 3), (100, 8)]:
        idx = np.concatenate([np.arange(n)[D.shard_slice(n, r, world)] for r in range(world)])
        assert idx.tolist() == list(range(n))
    assert D.shard_list([0, 1, 2, 3, 4], 1, 2) == [1, 3]
    a = np.arange(6).reshape(3, 2)
    assert D.gather_rows(a, 3) is a and not D.is_dist() and D.world_size() == 1 and D.is_main()


def test_cli_arguments_fail_with_one_line_naming_the_value(smoke_params):
    from ichdlib.app.train_cli import parse_folds, select_backbones

    assert parse_folds("0,2") == [0, 2] and parse_folds(None) is None
    with pytest.raises(ValueError, match="--folds 'a'"):
        parse_folds("a")
    assert [b.key for b in select_backbones(smoke_params, ["lcnet_050"])] == [KEY]
    with pytest.raises(ValueError, match="--backbone nope: not in the params' cnn.backbones \\(lcnet_050_48\\)"):
        select_backbones(smoke_params, ["nope"])


def test_fp16_option_validates_and_is_float32_on_the_cpu(repo):
    from ichdlib.runtime import amp_mode

    P = load_params(repo / "params/smoke.yaml", {"cnn": {"amp": True, "amp_dtype": "fp16"}})
    assert amp_mode(P, "cpu") is False
    with pytest.raises(ParamsError, match="amp_dtype"):
        load_params(repo / "params/smoke.yaml", {"cnn": {"amp_dtype": "fp8"}})


def _toy_params(repo, root, **cnn):
    backbone = {"name": "test_efficientnet", "size": 32, "batch": 16, "epochs": 3, "lr": 0.003}
    over = {"root": str(root), "device": "cpu", "seed": 5,
            "cnn": {"backbones": [backbone], "sampler": "slice", "schedule": "cosine",
                    "max_steps_per_epoch": 2, **cnn}}
    return load_params(repo / "params/smoke.yaml", over)


def test_validation_cadence_subset_between_full_passes_and_best_from_full_ones(repo, tmp_path):
    from ichdlib.cnn.train import read_logs, train_cnn

    cat, cache = toy_catalog(studies=8, slices=8, size=32, folds=2, test_studies=1, seed=4)
    P = _toy_params(repo, tmp_path, val_every=2, val_subset=5)
    s = train_cnn(P, P.cnn.backbones[0], folds=[0], catalog=cat, cache=cache, origin="ichd train")
    log = read_logs(P, P.cnn.backbones[0])
    n_val = int(((cat["split"] == "train") & (cat["fold"] == 0)).sum())
    assert log["val_kind"].tolist() == ["subset", "full", "full"]  # epoch 1 by cadence, epoch 2 the last
    assert log["val_images"].tolist() == [5, n_val, n_val]
    assert (log["val_images_per_s"] > 0).all()
    assert s["folds"][0]["best_epoch"] in (1, 2)  # never the subset-scored epoch
    val = pd.read_parquet(P.work_dir / "cnn" / "test_efficientnet_32" / "fold0_val.parquet")
    assert len(val) == n_val
    # a rerun loads the fold and says where it came from
    again = train_cnn(P, P.cnn.backbones[0], folds=[0], catalog=cat, cache=cache)
    assert again["folds"][0]["status"] == "skipped"
    assert "fold 0: skipped, trained by ichd train on" in again["provenance"]
    assert "1 process" in again["provenance"]


def test_a_second_job_on_the_same_fold_stops_at_once_naming_the_holder(repo, tmp_path):
    from ichdlib.cnn.train import cnn_dir, train_cnn
    from ichdlib.locks import LockHeld

    cat, cache = toy_catalog(studies=8, slices=8, size=32, folds=2, test_studies=1, seed=4)
    P = _toy_params(repo, tmp_path)
    target = cnn_dir(P, P.cnn.backbones[0]) / "fold1"
    code = ("import sys, time; from ichdlib.locks import output_lock\n"
            f"with output_lock({str(target)!r}, what='train fold 1'):\n"
            "    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"fold1 is being written by pid {holder.pid}"):
            train_cnn(P, P.cnn.backbones[0], folds=[1], catalog=cat, cache=cache)
    finally:
        holder.kill()
        holder.wait()
    assert not (cnn_dir(P, P.cnn.backbones[0]) / "fold1_last.pt").exists()


# --------------------------------------------------------------------------------------------------
# torchrun end to end on the smoke phantom (slow)
# --------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    env.pop("ICHD_FAULT_KILL", None)
    return env


def _ichd_train(root: Path, data_root: Path, *args: str, nproc: int = 0, env: dict | None = None,
                popen: bool = False, timeout: int = 300):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc else [sys.executable])
    sets = [f"root={root}", f"paths.data_root={data_root}", *SETS]
    cmd = [*launcher, "-m", "ichdlib", "train", str(REPO / "params/smoke.yaml"), *args,
           *sum((["--set", s] for s in sets), [])]
    kw = dict(env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    if popen:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=timeout, **kw)


def _params(root: Path, data_root: Path):
    from ichdlib.config import parse_overrides

    return load_params(REPO / "params/smoke.yaml",
                       parse_overrides([f"root={root}", f"paths.data_root={data_root}", *SETS]))


@pytest.fixture(scope="module")
def base(tmp_path_factory, phantom):
    """A root with the smoke phantom ingested (catalog + 48 px cache), copied for each run."""
    from ichdlib.ingest.catalog import ingest

    root = tmp_path_factory.mktemp("ddp_base")
    ingest(_params(root, phantom))
    return root, phantom


def _fresh(base, tmp_path_factory, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(base[0] / "work", root / "work")
    return root


@pytest.fixture(scope="module")
def one_process(base, tmp_path_factory):
    """The reference: the same stage in this process (one rank, same global batch)."""
    from ichdlib.cnn.train import train_cnn

    root = _fresh(base, tmp_path_factory, "one")
    P = _params(root, base[1])
    return P, train_cnn(P, P.cnn.backbones[0])


@pytest.fixture(scope="module")
def ddp(base, tmp_path_factory):
    """``torchrun --nproc_per_node 2 -m ichdlib train smoke --stage cnn`` (gloo)."""
    root = _fresh(base, tmp_path_factory, "ddp")
    res = _ichd_train(root, base[1], "--stage", "cnn", nproc=2)
    assert res.returncode == 0, res.stdout[-3000:]
    return _params(root, base[1]), res


@pytest.mark.slow
def test_torchrun_two_ranks_writes_complete_aligned_outputs_close_to_one_process(ddp, one_process):
    from ichdlib.ingest.table import load_catalog
    from ichdlib.metrics import weighted_log_loss

    P, res = ddp
    assert "stage cnn on 2 ranks" in res.stdout
    out = P.work_dir / "cnn" / KEY
    cat = load_catalog(P.work_dir)
    train, test = cat[cat["split"] == "train"], cat[cat["split"] == "test"]
    for k in (0, 1):
        last = torch.load(out / f"fold{k}_last.pt", weights_only=True)["meta"]
        assert last["finished"] and last["epoch"] == 1
        assert last["provenance"]["by"] == "ichd train" and last["provenance"]["world_size"] == 2
        assert (out / f"fold{k}.pt").is_file()
    oof = pd.read_parquet(out / "oof.parquet")
    assert oof["sop_uid"].tolist() == train["sop_uid"].tolist()  # every training slice once, catalog order
    assert oof["fold"].tolist() == train["fold"].tolist()
    te = pd.read_parquet(out / "test.parquet")
    assert te["sop_uid"].tolist() == test["sop_uid"].tolist()
    assert np.isfinite(oof[list(LABELS)].to_numpy()).all() and np.isfinite(te[list(LABELS)].to_numpy()).all()
    # the same global batch: validation loss within 5% of the one-process run, fold by fold and overall
    _, ref = one_process
    for k in (0, 1):
        a = ref["folds"][k]["best_wll"]
        b = torch.load(out / f"fold{k}.pt", weights_only=True)["meta"]["best_wll"]
        assert abs(b - a) <= 0.05 * a, (k, a, b)
    y = train[list(LABELS)].to_numpy(dtype=float)
    ddp_wll = weighted_log_loss(y, oof[list(LABELS)].to_numpy())
    assert abs(ddp_wll - ref["oof_wll"]) <= 0.05 * ref["oof_wll"]


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_resumes_to_the_uninterrupted_result(ddp, base, tmp_path_factory):
    root = _fresh(base, tmp_path_factory, "kill")
    out = root / "work" / "smoke" / "cnn" / KEY
    marker = root / "killed.txt"
    env = {**_env(), "ICHD_FAULT_KILL": f"1:1:1:{marker}"}  # rank 1, epoch 1, step 1 (fold 0 runs first)
    first = _ichd_train(root, base[1], nproc=2, env=env)
    assert first.returncode != 0 and marker.is_file(), first.stdout[-2000:]
    state = torch.load(out / "fold0_last.pt", weights_only=True)
    assert state["meta"]["epoch"] == 0 and not state["meta"]["finished"]
    assert not (out / "oof.parquet").exists()
    again = _ichd_train(root, base[1], nproc=2, env=env)  # the marker makes the fault fire only once
    assert again.returncode == 0, again.stdout[-3000:]
    assert "fold 0: resumed" in again.stdout and "fold 1: trained" in again.stdout
    ref = ddp[0].work_dir / "cnn" / KEY
    for name in ("fold0_last.pt", "fold0.pt", "fold1.pt"):
        a = torch.load(ref / name, weights_only=True)["state_dict"]
        b = torch.load(out / name, weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical on the CPU
    pd.testing.assert_frame_equal(pd.read_parquet(ref / "oof.parquet"), pd.read_parquet(out / "oof.parquet"),
                                  atol=1e-6)


@pytest.mark.slow
def test_two_fold_jobs_side_by_side_share_the_folder_and_assemble_once(base, tmp_path_factory):
    from ichdlib.ingest.table import load_catalog

    root = _fresh(base, tmp_path_factory, "fanout")
    jobs = [_ichd_train(root, base[1], "--folds", str(k), popen=True) for k in (0, 1)]
    outs = [j.communicate(timeout=300)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], "\n".join(o[-1500:] for o in outs)
    out = root / "work" / "smoke" / "cnn" / KEY
    cat = load_catalog(root / "work" / "smoke")
    train, test = cat[cat["split"] == "train"], cat[cat["split"] == "test"]
    oof = pd.read_parquet(out / "oof.parquet")
    assert oof["sop_uid"].tolist() == train["sop_uid"].tolist() and not oof["sop_uid"].duplicated().any()
    assert oof["fold"].tolist() == train["fold"].tolist()
    for k in (0, 1):  # each fold's rows come from that fold's own validation file
        val = pd.read_parquet(out / f"fold{k}_val.parquet").set_index("sop_uid")
        got = oof[oof["fold"] == k].set_index("sop_uid")[list(LABELS)]
        np.testing.assert_allclose(got.to_numpy(), val.loc[got.index, list(LABELS)].to_numpy())
    te = pd.read_parquet(out / "test.parquet")
    mean = np.mean([pd.read_parquet(out / f"fold{k}_test.parquet")[list(LABELS)].to_numpy() for k in (0, 1)], 0)
    assert te["sop_uid"].tolist() == test["sop_uid"].tolist()
    np.testing.assert_allclose(te[list(LABELS)].to_numpy(), mean)
    assert any("OOF wLL" in o for o in outs)  # the job that finished last assembled the OOF


@pytest.mark.slow
def test_features_sharded_and_seq_folds_fanned_out_match_one_process(ddp, base):
    from ichdlib.cnn.data import SliceDataset
    from ichdlib.cnn.features import load_features
    from ichdlib.cnn.infer import eval_augment, feature_views, predict
    from ichdlib.cnn.models import load_cnn
    from ichdlib.ingest.table import load_catalog
    from ichdlib.runtime import prepare_model
    from ichdlib.seq.train import train_seq

    P, _ = ddp
    root = P.root
    for stage in ("features", "seq"):
        res = _ichd_train(root, base[1], "--stage", stage, nproc=2)
        assert res.returncode == 0, res.stdout[-3000:]
    cat = load_catalog(P.work_dir)
    train = cat[cat["split"] == "train"]
    feat, prob = load_features(P, P.cnn.backbones[0], "oof")
    assert prob["sop_uid"].tolist() == train["sop_uid"].tolist() and np.isfinite(np.asarray(feat)).all()
    # fold 0's rows gathered from two ranks equal one process's prediction with that fold's model
    model, meta = load_cnn(P.work_dir / "cnn" / KEY / "fold0.pt", "cpu")
    model, runner = prepare_model(model, P, "cpu")
    from ichdlib.ingest.cache import open_cache

    rows = train[train["fold"] == 0]
    p, f = predict(runner, eval_augment(P, meta), SliceDataset.from_catalog(rows, open_cache(P.work_dir, 48)),
                   64, "cpu", pooled=True, views=feature_views(P))
    sel = (train["fold"] == 0).to_numpy()
    np.testing.assert_allclose(prob[list(LABELS)].to_numpy()[sel], p, atol=1e-5)
    np.testing.assert_allclose(np.asarray(feat, dtype=np.float32)[sel], f.astype(np.float16), atol=2e-3)
    # seq folds trained on two ranks (one fold each) give the one-process result
    seq_dir = P.work_dir / "seq" / "seq1"
    fanned = pd.read_parquet(seq_dir / "oof.parquet")
    again = train_seq(P, "seq1", force=True)
    pd.testing.assert_frame_equal(fanned, again.oof, atol=1e-6)


@pytest.mark.slow
def test_ichd_run_02_attaches_to_ichd_train_outputs_without_retraining(ddp):
    import json

    from ichdlib.run import run_pipeline

    P, _ = ddp
    out = P.work_dir / "cnn" / KEY
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("fold*.pt")}
    time.sleep(0.01)
    run_pipeline(REPO / "params/smoke.yaml", only=["02"], html=False,
                 overrides={"root": str(P.root), "paths": {"data_root": str(P.data_root)},
                            "cnn": P.model_dump(mode="json")["cnn"]})
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("fold*.pt")} == before
    nb = json.loads((P.reports_dir / "02_cnn_training.ipynb").read_text())
    text = json.dumps([c.get("outputs", []) for c in nb["cells"]])
    assert "skipped" in text


def test_rsna_cadence_keeps_validation_under_a_quarter_of_a_fold(repo):
    """The README's arithmetic (benchmarks/val_cadence.py) with a validation image at 0.25x a training image."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("val_cadence", repo / "benchmarks" / "val_cadence.py")
    vc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vc)
    P = load_params(repo / "params" / "rsna_gpu.yaml")
    r = vc.schedule_share(P, P.cnn.backbones[0], 1.0, 0.25)
    assert r["train_images_per_epoch"] == 69_632 and r["full_validations"] == 8 and r["subset_validations"] == 32
    assert r["val_images_per_fold"] == 8 * 150_561 + 32 * 10_000
    assert round(r["validation_share"], 2) == 0.12 and round(r["validation_and_test_share"], 2) == 0.13
    assert r["validation_and_test_share"] <= 0.25 < r["every_epoch_full_share"]
