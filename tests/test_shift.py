"""Scanner shifts of the phantom (``ichd synth --shift``), scanner-robustness augmentation, shift scoring."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from ichdlib.cli import main
from ichdlib.cnn.data import DeviceAugment, gaussian_blur
from ichdlib.config import AugmentCfg, ParamsError, load_params
from ichdlib.external import score_predictions
from ichdlib.labels import LABELS
from ichdlib.phantom.anatomy import render_study
from ichdlib.phantom.shift import SHIFTS, ScannerShift, get_shift
from ichdlib.phantom.synth import COMPLETE_MARKER, MANIFEST, ensure_phantom, generate_phantom, plan_phantom

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
OFF = dict(slice_swap=0.0, hflip=0.0, shift_scale_rotate=0.0, erase=0.0, random_crop=0.0)


def _plan(size: int = 64, slices: int = 3, shift: ScannerShift | None = None):
    """One planned study (cut to a few slices), optionally with another scanner's pixel settings."""
    plans, _ = plan_phantom(4, 1, size)
    pl = next(p for p in plans if p.positive)
    return dataclasses.replace(pl, n_slices=slices, s0=0.45, shift=shift)


def _air(hu: np.ndarray) -> np.ndarray:
    return hu[:, :6, :6]  # a corner: air plus noise on every slice


# -- the renderer --------------------------------------------------------------------------------------
def test_none_is_the_ordinary_phantom(tmp_path):
    assert get_shift(None) == get_shift("none") == ScannerShift() and ScannerShift().is_default
    assert ScannerShift().noise_kernel == 5  # the ordinary phantom's 5 x 5 noise texture
    a, _ = plan_phantom(6, 3, 64, True)
    b, _ = plan_phantom(6, 3, 64, True, "none")
    assert a == b and all(p.shift is None for p in b)
    generate_phantom(tmp_path / "a", 3, 3, 48, workers=1, progress=False)
    generate_phantom(tmp_path / "b", 3, 3, 48, workers=1, progress=False, shift="none")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.dcm"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert "shift" not in json.loads((tmp_path / "b" / COMPLETE_MARKER).read_text())
    assert "shift" not in json.loads((tmp_path / "b" / MANIFEST).read_text())


def test_shift_plans_spacing_windows_and_encodings():
    sh = SHIFTS["scannerB"]
    plans, _ = plan_phantom(8, 2, 64, False, "scannerB")
    assert all(sh.spacing_z[0] <= p.spacing_z <= sh.spacing_z[1] for p in plans)
    assert all(sh.slices[0] <= p.n_slices <= sh.slices[1] and len(p.sop_uids) == p.n_slices for p in plans)
    assert {p.window for p in plans} <= {tuple(map(float, w)) for w in sh.windows}
    assert {p.encoding for p in plans} == set(sh.encodings) and all(p.shift == sh for p in plans)
    thick, _ = plan_phantom(8, 2, 64, False, "scannerC")
    assert min(p.spacing_z for p in thick) >= 6.0 > max(p.spacing_z for p in plans)


def test_shift_changes_spacing_noise_and_calibration_as_claimed():
    base = render_study(_plan())
    # the same head and noise draws: only the scanner differs
    fov = render_study(_plan(shift=ScannerShift(fov_scale=1.3)))
    assert fov.pixel_spacing == pytest.approx(1.3 * base.pixel_spacing, rel=1e-5)
    noisy = render_study(_plan(shift=ScannerShift(noise_scale=2.5)))
    assert _air(noisy.hu).std() == pytest.approx(2.5 * _air(base.hu).std(), rel=1e-3)
    drift = render_study(_plan(shift=ScannerShift(hu_offset=5.0, hu_scale=1.03)))
    assert np.allclose(drift.hu, 1.03 * base.hu + 5.0, atol=1e-2)
    assert np.array_equal(drift.labels, base.labels) and np.array_equal(drift.masks, base.masks)


