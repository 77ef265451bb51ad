"""In-plane field-of-view normalisation (ichdlib.serve.inplane): what the bundle records, the forward and inverse
transforms (a blob lands where it was), and predictions unchanged inside the training range."""

from __future__ import annotations

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from builders import series_files

from ichdlib.ingest.cache import resize_hu
from ichdlib.serve import inplane as ip

FOV = {"fov_x_mm": {"p02": 200.0, "median": 230.0, "p98": 260.0},
       "fov_y_mm": {"p02": 200.0, "median": 230.0, "p98": 260.0}, "n_studies": 10, "source": "test"}
TRAIN = ip.TrainingFov((200.0, 230.0, 260.0), (200.0, 230.0, 260.0))


def _disc(shape, centre, radius_px, value=80.0) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.full(shape, -1000.0, np.float32)
    img[np.hypot(yy - centre[0], xx - centre[1]) <= radius_px] = value
    return img


# --------------------------------------------------------------------------------------------------
# What the bundle records
# --------------------------------------------------------------------------------------------------
def test_inplane_section_per_study_percentiles():
    # 10 training studies with fields of view 200..290 mm (one odd slice each that the per-study median ignores),
    # and a test study far outside that must not count
    rows = []
    for k in range(10):
        fov = 200.0 + 10 * k
        rows += [{"split": "train", "study_uid": f"s{k}", "pixel_spacing": fov / 256, "rows": 256, "cols": 256}] * 3
        rows.append({"split": "train", "study_uid": f"s{k}", "pixel_spacing": 5.0, "rows": 256, "cols": 256})
    rows.append({"split": "test", "study_uid": "t", "pixel_spacing": 9.0, "rows": 512, "cols": 512})
    rows.append({"split": "train", "study_uid": "nan", "pixel_spacing": np.nan, "rows": 256, "cols": 256})
    sec = ip.inplane_section(pd.DataFrame(rows))
    assert sec["n_studies"] == 10
    assert sec["fov_x_mm"]["median"] == pytest.approx(245.0)
    assert sec["fov_x_mm"]["p02"] == pytest.approx(np.percentile(np.arange(200, 300, 10), 2), abs=0.01)
    assert sec["fov_x_mm"]["p98"] == pytest.approx(np.percentile(np.arange(200, 300, 10), 98), abs=0.01)
    assert sec["fov_y_mm"] == sec["fov_x_mm"]
    t = ip.TrainingFov.from_manifest({"training": {"inplane": sec}})
    assert t.median == (245.0, 245.0) and t.inside(245, 245) and not t.inside(400, 245)
    assert ip.TrainingFov.from_manifest({"training": {"slice_thickness_mm": 5.0}}) is None  # an older bundle
    assert ip.inplane_section(pd.DataFrame(rows[-1:])) is None


def test_bundle_schema_takes_the_section_and_checks_it(smoke_params, tmp_path):
    from ichdlib.serve.bundle import Bundle, BundleError

    b = Bundle.untrained(smoke_params, folds=1)
    b.manifest["training"] = {"slice_thickness_mm": 5.0, "spacing_z_mm": 5.0, "n_studies": 10, "source": "t",
                              "inplane": FOV}
    loaded = Bundle.load(b.save(tmp_path / "ok"))
    assert ip.TrainingFov.from_manifest(loaded.manifest) == TRAIN
    b.manifest["training"]["inplane"] = dict(FOV, fov_x_mm={"p02": 300.0, "median": 230.0, "p98": 260.0})
    with pytest.raises(BundleError, match="training.inplane.fov_x_mm"):
        b.save(tmp_path / "bad")


def test_export_records_the_training_field_of_view(ingested):
    from ichdlib.serve.bundle_build import training_section

    sec = training_section(ingested)["inplane"]
    cat = pd.read_parquet(ingested.layout.catalog)
    fov = (cat.loc[cat["split"] == "train", "pixel_spacing"] * cat.loc[cat["split"] == "train", "cols"])
    assert fov.min() - 0.01 <= sec["fov_x_mm"]["p02"] <= sec["fov_x_mm"]["median"] <= sec["fov_x_mm"]["p98"]
    assert sec["fov_x_mm"]["p98"] <= fov.max() + 0.01 and sec["n_studies"] > 0


