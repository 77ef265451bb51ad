"""ichdlib.review.cam: target layers, hooks, CAM shape/geometry, per-class maps, pointing game, case selection."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from torch import nn  # noqa: E402

from ichdlib.cnn.data import center_crop_box  # noqa: E402
from ichdlib.labels import LABELS  # noqa: E402
from ichdlib.review import cam, plots, pointing  # noqa: E402
from ichdlib.review import cases as review_cases  # noqa: E402
from ichdlib.review import engine as cam_engine  # noqa: E402


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=6)


def _blob(h: int, w: int, center: tuple[int, int], radius: float, value: float = 60.0) -> np.ndarray:
    rr, cc = np.mgrid[:h, :w]
    img = np.zeros((h, w), np.float32)
    img[(rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2] = value
    return img


class Spot(nn.Module):
    """CAM = (positive) image intensity: a 1x1 conv trunk summing the channels, pooled, positive head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, kernel_size=1))
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)
            self.features[0].bias.zero_()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 6)
        with torch.no_grad():
            self.fc.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_target_layer_by_family_and_probe():
    assert cam.find_target_layer(_resnet())[0] == "layer4"
    dense = timm.create_model("densenet121", pretrained=False, num_classes=6)
    assert cam.find_target_layer(dense)[0] == "features.norm5"
    lcnet = timm.create_model("lcnet_050", pretrained=False, num_classes=6)
    name, layer = cam.find_target_layer(lcnet)
    # the squeeze-excite pools inside the blocks must not stop the probe early
    assert name == "blocks" and layer is lcnet.blocks
    assert cam.count_hooks(lcnet) == 0  # probe hooks removed
    assert cam.find_target_layer(Spot())[0] == "features"
    with pytest.raises(ValueError, match="no module 'nope'"):
        cam.find_target_layer(lcnet, "nope")


def test_coarse_family_layer_steps_back_to_a_finer_stage():
    from ichdlib.cnn.models import build_cnn

    res = _resnet()
    assert cam.find_target_layer(res, size=256, min_map=6)[0] == "layer4"  # 8 x 8: kept
    assert cam.find_target_layer(res, size=96, min_map=6)[0] == "layer3"  # 3 x 3 -> 6 x 6
    assert cam.find_target_layer(res, size=96, min_map=0)[0] == "layer4"
    # bottleneck blocks: the 1x1 conv at the start of layer4 is finer but inside layer4: not taken
    wrapped = build_cnn("resnet50")
    assert cam.find_target_layer(wrapped, size=96, min_map=6)[0] == "backbone.layer3"
    assert cam.count_hooks(wrapped) == 0
    # the stepped-back layer gives a finer map: more distinct values than a 3 x 3 grid can make
    stack = np.random.default_rng(2).integers(-50, 150, size=(1, 3, 96, 96)).astype(np.int16)
    coarse = cam.compute_cams(res, stack, ["any"], size=96, crop=1.0, min_map=0)
    fine = cam.compute_cams(res, stack, ["any"], size=96, crop=1.0, min_map=6)
    assert not np.allclose(coarse, fine)


def test_geometry_round_trip():
    """A peak at the network input lands where the same point of the original slice is."""
    h0, w0, spot = 200, 160, (60, 110)
    orig = _blob(h0, w0, spot, radius=6)
    cached = cv2.resize(orig, (64, 64), interpolation=cv2.INTER_AREA)
    x = cam.preprocess(np.stack([cached] * 3)[None], size=48, crop=0.8).numpy()
    assert x.shape == (1, 3, 48, 48)
    r, c = pointing.cam_peak(x[0, 1])
    # a map peaking there at the input, brought back to the slice's geometry
    m = np.zeros((1, 1, 48, 48), np.float32)
    m[0, 0] = np.exp(-((np.arange(48)[:, None] - r) ** 2 + (np.arange(48)[None] - c) ** 2) / 4.0)
    back = cam.undo_geometry(m, (64, 64), 0.8, (h0, w0))
    assert back.shape == (1, 1, h0, w0)
    pr, pc = pointing.cam_peak(back[0, 0])
    assert abs(pr - spot[0]) <= 5 and abs(pc - spot[1]) <= 5, (pr, pc)
    # nothing outside the crop the network saw
    top, left, ch, cw = center_crop_box(h0, w0, 0.8)
    assert back[0, 0, : top - 1].max() == 0 and back[0, 0, :, : left - 1].max() == 0
    assert back[0, 0, top + 2 : top + ch - 2, left + 2 : left + cw - 2].min() >= 0