def test_kernel_blur_and_sharpening_are_measurable():
    quiet = ScannerShift(noise_scale=0.0)
    hf = {}
    for name, sh in {"base": quiet, "soft": dataclasses.replace(quiet, blur_scale=3.0),
                     "sharp": dataclasses.replace(quiet, sharpen=0.8)}.items():
        hu = render_study(_plan(size=96, slices=1, shift=sh)).hu[0].astype(np.float64)
        brain = np.clip(hu, 0, 100)  # the soft-tissue range: skull edges saturate
        hf[name] = float(np.abs(np.diff(brain, axis=1)).mean())
    assert hf["soft"] < 0.9 * hf["base"] and hf["sharp"] > 1.5 * hf["base"]


def test_noise_texture_is_coarser_with_a_wider_kernel():
    def lag1(sh: ScannerShift) -> float:
        st = render_study(_plan(size=320, slices=1, shift=sh))
        assert st.pixel_spacing < 0.8  # correlated noise is drawn below 0.8 mm pixels
        a = st.hu[0][:40, :40].astype(np.float64)
        a = a - a.mean()
        return float((a[:, 1:] * a[:, :-1]).mean() / (a * a).mean())

    assert lag1(ScannerShift(noise_sigma_px=1.5)) > lag1(ScannerShift()) + 0.1


