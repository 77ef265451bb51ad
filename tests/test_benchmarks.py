"""The benchmarks measure what they report (tiny CPU runs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("sampler", ["study", "slice"])
def test_train_throughput_measures_the_steps_it_reports(tmp_path, sampler):
    tt = _load("train_throughput")
    out = tmp_path / "tt.json"
    res = tt.main(["--device", "cpu", "--model", "test_efficientnet", "--size", "32", "--batch", "4",
                   "--steps", "7", "--warmup", "2", "--val-steps", "2", "--workers", "0", "--threads", "1",
                   "--sampler", sampler, "--rows", "64", "--json", str(out)])
    assert res["loop_steps"] == 7 and res["loop_images"] == 7 * 4  # not the sampler's natural epoch
    assert res["val_images"] == 2 * 2 * 4 and res["val"] > 0
    assert res["loop"] > 0 and res["model_only"] > 0 and 0 < res["loop_vs_model"]
    assert json.loads(out.read_text())["loop_steps"] == 7


def test_scale_fit_extrapolates_fixed_plus_proportional():
    sc = _load("scale")
    # 2 s fixed + 100 s per unit of size, measured at 1% and 2%
    r = sc.fit([0.01, 0.02], [3.0, 4.0], [0.5, 0.6])
    assert r["full_seconds"] == pytest.approx(102.0) and r["full_seconds_upper"] == pytest.approx(200.0)
    assert r["exponent"] == pytest.approx(np.log2(4 / 3), abs=1e-3)
    assert r["full_peak_rss_gb"] == pytest.approx(10.4)
    quad = sc.fit([0.01, 0.02], [1.0, 4.0], [0.5, 0.5])  # quadratic growth is not hidden by the line
    assert quad["exponent"] == pytest.approx(2.0) and quad["full_seconds"] >= 4.0 * 50**2 - 1e-6
    sizes = sc._studies(np.random.default_rng(0), 1000, 29)
    assert sizes.sum() == 1000 and len(sizes) == 29 and sizes.min() >= 1


@pytest.mark.slow
def test_scale_benchmark_end_to_end(tmp_path):
    sc = _load("scale")
    out = sc.main(["--fractions", "0.001", "0.0005", "--repeat", "1", "--json", str(tmp_path / "s.json")])
    assert set(out["stages"]) == set(sc.STAGES) and any("seq" in n for n in out["stages"])
    for s in out["stages"].values():
        assert s["fractions"] == [0.0005, 0.001] and len(s["seconds"]) == len(s["peak_rss_gb"]) == 2
        assert s["full_peak_rss_gb"] >= max(s["peak_rss_gb"]) - 0.005 and min(s["peak_rss_gb"]) > 0.1
        assert {"exponent", "full_seconds", "full_peak_rss_gb"} <= set(s)
    assert 0 < out["disk"]["derived_gb"] / out["disk"]["raw_dicom_gb"] < 0.3
    assert json.loads((tmp_path / "s.json").read_text())["disk"] == out["disk"]


def test_predict_profiles_writes_the_contract(trained, tmp_path):
    """``benchmarks/predict.py --profiles --json OUT``: the four named profiles with the contract's keys;
    the ONNX run of the full profile scores what torch scores."""
    from ichdlib.config import dump_params

    bench = _load("predict")
    params = tmp_path / "params.yaml"
    params.write_text(dump_params(trained, params))  # root relative to the file
    out = tmp_path / "p.json"
    assert bench.main(["--profiles", "--timing-params", str(params), "--accuracy-params", str(params),
                       "--slices", "6", "--size", "64", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["profiles"]
    keys = {"seconds_per_study", "slices", "forward_passes", "oof_wll_ratio", "test_wll_ratio", "auc_any_delta"}
    for name in ("full_torch", "full_onnx", "fast"):
        assert keys <= set(res[name]), name
        assert res[name]["seconds_per_study"] > 0 and res[name]["slices"] == 6
    assert {"seconds_per_study", "slices", "forward_passes"} <= set(res["student"])
    assert res["full_torch"]["oof_wll_ratio"] == 1.0 and res["full_torch"]["auc_any_delta"] == 0.0
    assert res["full_onnx"]["oof_wll_ratio"] == pytest.approx(1.0, abs=1e-4)
    n_folds, n_views = 2, trained.features.tta
    assert res["full_torch"]["forward_passes"] == 6 * n_folds * n_views * len(trained.cnn.backbones)
    assert res["fast"]["forward_passes"] < res["full_torch"]["forward_passes"]
    assert res["student"]["forward_passes"] == 6
