"""Scale benchmark: every non-training stage on synthetic RSNA-sized tables, extrapolated to the full run.

    python benchmarks/scale.py [--fractions 0.01 0.02 ...] [--json OUT]

For each fraction F of RSNA stage 2 (752,803 training slices in 21,744 studies, 121,232 test slices in
3,518 studies; ``params/rsna_gpu.yaml``'s four backbones and five folds) it writes synthetic inputs into a
temporary folder (not timed): the long-format label CSV (with duplicated rows) at RSNA's prevalence, the
sample submission, the header table the DICOM scan would give, fold parts of the feature extraction at
D = 2048, the four backbones' level-2 features (1024/1664/2048/1024 wide, float16) and every stage's
OOF/test predictions. Then it runs each stage in a fresh Python process (so ``ru_maxrss`` is that stage's
peak resident memory, imports included) and times the stage's work (imports excluded; the fastest of
``--repeat`` runs, the fractions interleaved so that a shared machine's slow spells hit every size):

- ``labels_catalog_folds``: label parsing, catalog assembly (z order, neighbours), patient folds, written
  (:func:`ichdlib.ingest.catalog._scan` with the header scan replaced by reading the header table; reading
  DICOM headers is I/O timed by ``benchmarks/ingest.py``);
- ``feature_assembly``: one backbone's (D = 2048) five fold parts -> ``oof_feat.npy``/``test_feat.npy``
  and probability tables (:func:`ichdlib.cnn.features.assemble_parts`);
- ``level2_inputs``: the sequence stage's one-time loading and pre-assembly (:func:`ichdlib.seq.inputs.load_inputs`,
  :class:`ichdlib.seq.inputs.StudyTensors`; on a GPU the features then live in GPU memory);
- ``seq_epoch_host``: the host work of one sequence-model epoch of one fold (the training crops drawn with
  :func:`ichdlib.seq.inputs.epoch_plan` and cut into batch index matrices, and the validation batches of both
  slice directions); the gathers themselves run on the device;
- ``ensemble_submission``: :func:`ichdlib.ensemble.blend.run_ensemble` (load 6 stages, blend, write and validate
  the submission, score, metrics.json);
- ``notebook_summaries``: notebook 01's catalog tables, 03's PCA on a 20,000-row sample of the features,
  05's OOF scores with per-class AUC and calibration.
- ``cnn3d_epoch_host``: the host work of one 3D CNN epoch of one fold (``params/rsna_gpu.yaml``'s ``cnn3d``:
  crops of K slices, ``crops_per_study`` per study) and of its whole-study validation, every volume streamed
  from a memory-mapped HU cache (:class:`ichdlib.cnn3d.data.CropDataset`, :func:`ichdlib.cnn3d.data.read_volume`);
  the cache here is 32 px (bytes read grow 64x at 256 px: page-cache or disk bandwidth, what the loader workers
  hide); peak RSS must stay flat with size (one batch in memory). The model's time per slice is the GPU
  check's (``benchmarks/cnn3d_throughput.py``).

``exponent`` is the least-squares slope of log(seconds) against log(fraction); ``full_seconds`` and
``full_peak_rss_gb`` come from a straight-line fit (a constant plus a part proportional to size) evaluated at
fraction 1 (with a power law where the growth looks faster than linear), never below the largest measured
value; ``full_seconds_upper`` scales the largest fraction's seconds as if every cost grew with size. ``disk`` gives the DICOM folder's
size (874,035 uncompressed 512 x 512 int16 slices plus the measured header bytes of an RSNA-like file) and
the derived data of the whole run: the 256 px cache, the catalog, every backbone's features and tables, the
checkpoints (best + last with Adam state) and the sequence/ensemble outputs; the 512 px model reads the
DICOM files (``ichdlib.ingest.native``), so it adds nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL = {"train_slices": 752_803, "train_studies": 21_744, "test_slices": 121_232, "test_studies": 3_518}
#: RSNA's slice prevalence per label (``any`` about 14%); epidural the rarest.
PREVALENCE = {"any": 0.143, "epidural": 0.004, "intraparenchymal": 0.048, "intraventricular": 0.035,
              "subarachnoid": 0.047, "subdural": 0.063}
BACKBONES = {"densenet121_256": 1024, "densenet169_256": 1664, "seresnext101_32x4d_256": 2048,
             "densenet121_512": 1024}
#: Parameters of the backbones (timm), for checkpoint sizes.
PARAMS_M = {"densenet121_256": 7.98, "densenet169_256": 14.15, "seresnext101_32x4d_256": 48.96,
            "densenet121_512": 7.98}
FOLDS = 5
STAGES = ["labels_catalog_folds", "feature_assembly", "level2_inputs", "seq_epoch_host", "ensemble_submission",
          "notebook_summaries", "cnn3d_epoch_host"]
#: Stages that read what ``prepare_downstream`` writes.
DOWNSTREAM = {"feature_assembly", "level2_inputs", "seq_epoch_host", "ensemble_submission", "notebook_summaries"}
#: In-plane side of the benchmark's HU cache for the 3D stage (bytes read scale by (256 / 32)^2 at 256 px).
CACHE3D = 32
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's ichdlib, also when run without PYTHONPATH
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------------
# Synthetic inputs
# ----------------------------------------------------------------------------------------------------
def _params(d: Path, **extra):
    from ichdlib.config import load_params

    return load_params(REPO / "params/rsna_gpu.yaml", {"root": str(d), "device": "cpu",
                                                       "paths": {"data_root": str(d / "data"),
                                                                 "work": str(d / "work"),
                                                                 "reports": str(d / "reports")}, **extra})


def _studies(rng: np.random.Generator, n_slices: int, n_studies: int) -> np.ndarray:
    """Slices per study summing to ``n_slices`` (RSNA: 20-60, mostly about 32)."""
    n_studies = max(1, min(n_studies, n_slices))
    sizes = np.maximum(1, rng.normal(n_slices / n_studies, 5, n_studies)).astype(int)
    diff = n_slices - sizes.sum()
    i = 0
    while diff:
        j = i % n_studies
        if diff > 0:
            sizes[j] += 1
            diff -= 1
        elif sizes[j] > 1:
            sizes[j] -= 1
            diff += 1
        i += 1
    return sizes


def prepare(d: Path, fraction: float, seed: int = 0) -> dict:
    """Write every stage's synthetic inputs under ``d`` (see the module docstring)."""
    import pandas as pd

    from ichdlib.labels import LABELS

    rng = np.random.default_rng(seed)
    data, work = d / "data", d / "work"
    (data / "stage_2_train").mkdir(parents=True, exist_ok=True)
    (data / "stage_2_test").mkdir(parents=True, exist_ok=True)
    recs, labels = [], []
    n_pat = 0
    for split in ("train", "test"):
        sizes = _studies(rng, round(FULL[f"{split}_slices"] * fraction), round(FULL[f"{split}_studies"] * fraction))
        n = int(sizes.sum())
        study = np.repeat(np.arange(len(sizes)), sizes)
        idx = np.concatenate([np.arange(s) for s in sizes])
        patients = np.arange(len(sizes)) * 87 // 100 + n_pat  # ~0.87 patients per study, as in RSNA
        n_pat = int(patients.max()) + 1
        sop = np.array([f"ID_{x:09x}" for x in rng.choice(16**9, n, replace=False)])
        recs.append(pd.DataFrame({
            "sop_uid": sop, "patient_id": [f"ID_{p:08x}" for p in patients[study]],
            "study_uid": [f"ID_{split[:2]}{s:08x}" for s in study], "series_uid": [f"ID_{split[:2]}{s:08x}s" for s in study],
            "modality": "CT", "z": (idx * 5.0 + rng.normal(0, 0.01, n)).astype(float), "pixel_spacing": 0.49,
            "rows": 512, "cols": 512, "slope": 1.0, "intercept": -1024.0, "bits_allocated": 16, "bits_stored": 16,
            "pixel_representation": 1, "photometric": "MONOCHROME2", "transfer_syntax": "1.2.840.10008.1.2",
            "window_center": 40.0, "window_width": 80.0, "instance_number": idx + 1, "image_type": "ORIGINAL",
            "samples_per_pixel": 1, "frames": 1, "has_pixels": True, "pixel_offset": 1250, "pixel_nbytes": 524288,
            "fixes": "", "invalid": "", "path": [str(data / f"stage_2_{split}" / f"{s}.dcm") for s in sop], "_split": split}))
        if split == "train":  # positive runs inside 40% of the studies, subtypes at RSNA's prevalence
            y = np.zeros((n, len(LABELS)), dtype=np.int8)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            p_sub = np.array([PREVALENCE[c] for c in LABELS[1:]]) / PREVALENCE["any"]
            for a, m in zip(starts, sizes, strict=True):
                if rng.random() < 0.4:
                    run = max(1, int(round(m * PREVALENCE["any"] / 0.4)))
                    b = a + int(rng.integers(0, max(1, m - run + 1)))
                    y[b:b + run, 0] = 1
                    subs = rng.random(5) < p_sub
                    if not subs.any():
                        subs[int(rng.integers(5))] = True
                    y[b:b + run, 1:] = subs
            labels.append((sop, y))
    headers = pd.concat(recs, ignore_index=True)
    # file order is random (RSNA's names are), the catalog must sort by z
    headers = headers.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    headers.to_parquet(d / "headers.parquet")
    sop, y = labels[0]
    ids = np.repeat(sop, len(LABELS)) + "_" + np.tile(np.array(LABELS), len(sop))
    long = pd.DataFrame({"ID": ids, "Label": y.reshape(-1)})
    dup = long.sample(frac=0.001, random_state=seed)  # RSNA's file repeats some rows
    pd.concat([long, dup]).to_csv(data / "stage_2_train.csv", index=False)
    test_sop = headers.loc[headers["_split"] == "test", "sop_uid"].to_numpy()
    ids = np.repeat(test_sop, len(LABELS)) + "_" + np.tile(np.array(LABELS), len(test_sop))
    pd.DataFrame({"ID": ids, "Label": 0.5}).to_csv(data / "stage_2_sample_submission.csv", index=False)
    work.mkdir(parents=True, exist_ok=True)
    return {"train_slices": int((headers["_split"] == "train").sum()), "test_slices": len(test_sop)}


