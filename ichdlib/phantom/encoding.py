"""Phantom files: DICOM encoding of HU slices (the real data's pixel quirks), atomic writes, masks."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import config as pd_config
from pydicom.datadict import dictionary_has_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from ichdlib.files import write_bytes

#: Pixel encodings understood by :func:`write_ct_dicom`.
ENCODINGS = ("signed", "unsigned", "unsigned12", "wrap12", "monochrome1", "monochrome1_raw")
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# ----------------------------------------------------------------------------------------------------
# Files: atomic writes, DICOM encoding, masks
# ----------------------------------------------------------------------------------------------------
def _fov_circle(rows: int, cols: int) -> np.ndarray:
    """True outside the scanner's circular reconstruction field (diameter = the smaller image side)."""
    yy, xx = np.ogrid[:rows, :cols]
    r = min(rows, cols) / 2.0
    return (yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2 > r * r


def encode_hu(hu: np.ndarray, encoding: str = "signed", *, fov_padding: bool = False) -> tuple[np.ndarray, dict]:
    """HU -> stored pixel values and the header elements that decode them (rounded to whole HU).

    ``signed``: int16, intercept -1024; ``unsigned``: uint16, intercept -1024; ``unsigned12``: 12 bits
    stored; ``wrap12``: the RSNA 12-bit quirk (BitsStored 12, unsigned, intercept 1) that the community fix
    (raw + 1000, values >= 4096 minus 4096, intercept -1000) turns back into HU in [-1000, 3095];
    ``monochrome1``: inverted storage with RescaleSlope -1 (the standard modality LUT gives HU);
    ``monochrome1_raw``: inverted signed storage without rescale tags (HU = -1 - raw).
    ``fov_padding`` (signed only) stores -2000 outside the reconstruction circle, as many scanners do.
    """
    h = np.rint(np.asarray(hu, dtype=np.float64))
    hdr: dict[str, Any] = {"PhotometricInterpretation": "MONOCHROME2", "RescaleSlope": "1"}
    if encoding == "signed":
        raw = (np.clip(h, -1024, 31743) + 1024).astype(np.int16)
        if fov_padding:
            raw[_fov_circle(*raw.shape)] = -2000
        hdr.update(BitsStored=16, PixelRepresentation=1, RescaleIntercept="-1024")
    elif encoding == "unsigned":
        raw = (np.clip(h, -1024, 64511) + 1024).astype(np.uint16)
        hdr.update(BitsStored=16, PixelRepresentation=0, RescaleIntercept="-1024")
    elif encoding == "unsigned12":
        raw = (np.clip(h, -1024, 3071) + 1024).astype(np.uint16)
        hdr.update(BitsStored=12, PixelRepresentation=0, RescaleIntercept="-1024")
    elif encoding == "wrap12":
        hc = np.clip(h, -1000, 3095)
        raw = np.where(hc < 0, hc + 4096, hc).astype(np.uint16)
        hdr.update(BitsStored=12, PixelRepresentation=0, RescaleIntercept="1")
    elif encoding == "monochrome1":
        raw = (4095 - (np.clip(h, -1024, 3071) + 1024)).astype(np.uint16)
        hdr.update(BitsStored=16, PixelRepresentation=0, RescaleIntercept="3071", RescaleSlope="-1",
                   PhotometricInterpretation="MONOCHROME1")
    elif encoding == "monochrome1_raw":
        raw = (-1 - np.clip(h, -32767, 32767)).astype(np.int16)
        hdr.update(BitsStored=16, PixelRepresentation=1, PhotometricInterpretation="MONOCHROME1",
                   RescaleSlope=None, RescaleIntercept=None)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return raw, hdr


def ds_value(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def ds_values(value: float | list | tuple) -> str | list[str]:
    if isinstance(value, (list, tuple)):
        return [ds_value(float(v)) for v in value]
    return ds_value(float(value))


_META_KEYS = ("sop_uid", "patient_id", "study_uid", "series_uid", "z", "position", "orientation",
              "pixel_spacing", "encoding", "window_center", "window_width", "fov_padding", "modality",
              "truncate")


def _dicom_bytes(hu: np.ndarray, path: Path, meta: dict[str, Any]) -> bytes:

    unknown = [k for k in meta if k not in _META_KEYS and not (k[:1].isupper() and tag_for_keyword(k))]
    if unknown:
        raise TypeError(f"write_ct_dicom({path.name}): unknown keyword(s) {unknown}; use {', '.join(_META_KEYS)} "
                        "or DICOM keywords such as RescaleIntercept")
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"write_ct_dicom({path.name}): expected a 2-D slice, got shape {hu.shape}")
    rows, cols = hu.shape
    raw, hdr = encode_hu(hu, meta.get("encoding", "signed"), fov_padding=bool(meta.get("fov_padding", False)))
    sop = str(meta.get("sop_uid") or path.stem)
    spacing = meta.get("pixel_spacing", 0.45)
    if not isinstance(spacing, (list, tuple)):
        spacing = (spacing, spacing)
    position = meta.get("position")
    if position is None:
        position = (-(cols / 2) * float(spacing[1]), -(rows / 2) * float(spacing[0]), float(meta.get("z", 0.0)))
    with pd_config.disable_value_validation():
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
        file_meta.MediaStorageSOPInstanceUID = sop
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(str(path), Dataset(), file_meta=file_meta, preamble=b"\0" * 128)
        # The RSNA files' sparse header, in their order.
        ds.SOPInstanceUID = sop
        ds.Modality = str(meta.get("modality", "CT"))
        ds.PatientID = str(meta.get("patient_id", "ID_00000000"))
        ds.StudyInstanceUID = str(meta.get("study_uid", "ID_0000000000"))
        ds.SeriesInstanceUID = str(meta.get("series_uid", "ID_0000000000"))
        ds.StudyID = ""
        ds.ImagePositionPatient = [ds_value(float(p)) for p in position]
        ds.ImageOrientationPatient = [ds_value(float(o)) for o in meta.get("orientation", (1, 0, 0, 0, 1, 0))]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = hdr["PhotometricInterpretation"]
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [ds_value(float(s)) for s in spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = hdr["BitsStored"]
        ds.HighBit = hdr["BitsStored"] - 1
        ds.PixelRepresentation = hdr["PixelRepresentation"]
        ds.WindowCenter = ds_values(meta.get("window_center", 40))
        ds.WindowWidth = ds_values(meta.get("window_width", 80))
        if hdr["RescaleIntercept"] is not None:
            ds.RescaleIntercept = hdr["RescaleIntercept"]
            ds.RescaleSlope = hdr["RescaleSlope"]
        for key, value in meta.items():
            if key[:1].isupper():
                if value is None:
                    if key in ds:
                        delattr(ds, key)
                elif dictionary_has_tag(tag_for_keyword(key)):
                    setattr(ds, key, value)
        ds.PixelData = raw.astype(raw.dtype.newbyteorder("<"), copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    truncate = meta.get("truncate")
    if truncate is not None:
        # Keep the header and only a fraction of the pixel bytes: a file that looks valid but cannot decode.
        keep = len(data) - raw.nbytes + int(raw.nbytes * float(truncate))
        data = data[:keep]
    return data


def write_ct_dicom(path: str | os.PathLike, hu: np.ndarray, **meta: Any) -> Path:
    """Write one CT slice (2-D HU array) as an RSNA-like DICOM file, atomically; returns the path.

    Keywords: ``sop_uid`` (default: the file stem), ``patient_id``, ``study_uid``, ``series_uid``,
    ``z`` or ``position`` (x, y, z), ``orientation``, ``pixel_spacing`` (float or (row, col)),
    ``encoding`` (one of :data:`ENCODINGS`, default ``signed``), ``window_center``/``window_width`` (a
    number, or a list for multi-valued tags), ``fov_padding``, ``modality`` (default CT), ``truncate``
    (keep only this fraction of the pixel bytes: a corrupt file). Any DICOM keyword (``RescaleIntercept``,
    ``BitsStored``, ...) is set verbatim after the defaults (``None`` removes the element).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, _dicom_bytes(hu, path, meta))
    return path


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write a uint8 lesion bitmask as ``.npz`` (array ``mask``), byte-identical for identical input."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("mask.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(mask, dtype=np.uint8), allow_pickle=False)
    write_bytes(path, buf.getvalue())
    return path


