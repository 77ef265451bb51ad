"""``benchmarks/predict.py --profiles``: seconds per study and accuracy of the inference profiles (issue 22).

See ``benchmarks/predict.py``'s docstring for what is measured and how; this module does the work.
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Slices per forward batch on the CPU: a 31-slice batch of the 512 px DenseNet holds GBs of activations per
#: engine; 8 keeps the peak bounded at the same throughput.
BATCH = 8


def _untrained_one_fold(P: Any, out: Path) -> Path:
    """An untrained bundle of ``P``'s architectures with one fold model each, saved with ONNX graphs."""
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.onnx_runtime import add_onnx

    Bundle.untrained(P, folds=1).save(out)
    add_onnx(out)
    return out


def _student_view(bundle: Any, key: str) -> Any:
    """``bundle`` cut to one 2D member ``key`` (fold 0, view 0, no sequence model): the student's shape."""
    from ichdlib.serve.bundle import Bundle

    m = copy.deepcopy(bundle.manifest)
    name = f"cnn:{key}"
    m["backbones"] = [b for b in m["backbones"] if b["key"] == key]
    m["seq"] = {"backbones": [], "models": []}
    m["ensemble"] = {"method": "mean", "members": [name], "weights": {name: 1.0}, "sources": {name: "cnn"}}
    m["profile"] = {"name": "student", "folds": {key: [0]}, "views": [0], "members": [name]}
    return Bundle(m, {key: bundle.cnn[key]}, {}, source=bundle.source)


def _time_passes(bundle: Any, engine: str, loaded: Any) -> tuple[dict[str, float], float, Any]:
    """Seconds of one forward pass (one view, one fold model) of each 2D member over ``loaded`` (after a
    warm-up pass) and of the sequence models and blend (one fold each, on those 2D outputs); and the warm
    predictor (all of the bundle's views restored)."""
    from ichdlib.serve.pipeline import Predictor, study_cache

    pred = Predictor(bundle, "cpu", runtime=engine, batch=BATCH)
    views, pred.views = pred.views, pred.views[:1]
    out, cached = {}, {}
    for key in pred.cnn:
        cache, rows = study_cache(loaded, int(bundle.backbone(key)["size"]))
        pred.cnn_outputs(key, cache, rows)  # warm-up
        t0 = time.perf_counter()
        cached[key] = pred.cnn_outputs(key, cache, rows)
        out[key] = time.perf_counter() - t0
    pred.cnn_outputs = lambda key, cache, rows: cached[key]  # the sequence stage alone
    pred.predict(loaded)
    t0 = time.perf_counter()
    pred.predict(loaded)
    seq = time.perf_counter() - t0
    del pred.cnn_outputs
    pred.views = views
    return out, seq, pred


def _e2e(folder: Path, bundle: Any, pred: Any, views: list[int] | None = None) -> dict[str, float]:
    """``predict_dir`` on one study folder with a warm predictor (``views``: the TTA views it runs)."""
    from ichdlib.serve.pipeline import predict_dir

    keep = pred.views
    if views is not None:
        pred.views = [keep[i] for i in views]
    r = predict_dir(folder, bundle, predictor=pred)
    pred.views = keep
    return {"read": r.seconds["read"], "model": r.seconds["model"], "total": r.seconds["read"] + r.seconds["model"],
            "slices": len(r.slices)}