def prepare_downstream(d: Path, seed: int = 1) -> None:
    """After the catalog stage: fold parts (D = 2048), level-2 features of the four backbones and every
    stage's OOF/test tables, aligned with the catalog."""
    import pandas as pd

    from ichdlib.ingest.table import load_catalog
    from ichdlib.labels import LABELS

    rng = np.random.default_rng(seed)
    work = d / "work"
    cat = load_catalog(work)
    train, test = cat[cat["split"] == "train"], cat[cat["split"] == "test"]
    y = train[list(LABELS)].to_numpy(np.float64)

    def probs(n: int, truth: np.ndarray | None = None) -> np.ndarray:
        p = rng.random((n, 6)) * 0.2
        return np.clip(p + (0.6 * truth if truth is not None else 0), 1e-4, 1 - 1e-4)

    def frame(sop: np.ndarray, p: np.ndarray, fold: np.ndarray | None = None) -> pd.DataFrame:
        f = pd.DataFrame({"sop_uid": sop})
        if fold is not None:
            f["fold"] = fold
        for j, c in enumerate(LABELS):
            f[c] = p[:, j]
        return f

    parts = work / "parts"
    parts.mkdir(exist_ok=True)
    fold_of = train["fold"].to_numpy()
    for k in range(FOLDS):
        nv = int((fold_of == k).sum())
        np.savez(parts / f"part_fold{k}.npz", f_va=rng.standard_normal((nv, 2048), np.float32).astype(np.float16),
                 p_va=probs(nv), f_te=rng.standard_normal((len(test), 2048), np.float32).astype(np.float16),
                 p_te=probs(len(test)))
    for key, dim in BACKBONES.items():
        fd = work / "features" / key
        fd.mkdir(parents=True, exist_ok=True)
        for split, rows in (("oof", train), ("test", test)):
            mm = np.lib.format.open_memmap(fd / f"{split}_feat.npy", mode="w+", dtype=np.float16,
                                           shape=(len(rows), dim))
            for a in range(0, len(rows), 8192):
                b = min(len(rows), a + 8192)
                mm[a:b] = rng.standard_normal((b - a, dim), np.float32)
            mm.flush()
            del mm
        frame(train["sop_uid"].to_numpy(), probs(len(train), y)).to_parquet(fd / "oof_prob.parquet")
        frame(test["sop_uid"].to_numpy(), probs(len(test))).to_parquet(fd / "test_prob.parquet")
        np.save(fd / "test_prob_folds.npy", np.stack([probs(len(test)) for _ in range(FOLDS)]))
    for name in ("seq1", "seq2"):
        sd = work / "seq" / name
        sd.mkdir(parents=True, exist_ok=True)
        frame(train["sop_uid"].to_numpy(), probs(len(train), y), fold_of).to_parquet(sd / "oof.parquet")
        frame(test["sop_uid"].to_numpy(), probs(len(test))).to_parquet(sd / "test.parquet")


