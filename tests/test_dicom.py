"""ichdlib.ingest.dicom: HU decoding, quirk fixes, the raw fast path and errors that name the file."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from builders import hu_image, variant_files, write_slice
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from ichdlib.ingest import dicom
from ichdlib.ingest.dicom import DicomReadError, read_header, read_hu, read_hu_fast

# Tests that re-save a file read back (``ds.save_as``) meet pydicom's warning about RSNA-style UIDs.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def test_ct_small_bundled_file():
    path = get_testdata_file("CT_small.dcm")
    hu, meta = read_hu(path)
    raw = pydicom.dcmread(path).pixel_array
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, raw.astype(np.float32) - 1024.0)
    assert -1100 < hu.min() < 0 < 100 < hu.max() < 3000  # air/fat to bone
    assert meta["modality"] == "CT" and meta["intercept"] == -1024.0 and meta["slope"] == 1.0
    assert meta["patient_id"] == "1CT1" and meta["sop_uid"].startswith("1.3.6.1.4.1.5962")
    assert meta["z"] == pytest.approx(-75.699997) and meta["position"][2] == meta["z"]
    assert meta["pixel_spacing"] == pytest.approx(0.661468) and (meta["rows"], meta["cols"]) == (128, 128)
    assert meta["transfer_syntax"] == ExplicitVRLittleEndian and meta["fixes"] == []
    header = read_header(path)
    assert {k: v for k, v in header.items()} == meta


def test_intercept_wrap_12bit_fix(tmp_path):
    hu = hu_image()
    hu[0, :4] = [-1000, -1, 0, 3095]  # the wrap's edges
    stored = np.mod(hu, 4096).astype(np.uint16)  # how the broken RSNA files store it (intercept ~0)
    path = write_slice(tmp_path / "wrap.dcm", stored, bits_stored=12, intercept=0.0)
    out, meta = read_hu(path)
    np.testing.assert_array_equal(out, hu.astype(np.float32))
    assert "intercept_wrap_12bit" in meta["fixes"] and meta["intercept"] == -1000.0
    np.testing.assert_array_equal(read_hu_fast(path, read_header(path)), out)
    # The same bits with a normal intercept are left alone.
    normal = write_slice(tmp_path / "normal.dcm", stored, bits_stored=12, intercept=-1024.0)
    out2, meta2 = read_hu(normal)
    assert "intercept_wrap_12bit" not in meta2["fixes"]
    np.testing.assert_array_equal(out2, stored.astype(np.float32) - 1024)


def test_monochrome1(tmp_path):
    stored = (hu_image() + 1024).astype(np.uint16)
    ref, _ = read_hu(write_slice(tmp_path / "m2.dcm", stored))
    # With a rescale the modality LUT gives HU whatever the display polarity: not inverted.
    hu1, meta1 = read_hu(write_slice(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(hu1, ref)
    assert "monochrome1" in meta1["fixes"]
    # Without a rescale the values are display values: inverted so that bright means dense.
    path = write_slice(
        tmp_path / "m1raw.dcm", stored, photometric="MONOCHROME1", bits_stored=12, intercept=None, slope=None
    )
    inv, meta = read_hu(path)
    assert {"monochrome1_inverted", "default_rescale"} <= set(meta["fixes"])
    np.testing.assert_array_equal(inv, 4095.0 - stored)
    np.testing.assert_array_equal(read_hu_fast(path, read_header(path)), inv)


def test_multi_valued_window(tmp_path):
    stored = (hu_image() + 1024).astype(np.int16)
    meta = read_header(write_slice(tmp_path / "w.dcm", stored, window=([40, 300], [80, 2000])))
    assert (meta["window_center"], meta["window_width"]) == (40.0, 80.0)
    assert "window_first_value" in meta["fixes"]
    single = read_header(write_slice(tmp_path / "w1.dcm", stored, window=(35, 90)))
    assert (single["window_center"], single["window_width"]) == (35.0, 90.0) and single["fixes"] == []


def test_fast_path_matches_pydicom(tmp_path):
    for path in variant_files(tmp_path):
        meta = read_header(path)
        assert meta["pixel_offset"] > 0, path.name
        ref, _ = read_hu(path)
        np.testing.assert_array_equal(read_hu_fast(path, meta), ref, err_msg=path.name)
        assert ref.shape == (meta["rows"], meta["cols"])


def test_jpeg2000_compressed(tmp_path):
    hu = hu_image((64, 64), seed=2)
    path = write_slice(tmp_path / "plain.dcm", (hu + 1024).astype(np.uint16))
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm")
    out, meta = read_hu(tmp_path / "j2k.dcm")
    assert meta["transfer_syntax"] == JPEG2000Lossless and meta["pixel_offset"] == -1
    np.testing.assert_array_equal(out, hu.astype(np.float32))
    np.testing.assert_array_equal(read_hu_fast(tmp_path / "j2k.dcm", meta), out)  # falls back to pydicom
    # pydicom's bundled JPEG 2000 lossless MR equals its uncompressed twin
    mr_j2k, _ = read_hu(get_testdata_file("MR_small_jp2klossless.dcm"))
    np.testing.assert_array_equal(mr_j2k, read_hu(get_testdata_file("MR_small.dcm"))[0])


def test_missing_decoder_gives_install_hint(tmp_path, monkeypatch):
    import pydicom.pixels

    hu = hu_image((32, 32))
    ds = pydicom.dcmread(write_slice(tmp_path / "plain.dcm", (hu + 1024).astype(np.uint16)))
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm")

    class NoDecoder:
        is_available = False

    def fail(self):
        raise RuntimeError("Unable to decode as there are no pixel data plugins available")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(fail))
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoDecoder())
    with pytest.raises(
        DicomReadError, match=r"j2k\.dcm: unsupported transfer syntax JPEG 2000.*pip install ichdlib\[jpeg\]"
    ):
        read_hu(tmp_path / "j2k.dcm")


def test_unknown_transfer_syntax(tmp_path):
    from pydicom.encaps import encapsulate

    path = write_slice(tmp_path / "mpeg.dcm", np.zeros((8, 8), np.int16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder
    ds.PixelData = encapsulate([b"\x00" * 16])
    ds.save_as(path)
    with pytest.raises(DicomReadError, match=r"mpeg\.dcm: unsupported transfer syntax MPEG2"):
        read_hu(path)


def test_unreadable_files_name_file_and_reason(tmp_path):
    stored = (hu_image() + 1024).astype(np.int16)
    good = write_slice(tmp_path / "good.dcm", stored)
    raw = good.read_bytes()
    (tmp_path / "text.dcm").write_text("patient,notes\n1,not an image\n" * 20)
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "cut_pixels.dcm").write_bytes(raw[:-500])
    (tmp_path / "cut_header.dcm").write_bytes(raw[:300])
    write_slice(tmp_path / "frames.dcm", np.stack([stored, stored]), frames=2)
    cases = {
        "text.dcm": "not a DICOM file",
        "empty.dcm": "empty file",
        "cut_pixels.dcm": "truncated pixel data",
        "cut_header.dcm": "no pixel data",
        "frames.dcm": "multi-frame",
        "missing.dcm": "no such file",
    }
    for name, reason in cases.items():
        with pytest.raises(DicomReadError) as err:
            read_hu(tmp_path / name)
        assert isinstance(err.value, ValueError)
        assert str(err.value).startswith(str(tmp_path / name)) and reason in str(err.value), str(err.value)
        assert err.value.path == str(tmp_path / name) and reason in err.value.reason
    # The header of a file with cut pixels is readable; its raw read reports the truncation too.
    meta = read_header(tmp_path / "cut_pixels.dcm")
    with pytest.raises(DicomReadError, match=r"cut_pixels\.dcm: truncated pixel data"):
        read_hu_fast(tmp_path / "cut_pixels.dcm", meta)
    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_header(tmp_path / "text.dcm")
    with pytest.raises(DicomReadError, match="not grayscale"):
        read_hu(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))


def test_missing_tags_tolerated(tmp_path):
    path = write_slice(tmp_path / "ID_fromname.dcm", (hu_image() + 1024).astype(np.int16))
    ds = pydicom.dcmread(path)
    for tag in (
        "SOPInstanceUID",
        "ImagePositionPatient",
        "PixelSpacing",
        "WindowCenter",
        "WindowWidth",
        "PatientID",
        "RescaleSlope",
    ):
        delattr(ds, tag)
    ds.SliceLocation = 12.5
    ds.save_as(path)
    hu, meta = read_hu(path)
    assert meta["sop_uid"] == "ID_fromname" and meta["z"] == 12.5 and meta["patient_id"] == ""
    assert np.isnan(meta["pixel_spacing"]) and np.isnan(meta["window_center"])
    assert {"sop_uid_from_filename", "z_from_slice_location"} <= set(meta["fixes"])
    np.testing.assert_array_equal(hu, hu_image().astype(np.float32))  # slope defaults to 1


def test_read_headers_collects_errors(tmp_path):
    good = write_slice(tmp_path / "a.dcm", np.zeros((8, 8), np.int16))
    (tmp_path / "b.dcm").write_text("nope")
    metas, errors = dicom.read_headers([str(good), str(tmp_path / "b.dcm")])
    assert [m["path"] for m in metas] == [str(good)]
    assert errors == [
        (
            str(tmp_path / "b.dcm"),
            f"{tmp_path / 'b.dcm'}: not a DICOM file (no 'DICM' marker and no DICOM image elements)",
        )
    ]
