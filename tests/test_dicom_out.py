"""ichdlib.serve.dicom_out and ``ichd predict --dicom-out``: SR and Grad-CAM Secondary Capture objects that re-read
with pydicom/highdicom, carry predictions.json's numbers, reference their source slices and pass dciodvfy."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ichdlib.labels import LABELS

DCIODVFY = shutil.which("dciodvfy")
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (Debian dicom3tools; "
                                                             ".ci/install_pacs.sh installs it)")


def dciodvfy_errors(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy prints for one file."""
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def text_values(ds) -> list[str]:
    """Every TextValue in an SR content tree."""
    out = []
    for e in ds:
        if e.VR == "SQ":
            for item in e.value:
                out += text_values(item)
        elif e.keyword == "TextValue":
            out.append(str(e.value))
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """The same 2-study phantom twice: RSNA ``ID_`` UIDs and ``--valid-uids``."""
    from ichdlib.phantom.synth import generate_phantom

    root = tmp_path_factory.mktemp("dicom_out_phantoms")
    for name, valid in (("rsna", False), ("valid", True)):
        generate_phantom(root / name, studies=2, seed=5, size=64, workers=1, progress=False, valid_uids=valid)
    return {"rsna": root / "rsna", "valid": root / "valid"}


@pytest.fixture(scope="module")
def ubundle(smoke_params, tmp_path_factory) -> Path:
    """An untrained bundle with the smoke architectures (numbers are random but real model outputs)."""
    from ichdlib.serve.bundle import Bundle

    return Bundle.untrained(smoke_params, folds=1).save(tmp_path_factory.mktemp("dicom_out_bundle") / "b")