# ----------------------------------------------------------------------------------------------------
# Stages (each runs in its own process)
# ----------------------------------------------------------------------------------------------------
def stage_labels_catalog_folds(d: Path) -> float:
    import pandas as pd
    import sklearn.model_selection  # noqa: F401 - ingest imports it while the header scan runs

    from ichdlib.ingest import catalog

    P = _params(d)
    t0 = time.perf_counter()
    headers = pd.read_parquet(d / "headers.parquet")
    files = {s: headers.loc[headers["_split"] == s, "path"].tolist() for s in ("train", "test")}
    headers = headers.drop(columns="_split")
    catalog._scan_headers = lambda paths, pool, progress: (headers, [])
    cat, q, _ = catalog._scan(P.data_root, files, P.data_root / P.paths.train_csv,
                              P.data_root / P.paths.sample_submission, P.ingest.folds, P.seed,
                              set(P.ingest.skip_ids), None, False)
    catalog._save(P.work_dir, cat, q)
    return time.perf_counter() - t0


def stage_feature_assembly(d: Path) -> float:
    from ichdlib.cnn.features import assemble_parts
    from ichdlib.cnn.infer import probs_frame
    from ichdlib.cnn.train import save_parquet
    from ichdlib.ingest.table import load_catalog

    work = d / "work"
    cat = load_catalog(work)
    train, test = cat[cat["split"] == "train"], cat[cat["split"] == "test"]
    t0 = time.perf_counter()
    parts = work / "parts"
    _, oof_prob, test_folds = assemble_parts(parts, list(range(FOLDS)), train["fold"].to_numpy(), len(test))
    np.save(parts / "test_prob_folds.npy", test_folds)
    save_parquet(probs_frame(train["sop_uid"], oof_prob), parts / "oof_prob.parquet")
    save_parquet(probs_frame(test["sop_uid"], test_folds.mean(0)), parts / "test_prob.parquet")
    return time.perf_counter() - t0