def test_compute_cams_peak_end_to_end():
    """Grad-CAM through the probed layer of a model that looks at the bright spot peaks at the spot."""
    h0, w0, spot = 180, 240, (120, 70)
    orig = _blob(h0, w0, spot, radius=8)
    cached = cv2.resize(orig, (64, 64), interpolation=cv2.INTER_AREA)
    stack = np.stack([cached] * 3)[None].astype(np.int16)
    maps = cam.compute_cams(Spot(), stack, ["any", "subdural"], size=48, crop=0.8, out_size=(h0, w0))
    assert maps.shape == (1, 2, h0, w0) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0 and maps.max() > 0.99
    pr, pc = pointing.cam_peak(maps[0, 0])
    assert abs(pr - spot[0]) <= 6 and abs(pc - spot[1]) <= 6, (pr, pc)
    assert pointing.pointing_game(maps[:, 0], [_blob(h0, w0, spot, 8) > 0]) == 1.0


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam"])
def test_shapes_and_per_class_maps(method):
    model = _resnet()
    stack = np.random.default_rng(0).integers(-50, 150, size=(2, 3, 64, 64)).astype(np.int16)
    maps = cam.compute_cams(model, stack, None, method=method, size=64, out_size=(90, 70), batch=12)
    assert maps.shape == (2, 6, 90, 70) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0.99
    # one map per class: the targets differ, so do the maps
    diffs = [np.abs(maps[:, 0] - maps[:, k]).mean() for k in range(1, 6)]
    assert min(diffs) > 1e-3, diffs
    assert cam.count_hooks(model) == 0


def test_hooks_released_and_batching_invariant():
    model = _resnet()
    model.train()
    stack = np.random.default_rng(1).integers(-50, 150, size=(3, 3, 64, 64)).astype(np.int16)
    first = cam.compute_cams(model, stack, ["any", "subdural"], size=64, batch=6)
    for _ in range(2):
        again = cam.compute_cams(model, stack, ["any", "subdural"], size=64, batch=2)
        assert cam.count_hooks(model) == 0  # no growth over repeated calls
    np.testing.assert_allclose(again, first, atol=1e-4)  # batching does not change the maps
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def test_bad_inputs_fail_clearly():
    model = _resnet()
    with pytest.raises(ValueError, match="unknown class"):
        cam.compute_cams(model, np.zeros((1, 3, 32, 32)), ["bleed"])
    with pytest.raises(ValueError, match="out of range"):
        cam.compute_cams(model, np.zeros((1, 3, 32, 32)), [7])
    with pytest.raises(ValueError, match="unknown CAM method"):
        cam.compute_cams(model, np.zeros((1, 3, 32, 32)), method="scorecam")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        cam.compute_cams(model, np.zeros((3, 32, 32)))
    assert cam.count_hooks(model) == 0


def test_pointing_game():
    c = np.zeros((2, 10, 10), np.float32)
    c[0, 2, 3] = 1.0
    c[1, 8, 8] = 1.0
    m = np.zeros((2, 10, 10), bool)
    m[:, 2:4, 2:5] = True
    assert pointing.pointing_hits(c, m).tolist() == [True, False]
    assert pointing.pointing_game(c, m) == 0.5
    m[1, 6, 6] = True  # 2 * sqrt(2) = 2.83 px from the second peak
    assert pointing.pointing_game(c, m, tolerance=2) == 0.5 and pointing.pointing_game(c, m, tolerance=2.9) == 1.0
    np.testing.assert_allclose(pointing.peak_distances(c, m), [0.0, np.sqrt(8)], rtol=1e-3)
    assert not pointing.pointing_hits(np.zeros((1, 4, 4)), np.ones((1, 4, 4)))[0]  # empty map is a miss
    assert np.isnan(pointing.pointing_game([], []))
    with pytest.raises(ValueError, match="shape"):
        pointing.pointing_game(c, m[:, :5])


