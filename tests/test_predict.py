"""ichdlib.predict: DICOM folder discovery, bad-input handling, and predictions that match the notebooks."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from ichdlib import predict as pr

CT_SMALL = get_testdata_file("CT_small.dcm")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
_TEMPLATE = pydicom.dcmread(CT_SMALL)


def ct_file(path: Path, *, study: str = "1.2.826.0.1.1", series: str = "1.2.826.0.1.1.1", sop: str | None = None,
            z: float = 0.0, modality: str = "CT", orientation=AXIAL, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            seed: int = 0, syntax=None) -> Path:
    """pydicom's bundled CT slice with other UIDs, position, orientation, type and (seeded) pixels."""
    ds = copy.deepcopy(_TEMPLATE)
    sop = sop or f"{series}.{abs(hash((path.name, z))) % 10**8}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.Modality = modality
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [-158.1, -179.0, z]
    ds.ImageType = list(image_type)
    raw = _TEMPLATE.pixel_array.astype(np.int32) + np.random.default_rng(seed).integers(-40, 40, (128, 128))
    ds.PixelData = raw.astype(np.int16).tobytes()
    if syntax is not None:
        ds.compress(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def series_files(folder: Path, n: int, *, study: str = "1.2.826.0.1.1", series: str = "1.2.826.0.1.1.1",
                 z0: float = 0.0, dz: float = 5.0, ext: str = ".dcm", **kw) -> list[Path]:
    """``n`` slices written in shuffled order under random-looking names."""
    rng = np.random.default_rng(abs(hash(series)) % 2**32)
    return [ct_file(folder / f"f{rng.integers(1e9):09d}{ext}", study=study, series=series,
                    sop=f"{series}.{k}", z=z0 + dz * k, seed=k, **kw) for k in rng.permutation(n)]


def messages(problems) -> str:
    return "\n".join(p["message"] for p in problems)


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------
def test_discover_nested_studies_any_names(tmp_path):
    a = series_files(tmp_path / "patient1" / "deep" / "study", 5, study="1.2.3", series="1.2.3.9", ext="")
    b = series_files(tmp_path / "patient2", 3, study="1.2.4", series="1.2.4.9", z0=-20.0, dz=-2.5, ext=".DCM")
    scans, problems = pr.discover(tmp_path)
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
    one, _ = pr.discover(a[0])
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
    scans, problems = pr.discover(tmp_path)
    assert len(scans) == 1 and scans[0].series_uid == "1.2.5.2" and scans[0].n_slices == 6
    by_series = {p["series_uid"]: p["message"] for p in problems if p["series_uid"]}
    assert "localizer" in by_series["1.2.5.1"]
    assert "not axial" in by_series["1.2.5.4"]
    assert "modality MR, not CT" in by_series["1.2.5.5"]
    assert "other CT series left out (3 image(s))" in by_series["1.2.5.3"] and "1.2.5.2" in by_series["1.2.5.3"]
    by_path = {Path(p["path"]).name: p["message"] for p in problems if p["path"] and not p["series_uid"]}
    assert "not a DICOM file" in by_path["notes.txt"] and "empty file" in by_path["empty.dcm"]
    assert ".hidden" not in by_path
    assert all(p["severity"] == pr.SKIPPED for p in problems)
    frame = pr.problems_frame(problems)
    assert list(frame.columns) == pr.PROBLEM_COLUMNS and len(frame) == len(problems)


def test_study_without_ct_and_empty_folder(tmp_path):
    ct_file(tmp_path / "a" / "mr1", study="9.1", series="9.1.1", modality="MR")
    scans, problems = pr.discover(tmp_path / "a")
    assert scans == []
    assert "no axial CT series" in messages(problems)
    (tmp_path / "empty").mkdir()
    assert pr.discover(tmp_path / "empty") == ([], [pr.problem("no files found", path=tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        pr.discover(tmp_path / "missing")


def test_single_slice_and_duplicates(tmp_path):
    ct_file(tmp_path / "one" / "x", study="7.1", series="7.1.1", sop="7.1.1.1")
    scans, problems = pr.discover(tmp_path / "one")
    assert scans[0].n_slices == 1 and list(scans[0].slices["prev_index"]) == [0]
    assert [p["severity"] for p in problems] == [pr.WARNING] and "single slice" in problems[0]["message"]
    # same SOP twice: one left out; same z twice: both kept (as the catalog does) with a warning
    d = tmp_path / "dup"
    series_files(d, 3, study="7.2", series="7.2.1")
    ct_file(d / "copy_of_1", study="7.2", series="7.2.1", sop="7.2.1.1", z=5.0)
    ct_file(d / "same_z", study="7.2", series="7.2.1", sop="7.2.1.99", z=5.0)
    scans, problems = pr.discover(d)
    assert scans[0].n_slices == 4
    assert list(scans[0].slices["sop_uid"]) == ["7.2.1.0", "7.2.1.1", "7.2.1.99", "7.2.1.2"]
    text = messages(problems)
    assert "duplicate SOPInstanceUID 7.2.1.1" in text and "share 1 z position" in text


def test_index_ranges():
    assert pr.index_ranges([]) == ""
    assert pr.index_ranges([4]) == "4"
    assert pr.index_ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------
def test_load_study_compressed_and_corrupt(tmp_path):
    plain = series_files(tmp_path / "plain", 4, study="5.1", series="5.1.1")
    comp = tmp_path / "comp"
    for k, syntax in enumerate([None, RLELossless, JPEG2000Lossless, RLELossless]):
        ct_file(comp / f"s{k}", study="5.2", series="5.2.1", sop=f"5.2.1.{k}", z=5.0 * k, seed=k, syntax=syntax)
    (scan_plain,), _ = pr.discover(tmp_path / "plain")
    (scan_comp,), _ = pr.discover(comp)
    a, b = pr.load_study(scan_plain), pr.load_study(scan_comp)
    assert a.problems == [] and b.problems == []
    assert len(a.hu) == len(b.hu) == 4
    for x, y in zip(a.hu, b.hu, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.hu[0].dtype == np.float32 and -1100 < a.hu[0].min() < 0 < a.hu[0].max()
    # a slice whose pixel data is cut short: left out with the reason, neighbours over the rest
    victim = next(p for p in plain if p.name == Path(scan_plain.slices["path"].iloc[1]).name)
    victim.write_bytes(victim.read_bytes()[:-5000])
    (scan,), problems = pr.discover(tmp_path / "plain")
    assert problems == [] and scan.n_slices == 4  # the header still reads
    loaded = pr.load_study(scan)
    assert len(loaded.hu) == 3 and len(loaded.slices) == 3
    assert list(loaded.slices["z"]) == [0.0, 10.0, 15.0]
    assert list(loaded.slices["prev_index"]) == [0, 0, 1] and list(loaded.slices["next_index"]) == [1, 2, 2]
    assert len(loaded.problems) == 1 and loaded.problems[0]["path"] == str(victim)
    assert "slice left out" in loaded.problems[0]["message"] and "truncated" in loaded.problems[0]["message"]


def test_ct_small_bundled_file(tmp_path):
    (scan,), problems = pr.discover(CT_SMALL)
    assert problems[0]["severity"] == pr.WARNING  # a single slice
    loaded = pr.load_study(scan)
    assert loaded.problems == [] and loaded.hu[0].shape == (128, 128)
    assert isinstance(loaded.slices, pd.DataFrame)