def _level2(d: Path):
    from ichdlib.ingest.table import load_catalog
    from ichdlib.seq.inputs import load_inputs

    P = _params(d)
    cat = load_catalog(P.work_dir)
    inputs = load_inputs(P, "train", cat)
    return P, inputs, inputs.tensors("cpu")


def stage_level2_inputs(d: Path) -> float:
    import ichdlib.ingest.catalog  # noqa: F401 - imported before the clock starts
    import ichdlib.seq.train  # noqa: F401

    t0 = time.perf_counter()
    _level2(d)
    return time.perf_counter() - t0


def stage_seq_epoch_host(d: Path) -> float:
    from ichdlib.seq.inputs import epoch_plan
    from ichdlib.seq.train import fold_split

    P, inputs, st = _level2(d)
    cfg = P.seq
    t0 = time.perf_counter()
    tr, va = fold_split(inputs, 0)
    idx, lens = epoch_plan(st, tr, np.random.default_rng(0), crop=cfg.crop, subsample_p=cfg.subsample_p,
                           reverse_p=cfg.reverse_p)
    n = 0
    for a in range(0, len(idx), cfg.batch):  # what the training loop does on the host per batch
        b, m = idx[a:a + cfg.batch], lens[a:a + cfg.batch]
        n += int(np.ascontiguousarray(b[:, : int(m.max())]).shape[0])
    for reverse in (False, True):  # validation batches, both directions
        for a in range(0, len(va), cfg.batch):
            b, m = st.whole(va[a:a + cfg.batch], reverse=reverse)
            n += len(b)
    assert n == len(tr) + 2 * len(va)
    return time.perf_counter() - t0