def _accuracy(P: Any, tmp: Path, engines: list[str], max_studies: int | None = None) -> dict[str, Any]:
    """Scores of full (torch and each ONNX engine), fast and student on the trained run ``P``."""
    import pandas as pd

    from ichdlib.app.export_cli import export_bundle
    from ichdlib.app.profile_select import RunEvaluator, select_for_run
    from ichdlib.distill import student_dir
    from ichdlib.ensemble.outputs import read_truth
    from ichdlib.ingest.table import load_catalog
    from ichdlib.labels import LABELS
    from ichdlib.metrics import per_class_auc, weighted_log_loss
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.profiles import full_profile
    from ichdlib.stats import paired_wll

    t0 = time.perf_counter()
    bundle = Bundle.from_run(P)
    sel, ev = select_for_run(P, bundle, max_studies=max_studies)
    out: dict[str, Any] = {"full_torch": ev(full_profile(bundle)), "fast": sel.scores, "selection": sel.to_dict()}
    full_oof, full_test = ev.predict(full_profile(bundle))
    fast_oof, fast_test = ev.predict(sel.profile)

    def paired(p_oof: np.ndarray, p_test: np.ndarray | None) -> dict[str, Any]:
        """wLL(profile) - wLL(full) with 95% intervals over studies (stats.paired_wll)."""
        r = {"oof": paired_wll(ev.y_oof, p_oof, full_oof, groups=ev.train["study_uid"].to_numpy())}
        if ev.y_test is not None and p_test is not None:
            r["test"] = paired_wll(ev.y_test, p_test, full_test, groups=ev.test["study_uid"].to_numpy())
        return r

    out["paired"] = {"fast": paired(fast_oof, fast_test)}
    onnx_path, _ = export_bundle(P, tmp / "demo_onnx", runtime="onnx")
    onnx = Bundle.load(onnx_path)
    for engine in (e for e in engines if e != "openvino"):  # OpenVINO float32: timed, scored like onnxruntime
        ev_e = RunEvaluator(P, onnx, runtime=engine, max_studies=max_studies)
        out[f"full_{engine}"] = ev_e(full_profile(onnx))
        if engine == "onnxruntime":  # the fast profile as it runs (ONNX Runtime)
            out["fast"] = ev_e(sel.profile)
        if engine == "openvino_bf16":
            out["fast_openvino_bf16"] = ev_e(sel.profile)
    done = student_dir(P).done
    if done.is_file():
        cat = load_catalog(P.work_dir)
        y_oof, y_test = read_truth(P, cat)
        oof = pd.read_parquet(student_dir(P).oof).set_index("sop_uid").loc[y_oof.index, list(LABELS)]
        s = {"oof_wll": weighted_log_loss(y_oof.to_numpy(), oof.to_numpy()),
             "oof_auc_any": per_class_auc(y_oof.to_numpy(), oof.to_numpy())["any"]}
        if y_test is not None:
            te = pd.read_parquet(student_dir(P).test).set_index("sop_uid").loc[y_test.index, list(LABELS)]
            s.update(test_wll=weighted_log_loss(y_test.to_numpy(), te.to_numpy()),
                     test_auc_any=per_class_auc(y_test.to_numpy(), te.to_numpy())["any"])
        out["student"] = s
        out["student_training"] = json.loads(done.read_text())
        st_oof = pd.read_parquet(student_dir(P).oof).set_index("sop_uid").loc[ev.train["sop_uid"], list(LABELS)]
        st_test = pd.read_parquet(student_dir(P).test).set_index("sop_uid").loc[ev.test["sop_uid"], list(LABELS)]
        out["paired"]["student"] = paired(st_oof.to_numpy(), st_test.to_numpy())
    out["seconds"] = time.perf_counter() - t0
    return out