def test_bad_shift_name_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown scanner shift 'scannerX'; choose one of none, scannerB"):
        generate_phantom(tmp_path / "p", 2, 0, 32, shift="scannerX")
    assert main(["synth", "--out", str(tmp_path / "q"), "--studies", "2", "--size", "32", "--shift", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown scanner shift 'nope'" in err


def test_shifted_phantom_records_its_scanner_and_params_reach_it(tmp_path):
    synth = {"studies": 2, "seed": 0, "size": 48, "quirks": False, "masks": False, "workers": 1, "shift": "scannerC"}
    P = load_params(None, {"root": str(tmp_path), "paths": {"data_root": "ph"}, "synth": synth})
    root = ensure_phantom(P, progress=False)
    man = json.loads((root / MANIFEST).read_text())
    assert man["shift"]["name"] == "scannerC" and man["config"]["shift"] == "scannerC"
    assert json.loads((root / COMPLETE_MARKER).read_text())["shift"] == "scannerC"
    assert ensure_phantom(P, progress=False) == root  # the same settings: kept
    other = load_params(None, {"root": str(tmp_path), "paths": {"data_root": "ph"}, "synth": {**synth, "shift": "none"}})
    with pytest.raises(ValueError, match="params.synth asks for"):
        ensure_phantom(other, progress=False)
    with pytest.raises(ParamsError, match="kernel_range"):
        load_params(None, {"cnn": {"augment": {"kernel_range": [-2.0, 1.0]}}})


# -- augmentation --------------------------------------------------------------------------------------
def _hu(b: int = 6, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(b, 3, size, size, generator=g) * 120 - 20).to(torch.int16)


def test_scanner_augment_off_keeps_the_old_stream():
    hu = _hu()
    old = DeviceAugment(24, AugmentCfg(), learnable=True).train()
    new = DeviceAugment(24, AugmentCfg(intensity=0.0, noise=0.0, kernel=0.0, hu_offset=9.0), learnable=True).train()
    old.reseed(3)
    new.reseed(3)
    assert torch.equal(old(hu), new(hu)) and torch.equal(old(hu), new(hu))


@pytest.mark.parametrize("key", ["intensity", "noise", "kernel"])
def test_scanner_augment_is_seeded_and_keeps_shape(key):
    hu = _hu()
    aug = DeviceAugment(24, AugmentCfg(**OFF, **{key: 1.0}), learnable=True).train()
    aug.reseed(5)
    a = aug(hu)
    aug.reseed(5)
    b = aug(hu)
    assert a.shape == (6, 3, 24, 24) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.allclose(a, hu.float())
    windowed = DeviceAugment(24, AugmentCfg(**OFF, **{key: 1.0})).train()(hu)
    assert windowed.shape == (6, 3, 24, 24) and windowed.dtype == torch.float32 and torch.isfinite(windowed).all()


def test_intensity_augment_stays_in_its_range():
    hu = torch.full((64, 3, 8, 8), 100, dtype=torch.int16)
    aug = DeviceAugment(8, AugmentCfg(**OFF, intensity=1.0, hu_offset=5.0, hu_scale=0.05), learnable=True).train()
    out = aug(hu)
    per_image = out[:, 0, 0, 0]
    assert torch.equal(out, per_image.view(-1, 1, 1, 1).expand_as(out))  # one scanner per image, all channels
    assert per_image.min() >= 100 * 0.95 - 5 - 1e-4 and per_image.max() <= 100 * 1.05 + 5 + 1e-4
    assert per_image.std() > 2


def test_gaussian_blur_keeps_constants_and_smooths():
    x = torch.full((2, 3, 9, 9), 40.0)
    assert torch.allclose(gaussian_blur(x, 1.0), x)
    x[:, :, 4, 4] = 140.0
    y = gaussian_blur(x, 1.0)
    assert y.shape == x.shape and y.max() < 140 and y.sum().item() == pytest.approx(x.sum().item(), rel=1e-5)


# -- scoring -------------------------------------------------------------------------------------------
def test_score_predictions_slice_and_study_level():
    sops = [f"ID_{i:03x}" for i in range(8)]
    truth = pd.DataFrame(0.0, index=sops, columns=list(LABELS))
    truth.loc[["ID_001", "ID_005"], ["any", "subdural"]] = 1.0
    p_any = [0.1, 0.9, 0.2, 0.3, 0.6, 0.25, 0.2, 0.1]
    slices = pd.DataFrame({"sop_uid": sops + ["ID_fff"], "study_uid": list("aabbccdd") + ["e"]})
    for c in LABELS:
        slices[f"p_{c}"] = [*p_any, 0.5]
    s = score_predictions(slices, truth)
    assert s["n_slices"] == 8 and s["slices_without_truth"] == 1
    assert s["prevalence"] == 0.25 and s["mean_p_any"] == pytest.approx(np.mean(p_any), abs=1e-4)
    assert s["auc_any"] == pytest.approx(10 / 12, abs=1e-4)
    # studies: a (max .9, pos), b (.3, neg), c (.6, pos), d (.2, neg)
    st = s["study"]
    assert st["n_studies"] == 4 and st["n_positive"] == 2 and st["auc_any"] == 1.0
    assert st["sensitivity_05"] == 1.0 and st["specificity_05"] == 1.0 and st["median_max_any_negative"] == 0.25
    with pytest.raises(ValueError, match="lack columns"):
        score_predictions(slices.drop(columns=["p_any"]), truth)


# -- the benchmark -------------------------------------------------------------------------------------
def test_shift_benchmark_scores_what_it_predicts(trained, tmp_path):
    """benchmarks/shift_robustness.py on a tiny shifted phantom: every slice predicted and scored once."""
    import importlib.util
    import sys
    from pathlib import Path

    from ichdlib.serve.bundle import export

    bundle = export(trained, tmp_path / "bundle")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shift_robustness.py"
    spec = importlib.util.spec_from_file_location("bench_shift_robustness", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    res = mod.main(["--bundle", str(bundle), "--shift", "scannerB", "--studies", "4", "--size", "48",
                    "--work", str(tmp_path / "ph"), "--device", "cpu", "--json", str(out)])
    r = res["scannerB"]["final"]
    man = json.loads((tmp_path / "ph" / "scannerB_s1_n4_48" / MANIFEST).read_text())
    assert r["n_slices"] == man["counts"]["train_images"] + man["counts"]["test_images"]
    assert r["slices_without_truth"] == 0 == r["truth_without_prediction"]
    assert r["study"]["n_studies"] == 4 and 0 <= r["mean_p_any"] <= 1
    assert json.loads(out.read_text())["scannerB"]["cnn2d"]["n_slices"] == r["n_slices"]
    assert "| scannerB | 4 (" in mod.table(res)