def _cache3d(d: Path) -> Path:
    """A memory-mapped int16 HU cache at ``CACHE3D`` px over the catalog's rows (written once, not timed)."""
    from ichdlib.ingest.table import load_catalog

    path = d / "work" / f"cache_{CACHE3D}.npy"
    if not path.is_file():
        n = len(load_catalog(d / "work"))
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(n, CACHE3D, CACHE3D))
        for a in range(0, n, 4096):
            mm[a:a + 4096] = np.arange(a, min(n, a + 4096), dtype=np.int64)[:, None, None] % 2000 - 1000
        mm.flush()
        del mm
    return path


def stage_cnn3d_epoch_host(d: Path) -> float:
    from ichdlib.cnn3d.data import CropDataset, CropSampler, Studies, read_volume
    from ichdlib.ingest.table import load_catalog

    P = _params(d)
    c = P.cnn3d
    cache = np.load(_cache3d(d), mmap_mode="r")
    cat = load_catalog(P.work_dir)
    t0 = time.perf_counter()
    train = cat[cat["split"] == "train"]
    tr, va = Studies.from_catalog(train[train["fold"] != 0]), Studies.from_catalog(train[train["fold"] == 0])
    ds = CropDataset(cache, tr, c.slices)
    sampler = CropSampler(tr.lengths, c.slices, c.batch, c.crops_per_study, seed=0)
    n = 0
    for batch in sampler:  # one epoch's crops, one batch in memory at a time
        x, _, mask = ds.__getitems__(batch)
        n += int(mask.sum())
    for rows in va.rows:  # whole-study validation reads
        n += len(read_volume(cache, rows))
    assert n > 0
    return time.perf_counter() - t0


def stage_ensemble_submission(d: Path) -> float:
    import ichdlib.ingest.catalog  # noqa: F401 - imported before the clock starts, as in a running notebook
    import ichdlib.seq.train  # noqa: F401
    from ichdlib.ensemble.blend import run_ensemble

    # the 3D member's OOF/test tables are not synthesised here: it is left out of this blend (offering it adds
    # one more member's columns, the same cost as one more backbone)
    P = _params(d, cnn3d={"enabled": False})
    t0 = time.perf_counter()
    run_ensemble(P)
    return time.perf_counter() - t0