def test_class_mask_bits():
    bm = np.array([[0, 1, 2, 16 | 4]], np.uint8)
    assert pointing.class_mask(bm, "any").tolist() == [[False, True, True, True]]
    assert pointing.class_mask(bm, "epidural").tolist() == [[False, True, False, False]]
    assert pointing.class_mask(bm, "intraparenchymal").tolist() == [[False, False, True, False]]
    assert pointing.class_mask(bm, "subdural").tolist() == [[False, False, False, True]]


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 60
    tab = pd.DataFrame({"sop_uid": [f"ID_{i:03d}" for i in range(n)], "study_uid": [f"S{i // 10}" for i in range(n)],
                        "slice_index": np.arange(n) % 10})
    for c in LABELS:
        tab[f"y_{c}"] = (rng.random(n) < 0.4).astype(float)
        tab[f"p2d_{c}"] = tab[f"y_{c}"] * 0.3 + rng.random(n) * 0.7
        tab[f"p_{c}"] = tab[f"p2d_{c}"]
    return tab


def test_select_cases():
    tab = _table()
    sel = review_cases.select_cases(tab, 2, threshold=0.5)
    for lab in LABELS:
        y, p = tab[f"y_{lab}"], tab[f"p2d_{lab}"]
        tp = sel[(sel.label == lab) & (sel.group == "tp")]
        assert list(tp["prob"]) == sorted(p[(y == 1) & (p >= 0.5)], reverse=True)[:2]
        fp = sel[(sel.label == lab) & (sel.group == "fp")]
        assert (fp["truth"] == 0).all() and list(fp["prob"]) == sorted(p[(y == 0) & (p >= 0.5)], reverse=True)[:2]
        fn = sel[(sel.label == lab) & (sel.group == "fn")]
        assert len(tp) == len(fp) == len(fn) == 2
        assert (fn["truth"] == 1).all() and list(fn["prob"]) == sorted(p[(y == 1) & (p < 0.5)])[:2]
    # an empty group stays empty (no rows invented)
    assert len(review_cases.select_cases(tab.assign(y_any=1.0), 2, labels=["any"]).query("group == 'fp'")) == 0
    summ = review_cases.study_summary(tab)
    assert list(summ["study_uid"]) == [f"S{i}" for i in range(6)]
    assert np.allclose(summ["pred_any"], tab.groupby("study_uid")["p_any"].max().to_numpy())


def test_overlay_and_gallery():
    hu = _blob(32, 32, (10, 10), 4, value=60.0)
    cmap = np.zeros((32, 32), np.float32)
    plain = plots.overlay(hu, None)
    assert plain.shape == (32, 32, 3) and plain.dtype == np.uint8
    cmap[20:25, 20:25] = 1.0
    over = plots.overlay(hu, cmap, opacity=0.8)
    assert (over[22, 22] != plain[22, 22]).any() and (over[5, 5] == plain[5, 5]).all()
    outlined = plots.overlay(hu, None, outline=hu > 0)
    assert tuple(outlined[6, 10]) == cam.OUTLINE_RGB and tuple(outlined[10, 10]) != cam.OUTLINE_RGB
    cases = review_cases.select_cases(_table(), 2, labels=["any"])
    n = len(cases)
    fig = plots.gallery_figure(cases, [hu] * n, [cmap] * n, masks=[(hu > 0).astype(np.uint8)] * n, title="t")
    assert len(fig.axes) == 3 * 2 * 2 and sum(bool(ax.images) for ax in fig.axes) == 2 * n
    empty = plots.gallery_figure(cases.iloc[:0], [], [], title="none")
    assert not any(ax.images for ax in empty.axes)
    head = np.full((20, 30), -1000.0)
    head[5:9, 10:20] = 40.0
    rows, cols = plots.head_box(head, margin=1)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (4, 10, 9, 21)


# --------------------------------------------------------------------------------------------------
# A run: the smoke phantom (tests/conftest.py), fold checkpoints of an untrained CNN, fabricated OOF
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cam_run(ingested, tmp_path_factory):
    """The ingested smoke phantom with random-weight fold checkpoints and OOF probabilities near the truth."""
    from ichdlib.cnn.models import build_cnn
    from ichdlib.ingest.table import load_catalog

    P = ingested.model_copy(deep=True)
    P.paths.reports = tmp_path_factory.mktemp("cam_reports")
    # A work folder of its own (catalog and cache copied), so the fake checkpoints below never mix with
    # the shared smoke run that other test modules train.
    work = tmp_path_factory.mktemp("cam_work")
    for f in ingested.work_dir.iterdir():
        if f.is_file():
            shutil.copy(f, work / f.name)
    P.paths.work = work
    cat = load_catalog(P.work_dir)
    bb = P.cnn.backbones[0]
    out = P.work_dir / "cnn" / bb.key
    out.mkdir(parents=True, exist_ok=True)
    train = cat[cat["split"] == "train"]
    for k in sorted(train["fold"].unique()):
        torch.manual_seed(int(k))
        model = build_cnn(bb.name)
        meta = {"name": bb.name, "key": bb.key, "size": bb.size, "recipe": "seed_3window", "fold": int(k),
                "single_window": [40.0, 80.0], "learnable_window": False, "val_center_crop": 0.8}
        torch.save({"state_dict": model.state_dict(), "meta": meta}, out / f"fold{k}.pt")
    oof = train[["sop_uid", "fold"]].copy()
    for c in LABELS:
        oof[c] = train[c].to_numpy() * 0.8 + 0.1
    oof.to_parquet(out / "oof.parquet")
    return P