# --------------------------------------------------------------------------------------------------
# The transforms
# --------------------------------------------------------------------------------------------------
def test_inside_the_range_is_exactly_resize_hu():
    hu = [_disc((256, 240), (100, 130), 12) for _ in range(3)]
    plan = ip.plan_series(hu, (0.95, 0.95), TRAIN)  # 228 x 243 mm: inside
    assert not plan.changed and plan.note == "" and plan.warning == "" and plan.fov_mm == pytest.approx(228.0)
    np.testing.assert_array_equal(plan.cache(hu, 64), np.stack([resize_hu(h, 64) for h in hu]))
    m = np.random.default_rng(0).random((2, 256, 240)).astype(np.float32)
    assert plan.boxes[0].to_original(m) is m


@pytest.mark.parametrize(("scale", "shape", "spacing"), [
    (1.3, (256, 256), None),       # a wider field of view: cropped
    (0.8, (256, 256), None),       # narrower: padded with air
    (1.4, (200, 256), (1.6, 1.25)),  # non-square slice, anisotropic pixels
])
def test_blob_round_trip(scale, shape, spacing):
    """A disc at a known slice position: in the cache it has the training scale, and a map peaked where the cache
    shows it comes back to the disc's original pixel."""
    if spacing is None:
        spacing = (230.0 * scale / shape[0], 230.0 * scale / shape[1])
    centre = (shape[0] * 0.35, shape[1] * 0.6)  # off centre in both axes
    radius_mm = 12.0
    hu = _disc(shape, centre, radius_mm / spacing[0])
    if spacing[0] != spacing[1]:  # an ellipse in pixels that is a disc in mm
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        hu = np.where(np.hypot((yy - centre[0]) * spacing[0], (xx - centre[1]) * spacing[1]) <= radius_mm,
                      80.0, -1000.0).astype(np.float32)
    plan = ip.plan_series([hu], spacing, TRAIN)
    assert plan.changed and plan.note.startswith("resampled from") and "to 230 mm field of view" in plan.note
    size = 96
    cache = plan.cache([hu], size)[0]
    # outside the slice the cache is air; the disc is as many cache pixels wide as 24 mm at 230 mm / 96 px
    bright = cache > 0
    width = bright.any(axis=0).sum()
    assert abs(width - 2 * radius_mm * size / 230.0) <= 1.5
    if scale < 1:
        assert cache[0, 0] == -1024 and cache[size // 2, 0] == -1024
    # a map peaked at the disc in the cache frame, back on the slice grid through the inverse
    box = plan.boxes[0]
    cy, cx = np.argwhere(bright).mean(axis=0)
    peak = np.exp(-((np.mgrid[:size, :size][0] - cy) ** 2 + (np.mgrid[:size, :size][1] - cx) ** 2) / 20.0)
    back = box.to_original(cv2.resize(peak.astype(np.float32), box.size[::-1], interpolation=cv2.INTER_LINEAR))
    assert back.shape == shape
    got = np.unravel_index(np.argmax(back), shape)
    assert abs(got[0] - centre[0]) <= 2 and abs(got[1] - centre[1]) <= 2
    # the forward map of the same position agrees (cache pixel of the disc centre)
    fy = (centre[0] - box.top + 0.5) * size / box.height - 0.5
    fx = (centre[1] - box.left + 0.5) * size / box.width - 0.5
    assert abs(fy - cy) <= 1 and abs(fx - cx) <= 1


def test_no_spacing_and_absurd_spacing_warn():
    hu = [np.zeros((64, 64), np.float32)]
    plan = ip.plan_series(hu, None, TRAIN)
    assert not plan.changed and plan.fov_mm is None and "no PixelSpacing" in plan.warning
    assert ip.plan_series(hu, None, None).warning == ""  # normalisation off: nothing to say
    plan = ip.plan_series(hu, (0.001, 0.001), TRAIN)
    assert not plan.changed and "not resampled" in plan.warning
    assert ip.parse_spacing("0.5\\0.7") == (0.5, 0.7) and ip.parse_spacing("0.4") == (0.4, 0.4)
    assert ip.parse_spacing("") is None and ip.parse_spacing("0\\0") is None and ip.parse_spacing("x") is None


def test_nifti_spacing_follows_the_reorientation():
    from ichdlib.validate.readers import canonical, inplane_spacing

    data = np.zeros((40, 30, 5), np.float32)  # stored axes: 40 along x (1.2 mm), 30 along y (0.8 mm)
    aff = np.diag([-1.2, 0.8, 5.0, 1.0])
    img = nib.Nifti1Image(data, aff)
    vol = canonical(img)[0]
    assert vol.shape == (5, 30, 40)  # slices, rows (posterior), cols (left)
    assert inplane_spacing(img) == pytest.approx((0.8, 1.2))
    swapped = nib.Nifti1Image(np.transpose(data, (1, 0, 2)), aff[:, [1, 0, 2, 3]])  # stored axes swapped
    assert canonical(swapped)[0].shape == (5, 30, 40) and inplane_spacing(swapped) == pytest.approx((0.8, 1.2))


# --------------------------------------------------------------------------------------------------
# The shared inference path
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ubundle(smoke_params):
    from ichdlib.serve.bundle import Bundle

    b = Bundle.untrained(smoke_params, folds=1)
    b.manifest["training"] = {"slice_thickness_mm": 5.0, "spacing_z_mm": 5.0, "n_studies": 10, "source": "t",
                              "inplane": FOV}
    g = torch.Generator().manual_seed(0)
    for state in b.cnn[next(iter(b.cnn))].states:  # untrained, the pooled features are all zero: wake them up
        for k, v in state.items():
            if k.endswith(("bn1.bias", "bn2.bias", "conv_head.bias")):
                state[k] = torch.rand(v.shape, generator=g)
    return b


def test_predictions_identical_inside_the_range_and_resampled_outside(ubundle, tmp_path):
    from ichdlib.serve.pipeline import Predictor, explain_study, predict_dir

    d = tmp_path / "study"
    series_files(d, 4, study="5.1", series="5.1.1", pixel_spacing=230.0 / 64)  # 230 mm: inside
    on = predict_dir(d, ubundle, device="cpu", predictor=Predictor(ubundle, "cpu"))
    off = predict_dir(d, ubundle, device="cpu", predictor=Predictor(ubundle, "cpu", fov_norm=False))
    pd.testing.assert_frame_equal(on.slices, off.slices, check_exact=True)
    assert on.studies["inplane"].tolist() == [""] and on.studies["fov_mm"].tolist() == [pytest.approx(230.0)]
    assert not on.problems["message"].str.contains("field of view").any()

    wide = tmp_path / "wide"
    series_files(wide, 4, study="5.2", series="5.2.1", pixel_spacing=1.3 * 230.0 / 64)  # 299 mm: outside
    predictor = Predictor(ubundle, "cpu")
    got = predict_dir(wide, ubundle, device="cpu", predictor=predictor)
    plain = predict_dir(wide, ubundle, device="cpu", predictor=Predictor(ubundle, "cpu", fov_norm=False))
    assert on.slices["p2d_any"].nunique() > 1  # the models' outputs follow the pixels (else this test proves nothing)
    assert (got.slices["p2d_any"] - plain.slices["p2d_any"]).abs().max() > 1e-6
    note = "resampled from 299 mm to 230 mm field of view"
    assert got.studies["inplane"].iloc[0].startswith(note)
    read = got.series[got.series["read"]]
    assert read["inplane"].iloc[0].startswith(note) and read["fov_mm"].iloc[0] == pytest.approx(299.0)
    assert got.problems["message"].str.startswith(note).any() and plain.studies["inplane"].iloc[0] == ""
    # Grad-CAM of a resampled series: on the slice's own grid, zero outside the part the model saw
    from ichdlib.serve.discover import discover, load_study

    loaded = load_study(discover(wide)[0][0])
    overlays = explain_study(predictor, loaded, got.slices, threshold=0.0)
    box = predictor.inplane(loaded).boxes[0]
    assert overlays and all(o.cam.shape == loaded.hu[o.row].shape for o in overlays)
    assert box.top > 0 and all(o.cam[: box.top].max() == 0 and o.cam[:, : box.left].max() == 0 for o in overlays)


def test_validate_resamples_a_wide_nifti_and_maps_the_pointing_game_back(ubundle, tmp_path):
    """CT-ICH-style volumes with a 2x wider field of view: every study is resampled (problems.csv says so), and the
    pointing game still runs on the masks' own grid through the inverse box."""
    from ichdlib.phantom.layouts import generate_layout
    from ichdlib.validate.run import validate

    data = tmp_path / "ctich"
    generate_layout(data, "ctich", studies=3, seed=1, size=32, workers=1, progress=False)  # one with a lesion
    for path in sorted((data / "ct_scans").glob("*.nii")):
        img = nib.load(str(path), mmap=False)  # read into memory: the file is written over below
        aff = img.affine.copy()
        aff[:3, :2] *= 2.0  # the same pixels, each twice as wide: a 2x field of view
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), aff, img.header), str(path))
    v = validate(data, [ubundle], tmp_path / "out", device="cpu", n_boot=0, threshold=0.0)  # every mask slice
    msgs = v.problems["message"]
    assert msgs.str.contains("to 230 mm field of view").sum() == len(v.studies) == 3
    assert not msgs.str.contains("pointing game skipped").any()
    assert v.metrics["pointing"] is not None  # the maps were compared with the masks