def stage_notebook_summaries(d: Path) -> float:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import sklearn.decomposition  # noqa: F401 - imported before the clock starts

    from ichdlib.cnn.features import plot_feature_map
    from ichdlib.ingest.table import load_catalog, load_quarantine
    from ichdlib.labels import LABELS
    from ichdlib.metrics import calibration, per_class_auc, weighted_log_loss
    from ichdlib.review.explore import catalog_summary

    work = d / "work"
    t0 = time.perf_counter()
    cat = load_catalog(work)
    catalog_summary(cat, load_quarantine(work))  # notebook 01
    train = cat[cat["split"] == "train"].reset_index(drop=True)
    feat = np.load(work / "features" / "seresnext101_32x4d_256" / "oof_feat.npy", mmap_mode="r")
    # notebook 03's PCA runs on 20,000 sampled rows at full size: the same share of the rows here
    points = max(100, round(20000 * float(os.environ.get("ICHD_SCALE_FRACTION", "1"))))
    plt.close(plot_feature_map(feat, train["any"].to_numpy(), max_points=points))
    import pandas as pd

    y = train[list(LABELS)].to_numpy(float)
    p = pd.read_parquet(work / "seq" / "seq2" / "oof.parquet")[list(LABELS)].to_numpy()
    weighted_log_loss(y, p), per_class_auc(y, p), calibration(y, p)  # notebook 05
    return time.perf_counter() - t0


