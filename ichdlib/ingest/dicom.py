"""One DICOM file -> Hounsfield units (float32) and a flat metadata dict, with the community's quirk fixes.

``read_header`` parses the header only (the pixel data element is deferred: its file offset is recorded so
the cache pass can read native little-endian pixels with one ``np.fromfile``); ``read_hu`` decodes through
pydicom (compressed transfer syntaxes via pylibjpeg / python-gdcm when installed) and is the reference.
``read_hu_fast`` uses a header already read and must give the same numbers as ``read_hu``.

Fixes applied (named in ``meta["fixes"]``):

- ``intercept_wrap_12bit``: ``BitsStored == 12``, unsigned, ``int(RescaleIntercept) > -100`` (a subset of
  the RSNA images): raw + 1000, values >= 4096 minus 4096, intercept -1000.
- ``monochrome1_inverted``: MONOCHROME1 without a rescale (the values are display values, bright = low);
  with a rescale the modality LUT already gives HU, so HU are never inverted (noted as ``monochrome1``).
- ``window_first_value``: multi-valued WindowCenter/WindowWidth, the first value kept.
- ``default_rescale``: RescaleSlope/Intercept missing, 1 and 0 used.
- ``sop_uid_from_filename``, ``z_from_slice_location``: missing SOPInstanceUID / ImagePositionPatient.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import config as _pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.values import convert_value

#: Elements larger than this are not read by ``read_header`` (pixel data, big private blobs).
_DEFER_BYTES = 2048
_PIXEL_TAG = 0x7FE00010
_NATIVE_LE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
#: Transfer syntaxes whose decoders come with ``pip install ichdlib[jpeg]`` (pylibjpeg + plugins).
_JPEG_HINT = "install a decoder: pip install ichdlib[jpeg] (pylibjpeg, libjpeg, openjpeg) or python-gdcm"


class DicomReadError(ValueError):
    """A DICOM file that cannot be read or decoded; ``str(err)`` is ``'<path>: <reason>'``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's value-validation warnings (RSNA UIDs such as ``ID_ab12`` are not valid UIDs)."""
    settings = _pydicom_config.settings
    old = settings.reading_validation_mode
    settings.reading_validation_mode = _pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        settings.reading_validation_mode = old