def one_study(phantom: Path, out: Path, keep: int = 6) -> Path:
    """The first test study's middle ``keep`` slices copied to ``out``."""
    files = sorted((phantom / "stage_2_test").glob("*.dcm"))
    by_study: dict[str, list[tuple[float, Path]]] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append((float(ds.ImagePositionPatient[2]), f))
    study = sorted(by_study)[0]
    chosen = sorted(by_study[study])
    mid = len(chosen) // 2
    out.mkdir(parents=True)
    for _, f in chosen[mid - keep // 2: mid - keep // 2 + keep]:
        shutil.copy(f, out / f.name)
    return out


def test_synth_valid_uids_same_phantom(phantoms):
    """--valid-uids: numeric UIDs (valid DICOM) in headers and names, otherwise the same files."""
    from pydicom.uid import UID

    from ichdlib.phantom.synth import valid_uid

    rsna = sorted((phantoms["rsna"] / "stage_2_test").glob("*.dcm"))
    valid = {p.name for p in (phantoms["valid"] / "stage_2_test").glob("*.dcm")}
    assert len(rsna) == len(valid) > 0
    for p in rsna[:5]:
        q = phantoms["valid"] / "stage_2_test" / f"{valid_uid(p.stem)}.dcm"
        assert q.name in valid
        a, b = pydicom.dcmread(p), pydicom.dcmread(q)
        assert a.PixelData == b.PixelData and a.ImagePositionPatient == b.ImagePositionPatient
        assert a.PatientID == b.PatientID  # patient IDs are LO, not UIDs: unchanged
        for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            assert not UID(str(a[key].value)).is_valid and UID(str(b[key].value)).is_valid, key
            assert str(b[key].value) == valid_uid(str(a[key].value))
    man = json.loads((phantoms["valid"] / "phantom_manifest.json").read_text())
    assert man["config"]["valid_uids"] is True and all(s["study_uid"].startswith("2.25.") for s in man["studies"])
    assert b.FrameOfReferenceUID and "FrameOfReferenceUID" not in a  # hospital-style header fields


def test_synth_cli_valid_uids(tmp_path, capsys):
    from ichdlib.cli import main as ichd

    assert ichd(["synth", "--out", str(tmp_path / "p"), "--studies", "2", "--size", "32", "--workers", "1",
                 "--no-quirks", "--no-masks", "--valid-uids"]) == 0
    names = [p.stem for p in (tmp_path / "p").glob("stage_2_*/*.dcm")]
    assert names and all(n.startswith("2.25.") for n in names)
    assert json.loads((tmp_path / "p" / ".phantom_complete").read_text())["valid_uids"] is True


@pytest.fixture(scope="module")
def written(phantoms, ubundle, tmp_path_factory):
    """``ichd predict --dicom-out --cam`` on 6 slices of a --valid-uids study, with a threshold that makes
    about half of the slices positive (the untrained model's outputs sit near 0.5)."""
    from ichdlib.cli import main as ichd
    from ichdlib.serve.predict import predict_dir

    tmp = tmp_path_factory.mktemp("dicom_out")
    src = one_study(phantoms["valid"], tmp / "src")
    p_any = predict_dir(src, ubundle, device="cpu").slices["p_any"].to_numpy()
    threshold = float(np.sort(p_any)[len(p_any) // 2])
    out, dicom = tmp / "out", tmp / "dicom"
    rc = ichd(["predict", str(src), "--bundle", str(ubundle), "--out", str(out), "--dicom-out", str(dicom),
               "--cam", "--pmap", "--threshold", repr(threshold), "--device", "cpu"])
    assert rc == 0
    return {"src": src, "out": out, "bundle": ubundle, "dicom": dicom, "threshold": threshold,
            "doc": json.loads((out / "predictions.json").read_text())}


def test_sr_holds_predictions_json(written):
    import highdicom as hd

    (study,) = written["doc"]["studies"]
    t = written["threshold"]
    (sr_path,) = list(written["dicom"].rglob("sr.dcm"))
    sr = hd.sr.srread(sr_path)
    src = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): pydicom.dcmread(p, stop_before_pixels=True)
           for p in written["src"].iterdir()}
    ref = next(iter(src.values()))
    # patient/study from the source, new series/instance UIDs, the disclaimer
    assert sr.StudyInstanceUID == ref.StudyInstanceUID == study["study_uid"] and sr.PatientID == ref.PatientID
    assert sr.SeriesInstanceUID not in {str(d.SeriesInstanceUID) for d in src.values()}
    raw = pydicom.dcmread(sr_path)  # every container SEPARATE: SR viewers list items with their names, not as prose
    containers = [raw, *(i for g in raw.ContentSequence for i in [g, *g.get("ContentSequence", [])])]
    assert all(c.ContinuityOfContent == "SEPARATE" for c in containers if c.get("ValueType") == "CONTAINER")
    assert "not for clinical use" in sr.SeriesDescription
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == set(src)
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    assert sorted(groups) == sorted(f"ICH {c}" for c in LABELS)
    per_slice = {s["sop_uid"]: s["p"] for s in study["slices"]}
    n_refs = 0
    for c in LABELS:
        g = groups[f"ICH {c}"]
        ms = g.get_measurements()
        top = [m for m in ms if m.derivation is not None]
        assert len(top) == 1 and top[0].value == pytest.approx(study["max"][c], rel=1e-9, abs=1e-12)
        (call,) = g.get_qualitative_evaluations()
        assert call.value.meaning == ("Present" if study["max"][c] >= t else "Absent")
        got = {}
        for m in ms:
            if m.derivation is None:
                (img,) = m.referenced_images
                got[img.referenced_sop_instance_uid] = m.value
                assert img.referenced_sop_class_uid == src[img.referenced_sop_instance_uid].file_meta.MediaStorageSOPClassUID
        want = {u: p[c] for u, p in per_slice.items() if p[c] >= t}
        assert set(got) == set(want)
        for u in want:
            assert got[u] == pytest.approx(want[u], rel=1e-9, abs=1e-12)
        n_refs += len(got)
    assert n_refs > 0  # the threshold made some slices positive
    # the algorithm identification (name, version, parameters) carries the bundle identity and the threshold
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.dicom_out import bundle_identity

    ident = bundle_identity(Bundle.load(written["bundle"]))
    texts = set(text_values(sr))
    for needle in (f"ichd-workbench ICH model {ident['name']}", ident["version"], f"bundle sha256 {ident['sha256']}",
                   f"threshold {t!r}"):
        assert needle in texts, needle


def test_cam_series_references_its_slices(written):
    (study,) = written["doc"]["studies"]
    t = written["threshold"]
    cams = sorted(written["dicom"].rglob("cam/*.dcm"))
    assert cams and all(p.parent.parent.name == study["study_uid"] for p in cams)
    want = sorted((s["sop_uid"], c) for s in study["slices"] if s["p"]["any"] >= t for c in LABELS if s["p"][c] >= t)
    assert len(cams) == len(want) > 0
    series = set()
    got = []
    for p in cams:
        ds = pydicom.dcmread(p)
        series.add(ds.SeriesInstanceUID)
        assert ds.Modality == "OT" and ds.PhotometricInterpretation == "RGB" and ds.pixel_array.shape == (64, 64, 3)
        assert ds.StudyInstanceUID == study["study_uid"] and "not for clinical use" in ds.SeriesDescription
        (item,) = ds.SourceImageSequence
        label = ds.ImageComments.split(":")[0]
        got.append((str(item.ReferencedSOPInstanceUID), label))
        src = next(f for f in written["src"].iterdir() if f.stem == item.ReferencedSOPInstanceUID)
        head = pydicom.dcmread(src, stop_before_pixels=True)
        assert head.SOPInstanceUID == item.ReferencedSOPInstanceUID
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):  # viewers line it up
            assert key not in head or ds[key].value == head[key].value, key
        assert ds.pixel_array.std() > 0
    assert len(series) == 1 and sorted(got) == want
    # the PNGs of --cam are the same overlays (computed once for both)
    import cv2

    from ichdlib.serve.discover import safe_name

    index = {s["sop_uid"]: s["slice_index"] for s in study["slices"]}
    pngs = sorted((written["out"] / "cam").rglob("*.png"))
    assert len(pngs) == len(cams) and sorted(written["doc"]["cams"]) == [str(p) for p in pngs]
    for p in cams:
        ds = pydicom.dcmread(p)
        sop, label = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID), ds.ImageComments.split(":")[0]
        png = written["out"] / "cam" / safe_name(study["study_uid"]) / f"slice{index[sop] + 1:03d}_{label}.png"
        img = cv2.imread(str(png))  # the same map, annotated (label, probability, colour scale) and enlarged
        assert min(img.shape[:2]) >= 512 and min(img.shape[:2]) > min(ds.pixel_array.shape[:2])


