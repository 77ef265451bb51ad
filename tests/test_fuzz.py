"""Fuzz: corrupt and odd inputs generated on the fly (32 px), through both ingest and predict.

Every case ends as "kept, with finite values" or "left out with its reason" in *both* paths, for the same
reason kind (one slice-validity rule, :mod:`ichdlib.ingest.validity`); never NaN, never a traceback, never a hang
(a timeout per case for the header pass, and one around each whole run).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from ichdlib.ingest import catalog
from ichdlib.ingest import table as catalog_table
from ichdlib.ingest.cache import open_cache
from ichdlib.ingest.dicom import DicomReadError, read_header
from ichdlib.ingest.validity import slice_problem
from ichdlib.labels import LABELS
from ichdlib.phantom.synth import write_ct_dicom

PX = 32
STUDY, SERIES = "1.2.826.0.9.1", "1.2.826.0.9.1.1"
KEPT = "kept"


def _hu(seed: int) -> np.ndarray:
    yy, xx = np.mgrid[:PX, :PX]
    r = np.hypot(yy - PX / 2, xx - PX / 2) / (PX / 2)
    hu = np.where(r < 0.8, 35.0, -1000.0) + np.where((r >= 0.7) & (r < 0.8), 1165.0, 0.0)
    return np.rint(hu + np.random.default_rng(seed).normal(0, 8, hu.shape) * (r < 0.7)).astype(np.float32)


def _slice(path: Path, sop: str, z: float, seed: int = 0, **meta) -> Path:
    return write_ct_dicom(path, _hu(seed), sop_uid=sop, study_uid=STUDY, series_uid=SERIES, patient_id="FUZZ",
                          z=z, **meta)


@contextlib.contextmanager
def lenient_pydicom():
    """Let pydicom read and write invalid values ('nan', 'abc', non-UID IDs) without warnings."""
    settings = pydicom_config.settings
    old = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = old


def _edit(path: Path, **elements) -> Path:
    """Rewrite elements of a written file verbatim (invalid values such as 'nan' included)."""
    ds = pydicom.dcmread(path)
    for key, value in elements.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)
    return path


def _with_pixels(path: Path, arr: np.ndarray, **elements) -> Path:
    ds = pydicom.dcmread(path)
    ds.PixelData = arr.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


def _compressed(path: Path, syntax) -> Path:
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(path)
    return path


def _png(path: Path) -> Path:
    ok, buf = cv2.imencode(".png", np.zeros((PX, PX), np.uint8))
    path.write_bytes(buf.tobytes())
    return path


def _copy_testdata(name: str):
    def make(path: Path, sop: str, z: float) -> Path:
        path.write_bytes(Path(get_testdata_file(name)).read_bytes())
        return path

    return make


# name -> (how to write it at (path, sop, z), the reason kind it must end with, or KEPT)
CASES: dict[str, tuple] = {
    "good_native": (lambda p, s, z: _slice(p, s, z), KEPT),
    "good_rle": (lambda p, s, z: _compressed(_slice(p, s, z, 1), RLELossless), KEPT),
    "good_j2k": (lambda p, s, z: _compressed(_slice(p, s, z, 2), JPEG2000Lossless), KEPT),
    "bits8": (lambda p, s, z: _with_pixels(_slice(p, s, z), np.full((PX, PX), 60, np.uint8), BitsAllocated=8,
                                           BitsStored=8, HighBit=7, PixelRepresentation=0), KEPT),
    "bits32": (lambda p, s, z: _with_pixels(_slice(p, s, z), np.full((PX, PX), 40, np.int32), BitsAllocated=32,
                                            BitsStored=32, HighBit=31, PixelRepresentation=1), KEPT),
    "odd_window_text": (lambda p, s, z: _window_text(_slice(p, s, z)), KEPT),
    "zero_byte": (lambda p, s, z: (p.write_bytes(b""), p)[1], "unreadable"),
    "random_bytes": (lambda p, s, z: (p.write_bytes(np.random.default_rng(1).bytes(3000)), p)[1], "unreadable"),
    "truncated_header": (lambda p, s, z: (p.write_bytes(_slice(p, s, z).read_bytes()[:300]), p)[1],
                         "unreadable"),
    "truncated_pixels": (lambda p, s, z: _slice(p, s, z, truncate=0.5), "unreadable"),
    "png_renamed": (lambda p, s, z: _png(p), "unreadable"),
    "no_pixel_data": (lambda p, s, z: _edit(_slice(p, s, z), PixelData=None), "no pixel data"),
    "float_pixels": (lambda p, s, z: _float_pixels(_slice(p, s, z)), "no pixel data"),
    "rgb": (lambda p, s, z: _with_pixels(_slice(p, s, z), np.zeros((PX, PX, 3), np.uint8), SamplesPerPixel=3,
                                         PhotometricInterpretation="RGB", PlanarConfiguration=0, BitsAllocated=8,
                                         BitsStored=8, HighBit=7, PixelRepresentation=0), "not greyscale"),
    "multi_frame": (lambda p, s, z: _with_pixels(_slice(p, s, z), np.zeros((2, PX, PX), np.int16),
                                                 NumberOfFrames=2), "not a 2-D slice"),
    "huge_rows": (lambda p, s, z: _edit(_slice(p, s, z), Rows=65535, Columns=65535), "bad size"),
    "slope_nan": (lambda p, s, z: _edit(_slice(p, s, z), RescaleSlope="nan"), "bad rescale"),
    "slope_inf": (lambda p, s, z: _edit(_slice(p, s, z), RescaleSlope="inf"), "bad rescale"),
    "slope_zero": (lambda p, s, z: _edit(_slice(p, s, z), RescaleSlope="0"), "bad rescale"),
    "slope_huge": (lambda p, s, z: _edit(_slice(p, s, z), RescaleSlope="1e30"), "bad rescale"),
    "intercept_nan": (lambda p, s, z: _edit(_slice(p, s, z), RescaleIntercept="nan"), "bad rescale"),
    "z_inf": (lambda p, s, z: _edit(_slice(p, s, z), ImagePositionPatient=["0", "0", "inf"]), "bad position"),
    "z_1e308": (lambda p, s, z: _edit(_slice(p, s, z), ImagePositionPatient=["0", "0", "1e308"]),
                "bad position"),
    "z_nan": (lambda p, s, z: _edit(_slice(p, s, z), ImagePositionPatient=["0", "0", "nan"]), "position"),
    "z_missing": (lambda p, s, z: _edit(_slice(p, s, z), ImagePositionPatient=None), "no position"),
    "orientation_nan": (lambda p, s, z: _edit(_slice(p, s, z), ImageOrientationPatient=["nan"] * 6),
                        "bad orientation"),
    "coronal_in_axial_series": (lambda p, s, z: _slice(p, s, z, orientation=(1, 0, 0, 0, 0, -1)), "not axial"),
    "mr_in_ct_series": (lambda p, s, z: _slice(p, s, z, modality="MR"), "not CT"),
    "pydicom_mr_rle": (_copy_testdata("MR_small_RLE.dcm"), "not CT"),
    "pydicom_mr_bigendian": (_copy_testdata("MR_small_bigendian.dcm"), "not CT"),
    "pydicom_rgb_jpeg": (_copy_testdata("SC_rgb_jpeg.dcm"), "not greyscale|not CT"),
    "pydicom_ct_small": (_copy_testdata("CT_small.dcm"), KEPT),
}


def _window_text(path: Path) -> Path:
    ds = pydicom.dcmread(path)
    ds.add_new(0x00281050, "LO", "abc")  # WindowCenter as text
    ds.add_new(0x00281051, "LO", "")
    ds.save_as(path)
    return path


def _float_pixels(path: Path) -> Path:
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.FloatPixelData = np.zeros((PX, PX), np.float32).tobytes()
    ds.BitsAllocated = 32
    ds.save_as(path)
    return path


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail (never hang) when the block runs longer than ``seconds``."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """An RSNA layout whose test split holds one study of 4 good slices plus every case (each at its own z),
    a FIFO and a hidden file."""
    root = tmp_path_factory.mktemp("fuzz")
    test = root / "stage_2_test"
    test.mkdir()
    for k in range(4):
        _slice(test / f"ID_good{k}.dcm", f"ID_good{k}", 100.0 + 5 * k, seed=10 + k)
    files = {}
    with lenient_pydicom():
        for i, (name, (make, expect)) in enumerate(CASES.items()):
            path = test / f"ID_{name}.dcm"
            make(path, f"ID_{name}", 120.0 + 5.0 * i)  # 5 mm apart: a thick series, read slice by slice
            files[name] = (path, expect)
    os.mkfifo(test / "ID_fifo.dcm")
    files["fifo"] = (test / "ID_fifo.dcm", "skipped")
    (test / ".ID_hidden.dcm").write_bytes(Path(files["good_native"][0]).read_bytes())
    files["hidden"] = (test / ".ID_hidden.dcm", "skipped")
    return root, files


def test_each_case_header_pass_is_fast_and_named(fuzz_root):
    """Per case (with its own timeout): the header read either raises DicomReadError naming the file or
    returns a header that the validity rule judges with the expected kind."""
    _, files = fuzz_root
    for name, (path, expect) in files.items():
        if expect == "skipped":
            continue
        with deadline(5, f"header of case {name}"):
            try:
                meta = read_header(path)
            except DicomReadError as exc:
                assert str(path) in str(exc) and expect in ("unreadable",), (name, str(exc))
                continue
        why = slice_problem(meta)
        if expect == KEPT:
            assert why is None, (name, why)
        elif expect != "unreadable":  # broken files fail here or, by their pixels, later
            assert why is not None and any(k in why.lower() for k in expect.lower().split("|")), (name, why)


def _series_uid(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("SeriesInstanceUID", ""))
    except Exception:  # noqa: BLE001 - an unreadable case has no series
        return "<none>"


def _predict_outcomes(pred, files) -> dict[str, str]:
    problems = pred.problems
    out = {}
    for name, (path, _) in files.items():
        if str(path) in set(pred.slices.get("path", pd.Series(dtype=str))):
            out[name] = KEPT
            continue
        mine = problems[problems["path"].astype(str).str.startswith(str(path))]
        if not len(mine):  # a series left out whole is one problem row naming its first file and the count
            mine = problems[problems["series_uid"].astype(str) == _series_uid(path)]
        assert len(mine), f"case {name}: neither predicted nor listed in problems"
        out[name] = " | ".join(mine["message"])
    return out


def test_ingest_and_predict_agree_and_never_give_nan(fuzz_root, smoke_params, tmp_path):
    from ichdlib.serve.bundle import Bundle
    from ichdlib.serve.predict import predict_dir

    root, files = fuzz_root
    work = tmp_path / "work"
    with deadline(40, "ingest of the fuzz folder"), contextlib.redirect_stderr(io.StringIO()):
        cat = catalog.build_catalog(root, work, size=PX, workers=1, folds=2, progress=False)
    q = catalog_table.load_quarantine(work).set_index("path")
    cache = open_cache(work, PX)
    bundle = Bundle.untrained(smoke_params, folds=1)
    with deadline(40, "predict of the fuzz folder"):
        pred = predict_dir(root / "stage_2_test", bundle, device="cpu")
    predicted = _predict_outcomes(pred, files)
    probs = pred.slices[[c for c in pred.slices.columns if c.startswith(("p_", "p2d_"))]].to_numpy(float)
    assert len(pred.slices) and np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()
    assert len(pred.studies) and np.isfinite(pred.studies["max_any"]).all()
    table = []
    for name, (path, expect) in files.items():
        if str(path) in set(cat["path"]):
            row = cat.loc[cat["path"] == str(path)].iloc[0]
            img = np.asarray(cache[int(row["row"])])
            assert img.std() > 0 or name == "bits32" or name == "bits8", f"{name}: constant cache row"
            ingested = KEPT
        else:
            assert str(path) in q.index, f"case {name}: neither in the catalog nor in quarantine.csv"
            ingested = q.loc[str(path), "reason"]
            assert isinstance(ingested, str) and ingested
        table.append((name, ingested, predicted[name]))
        if expect == KEPT:
            assert ingested == KEPT and predicted[name] == KEPT, (name, ingested, predicted[name])
        else:
            assert ingested != KEPT and predicted[name] != KEPT, (name, ingested, predicted[name])
            if expect != "unreadable":  # the shared rule: both paths name the reason kind
                kinds = expect.lower().split("|")
                assert any(k in ingested.lower() for k in kinds), (name, ingested)
                assert any(k in predicted[name].lower() for k in kinds), (name, predicted[name])
    # the study's neighbours and spacing come from the kept slices only: finite, no 1e308 gaps
    assert np.isfinite(cat["z"]).all() and np.isfinite(cat["spacing_z"]).all()
    assert cat["spacing_z"].abs().max() < 200
    assert set(LABELS) <= set(cat.columns)
    print("\n".join(f"{n:26s} | ingest: {a[:70]:70s} | predict: {b[:90]}" for n, a, b in table))