def _open(path: Path) -> pydicom.Dataset:
    """Parse a file's elements, deferring large values; raise DicomReadError for non-DICOM input."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DicomReadError(path, "no such file") from None
    except OSError as exc:
        raise DicomReadError(path, f"cannot read file ({exc})") from exc
    if not stat.S_ISREG(mode):  # a FIFO would block the read forever, a device never end
        raise DicomReadError(path, "not a regular file (a folder, FIFO, socket or device)")
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except InvalidDicomError:
        if path.stat().st_size == 0:
            raise DicomReadError(path, "empty file (0 bytes)") from None
        # no 'DICM' preamble: try once more without it (raw datasets exist), but insist on content
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DicomReadError(path, "no such file") from None
    except OSError as exc:
        raise DicomReadError(path, f"cannot read file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types on malformed headers
        raise DicomReadError(path, f"malformed or truncated header ({type(exc).__name__}: {exc})") from exc
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
        if _PIXEL_TAG in ds or ("SOPInstanceUID" in ds and str(ds.SOPInstanceUID).strip()):
            return ds
    except Exception:  # garbage parsed with force=True fails in arbitrary ways
        pass
    raise DicomReadError(path, "not a DICOM file (no 'DICM' marker and no DICOM image elements)")


def _first(value: Any) -> tuple[Any, bool]:
    """First item of a multi-valued element and whether it had several."""
    if isinstance(value, list | tuple | MultiValue):
        return (value[0] if len(value) else None), len(value) > 1
    return value, False


def _list(value: Any) -> list[Any]:
    if value in (None, ""):
        return []
    return list(value) if isinstance(value, list | tuple | MultiValue) else [value]


def _float(value: Any, default: float = float("nan")) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


#: The header elements ``_meta`` reads, by keyword, with their tag and dictionary VR.
_KEYWORDS = (
    "SOPInstanceUID",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "PixelSpacing",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "NumberOfFrames",
    "SamplesPerPixel",
    "InstanceNumber",
    "ImageType",
)
_TAGS = tuple((k, tag_for_keyword(k), dictionary_VR(k)) for k in _KEYWORDS)


def _values(ds: pydicom.Dataset) -> dict[str, Any]:
    """Values of the elements in :data:`_KEYWORDS` that are present (``None`` for empty ones).

    Raw elements are converted with ``pydicom.values.convert_value`` directly, which is several times
    faster than attribute access (no DataElement is built and stored back); this is most of the header pass.
    """
    out: dict[str, Any] = {}
    for key, tag, vr in _TAGS:
        elem = ds.get_item(tag, keep_deferred=True)
        if elem is None:
            continue
        if isinstance(elem, RawDataElement) and elem.value is not None:
            value = convert_value(elem.VR if elem.VR not in (None, "UN") else vr, elem)
        else:
            value = ds[tag].value
        out[key] = None if value == "" else value
    return out


def _meta(ds: pydicom.Dataset, path: Path) -> dict[str, Any]:
    """The flat metadata dict (see the module docstring and docs/architecture.md)."""
    fixes: list[str] = []
    v = _values(ds)
    get = v.get
    sop = str(get("SOPInstanceUID", "") or "").strip()
    if not sop:
        sop = path.stem
        fixes.append("sop_uid_from_filename")
    position = _floats(get("ImagePositionPatient"), 3)
    z = position[2] if position else float("nan")
    if position is None and get("SliceLocation") not in (None, ""):
        z = _float(get("SliceLocation"))
        fixes.append("z_from_slice_location")
    spacing = _floats(get("PixelSpacing"), 2)
    ts = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ExplicitVRLittleEndian))
    bits_alloc = _int(get("BitsAllocated"), 16)
    bits_stored = _int(get("BitsStored"), bits_alloc)
    pixrep = _int(get("PixelRepresentation"), 0)
    photometric = str(get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    has_rescale = get("RescaleSlope") is not None or get("RescaleIntercept") is not None
    slope = _float(get("RescaleSlope"), 1.0)
    intercept = _float(get("RescaleIntercept"), 0.0)
    if not has_rescale:
        fixes.append("default_rescale")
    if has_rescale and bits_stored == 12 and pixrep == 0 and int(intercept) > -100:
        fixes.append("intercept_wrap_12bit")
        intercept = -1000.0
    if photometric == "MONOCHROME1":
        fixes.append("monochrome1" if has_rescale else "monochrome1_inverted")
    wc, multi_c = _first(get("WindowCenter"))
    ww, multi_w = _first(get("WindowWidth"))
    if multi_c or multi_w:
        fixes.append("window_first_value")
    rows, cols = _int(get("Rows")), _int(get("Columns"))
    frames = _int(get("NumberOfFrames"), 1)
    spp = _int(get("SamplesPerPixel"), 1)
    # Where the pixels lie, for the one-read fast path (native little-endian, single grayscale frame).
    offset, nbytes = -1, 0
    elem = ds.get_item(_PIXEL_TAG, keep_deferred=True) if _PIXEL_TAG in ds else None
    if elem is not None:
        nbytes = int(getattr(elem, "length", 0) or 0)
        tell = getattr(elem, "value_tell", None)
        expected = rows * cols * (bits_alloc // 8)
        if (
            ts in _NATIVE_LE
            and tell is not None
            and not getattr(elem, "is_undefined_length", False)
            and bits_alloc in (8, 16)
            and spp == 1
            and frames == 1
            and 0 < expected <= nbytes
        ):
            offset = int(tell)
    return {
        "sop_uid": sop,
        "patient_id": str(get("PatientID", "") or "").strip(),
        "study_uid": str(get("StudyInstanceUID", "") or "").strip(),
        "series_uid": str(get("SeriesInstanceUID", "") or "").strip(),
        "modality": str(get("Modality", "") or "").strip().upper(),
        "z": float(z),
        "position": position,
        "orientation": _floats(get("ImageOrientationPatient"), 6),
        "pixel_spacing": spacing[0] if spacing else float("nan"),
        "rows": rows,
        "cols": cols,
        "slope": slope,
        "intercept": intercept,
        "bits_allocated": bits_alloc,
        "bits_stored": bits_stored,
        "pixel_representation": pixrep,
        "photometric": photometric,
        "transfer_syntax": str(ts),
        "window_center": _float(wc),
        "window_width": _float(ww),
        "instance_number": _int(get("InstanceNumber"), -1),
        "image_type": "\\".join(str(v) for v in (_list(get("ImageType")))).upper(),
        "samples_per_pixel": spp,
        "frames": frames,
        "has_pixels": elem is not None,
        "pixel_offset": offset,
        "pixel_nbytes": nbytes,
        "fixes": fixes,
        "path": str(path),
    }


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Header metadata of one file without reading its pixels; raises :class:`DicomReadError`."""
    with _quiet():
        return _read_header(Path(path))


