"""The synthetic head-CT phantom: RSNA layout, labels vs masks, quirks, determinism, anatomy sanity."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy.ndimage import maximum_filter

from ichdlib.config import load_params
from ichdlib.labels import KAGGLE_ROW_ORDER, LABELS, SUBTYPES, read_labels
from ichdlib.phantom.encoding import ENCODINGS
from ichdlib.phantom.synth import (
    ANSWER_KEY,
    COMPLETE_MARKER,
    CORRUPT_ID,
    MANIFEST,
    MASK_BITS,
    PHANTOM_VERSION,
    PROGRESS_MARKER,
    SAMPLE_SUBMISSION,
    TRAIN_CSV,
    ensure_phantom,
    generate_phantom,
    plan_phantom,
    write_ct_dicom,
)

# The RSNA files use "ID_<hex>" in UI elements; pydicom warns about that on every read.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
ID_FILE = re.compile(r"^ID_[0-9a-f]{9}\.dcm$")


# -- a reference decoder, written independently of ichdlib.ingest.dicom ---------------------------------------
def community_fix(raw: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, float]:
    """The RSNA community's 12-bit fix: raw + 1000, values >= 4096 minus 4096, intercept -1000."""
    intercept = float(ds.get("RescaleIntercept", 0))
    if int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0 and int(intercept) > -100:
        raw = raw.astype(np.int64) + 1000
        raw[raw >= 4096] -= 4096
        intercept = -1000.0
    return raw, intercept


def decode(path: Path) -> np.ndarray:
    """HU of one file: pixel_array, the community fix, then the modality LUT (MONOCHROME1 without a rescale
    stores display values: HU = -1 - raw)."""
    ds = pydicom.dcmread(path)
    raw, intercept = community_fix(ds.pixel_array, ds)
    if ds.PhotometricInterpretation == "MONOCHROME1" and "RescaleSlope" not in ds:
        raw = -1 - raw.astype(np.int64)
    return raw.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + intercept