def test_run_review_pointing_game_and_viewer(cam_run, caplog):
    import json as _json

    from ichdlib.review.viewer import run_state

    P = cam_run
    P.reports_dir.mkdir(parents=True, exist_ok=True)
    (P.reports_dir / "metrics.json").write_text(_json.dumps({"prior": {"oof": {"wll": 0.3}}}))
    table = review_cases.review_table(P)  # no sequence models yet: final = the 2D CNN's
    assert len(table) and np.allclose(table["p_any"], table["p2d_any"])
    engine = cam_engine.CamEngine(P)
    assert engine.target_layer() == "backbone.blocks.1"  # lcnet at 48 px: the 2 x 2 trunk steps back to 12 x 12
    rows = table.head(3)
    maps = engine.cams(rows)
    for m, (_, r) in zip(maps, rows.iterrows(), strict=True):
        assert m.shape == (6, r["rows"], r["cols"])
    hu = engine.hu(rows)
    assert [h.shape for h in hu] == [m.shape[1:] for m in maps]
    cases = review_cases.select_cases(table, 1, labels=["any", "subdural"])
    figs = plots.gallery(engine, cases, ["any", "subdural"])
    # a label without any case gets no (empty) figure
    assert set(figs) == {c for c in ("any", "subdural") if (cases["label"] == c).any()} and "any" in figs
    pg = pointing.pointing_game_run(P, engine, table, max_per_class=4)
    n_pos = {c: min(4, int((table[f"y_{c}"] == 1).sum())) for c in LABELS}
    assert pg["positives"]["n"] == n_pos and pg["method"] == P.cam.method and pg["backbone"] == engine.key
    assert pg["target_layer"] == "backbone.blocks.1"
    assert pg["n"] == n_pos  # the fabricated OOF puts every positive above the threshold
    for c in LABELS:
        assert (pg["per_class"][c] is None) == (n_pos[c] == 0)
        assert n_pos[c] == 0 or 0 < pg["chance"]["per_class"][c] < 0.5  # lesions cover part of the image
        assert n_pos[c] == 0 or pg["standard_tolerance"]["per_class"][c] >= pg["per_class"][c]
    data = _json.loads((P.reports_dir / "metrics.json").read_text())
    assert data["prior"]["oof"]["wll"] == 0.3 and data["pointing_game"]["n"] == n_pos  # merged, not clobbered
    # the pooled hit rate with its 95% interval (a bootstrap over patients), in metrics.json too
    lo, hi = pg["overall_ci"]
    assert 0 <= lo <= pg["overall"] <= hi <= 1 and data["pointing_game"]["overall_ci"] == [lo, hi]
    assert pg["standard_tolerance"]["overall_ci"] is not None and "overall_ci" not in pg["chance"]
    # the viewer over the run's studies
    studies = list(dict.fromkeys(cases["study_uid"]))
    state = run_state(P, engine, table, studies)
    assert set(state.study_ids) == set(studies)
    img = state.image()
    h, w = state.study_obj().hu[state.index].shape
    assert h // 2 < img.shape[0] <= h and w // 2 < img.shape[1] <= w and state.cam_calls == 1


def test_gallery_draws_only_groups_with_cases():
    hu = _blob(32, 32, (10, 10), 4, value=60.0)
    cases = review_cases.select_cases(_table(), 2, labels=["any"])
    tp = cases[cases["group"] == "tp"]
    n = len(tp)
    fig = plots.gallery_figure(tp, [hu] * n, [np.zeros((32, 32), np.float32)] * n, title="any")
    assert len(fig.axes) == 1 * 2 * n  # one row (TP), no empty FP/FN rows
    assert "no FP, FN cases" in fig._suptitle.get_text()