def _read_header(path: Path) -> dict[str, Any]:
    return _meta(_open(path), path)


def _fixes(meta: dict[str, Any]) -> list[str] | tuple[str, ...]:
    fixes = meta.get("fixes") or ()
    return fixes.split(";") if isinstance(fixes, str) else fixes


def fix_stored(raw: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Stored values with the pixel-level fixes of ``meta['fixes']`` (12-bit wrap, MONOCHROME1 inversion)."""
    fixes = _fixes(meta)
    if "intercept_wrap_12bit" in fixes:
        raw = raw.astype(np.int32) + 1000
        raw[raw >= 4096] -= 4096
    if "monochrome1_inverted" in fixes:
        bits = int(meta.get("bits_stored") or 16)
        top = -1 if int(meta.get("pixel_representation") or 0) else (1 << bits) - 1
        raw = top - raw.astype(np.int32)
    return raw


def rescale(values: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """``values * slope + intercept`` in place on a float32 array (the modality LUT); returns it."""
    slope, intercept = float(meta.get("slope", 1.0)), float(meta.get("intercept", 0.0))
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def to_hu(raw: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Stored pixel values -> float32 HU using ``meta`` (rescale and the fixes named in ``meta['fixes']``)."""
    return rescale(fix_stored(raw, meta).astype(np.float32), meta)


def _check_image(path: Path, meta: dict[str, Any]) -> None:
    if not meta["has_pixels"]:
        raise DicomReadError(
            path, "no pixel data (element 7FE0,0010 missing; not an image or truncated file)"
        )
    if meta["frames"] > 1:
        raise DicomReadError(
            path, f"multi-frame image ({meta['frames']} frames); one 2D slice per file expected"
        )
    if meta["samples_per_pixel"] != 1:
        raise DicomReadError(
            path,
            f"not grayscale (SamplesPerPixel={meta['samples_per_pixel']}, "
            f"{meta['photometric']}); a 2D CT slice expected",
        )
    if meta["rows"] <= 0 or meta["cols"] <= 0:
        raise DicomReadError(path, f"invalid image size Rows={meta['rows']} Columns={meta['cols']}")


def _decode_error(path: Path, ts: UID, exc: Exception) -> DicomReadError:
    """A readable reason for a failed ``pixel_array``."""
    msg = f"{type(exc).__name__}: {exc}".split("\n")[0]
    if ts.is_compressed:
        try:
            from pydicom.pixels import get_decoder  # noqa: PLC0415  (DICOM libraries load only to read or write DICOM)

            available = get_decoder(ts).is_available
        except NotImplementedError:
            return DicomReadError(
                path, f"unsupported transfer syntax {ts.name} ({ts}): pydicom has no decoder"
            )
        except Exception:  # other pydicom versions: fall back to the generic message
            available = True
        if not available:
            return DicomReadError(
                path, f"unsupported transfer syntax {ts.name} ({ts}) in this environment: {_JPEG_HINT}"
            )
        return DicomReadError(path, f"cannot decode {ts.name} pixel data ({msg})")
    if "less than expected" in msg or "truncat" in msg.lower():
        return DicomReadError(path, f"truncated pixel data ({msg})")
    return DicomReadError(path, f"cannot decode pixel data ({msg})")


def read_hu(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one 2D slice to float32 HU (rows x cols) through pydicom, with its metadata.

    Raises :class:`DicomReadError` naming the file and the reason for anything unreadable.
    """
    path = Path(path)
    with _quiet():
        ds = _open(path)
        meta = _meta(ds, path)
        _check_image(path, meta)
        ts = UID(meta["transfer_syntax"])
        if not ts.is_transfer_syntax:
            raise DicomReadError(
                path, f"unsupported transfer syntax {ts} (not a known DICOM transfer syntax)"
            )
        try:
            raw = ds.pixel_array
        except Exception as exc:  # decoders raise many types
            raise _decode_error(path, ts, exc) from exc
    if raw.ndim != 2:
        raise DicomReadError(path, f"decoded pixel array has shape {raw.shape}; a 2D slice expected")
    return to_hu(raw, meta), meta


def _native_pixels(path: Path, meta: dict[str, Any]) -> np.ndarray:
    """Stored values of a native little-endian slice read straight from the file, masked as pydicom does."""
    rows, cols, alloc = int(meta["rows"]), int(meta["cols"]), int(meta["bits_allocated"])
    stored, signed = int(meta["bits_stored"]), bool(int(meta["pixel_representation"]))
    dtype = np.dtype(f"<{'i' if signed else 'u'}{alloc // 8}")
    count = rows * cols
    raw = np.fromfile(path, dtype=dtype, count=count, offset=int(meta["pixel_offset"]))
    if raw.size != count:
        raise DicomReadError(
            path, f"truncated pixel data ({raw.size * dtype.itemsize} of {count * dtype.itemsize} bytes)"
        )
    raw = raw.reshape(rows, cols)
    if stored < alloc:  # pydicom keeps only the stored bits (sign-extended for signed data)
        shift = alloc - stored
        raw = (raw << shift) >> shift if signed else raw & ((1 << stored) - 1)
    return raw


def read_stored(path: str | os.PathLike, meta: dict[str, Any]) -> np.ndarray | None:
    """Stored values of a native little-endian slice read with one ``np.fromfile`` at the header's offset.

    ``None`` when ``meta`` (from :func:`read_header`) records no such offset (compressed, big-endian, ...).
    Raises :class:`DicomReadError` for a missing or truncated file.
    """
    if int(meta.get("pixel_offset", -1)) < 0:
        return None
    path = Path(path)
    try:
        return _native_pixels(path, meta)
    except FileNotFoundError as exc:
        raise DicomReadError(path, "no such file") from exc
    except OSError as exc:
        raise DicomReadError(path, f"cannot read pixel data ({exc})") from exc


def read_hu_fast(path: str | os.PathLike, meta: dict[str, Any]) -> np.ndarray:
    """HU of a file whose header ``meta`` (from :func:`read_header`) is known: one raw read when possible.

    Native little-endian files are read with ``np.fromfile`` at the recorded offset; anything else goes
    through :func:`read_hu`. Same numbers as ``read_hu(path)[0]``.
    """
    raw = read_stored(path, meta)
    return read_hu(path)[0] if raw is None else to_hu(raw, meta)


def read_headers(paths: list[str]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Headers of many files (one task of a process pool): ``(metas, [(path, error), ...])``."""
    metas, errors = [], []
    with _quiet():
        for p in paths:
            try:
                metas.append(_read_header(Path(p)))
            except DicomReadError as exc:
                errors.append((p, str(exc)))
            except Exception as exc:  # one bad file never stops a scan
                errors.append((p, f"{p}: unexpected error ({type(exc).__name__}: {exc})"))
    return metas, errors
