"""Unit tests of the 2D CNN stage: samplers, dataset, device augmentation, models, schedule, loss."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch
from builders import toy_catalog

from ichdlib.cnn.data import (
    AIR_HU,
    DeviceAugment,
    SliceBatchSampler,
    SliceDataset,
    StudyBatchSampler,
    TtaView,
    eval_view,
    make_loader,
    middle_weights,
    tta_views,
)
from ichdlib.config import AugmentCfg, CnnCfg, ParamsError, load_params
from ichdlib.labels import LABELS
from ichdlib.windows import stack_channels_torch

OFF = dict(slice_swap=0.0, hflip=0.0, shift_scale_rotate=0.0, erase=0.0, random_crop=0.0)


# -- samplers --------------------------------------------------------------------------------------
def test_middle_weights_reach_every_slice_and_favour_the_middle():
    w = middle_weights(30)
    assert len(w) == 30 and (w >= 1).all()
    assert w[-1] == w[0] == 1  # the last slice is drawable (the original's off-by-one never drew it)
    assert w[15] == w[14] == w.max() == 3
    assert np.array_equal(w, w[::-1])
    assert middle_weights(1).tolist() == [1.0]


def test_study_sampler_epoch_length_coverage_and_determinism():
    studies = np.repeat(["a", "b", "c"], [5, 20, 1])
    s = StudyBatchSampler(studies, batch=4, k=4, seed=1)
    assert len(s) == 3  # ceil(4 * 3 studies / 4)
    batches = list(s)
    assert all(len(b) == 4 for b in batches)
    again = list(s)
    assert batches == again
    s.set_epoch(1)
    assert list(s) != batches
    draws = s.draw(60000, np.random.default_rng(0))
    counts = np.bincount(draws, minlength=26)
    assert (counts > 0).all(), "every slice, the first and last of each study included, must be reachable"
    per_study = np.array([counts[:5].sum(), counts[5:25].sum(), counts[25:].sum()]) / len(draws)
    assert np.allclose(per_study, 1 / 3, atol=0.02)  # a study first, uniformly
    mid = counts[5:25]  # then slices weighted toward the middle: weight 2 at the centre, 1 at the ends
    assert np.isclose(mid[10] / mid[-1], 2.0, rtol=0.2) and np.isclose(mid[10] / mid[0], 2.0, rtol=0.2)
    assert len(StudyBatchSampler(studies, batch=4, k=4, max_steps=2)) == 2


def test_slice_sampler_shuffles_without_repeats_and_eval_order_covers_all():
    s = SliceBatchSampler(10, 4, seed=0)
    b = list(s)
    assert len(b) == 2 and len(set(sum(b, []))) == 8  # ragged last batch dropped when training
    s.set_epoch(3)
    assert list(s) != b
    e = SliceBatchSampler(10, 4, shuffle=False)
    assert sum(list(e), []) == list(range(10))
    assert len(SliceBatchSampler(3, 8)) == 1  # never empty


# -- dataset ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return toy_catalog(studies=6, slices=8, size=32, folds=2, test_studies=1, seed=1)


def test_dataset_gathers_prev_row_next_and_labels(toy):
    cat, cache = toy
    ds = SliceDataset.from_catalog(cat, cache)
    x, y, pos = ds.__getitems__([0, 5, 7])
    assert x.dtype == torch.int16 and x.shape == (3, 3, 32, 32)
    for j, i in enumerate([0, 5, 7]):
        r = cat.iloc[i]
        for c, col in enumerate(["prev_row", "row", "next_row"]):
            assert np.array_equal(x[j, c].numpy(), cache[r[col]])
        assert np.allclose(y[j].numpy(), r[list(LABELS)].to_numpy(dtype=float))
    assert pos.tolist() == [0, 5, 7]
    one_x, one_y = ds[5]
    assert torch.equal(one_x, x[1]) and torch.equal(one_y, y[1])
    assert np.array_equal(x[0, 0].numpy(), x[0, 1].numpy())  # first slice: its own previous neighbour


def test_dataset_rejects_rows_outside_the_cache(toy):
    cat, cache = toy
    with pytest.raises(ValueError, match="out of range"):
        SliceDataset.from_catalog(cat, cache[:5])


def test_memmap_dataset_pickles_without_the_data_and_works_in_workers(toy, tmp_path):
    cat, cache = toy
    np.save(tmp_path / "cache.npy", cache)
    mm = np.load(tmp_path / "cache.npy", mmap_mode="r")
    ds = SliceDataset.from_catalog(cat, mm)
    blob = pickle.dumps(ds)
    assert len(blob) < cache.nbytes / 4
    ds2 = pickle.loads(blob)
    assert isinstance(ds2.cache, np.memmap) and np.array_equal(ds2.cache[3], cache[3])
    loader = make_loader(ds, SliceBatchSampler(len(ds), 8, shuffle=False), num_workers=1)
    got = torch.cat([x for x, _, _ in loader])
    ref = torch.cat([ds.__getitems__(b)[0] for b in SliceBatchSampler(len(ds), 8, shuffle=False)])
    assert torch.equal(got, ref)


# -- device augmentation -----------------------------------------------------------------------------
def _hu(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1000, 1500, (b, 3, size, size), generator=g).to(torch.int16)


def test_slice_swap_reverses_s_minus_1_and_s_plus_1_before_windowing():
    hu = _hu()
    aug = DeviceAugment(32, AugmentCfg(**{**OFF, "slice_swap": 1.0}), learnable=True).train()
    out = aug(hu)
    assert torch.equal(out[:, 0], hu[:, 2].float()) and torch.equal(out[:, 2], hu[:, 0].float())
    assert torch.equal(out[:, 1], hu[:, 1].float())
    windowed = DeviceAugment(32, AugmentCfg(**{**OFF, "slice_swap": 1.0})).train()(hu)
    # brain window now reads s+1, bone window reads s-1
    assert torch.allclose(windowed, stack_channels_torch(hu.flip(1).float(), "seed_3window"))
    none = DeviceAugment(32, AugmentCfg(**OFF), learnable=True).train()(hu)
    assert torch.equal(none, hu.float())


def test_hflip_and_erase_and_shapes():
    hu = _hu(6, 40)
    flip = DeviceAugment(40, AugmentCfg(**{**OFF, "hflip": 1.0}), learnable=True).train()(hu)
    assert torch.allclose(flip, hu.flip(-1).float(), atol=1e-2)
    erase = DeviceAugment(40, AugmentCfg(**{**OFF, "erase": 1.0}), learnable=True).train()(hu)
    frac = (erase == AIR_HU).all(1).float().mean((1, 2))
    assert ((frac >= 0.015) & (frac <= 0.42)).all()
    full = DeviceAugment(32, AugmentCfg(), learnable=False).train()
    out = full(hu)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert full.eval()(hu).shape == (6, 3, 32, 32)


def test_random_geometry_is_seeded_and_fills_with_air():
    hu = torch.full((8, 3, 32, 32), 40, dtype=torch.int16)
    aug = DeviceAugment(32, AugmentCfg(**{**OFF, "shift_scale_rotate": 1.0, "rotate_deg": 30.0}),
                        learnable=True).train()
    aug.reseed(5)
    a = aug(hu)
    aug.reseed(5)
    assert torch.equal(a, aug(hu))
    aug.reseed(6)
    assert not torch.equal(a, aug(hu))
    assert float(a.min()) < -500  # rotated/shifted borders are air, not 0 HU
    crop = DeviceAugment(32, AugmentCfg(**{**OFF, "random_crop": 1.0, "crop_range": (0.6, 0.6)}),
                         learnable=True).train()
    ramp = torch.arange(32, dtype=torch.float32).expand(2, 3, 32, 32)
    c = crop(ramp)
    spread = c[..., -1] - c[..., 0]
    assert torch.allclose(spread, torch.full_like(spread, 0.6 * 32 - 0.6), atol=0.2)  # zoomed, not cut


def test_eval_view_is_a_centre_crop_resized_back():
    hu = _hu(2, 40)
    v = eval_view(hu, 32, 0.8)
    assert v.shape == (2, 3, 32, 32)
    assert torch.equal(v, hu[..., 4:36, 4:36].float())  # 0.8 * 40 = 32: no resize needed
    aug = DeviceAugment(32, AugmentCfg(val_center_crop=0.8)).eval()
    assert torch.allclose(aug(hu), stack_channels_torch(v, "seed_3window"))


def test_tta_views_are_deterministic_and_start_with_the_validation_view():
    v = tta_views(6, (0.6, 0.99), seed=3)
    assert v[:4] == [TtaView(), TtaView(hflip=True), TtaView(swap=True), TtaView(hflip=True, swap=True)]
    assert v == tta_views(6, (0.6, 0.99), seed=3)
    assert all(0.6 <= x.crop <= 0.99 for x in v[4:])
    hu = _hu(3, 40)
    aug = DeviceAugment(32, AugmentCfg()).eval()
    assert torch.equal(aug.tta(hu, v[0]), aug(hu))
    assert torch.allclose(aug.tta(hu, v[2]), aug(hu.flip(1)))
    assert aug.tta(hu, v[4]).shape == (3, 3, 32, 32)


def test_augment_config_rejects_bad_ranges():
    with pytest.raises(ValueError):
        AugmentCfg(crop_range=(0.9, 0.5))
    with pytest.raises(ParamsError, match="hflip"):
        load_params(None, {"cnn": {"augment": {"hflip": 2}}})


# -- models ----------------------------------------------------------------------------------------
def test_build_cnn_logits_pooled_features_and_learnable_window():
    from ichdlib.cnn.models import build_cnn

    m = build_cnn("test_efficientnet").eval()
    x = torch.rand(2, 3, 32, 32)
    assert m(x).shape == (2, 6)
    f, logits = m.forward_both(x)
    assert f.shape == (2, m.feature_dim) and torch.allclose(logits, m(x), atol=1e-5)
    assert torch.equal(m.forward_pooled(x), f)
    lw = build_cnn("test_efficientnet", learnable_window="seed_3window").eval()
    assert lw.learnable_window and lw(_hu(2, 32).float()).shape == (2, 6)


@pytest.mark.parametrize("name,dim",
                         [("densenet121", 1024), ("densenet169", 1664), ("seresnext101_32x4d", 2048)])
def test_original_backbones_expose_their_feature_sizes(name, dim):
    from ichdlib.cnn.models import build_cnn

    assert build_cnn(name).feature_dim == dim


def test_local_weights_files_load_and_mismatches_fail_clearly(tmp_path):
    import timm
    from safetensors.torch import save_file

    from ichdlib.cnn.models import WeightsError, build_cnn

    src = timm.create_model("test_efficientnet")  # 1000-class ImageNet-style head
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    for f in ("w.pth", "w.safetensors"):
        m = build_cnn("test_efficientnet", pretrained=str(tmp_path / f))
        assert torch.equal(m.backbone.conv_stem.weight, src.conv_stem.weight)
        assert m.backbone.get_classifier().out_features == 6  # classifier ignored
    own = build_cnn("test_efficientnet")
    torch.save({"state_dict": own.state_dict(), "meta": {}}, tmp_path / "own.pt")  # 'backbone.' keys
    again = build_cnn("test_efficientnet", pretrained=tmp_path / "own.pt")
    assert torch.equal(again.backbone.conv_stem.weight, own.backbone.conv_stem.weight)
    with pytest.raises(WeightsError, match="w.pth.*resnet10t"):
        build_cnn("resnet10t", pretrained=tmp_path / "w.pth")  # shapes differ
    sd = {k.replace("blocks.", "stages."): v for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "renamed.pth")
    with pytest.raises(WeightsError, match="not found in the file"):
        build_cnn("test_efficientnet", pretrained=tmp_path / "renamed.pth")  # keys differ
    with pytest.raises(WeightsError, match="not found"):
        build_cnn("test_efficientnet", pretrained=tmp_path / "nope.pth")


def test_pretrained_true_offline_fails_fast_with_advice(monkeypatch):
    from ichdlib.cnn.models import WeightsError, build_cnn

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="local file"):
        build_cnn("test_efficientnet", pretrained=True)
    assert time.perf_counter() - t0 < 10


def test_unknown_backbone_name_is_reported():
    from ichdlib.cnn.models import build_cnn

    with pytest.raises(ValueError, match="unknown timm model 'densenet12'"):
        build_cnn("densenet12")


# -- schedule and loss -----------------------------------------------------------------------------
def test_seed_restarts_schedule_matches_the_original_shape():
    from ichdlib.cnn.train import lr_at

    cnn = CnnCfg(schedule="seed_restarts")
    lrs = [lr_at(cnn, 5e-4, 40, e) for e in range(21)]
    assert lrs[:11] == [5e-4] * 11
    assert np.allclose(lrs[11:16], [4.53e-4, 3.31e-4, 1.79e-4, 5.7e-5, 5e-4], rtol=0.01)
    assert np.allclose(lrs[16:21], lrs[11:16])
    cos = CnnCfg(schedule="cosine")
    steps = [lr_at(cos, 1e-3, 3, e, s, 10) for e in range(3) for s in range(10)]
    assert steps[0] == 1e-3 and all(a >= b for a, b in zip(steps, steps[1:], strict=False))
    assert steps[-1] < 0.05e-3


def test_weighted_bce_is_the_competition_metric():
    from ichdlib.cnn.train import weighted_bce
    from ichdlib.metrics import weighted_log_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g) * 2
    y = (torch.rand(50, 6, generator=g) < 0.3).float()
    w = torch.tensor([2.0, 1, 1, 1, 1, 1])
    ours = float(weighted_bce(logits, y, w))
    ref = weighted_log_loss(y.numpy(), torch.sigmoid(logits).double().numpy())
    assert ours == pytest.approx(ref, rel=1e-5)
