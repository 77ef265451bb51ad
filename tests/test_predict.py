"""ichdlib.serve.predict: DICOM folder discovery, bad-input handling, and predictions that match the notebooks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import CORONAL, ct_file, head_hu, series_files, study_folder
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from ichdlib.serve import discover as dsc
from ichdlib.serve import predict as pr

CT_SMALL = get_testdata_file("CT_small.dcm")


def messages(problems) -> str:
    return "\n".join(p["message"] for p in problems)


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------
def test_discover_nested_studies_any_names(tmp_path):
    a = series_files(tmp_path / "patient1" / "deep" / "study", 5, study="1.2.3", series="1.2.3.9", ext="")
    b = series_files(tmp_path / "patient2", 3, study="1.2.4", series="1.2.4.9", z0=-20.0, dz=-2.5, ext=".DCM")
    scans, problems = dsc.discover(tmp_path)
    assert problems == []
    assert [s.study_uid for s in scans] == ["1.2.3", "1.2.4"]
    s1, s2 = scans
    assert s1.n_slices == 5 and s2.n_slices == 3
    assert set(s1.slices["path"]) == {str(p) for p in a} and set(s2.slices["path"]) == {str(p) for p in b}
    # ordered by z ascending, neighbours are positions, the edges are their own neighbours
    assert list(s1.slices["z"]) == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert list(s2.slices["z"]) == [-25.0, -22.5, -20.0]
    assert list(s1.slices["slice_index"]) == [0, 1, 2, 3, 4]
    assert list(s1.slices["prev_index"]) == [0, 0, 1, 2, 3]
    assert list(s1.slices["next_index"]) == [1, 2, 3, 4, 4]
    assert list(s1.slices["sop_uid"]) == [f"1.2.3.9.{k}" for k in range(5)]
    # a single file is a folder of one
    one, _ = dsc.discover(a[0])
    assert len(one) == 1 and one[0].n_slices == 1


def test_non_dicom_non_ct_localizer_and_mixed_series(tmp_path):
    study = "1.2.5"
    series_files(tmp_path, 6, study=study, series="1.2.5.2")  # the one to predict
    series_files(tmp_path, 3, study=study, series="1.2.5.3", z0=1.0)  # a second, shorter axial CT series
    ct_file(tmp_path / "scout", study=study, series="1.2.5.1", orientation=CORONAL,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    ct_file(tmp_path / "sag", study=study, series="1.2.5.4", orientation=(0, 1, 0, 0, 0, -1))
    ct_file(tmp_path / "mr.dcm", study=study, series="1.2.5.5", modality="MR")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / ".hidden").write_text("skipped")
    scans, problems = dsc.discover(tmp_path)
    assert len(scans) == 1 and scans[0].series_uid == "1.2.5.2" and scans[0].n_slices == 6
    by_series = {p["series_uid"]: p["message"] for p in problems if p["series_uid"]}
    assert "localizer" in by_series["1.2.5.1"]
    assert "not axial" in by_series["1.2.5.4"]
    assert "modality MR, not CT" in by_series["1.2.5.5"]
    assert "other CT series left out (3 image(s))" in by_series["1.2.5.3"] and "1.2.5.2" in by_series["1.2.5.3"]
    by_path = {Path(p["path"]).name: p["message"] for p in problems if p["path"] and not p["series_uid"]}
    assert "not a DICOM file" in by_path["notes.txt"] and "empty file" in by_path["empty.dcm"]
    assert by_path[".hidden"] == "skipped: hidden file"  # listed, not opened (as ingest does)
    assert all(p["severity"] == dsc.SKIPPED for p in problems)
    frame = dsc.problems_frame(problems)
    assert list(frame.columns) == dsc.PROBLEM_COLUMNS and len(frame) == len(problems)


def test_study_without_ct_and_empty_folder(tmp_path):
    ct_file(tmp_path / "a" / "mr1", study="9.1", series="9.1.1", modality="MR")
    scans, problems = dsc.discover(tmp_path / "a")
    assert scans == []
    assert "no axial CT series" in messages(problems)
    (tmp_path / "empty").mkdir()
    assert dsc.discover(tmp_path / "empty") == ([], [dsc.problem("no files found", path=tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        dsc.discover(tmp_path / "missing")


def test_single_slice_and_duplicates(tmp_path):
    ct_file(tmp_path / "one" / "x", study="7.1", series="7.1.1", sop="7.1.1.1")
    scans, problems = dsc.discover(tmp_path / "one")
    assert scans[0].n_slices == 1 and list(scans[0].slices["prev_index"]) == [0]
    assert [p["severity"] for p in problems] == [dsc.WARNING] and "single slice" in problems[0]["message"]
    # same SOP twice: one left out; same z twice: both kept (as the catalog does) with a warning
    d = tmp_path / "dup"
    series_files(d, 3, study="7.2", series="7.2.1")
    ct_file(d / "copy_of_1", study="7.2", series="7.2.1", sop="7.2.1.1", z=5.0)
    ct_file(d / "same_z", study="7.2", series="7.2.1", sop="7.2.1.99", z=5.0)
    scans, problems = dsc.discover(d)
    assert scans[0].n_slices == 4
    assert list(scans[0].slices["sop_uid"]) == ["7.2.1.0", "7.2.1.1", "7.2.1.99", "7.2.1.2"]
    text = messages(problems)
    assert "duplicate SOPInstanceUID 7.2.1.1" in text and "share 1 z position" in text


def test_slices_without_position(tmp_path):
    d = tmp_path / "some"
    series_files(d, 3, study="8.1", series="8.1.1")
    lost = ct_file(d / "lost", study="8.1", series="8.1.1", sop="8.1.1.9", ImagePositionPatient=None)
    (scan,), problems = dsc.discover(d)
    assert scan.n_slices == 3 and problems[0]["path"] == str(lost)
    assert "no ImagePositionPatient/SliceLocation" in problems[0]["message"]
    # no positions at all: InstanceNumber gives the order
    d = tmp_path / "none"
    for k, inst in enumerate([3, 1, 2]):
        ct_file(d / f"x{k}", study="8.2", series="8.2.1", sop=f"8.2.1.{inst}", ImagePositionPatient=None,
                InstanceNumber=inst)
    (scan,), problems = dsc.discover(d)
    assert list(scan.slices["sop_uid"]) == ["8.2.1.1", "8.2.1.2", "8.2.1.3"]
    assert [p["severity"] for p in problems] == [dsc.WARNING] and "InstanceNumber" in problems[0]["message"]


def test_index_ranges():
    assert dsc.index_ranges([]) == ""
    assert dsc.index_ranges([4]) == "4"
    assert dsc.index_ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------
def test_load_study_compressed_and_corrupt(tmp_path):
    plain = series_files(tmp_path / "plain", 4, study="5.1", series="5.1.1")
    comp = tmp_path / "comp"
    for k, syntax in enumerate([None, RLELossless, JPEG2000Lossless, RLELossless]):
        ct_file(comp / f"s{k}", study="5.2", series="5.2.1", sop=f"5.2.1.{k}", z=5.0 * k, seed=k, syntax=syntax)
    (scan_plain,), _ = dsc.discover(tmp_path / "plain")
    (scan_comp,), _ = dsc.discover(comp)
    a, b = dsc.load_study(scan_plain), dsc.load_study(scan_comp)
    assert a.problems == [] and b.problems == []
    assert len(a.hu) == len(b.hu) == 4
    for x, y in zip(a.hu, b.hu, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.hu[0].dtype == np.float32
    np.testing.assert_allclose(a.hu[2], head_hu(2), atol=1.0)  # the writer may round HU to stored integers
    # a slice whose pixel data is cut short: left out with the reason, neighbours over the rest
    victim = next(p for p in plain if p.name == Path(scan_plain.slices["path"].iloc[1]).name)
    ct_file(victim, study="5.1", series="5.1.1", sop="5.1.1.1", z=5.0, seed=1, truncate=0.5)
    (scan,), problems = dsc.discover(tmp_path / "plain")
    assert problems == [] and scan.n_slices == 4  # the header still reads
    loaded = dsc.load_study(scan)
    assert len(loaded.hu) == 3 and len(loaded.slices) == 3
    assert list(loaded.slices["z"]) == [0.0, 10.0, 15.0]
    assert list(loaded.slices["prev_index"]) == [0, 0, 1] and list(loaded.slices["next_index"]) == [1, 2, 2]
    assert len(loaded.problems) == 1 and loaded.problems[0]["path"] == str(victim)
    assert "slice left out" in loaded.problems[0]["message"] and "truncated" in loaded.problems[0]["message"]


def test_ct_small_bundled_file(tmp_path):
    (scan,), problems = dsc.discover(CT_SMALL)
    assert problems[0]["severity"] == dsc.WARNING  # a single slice
    loaded = dsc.load_study(scan)
    assert loaded.problems == [] and loaded.hu[0].shape == (128, 128)
    assert isinstance(loaded.slices, pd.DataFrame)


# --------------------------------------------------------------------------------------------------
# A trained run (shared with test_bundle.py)
# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_dir(trained, tmp_path_factory) -> Path:
    from ichdlib.serve.bundle import export

    return export(trained, tmp_path_factory.mktemp("predict_bundle") / "bundle")


def test_matches_notebook_05_on_the_test_split(trained, bundle_dir):
    """Predicting the phantom's test folder (quirky files included) gives notebook 05's submission, and each
    stage gives what its notebook wrote for the test rows."""
    from ichdlib.ingest.table import load_catalog
    from ichdlib.labels import LABELS, read_labels

    P = trained
    slices = pr.predict_study(P.data_root / P.paths.test_dir, bundle_dir, device="cpu")
    cat = load_catalog(P.work_dir)
    ids = cat.loc[cat["split"] == "test", "sop_uid"].to_numpy(str)
    got = slices.set_index("sop_uid")
    assert sorted(got.index) == sorted(ids)  # the same slices as the catalog keeps
    labels = list(LABELS)
    sub, _ = read_labels(P.reports_dir / "submission.csv")
    np.testing.assert_allclose(got.loc[ids, [f"p_{c}" for c in labels]], sub.loc[ids, labels], rtol=0, atol=1e-4)
    from ichdlib.ensemble.blend import stage_files

    key = P.cnn.backbones[0].key
    refs = {"p2d_": P.work_dir / "features" / key / "test_prob.parquet",
            f"cnn:{key}:": stage_files(P, f"cnn:{key}")[1],
            **{f"{m}:": P.work_dir / "seq" / m / "test.parquet" for m in P.seq.models}}
    for prefix, path in refs.items():
        ref = pd.read_parquet(path).set_index("sop_uid")
        np.testing.assert_allclose(got.loc[ids, [f"{prefix}{c}" for c in labels]], ref.loc[ids, labels],
                                   rtol=0, atol=1e-5, err_msg=prefix)
    # the study table summarises the slice table
    studies = slices.attrs["studies"]
    assert sorted(studies["study_uid"]) == sorted(cat.loc[cat["split"] == "test", "study_uid"].unique())
    for st in studies.itertuples():
        g = slices[slices["study_uid"] == st.study_uid]
        assert st.max_any == pytest.approx(g["p_any"].max()) and st.n_slices == len(g)


def test_cli_bad_inputs_never_traceback(trained, bundle_dir, tmp_path, capsys):
    """A folder with a real CT slice (pydicom's CT_small), a study with a corrupt slice, a text file and a
    non-CT series: predictions for what is readable, the rest in problems.csv, exit code 0."""
    from ichdlib.cli import main as ichd

    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(CT_SMALL, d / "ct_small")
    study = study_folder(trained, d / "phantom", keep=6)
    victim = sorted(study.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-600])
    (d / "readme.txt").write_text("hello")
    ct_file(d / "mr" / "x.dcm", study="3.3", series="3.3.1", modality="MR")
    out = tmp_path / "out"
    assert ichd(["predict", str(d), "--bundle", str(bundle_dir), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err and "predicted" in printed.out
    slices, studies = pd.read_csv(out / "slices.csv"), pd.read_csv(out / "studies.csv")
    problems = pd.read_csv(out / "problems.csv").fillna("")
    assert len(studies) == 2  # the phantom study and CT_small; the MR-only study has no CT series
    n_phantom = len(list(study.iterdir()))
    assert sorted(slices.groupby("study_uid").size()) == [1, n_phantom - 1]
    assert slices[[c for c in slices.columns if c.startswith("p")]].notna().all().all()
    text = "\n".join(problems["path"] + " " + problems["message"])
    assert f"{victim} slice left out" in text and "readme.txt not read: not a DICOM file" in text
    assert "modality MR, not CT" in text and "single slice" in text
    doc = json.loads((out / "predictions.json").read_text())
    assert {s["study_uid"] for s in doc["studies"]} == set(studies["study_uid"])
    assert all(isinstance(s["positive"], bool) and isinstance(s["n_slices"], int) for s in doc["studies"])
    assert len(doc["problems"]) == len(problems) and doc["bundle"]["run"] == trained.run


def test_cli_cam_and_empty_folder(bundle_dir, tmp_path, capsys):
    from ichdlib.cli import main as ichd

    out = tmp_path / "cam_out"
    # threshold 0: every slice counts as positive for every label, so the CAM path surely runs
    rc = ichd(["predict", CT_SMALL, "--bundle", str(bundle_dir), "--out", str(out), "--cam", "--threshold", "0"])
    assert rc == 0
    pngs = sorted((out / "cam").rglob("*.png"))
    assert len(pngs) == 6 and pngs[0].name == "slice001_any.png"  # slices numbered 1..n, as users count them
    import cv2

    img = cv2.imread(str(pngs[0]))
    assert min(img.shape[:2]) >= 512 and img.std() > 0  # shown large, with its title and colour scale
    # the heat map covers the whole slice: no hard-edged centre-crop rectangle of map values at its border
    slices = pd.read_csv(out / "slices.csv")
    assert {"slice_index", "slice"} <= set(slices.columns) and (slices["slice"] == slices["slice_index"] + 1).all()
    (tmp_path / "empty").mkdir()
    assert ichd(["predict", str(tmp_path / "empty"), "--bundle", str(bundle_dir), "--out", str(out)]) == 1
    assert "no files found" in pd.read_csv(out / "problems.csv")["message"].iloc[0]
    assert ichd(["predict", str(tmp_path / "nowhere"), "--bundle", str(bundle_dir), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert ichd(["predict", str(tmp_path / "empty"), "--bundle", str(tmp_path), "--out", str(out)]) == 2
    assert "not a model bundle" in capsys.readouterr().err


def test_blend_of_a_2d_member_from_notebook_02(trained, bundle_dir, tmp_path, monkeypatch):
    """A run that blends a 2D stage from notebook 02's table: the bundle says so and predict follows (the
    validation-view pass runs only then)."""
    import ichdlib.cnn.infer
    from ichdlib.labels import LABELS
    from ichdlib.serve.bundle import Bundle

    calls = []
    real = ichdlib.cnn.infer.predict
    monkeypatch.setattr(ichdlib.cnn.infer, "predict", lambda *a, **k: calls.append(k.get("views")) or real(*a, **k))
    P = trained
    key = P.cnn.backbones[0].key
    folder = study_folder(P, tmp_path / "s", k=1)
    b = Bundle.load(bundle_dir)
    pr.predict_study(folder, b, device="cpu")
    assert len(calls) == 2 and all(v is not None for v in calls)  # two folds, TTA only
    b.manifest["ensemble"] = {"method": "fit", "members": [f"cnn:{key}", "seq2"],
                              "weights": {f"cnn:{key}": 0.25, "seq2": 0.75},
                              "sources": {f"cnn:{key}": "cnn", "seq2": "seq"}}
    calls.clear()
    got = pr.predict_study(folder, b, device="cpu").set_index("sop_uid")
    assert len(calls) == 4 and sum(v is None for v in calls) == 2  # plus the validation view per fold
    ref = pd.read_parquet(P.work_dir / "cnn" / key / "test.parquet").set_index("sop_uid").loc[got.index]
    labels = list(LABELS)
    cnn = got[[f"cnn:{key}:{c}" for c in labels]].to_numpy()
    np.testing.assert_allclose(cnn, ref[labels], rtol=0, atol=1e-6)
    blend = 0.25 * cnn + 0.75 * got[[f"seq2:{c}" for c in labels]].to_numpy()
    np.testing.assert_allclose(got[[f"p_{c}" for c in labels]].to_numpy(), blend, rtol=0, atol=1e-12)