def _run_stage(name: str, d: Path, repeat: int = 3) -> dict:
    """Run a stage ``repeat`` times in this process: the fastest run's seconds (one-time costs such as
    first calls into libraries and a shared machine's hiccups drop out), the process's peak RSS."""
    seconds = min(globals()[f"stage_{name}"](d) for _ in range(max(1, repeat)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"seconds": seconds, "peak_rss_gb": rss / 1e9}


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------
def _child(args: list[str], fraction: float = 1.0) -> dict:
    env = {**os.environ, "ICHD_SCALE_FRACTION": str(fraction), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fit(fractions: list[float], seconds: list[float], rss: list[float]) -> dict:
    """Exponent of seconds vs size and the values extrapolated to fraction 1."""
    f, s, m = np.asarray(fractions), np.maximum(np.asarray(seconds), 1e-6), np.asarray(rss)
    e = float(np.polyfit(np.log(f), np.log(s), 1)[0]) if len(f) > 1 else 1.0

    def at_one(v: np.ndarray, power: float) -> float:
        if len(f) == 1:
            return float(v[0] / f[0])
        slope, icpt = np.polyfit(f, v, 1)
        lin = float(icpt + slope)
        if power > 1.0:
            lin = max(lin, float(v[-1] * (1 / f[-1]) ** power))
        return max(lin, float(v.max()))

    return {"exponent": round(e, 3), "full_seconds": round(at_one(s, e), 2),
            "full_seconds_upper": round(float(s[-1] / f[-1]), 2),  # as if every cost grew with size
            "full_peak_rss_gb": round(at_one(m, 1.0), 2)}


def disk_budget(tmp: Path, measured: dict[float, dict]) -> dict:
    """The DICOM folder and the derived data of the whole run, in GB (see the module docstring)."""
    from ichdlib.phantom.synth import write_ct_dicom

    n = FULL["train_slices"] + FULL["test_slices"] + 1  # + the corrupt file the catalog leaves out
    p = write_ct_dicom(tmp / "one.dcm", np.zeros((512, 512)), encoding="signed", z=0.0)
    raw = n * p.stat().st_size
    n_tr, n_te = FULL["train_slices"], FULL["test_slices"]
    derived = {
        "cache_256": n * 256 * 256 * 2,
        "features": sum((n_tr + n_te) * dim * 2 for dim in BACKBONES.values()),
        "checkpoints": sum(m * 1e6 * 16 for m in PARAMS_M.values()) * FOLDS,  # best fp32 + last with Adam
    }
    f = max(measured)
    small = measured[f]["files_bytes"]  # catalog, tables, submission at fraction f: proportional to size
    derived["catalog_tables_submission"] = small / f
    total = sum(derived.values())
    return {"raw_dicom_gb": round(raw / 1e9, 1), "derived_gb": round(total / 1e9, 1),
            "derived_over_raw": round(total / raw, 3),
            "derived_parts_gb": {k: round(v / 1e9, 2) for k, v in derived.items()},
            "dicom_file_bytes": p.stat().st_size}


def _table_bytes(d: Path) -> int:
    """Bytes of the outputs that grow with the tables (everything written but the arrays we model)."""
    work = d / "work"
    total = 0
    for path in list(work.rglob("*")) + list((d / "reports").rglob("*")):
        if path.is_file() and path.suffix in (".parquet", ".csv", ".json") and "parts" not in path.parts:
            total += path.stat().st_size
    # the six stages' tables: 4 backbones x (oof, test, per-fold val/test of notebook 02) + 2 sequence models
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.02])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="runs per stage and fraction, each in a fresh "
                    "process, fractions interleaved (the fastest is kept)")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages (the catalog is still built)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:  # child process
        if args.stage == "prepare":
            out = prepare(args.dir, args.fraction)
        elif args.stage == "prepare_downstream":
            prepare_downstream(args.dir)
            out = {}
        else:
            out = _run_stage(args.stage, args.dir, args.repeat)
        print(json.dumps(out))
        return out
    if any(not 0 < f <= 1 for f in args.fractions):
        ap.error("--fractions must be in (0, 1]")
    fractions = sorted(set(args.fractions))
    if len(fractions) < 2:
        ap.error("give at least two --fractions: the fit separates fixed costs from those that grow")
    runs: dict[float, dict] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ichd_scale_") as tmp:
        dirs = {f: Path(tmp) / f"f{f}" for f in fractions}
        for f, d in dirs.items():
            d.mkdir()
            runs[f] = {"sizes": _child(["--stage", "prepare", "--dir", str(d), "--fraction", str(f)])}
        chosen = [n for n in STAGES if not args.only or n in args.only]
        if chosen[0] != "labels_catalog_folds":  # the later stages read the catalog it writes (not timed then)
            for d in dirs.values():
                _child(["--stage", "labels_catalog_folds", "--dir", str(d), "--repeat", "1"])
        downstream = False
        for name in chosen:
            if name in DOWNSTREAM and not downstream:  # fold parts, features, predictions (not timed)
                downstream = True
                for d in dirs.values():
                    _child(["--stage", "prepare_downstream", "--dir", str(d)])
            # fractions interleaved, one process each time: a shared machine's slow spells hit both sizes
            tries: dict[float, list[dict]] = {f: [] for f in fractions}
            for _ in range(args.repeat):
                for f, d in dirs.items():
                    tries[f].append(_child(["--stage", name, "--dir", str(d), "--repeat", "1"], f))
            for f in fractions:
                runs[f][name] = {"seconds": min(t["seconds"] for t in tries[f]),
                                 "peak_rss_gb": max(t["peak_rss_gb"] for t in tries[f])}
                print(f"fraction {f}: {name:22s} {runs[f][name]['seconds']:7.2f} s  "
                      f"peak RSS {runs[f][name]['peak_rss_gb']:.2f} GB", file=sys.stderr)
        for f, d in dirs.items():
            runs[f]["files_bytes"] = _table_bytes(d)
        disk = disk_budget(Path(tmp), runs)
    stages = {}
    for name in chosen:
        secs = [runs[f][name]["seconds"] for f in fractions]
        rss = [runs[f][name]["peak_rss_gb"] for f in fractions]
        stages[name] = {"fractions": fractions, "seconds": [round(s, 3) for s in secs],
                        "peak_rss_gb": [round(r, 3) for r in rss], **fit(fractions, secs, rss)}
    out = {"stages": stages, "disk": disk, "full": FULL, "benchmark_seconds": round(time.perf_counter() - t_all, 1)}
    print(f"{'stage':22s} {'exponent':>8s} {'full s':>8s} {'full peak RSS GB':>17s}")
    for name, s in stages.items():
        print(f"{name:22s} {s['exponent']:8.2f} {s['full_seconds']:8.1f} {s['full_peak_rss_gb']:17.2f}")
    print(f"disk: DICOM {disk['raw_dicom_gb']} GB, derived {disk['derived_gb']} GB "
          f"({disk['derived_over_raw']:.3f} x) {disk['derived_parts_gb']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