def test_parametric_maps_per_label(written):
    """--pmap: one Parametric Map per label found, a float frame per slice with that label, each frame derived
    from its source slice, values in [0, 1]."""
    (study,) = written["doc"]["studies"]
    t = written["threshold"]
    pmaps = sorted(written["dicom"].rglob("pmap_*.dcm"))
    by_label = {c: sorted(s["sop_uid"] for s in study["slices"] if s["p"]["any"] >= t and s["p"][c] >= t)
                for c in LABELS}
    assert [p.stem[5:] for p in pmaps] == [c for c in LABELS if by_label[c]]
    series = set()
    for p in pmaps:
        ds = pydicom.dcmread(p)
        series.add(ds.SeriesInstanceUID)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and ds.StudyInstanceUID == study["study_uid"]
        assert "not for clinical use" in ds.SeriesDescription
        refs = sorted(str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                      for f in ds.PerFrameFunctionalGroupsSequence)
        assert refs == by_label[p.stem[5:]] and int(ds.NumberOfFrames) == len(refs)
        arr = ds.pixel_array.reshape(len(refs), 64, 64)
        assert arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1 and arr.max() > 0
    assert len(series) == 1


@needs_dciodvfy
def test_dciodvfy_no_errors_with_valid_uids(written):
    files = sorted(written["dicom"].rglob("*.dcm"))
    assert files
    for p in files:
        assert dciodvfy_errors(p) == [], p


