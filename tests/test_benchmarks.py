"""The benchmarks measure what they report (tiny CPU runs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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