def headers(root: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(root.glob("stage_2_*/*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows.append({"sop": path.stem, "split": "train" if path.parent.name.endswith("train") else "test",
                     "sop_uid": str(ds.SOPInstanceUID), "patient": str(ds.PatientID), "study": str(ds.StudyInstanceUID),
                     "series": str(ds.SeriesInstanceUID), "z": float(ds.ImagePositionPatient[2]),
                     "rows": int(ds.Rows), "cols": int(ds.Columns), "path": path, "ds": ds})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def ph(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, studies=8, seed=5, size=64, quirks=True, masks=True, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def manifest(ph) -> dict:
    return json.loads((ph / MANIFEST).read_text())


@pytest.fixture(scope="module")
def hdr(ph) -> pd.DataFrame:
    return headers(ph)


# -- layout and CSVs ---------------------------------------------------------------------------------------
def test_layout_and_csv_format(ph, hdr, manifest):
    assert (ph / COMPLETE_MARKER).is_file() and not (ph / PROGRESS_MARKER).exists()
    assert not list(ph.rglob("*.tmp"))
    for split in ("train", "test"):
        files = sorted(p.name for p in (ph / f"stage_2_{split}").iterdir())
        assert files and all(ID_FILE.match(f) for f in files), files[:3]
    train = pd.read_csv(ph / TRAIN_CSV)
    assert list(train.columns) == ["ID", "Label"]
    assert set(train.Label.unique()) <= {0, 1}
    # Blocks of six rows per image in the Kaggle order (the duplicated blocks are whole blocks too).
    assert len(train) % 6 == 0
    blocks = train.ID.to_numpy().reshape(-1, 6)
    for block in blocks:
        sop = block[0].rsplit("_", 1)[0]
        assert list(block) == [f"{sop}_{s}" for s in KAGGLE_ROW_ORDER]
    wide = train.assign(sop=train.ID.str.rsplit("_", n=1).str[0], lab=train.ID.str.rsplit("_", n=1).str[1])
    wide = wide.drop_duplicates().pivot(index="sop", columns="lab", values="Label")
    assert (wide["any"] == wide[list(SUBTYPES)].max(axis=1)).all()
    # Every training DICOM is labelled, and every label belongs to a DICOM (the corrupt one included).
    tr = hdr[hdr.split == "train"]
    assert set(wide.index) == set(tr.sop)
    assert (tr.sop == tr.sop_uid).all() and (hdr.sop == hdr.sop_uid).all()
    # Sample submission and answer key: the test images, same order, 0.5 / truth.
    sample = pd.read_csv(ph / SAMPLE_SUBMISSION)
    key = pd.read_csv(ph / ANSWER_KEY)
    assert list(sample.columns) == ["ID", "Label"] and (sample.Label == 0.5).all()
    assert sample.ID.tolist() == key.ID.tolist()
    assert {i.rsplit("_", 1)[0] for i in sample.ID} == set(hdr[hdr.split == "test"].sop)
    assert len(sample) == 6 * int((hdr.split == "test").sum())
    c = manifest["counts"]
    assert c["train_images"] == len(tr) and c["test_images"] == int((hdr.split == "test").sum())


def test_headers_are_rsna_like(hdr):
    ds = hdr.ds.iloc[0]
    for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert re.match(r"^ID_[0-9a-f]+$", str(ds[key].value))
    assert all(str(d.Modality) == "CT" for d in hdr.ds)
    assert all(d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian for d in hdr.ds)
    assert all(int(d.BitsAllocated) == 16 and int(d.BitsStored) in (12, 16) for d in hdr.ds)
    assert {int(d.PixelRepresentation) for d in hdr.ds} == {0, 1}
    spacing = np.array([float(d.PixelSpacing[0]) for d in hdr.ds])
    assert (spacing > 2.5).all() and (spacing < 4.5).all()  # ~0.45 mm at 512 px scaled to 64 px
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    # Nothing time-dependent in the headers.
    assert not any("Date" in e.keyword or "Time" in e.keyword for e in ds)


def test_split_by_patient(hdr):
    train, test = set(hdr[hdr.split == "train"].patient), set(hdr[hdr.split == "test"].patient)
    assert train and test and not train & test
    # On a bigger plan: some patients have two studies, and about a quarter of the studies are in test.
    plans, _ = plan_phantom(200, seed=1, size=64)
    per_patient = pd.Series([p.patient_id for p in plans]).value_counts()
    assert (per_patient == 2).sum() >= 10
    test_frac = np.mean([p.split == "test" for p in plans])
    assert 0.2 <= test_frac <= 0.3
    by_patient = pd.DataFrame({"pid": [p.patient_id for p in plans], "split": [p.split for p in plans]})
    assert (by_patient.groupby("pid").split.nunique() == 1).all()


# -- labels and masks --------------------------------------------------------------------------------------
def test_labels_agree_with_masks(ph, hdr):
    wide, problems = read_labels(ph / TRAIN_CSV)
    assert problems.empty
    key, _ = read_labels(ph / ANSWER_KEY)
    truth = pd.concat([wide, key])
    assert truth["any"].sum() > 0
    shapes = hdr.set_index("sop")[["rows", "cols"]]
    for sop, row in truth.iterrows():
        path = ph / "masks" / f"{sop}.npz"
        if row["any"] == 0:
            assert not path.exists(), sop
            continue
        mask = np.load(path)["mask"]
        assert mask.dtype == np.uint8 and mask.shape == tuple(shapes.loc[sop])
        for name in SUBTYPES:
            assert bool((mask & MASK_BITS[name]).any()) == bool(row[name]), (sop, name)
    assert {p.stem for p in (ph / "masks").iterdir()} == set(truth.index[truth["any"] == 1])


def test_prevalence_is_rsna_like(tmp_path):
    man = generate_phantom(tmp_path, studies=30, seed=11, size=40, workers=1, progress=False)
    c = man["counts"]
    assert 0.2 <= c["positive_studies"] / 30 <= 0.6
    frac = c["positive_slices"]["any"] / (c["train_images"] + c["test_images"])
    assert 0.05 <= frac <= 0.3
    subtypes = {n: c["positive_slices"][n] for n in SUBTYPES}
    assert subtypes["epidural"] == min(subtypes.values())
    assert sum(v > 0 for v in subtypes.values()) >= 3
    # A positive study can hold several subtypes.
    assert any(len({les["kind"] for les in s["lesions"] if les["slices"]}) > 1 for s in man["studies"])


# -- anatomy and geometry ----------------------------------------------------------------------------------
def test_z_spacing_and_slices_per_study(hdr, manifest):
    quirky = {q["study_uid"] for key in ("duplicate_slice", "missing_slice") for q in manifest["quirks"][key]}
    for study, g in hdr.groupby("study"):
        dz = np.diff(np.sort(g.z.to_numpy()))
        if study in quirky:
            continue
        assert 24 <= len(g) <= 40
        assert (dz >= 4.0 - 1e-3).all() and (dz <= 6.0 + 1e-3).all(), (study, dz)
        assert np.allclose(dz, dz[0], atol=2e-3)


def test_slices_show_skull_ring_and_air(hdr, manifest):
    corrupt = {q["sop_uid"] for q in manifest["quirks"]["corrupt"]}
    for _, g in hdr[~hdr.sop.isin(corrupt)].groupby("study"):
        g = g.sort_values("z")
        for path in g.path.iloc[[int(len(g) * 0.45), int(len(g) * 0.65)]]:  # above the sinuses, below the vertex
            hu = decode(path)
            h, w = hu.shape
            assert hu[:3, :3].max() < -900 and hu[-3:, -3:].max() < -900
            brain = hu[h // 2 - 2:h // 2 + 3, w // 2 - 2:w // 2 + 3]
            assert -20 < np.median(brain) < 100
            # Rays from the centre all cross bone (> 700 HU, within a pixel at this coarse size) before air.
            hu = maximum_filter(hu, size=3)
            for ang in np.linspace(0, 2 * np.pi, 24, endpoint=False):
                r = np.arange(0, min(h, w) / 2 - 1)
                ys = np.clip((h / 2 + r * np.sin(ang)).astype(int), 0, h - 1)
                xs = np.clip((w / 2 + r * np.cos(ang)).astype(int), 0, w - 1)
                assert hu[ys, xs].max() > 700, (path.name, ang)


def test_lowest_slice_has_skull_base_and_top_is_small(tmp_path):
    from ichdlib.phantom.synth import render_study

    plan = plan_phantom(2, seed=4, size=96)[0][0]
    st = render_study(plan)
    mid = len(st.hu) // 2
    head = (st.hu > -300).sum(axis=(1, 2))
    centre = st.hu[:, 48 - 18:48 + 18, 48 - 18:48 + 18]  # about 45 mm around the middle of the head
    bone, air = (centre > 700).sum(axis=(1, 2)), (centre < -500).sum(axis=(1, 2))
    assert head[-1] < 0.7 * head.max()  # the small vertex
    assert bone[:2].min() > 20 and bone[mid] == 0  # dense skull base (petrous bone, clivus) low, none mid-head
    assert air[:3].max() > 5 and air[mid] == 0  # air sinuses low
    brain = ((centre > 15) & (centre < 60)).sum(axis=(1, 2))
    assert brain[mid] > 0.8 * centre[mid].size


def test_lesion_coverage_is_the_slab_share():
    from ichdlib.phantom.lesions import Lesion

    les = Lesion("intraparenchymal", "lobar", s_c=0.5, half_mm=10.0, hu=70.0)
    height = 100.0  # the lesion spans levels 0.4 .. 0.6
    assert les.coverage(0.5, 0.0, height) == (1.0, 0.5)  # a thin plane inside
    assert les.coverage(0.65, 0.0, height)[0] == 0.0
    assert les.coverage(0.5, 0.02, height) == pytest.approx((1.0, 0.5))  # slab wholly inside
    cover, mid = les.coverage(0.6, 0.02, height)  # slab centred on the end: half of it inside
    assert cover == pytest.approx(0.5) and mid == pytest.approx(0.59)
    assert les.coverage(0.63, 0.02, height)[0] == 0.0


def test_lesion_ends_fade_by_partial_volume():
    """A slab that a lesion fills only partly shows it with proportionally lower contrast; too small a share
    draws nothing (and labels nothing); a slab wholly inside renders as a thin plane would."""
    from ichdlib.phantom.anatomy import _Head, render_slice
    from ichdlib.phantom.lesions import MIN_SLAB_COVER, Lesion

    plan = plan_phantom(2, seed=4, size=96)[0][0]
    head = _Head(plan, np.random.default_rng(0))
    half_mm, s_c = 12.0, 0.5
    les = Lesion("intraparenchymal", "basal_ganglia", s_c, half_mm, 75.0,
                 {"cu": 20.0, "cv": 0.0, "radius": 14.0, "h2": 0.1, "h3": 0.05, "ph2": 1.0, "ph3": 2.0,
                  "edema": 0.0, "edema_hu": 0.0})
    h = 0.5 * 5.0 / head.H  # half of a 5 mm slab in level units
    end = s_c + half_mm / head.H

    def excess(s: float, slab: float) -> tuple[float, int]:
        img, mask = render_slice(head, s, 0, [les], 3, slab)
        return float((img - render_slice(head, s, 0, [], 3, slab)[0]).sum()), int(mask.astype(bool).sum())

    assert excess(s_c, h) == excess(s_c, 0.0)  # interior: identical to a thin plane
    full, full_px = excess(end - h / 2, 0.0)  # the part of the end slab inside the lesion, drawn at full contrast
    half, half_px = excess(end, h)  # the end slab: half of it inside
    assert full > 0 and half_px == full_px > 0
    assert 0.4 < half / full < 0.6
    assert excess(end + h * (1 - 2 * MIN_SLAB_COVER) + 1e-3, h) == (0.0, 0)  # below the minimum share: nothing


# -- quirks ------------------------------------------------------------------------------------------------
def test_manifest_lists_every_quirk(manifest):
    assert manifest["seed"] == 5 and manifest["config"]["quirks"]
    for key in ("corrupt", "intercept_wrap", "duplicate_label_rows", "duplicate_slice", "missing_slice",
                "odd_size", "multi_window", "monochrome1"):
        assert manifest["quirks"][key], key


def test_corrupt_file_fails_to_decode(ph, manifest):
    (bad,) = manifest["quirks"]["corrupt"]
    assert bad["sop_uid"] == CORRUPT_ID
    path = ph / bad["path"]
    ds = pydicom.dcmread(path)  # the header still looks fine ...
    assert str(ds.SOPInstanceUID) == CORRUPT_ID
    with pytest.raises(Exception):  # noqa: B017 - any decoder error will do
        _ = ds.pixel_array  # ... the pixels do not
    assert f"{CORRUPT_ID}_any" in set(pd.read_csv(ph / TRAIN_CSV).ID)


def test_intercept_wrap_decodes_with_community_fix(ph, hdr, manifest):
    wraps = manifest["quirks"]["intercept_wrap"]
    assert {w["split"] for w in wraps} == {"train", "test"}
    paths = hdr.set_index("sop").path
    for w in wraps[:6]:
        ds = pydicom.dcmread(paths[w["sop_uid"]])
        assert int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0 and int(ds.RescaleIntercept) > -100
        naive = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hu = decode(paths[w["sop_uid"]])
        assert naive[:3, :3].min() > 3000  # without the fix air looks like dense bone
        assert hu[:3, :3].max() < -900 and hu.max() > 700


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_write_ct_dicom_round_trip(tmp_path, encoding):
    rng = np.random.default_rng(0)
    lo, hi = {"wrap12": (-1000, 3095)}.get(encoding, (-1024, 3071))
    hu = rng.integers(lo, hi + 1, size=(24, 20)).astype(np.float32)
    hu[0, :4] = [lo, hi, -1, 0]
    path = write_ct_dicom(tmp_path / "ID_0123456789.dcm", hu, encoding=encoding, z=-12.5)
    ds = pydicom.dcmread(path)
    assert str(ds.SOPInstanceUID) == "ID_0123456789" and float(ds.ImagePositionPatient[2]) == -12.5
    assert (int(ds.Rows), int(ds.Columns)) == (24, 20)
    np.testing.assert_array_equal(decode(path), hu)
    if encoding in ("signed", "unsigned", "unsigned12", "monochrome1"):
        # A plain modality LUT is enough for everything but the two quirks that need a fix.
        np.testing.assert_array_equal(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), hu)


def test_write_ct_dicom_options(tmp_path):
    hu = np.zeros((8, 8), np.float32)
    p = write_ct_dicom(tmp_path / "a.dcm", hu, sop_uid="ID_abc", window_center=[40, 600],
                       window_width=[80, 2800], Modality="MR", RescaleSlope="1")
    ds = pydicom.dcmread(p)
    assert list(map(float, ds.WindowCenter)) == [40, 600] and str(ds.Modality) == "MR"
    p = write_ct_dicom(tmp_path / "b.dcm", hu, truncate=0.3)
    with pytest.raises(Exception):  # noqa: B017
        _ = pydicom.dcmread(p).pixel_array
    p = write_ct_dicom(tmp_path / "c.dcm", hu - 1000, fov_padding=True)
    assert pydicom.dcmread(p).pixel_array[0, 0] == -2000
    with pytest.raises(TypeError, match="unknown keyword"):
        write_ct_dicom(tmp_path / "d.dcm", hu, spacing=1.0)
    with pytest.raises(ValueError, match="unknown encoding"):
        write_ct_dicom(tmp_path / "e.dcm", hu, encoding="jpeg")


def test_other_quirks(ph, hdr, manifest):
    q = manifest["quirks"]
    by_study = {s: g for s, g in hdr.groupby("study")}
    # One study at another size, rows x cols as the manifest says, masks at the slice's own size.
    (odd,) = q["odd_size"]
    g = by_study[odd["study_uid"]]
    assert (g.rows == odd["rows"]).all() and (g.cols == odd["cols"]).all() and odd["rows"] != odd["cols"]
    assert ((hdr[hdr.study != odd["study_uid"]].rows == 64) & (hdr[hdr.study != odd["study_uid"]].cols == 64)).all()
    # Two SOPs at the same z, both labelled alike.
    (dup,) = q["duplicate_slice"]
    g = by_study[dup["study_uid"]].set_index("sop")
    a, b = dup["sop_uids"]
    assert g.z[a] == g.z[b] == dup["z"]
    wide, _ = read_labels(ph / TRAIN_CSV)
    assert (wide.loc[a] == wide.loc[b]).all()
    np.testing.assert_array_equal(decode(g.path[a]), decode(g.path[b]))
    # A gap in z.
    (miss,) = q["missing_slice"]
    dz = np.diff(np.sort(by_study[miss["study_uid"]].z.to_numpy()))
    assert (dz > 1.5 * np.median(dz)).sum() == 1 and miss["z"] not in set(by_study[miss["study_uid"]].z)
    # Exact duplicate label rows.
    train = pd.read_csv(ph / TRAIN_CSV)
    assert train.duplicated().sum() == 6 * len(q["duplicate_label_rows"]) == 18
    assert set(train.ID[train.duplicated()].str.rsplit("_", n=1).str[0]) == {d["sop_uid"] for d in q["duplicate_label_rows"]}
    # Multi-valued windows and an inverted MONOCHROME1 slice that still decodes to HU.
    ds_of = hdr.set_index("sop").ds
    for mw in q["multi_window"]:
        assert len(ds_of[mw["sop_uid"]].WindowCenter) == 2 and len(ds_of[mw["sop_uid"]].WindowWidth) == 2
    (mono,) = q["monochrome1"]
    path = hdr.set_index("sop").path[mono["sop_uid"]]
    assert ds_of[mono["sop_uid"]].PhotometricInterpretation == "MONOCHROME1"
    hu = decode(path)
    assert hu[:2, :2].max() < -900 and hu.max() > 700
    for pad in q["fov_padding"]:
        g = by_study[pad["study_uid"]]
        raw = pydicom.dcmread(g.path.iloc[len(g) // 2]).pixel_array
        assert raw[0, 0] == -2000


# -- determinism, idempotence, CLI ---------------------------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed_and_independent_of_workers(tmp_path):
    kw = dict(studies=3, size=32, quirks=True, masks=True, progress=False)
    generate_phantom(tmp_path / "a", seed=7, workers=1, **kw)
    generate_phantom(tmp_path / "b", seed=7, workers=2, **kw)
    generate_phantom(tmp_path / "c", seed=8, workers=1, **kw)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len(a) > 3 * 24
    assert a[TRAIN_CSV] != c[TRAIN_CSV] and set(a) != set(c)


def test_refuses_to_overwrite_real_data(tmp_path):
    (tmp_path / TRAIN_CSV).write_text("ID,Label\n")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        generate_phantom(tmp_path, studies=2, seed=0, size=32, progress=False)
    assert (tmp_path / TRAIN_CSV).read_text() == "ID,Label\n"


def test_ensure_phantom_is_idempotent(tmp_path):
    synth = {"studies": 3, "size": 32, "quirks": False, "masks": False, "workers": 1}
    params = load_params(None, {"root": str(tmp_path), "paths": {"data_root": "ph"}, "synth": synth})
    root = ensure_phantom(params, progress=False)
    assert root == tmp_path / "ph" and (root / COMPLETE_MARKER).exists()
    sentinel = root / "stage_2_train" / "keep.txt"
    sentinel.write_text("not regenerated")
    assert ensure_phantom(params, progress=False) == root and sentinel.exists()
    # Other settings: a clear error, or regenerate on request.
    other = load_params(None, {"root": str(tmp_path), "paths": {"data_root": "ph"}, "synth": {**synth, "studies": 4}})
    with pytest.raises(ValueError, match="force"):
        ensure_phantom(other, progress=False)
    ensure_phantom(other, force=True, progress=False)
    assert not sentinel.exists() and json.loads((root / MANIFEST).read_text())["counts"]["studies"] == 4
    # An interrupted run (in-progress marker, no completion marker) is redone.
    (root / COMPLETE_MARKER).unlink()
    (root / PROGRESS_MARKER).write_text("{}")
    ensure_phantom(other, progress=False)
    assert (root / COMPLETE_MARKER).exists() and not (root / PROGRESS_MARKER).exists()
    # A phantom from an older renderer with the same settings is regenerated without asking.
    marker = json.loads((root / COMPLETE_MARKER).read_text())
    (root / COMPLETE_MARKER).write_text(json.dumps({**marker, "version": PHANTOM_VERSION - 1}))
    sentinel.write_text("old renderer")
    ensure_phantom(other, progress=False)
    assert not sentinel.exists() and json.loads((root / COMPLETE_MARKER).read_text()) == marker


def test_ensure_phantom_leaves_real_data_alone(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / TRAIN_CSV).write_text("ID,Label\n")
    params = load_params(None, {"root": str(tmp_path), "paths": {"data_root": "real"}})
    assert ensure_phantom(params, progress=False) == real
    assert sorted(p.name for p in real.iterdir()) == [TRAIN_CSV]
    off = load_params(None, {"root": str(tmp_path), "paths": {"data_root": "empty"}, "synth": {"enabled": False}})
    with pytest.raises(FileNotFoundError, match="synth.enabled"):
        ensure_phantom(off, progress=False)


def test_cli(tmp_path, capsys):
    from ichdlib.cli import main

    assert main(["synth", "--out", str(tmp_path / "p"), "--studies", "2", "--seed", "1", "--size", "32",
                 "--no-quirks", "--masks", "--workers", "1"]) == 0
    assert "2 studies" in capsys.readouterr().out
    assert (tmp_path / "p" / TRAIN_CSV).exists() and (tmp_path / "p" / COMPLETE_MARKER).exists()
    assert main(["synth", "--out", str(tmp_path / "q"), "--studies", "1"]) == 2  # a clear error, not a traceback
    assert LABELS[0] == "any"