@needs_dciodvfy
def test_id_sources_only_inherited_uid_complaints(phantoms, ubundle, tmp_path):
    """RSNA-style ``ID_`` sources: the outputs are still written; the validator complains only about those
    inherited UIDs."""
    from ichdlib.cli import main as ichd

    src = one_study(phantoms["rsna"], tmp_path / "src", keep=4)
    ids = {str(pydicom.dcmread(p, stop_before_pixels=True)[k].value) for p in src.iterdir()
           for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    dicom = tmp_path / "dicom"
    assert ichd(["predict", str(src), "--bundle", str(ubundle), "--out", str(tmp_path / "out"), "--dicom-out",
                 str(dicom), "--cam", "--pmap", "--threshold", "0", "--device", "cpu"]) == 0
    files = sorted(dicom.rglob("*.dcm"))
    assert len(files) == 1 + 4 * len(LABELS)  # SR + overlays; no Parametric Map without a frame of reference
    problems = (tmp_path / "out" / "problems.csv").read_text()
    assert "Parametric Map of any not written" in problems and "FrameOfReferenceUID" in problems
    for p in files:
        errors = dciodvfy_errors(p)
        assert errors, p  # the study UID at least is inherited
        for line in errors:
            assert any(u in line for u in ids) or "invalid data values for Value Representations" in line, line
    # a rerun into the same folder replaces the earlier run's objects (no mix of two runs' series)
    assert ichd(["predict", str(src), "--bundle", str(ubundle), "--out", str(tmp_path / "out"), "--dicom-out",
                 str(dicom), "--cam", "--threshold", "1", "--device", "cpu"]) == 0
    assert [p.name for p in dicom.rglob("*.dcm")] == ["sr.dcm"]


def test_one_explain_path_reads_the_preprocessing_from_the_model(phantoms, ubundle, tmp_path):
    """PNGs and DICOM overlays come from ``pipeline.explain_study``: the window recipe is the model's own spec
    (never the run's params), and the maps are those of ``review.cam.explain`` (as notebook 06's)."""
    from ichdlib.review.cam import explain
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.discover import discover, load_study
    from ichdlib.serve.pipeline import Predictor, explain_study, study_cache, write_cam_pngs

    bundle = Bundle.load(ubundle)
    other = "three_window" if bundle.params().windows.recipe != "three_window" else "seed_3window"
    bundle.manifest["params"]["windows"]["recipe"] = other  # the run's params now disagree with the model
    predictor = Predictor(bundle, "cpu")
    scans, _ = discover(one_study(phantoms["rsna"], tmp_path / "in"))
    loaded = load_study(scans[0])
    frame = predictor.predict(loaded)
    overlays = explain_study(predictor, loaded, frame, threshold=0.0)
    assert overlays and {o.label for o in overlays} <= set(LABELS)
    model = bundle.cnn[next(iter(predictor.cnn))].models[0]
    assert model.spec.recipe != other
    cache, rows = study_cache(loaded, model.spec.size)
    o = overlays[0]
    # the whole slice (crop 1.0): no hard-edged centre-crop rectangle of map values (issue 24)
    want = explain(model, cache[rows[o.row]][None], [o.label], predictor.P.cam, out_size=loaded.hu[o.row].shape,
                   crop=1.0)[0, 0]
    np.testing.assert_allclose(o.cam, want, atol=1e-5)  # same path; float noise of a resize
    cropped = explain(model, cache[rows[o.row]][None], [o.label], predictor.P.cam,
                      out_size=loaded.hu[o.row].shape)[0, 0]
    h, w = cropped.shape
    border = np.concatenate([cropped[:h // 20].ravel(), cropped[-(h // 20):].ravel()])
    assert not border.any()  # the spec's crop leaves the map's outer band empty: the rectangle the PNGs avoid
    paths = write_cam_pngs(overlays, frame, loaded.scan.study_uid, tmp_path / "png", loaded.hu, "Grad-CAM")
    assert len(paths) == len(set(paths)) == len(overlays)
