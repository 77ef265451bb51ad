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