def _as_dict(s: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(s) if is_dataclass(s) else dict(s)


def run_profiles(args: Any, make_studies: Any) -> int:
    import torch

    from ichdlib.config import load_params
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.discover import discover, load_study

    torch.set_num_threads(args.threads)
    slices = args.slices or 31
    engines = ["onnxruntime"]
    try:
        import openvino  # noqa: F401

        engines += ["openvino", "openvino_bf16"]
    except ImportError:
        print("openvino not installed: OpenVINO not measured")
    res: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                       "torch": torch.__version__},
                           "timing_params": args.timing_params.name, "accuracy_params": args.accuracy_params.name}
    with tempfile.TemporaryDirectory(prefix="ichd_profiles_") as tmp:
        tmp = Path(tmp)
        # --- accuracy on the trained demo run --------------------------------------------------------
        acc = _accuracy(load_params(args.accuracy_params), tmp, engines, args.max_studies)
        sel = acc["selection"]
        fast_views = sel["profile"]["views"]
        print(f"accuracy on {args.accuracy_params.name} ({acc['seconds']:.0f} s): fast profile {sel['profile']}")
        # --- timing with untrained networks of the timing architecture -------------------------------
        P = load_params(args.timing_params, {"device": "cpu"})
        n_folds = P.ingest.folds if P.cnn.folds == "all" else len(P.cnn.folds)
        t0 = time.perf_counter()
        path = _untrained_one_fold(P, tmp / "timing")
        bundle = Bundle.load(path)
        print(f"untrained {args.timing_params.name} bundle (1 fold each) with ONNX graphs in "
              f"{time.perf_counter() - t0:.0f} s")
        (folder,) = make_studies(tmp / "studies", 1, slices, args.size)
        (scan,), _ = discover(folder)
        loaded = load_study(scan)
        t0 = time.perf_counter()
        load_study(scan)
        t_read = time.perf_counter() - t0
        n = len(loaded.hu)
        import gc

        passes, seq, e2e = {}, {}, {}
        fast_folds = max(len(f) for f in sel["profile"]["folds"].values())
        for engine in ["torch", *engines]:
            passes[engine], seq[engine], pred = _time_passes(bundle, engine, loaded)
            if engine in ("onnxruntime", "openvino_bf16") and fast_folds == 1:  # the fast profile end to end
                e2e[engine] = _e2e(folder, bundle, pred, views=fast_views)
            del pred
            gc.collect()
            print(f"  {engine}: one pass over {n} slices " + ", ".join(f"{k} {v:.2f} s" for k, v in passes[engine].items())
                  + f"; sequence models (one fold each) and blend {seq[engine]:.3f} s")
        keys = list(bundle.cnn)
        n_views, n_seq = P.features.tta, len(P.seq.models)
        student_key = (P.distill.backbone or P.cnn.backbones[0]).key

        def estimate(engine: str, folds: int, views: int, keys_: list[str], seq_models: int) -> float:
            # seq[engine]: every sequence model once (one fold each) + blend; profiles keep all their folds
            return (t_read + sum(folds * views * passes[engine][k] for k in keys_)
                    + seq[engine] * n_folds * seq_models / max(1, n_seq))

        fast_seq = sum(1 for m in sel["profile"]["members"] if not m.startswith("cnn:"))
        rows = {
            "full_torch": ("torch", n_folds, n_views, keys, n_seq),
            "full_onnx": ("onnxruntime", n_folds, n_views, keys, n_seq),
            **({"full_openvino": ("openvino", n_folds, n_views, keys, n_seq),
                "full_openvino_bf16": ("openvino_bf16", n_folds, n_views, keys, n_seq),
                "fast_openvino_bf16": ("openvino_bf16", fast_folds, len(fast_views), keys, fast_seq),
                "student_openvino_bf16": ("openvino_bf16", 1, 1, [student_key], 0)} if "openvino" in engines else {}),
            "fast": ("onnxruntime", fast_folds, len(fast_views), keys, fast_seq),
            "fast_torch": ("torch", fast_folds, len(fast_views), keys, fast_seq),
            "student": ("onnxruntime", 1, 1, [student_key], 0),
            "student_torch": ("torch", 1, 1, [student_key], 0),
        }
        full_acc = acc["full_torch"]
        out = {}
        for name, (engine, folds, views, keys_, seq_models) in rows.items():
            secs = estimate(engine, folds, views, keys_, seq_models)
            a = acc.get({"full_onnx": "full_onnxruntime", "fast_torch": "fast", "student_torch": "student",
                         "student_openvino_bf16": None}.get(name, name))
            a = _as_dict(a) if a is not None else None
            row = {"seconds_per_study": round(secs, 2), "seconds_per_slice": round(secs / n, 4), "slices": n,
                   "forward_passes": n * folds * views * len(keys_), "engine": engine, "timing": "passes",
                   "models": f"{len(keys_)} backbone(s) x {folds} fold(s) x {views} view(s), "
                             f"{seq_models} sequence model(s)"}
            if a is not None:
                fa = _as_dict(full_acc)
                row.update({
                    "oof_wll": a["oof_wll"], "test_wll": a.get("test_wll"), "oof_auc_any": a["oof_auc_any"],
                    "test_auc_any": a.get("test_auc_any"),
                    "oof_wll_ratio": round(a["oof_wll"] / fa["oof_wll"], 4),
                    "test_wll_ratio": round(a["test_wll"] / fa["test_wll"], 4) if a.get("test_wll") else None,
                    "oof_auc_any_delta": round(a["oof_auc_any"] - fa["oof_auc_any"], 4),
                    "test_auc_any_delta": round(a["test_auc_any"] - fa["test_auc_any"], 4)
                    if a.get("test_auc_any") is not None else None})
                row["auc_any_delta"] = min(d for d in (row["oof_auc_any_delta"], row["test_auc_any_delta"])
                                           if d is not None)
            out[name] = row
        # end to end through predict_dir: the fast profile and the student
        # (the fast profile keeps every sequence model here; fewer would only be cheaper)
        student = _student_view(bundle, student_key)
        from ichdlib.serve.pipeline import Predictor

        e2e_student = _e2e(folder, student, Predictor(student, "cpu", runtime="onnxruntime", batch=BATCH))
        if "onnxruntime" in e2e:
            out["fast"]["e2e_seconds_per_study"] = round(e2e["onnxruntime"]["total"], 2)
        if "openvino_bf16" in e2e and "fast_openvino_bf16" in out:
            out["fast_openvino_bf16"]["e2e_seconds_per_study"] = round(e2e["openvino_bf16"]["total"], 2)
        out["student"]["e2e_seconds_per_study"] = round(e2e_student["total"], 2)
        res.update(read_seconds_per_study=round(t_read, 3), pass_seconds=passes, seq_seconds_per_fold=seq,
                   profiles=out, paired_wll_vs_full=acc["paired"], fast_selection=sel,
                   student_training=acc.get("student_training"),
                   note=(f"timing: untrained {args.timing_params.name} networks (random weights; time does not "
                         "depend on them) on one phantom study; accuracy: the trained "
                         f"{args.accuracy_params.name} run (ratios and deltas to full_torch)"))
    for name, r in out.items():
        extra = "" if "oof_wll_ratio" not in r else (
            f"; OOF wLL x{r['oof_wll_ratio']:.4f}, test wLL x{r['test_wll_ratio']}, AUC any {r['auc_any_delta']:+.4f}")
        e2e = f" (end to end {r['e2e_seconds_per_study']:.1f} s)" if "e2e_seconds_per_study" in r else ""
        print(f"{name:>14}: {r['seconds_per_study']:8.1f} s/study{e2e}, {r['forward_passes']} passes{extra}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float))
    return 0
