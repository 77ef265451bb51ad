"""DICOM-native outputs of ``ichd predict --dicom-out DIR``: what a PACS viewer shows beside the source series.

Per predicted study, under ``DIR/<study>/``:

- ``sr.dcm``: a DICOM Structured Report (highdicom, TID 1500 *Imaging Measurement Report*, Comprehensive SR
  storage). One measurement group (TID 1501) per label, tracking identifier ``ICH <label>``, with
  the study-level probability (``Probability``, derivation ``Maximum`` over slices), the call (``Presence of property``:
  ``Present``/``Absent`` at the threshold) and, for every slice whose probability reaches the threshold,
  that slice's probability with a reference to its source image (SOP Class/Instance UID). The algorithm
  identification names the bundle (run name, version = creation time and format) and carries its hash,
  the threshold and the method as parameters; the device observer is the bundle too.
- ``cam/<k>.dcm`` (with ``--cam``): one Secondary Capture series, an RGB instance per (slice, label) with a
  finding: the slice in the brain window with the Grad-CAM heat map blended in, exactly the PNG that
  ``--cam`` writes. Each instance references its source slice (SourceImageSequence, purpose *Source image
  for image processing operation*) and names the label and probability in ImageComments.
- ``pmap_<label>.dcm`` (with ``--cam --pmap``): a Parametric Map per label, float32 maps in [0, 1], one frame
  per slice with that label, each derived from its source slice. It needs the sources' FrameOfReferenceUID and
  geometry; RSNA-style files lack them, and then a warning says so (the SR and overlays are still written).

Patient and study modules are copied from the source series (the results belong to that study); every
created series and instance gets a new UID; series descriptions say ``ICH model ... - not for clinical use``.
Codes: finding ``any`` is SNOMED CT 1386000 *Intracranial hemorrhage*; the five subtypes use the private
coding scheme ``99ICHD`` (code value = the RSNA label name), declared in CodingSchemeIdentificationSequence.

RSNA-style ``ID_...`` UIDs of the sources are copied as they are (they are the sources' identity): a
validator then complains about exactly those inherited UIDs, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
from highdicom import UID
from highdicom.sc import SCImage
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurement,
    TrackingIdentifier,
)
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ichdlib import __version__
from ichdlib.files import write_bytes
from ichdlib.labels import LABELS
from ichdlib.locks import output_lock
from ichdlib.registry import CAM_METHODS
from ichdlib.serve.discover import WARNING, problem
from ichdlib.serve.pipeline import CamOverlay, explain_study, write_cam_pngs

#: Said on every series written here.
NOT_CLINICAL = "not for clinical use"
SR_SERIES_DESCRIPTION = f"ICH model findings - {NOT_CLINICAL}"
CAM_SERIES_DESCRIPTION = f"ICH model Grad-CAM - {NOT_CLINICAL}"
PMAP_SERIES_DESCRIPTION = f"ICH model Grad-CAM maps - {NOT_CLINICAL}"
SR_SERIES_NUMBER, CAM_SERIES_NUMBER, PMAP_SERIES_NUMBER = 9901, 9902, 9903
MANUFACTURER = "ichd-workbench"
PRIVATE_SCHEME = "99ICHD"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_SUBTYPE_MEANINGS = {"epidural": "Epidural hemorrhage", "intraparenchymal": "Intraparenchymal hemorrhage",
                     "intraventricular": "Intraventricular hemorrhage", "subarachnoid": "Subarachnoid hemorrhage",
                     "subdural": "Subdural hemorrhage"}


class DicomOutError(ValueError):
    """Outputs that cannot be written; the message names the study or file."""


# --------------------------------------------------------------------------------------------------
# Identity of the model
# --------------------------------------------------------------------------------------------------
def bundle_identity(bundle: Any) -> dict[str, str]:
    """``name`` (the run), ``version`` (bundle format and creation time), ``sha256`` (of the sorted weight-file
    hashes of the manifest: the same weights give the same hash), ``method`` (the blend)."""
    m = getattr(bundle, "manifest", {}) or {}
    files = m.get("files") or {}
    if not files:  # an in-memory bundle not saved yet: hash the manifest's model description instead
        files = {"backbones": m.get("backbones"), "seq": m.get("seq"), "ensemble": m.get("ensemble")}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True, default=str).encode()).hexdigest()
    ens = m.get("ensemble") or {}
    weights = ens.get("weights") or {}
    method = f"{ens.get('method', '?')} blend of " + ", ".join(f"{k} ({float(w):.3g})" for k, w in weights.items())
    return {"name": str(m.get("run") or "bundle"), "version": f"format {m.get('format_version', '?')}, "
            f"created {m.get('created', 'unknown')}", "sha256": digest, "method": method}


# --------------------------------------------------------------------------------------------------
# Source headers
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def lenient_uids() -> Iterator[None]:
    """pydicom accepts RSNA's ``ID_...`` UIDs while datasets are built and written (they are the sources'
    identity and are copied as they are); its warnings about them are silenced."""

    s = config.settings
    old = s.reading_validation_mode, s.writing_validation_mode
    s.reading_validation_mode = s.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        s.reading_validation_mode, s.writing_validation_mode = old


def read_source(path: str | os.PathLike) -> Any:
    """A source slice's header (no pixels) with SOPClassUID filled from the file meta when the body lacks it
    (RSNA's files do), as references need it."""

    with lenient_uids():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None) or CT_IMAGE_STORAGE
    for key in _PATIENT_STUDY:  # type 2 in the outputs: present and empty ("unknown") when the source has none
        if key not in ds:
            setattr(ds, key, "")
    return ds


def _new_uid() -> str:

    return str(UID())


# --------------------------------------------------------------------------------------------------
# Structured report
# --------------------------------------------------------------------------------------------------
def _codes() -> dict[str, Any]:

    return {"probability": codes.DCM.Probability, "presence": codes.DCM.PresenceOfProperty, "present": codes.SCT.Present,
            "absent": codes.SCT.Absent, "maximum": codes.SCT.Maximum, "unit": codes.UCUM.NoUnits,
            "procedure": codes.LN.HeadCT}


def finding_code(label: str) -> Any:
    """The finding-type code of a label (see the module docstring)."""

    if label == "any":
        return codes.SCT.IntracranialHemorrhage
    return CodedConcept(label, PRIVATE_SCHEME, _SUBTYPE_MEANINGS[label])


def build_sr(sources: Sequence[Any], frame: pd.DataFrame, *, identity: dict[str, str], threshold: float,
             labels: Sequence[str]) -> Any:
    """The Structured Report of one study: ``sources`` are the predicted slices' headers in ``frame``'s row
    order (``frame``: :meth:`ichdlib.serve.predict.Predictor.predict`'s table with ``p_<label>``)."""

    if len(sources) != len(frame) or not len(frame):
        raise DicomOutError(f"study {frame['study_uid'].iloc[0] if len(frame) else '?'}: {len(sources)} source "
                            f"header(s) for {len(frame)} predicted slice(s)")
    c = _codes()
    algo = AlgorithmIdentification(
        name=f"ichd-workbench ICH model {identity['name']}", version=identity["version"][:64],
        parameters=[f"bundle sha256 {identity['sha256']}", f"threshold {float(threshold)!r}",
                    f"method {identity['method']}"[:64]])
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=f"2.25.{int(identity['sha256'][:32], 16)}", name=f"ICH model {identity['name']}"[:64],
            manufacturer_name=MANUFACTURER, model_name=identity["name"][:64], serial_number=identity["sha256"][:16]))
    groups = []
    for label in labels:
        p = frame[f"p_{label}"].to_numpy(dtype=np.float64)
        if not np.isfinite(p).all():
            raise DicomOutError(f"study {frame['study_uid'].iloc[0]}: non-finite p_{label}; nothing written")
        top = float(p.max())
        measurements = [Measurement(name=c["probability"], value=top, unit=c["unit"], derivation=c["maximum"],
                                    algorithm_id=algo)]
        for i in np.flatnonzero(p >= threshold):
            measurements.append(Measurement(
                name=c["probability"], value=float(p[i]), unit=c["unit"], algorithm_id=algo,
                referenced_images=[SourceImageForMeasurement.from_source_image(sources[i])]))
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=_new_uid(), identifier=f"ICH {label}"),
            finding_type=finding_code(label), algorithm_id=algo, measurements=measurements,
            qualitative_evaluations=[QualitativeEvaluation(c["presence"], c["present"] if top >= threshold
                                                           else c["absent"])]))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=c["procedure"], imaging_measurements=groups)
    ref = sources[0]
    with lenient_uids():
        sr = hd.sr.ComprehensiveSR(
            evidence=list(sources), content=report, series_instance_uid=_new_uid(), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=_new_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
            is_final=False, is_verified=False, series_description=SR_SERIES_DESCRIPTION)
        _copy_patient_study(ref, sr)
        scheme = Dataset()
        scheme.CodingSchemeDesignator = PRIVATE_SCHEME
        scheme.CodingSchemeName = "ichd-workbench RSNA ICH labels"
        scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
        sr.CodingSchemeIdentificationSequence = [scheme]
        _separate(sr)
    return sr


def _separate(item: Any) -> None:
    """Containers' ContinuityOfContent SEPARATE: SR viewers then show each item (``Probability = 0.87``, the
    finding, ``Present``) on its own line with its name, instead of running the numbers together as prose."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate(child)


_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _copy_patient_study(ref: Any, ds: Any) -> None:
    """Patient and General Study attributes from the source (type 2: present, empty when the source has none)."""
    ds.StudyInstanceUID = ref.StudyInstanceUID
    for key in _PATIENT_STUDY:
        value = ref.get(key, None)
        setattr(ds, key, value if value is not None else "")


# --------------------------------------------------------------------------------------------------
# Grad-CAM overlays as Secondary Capture
# --------------------------------------------------------------------------------------------------
def _orientation_letters(vec: Sequence[float]) -> str:
    """A direction cosine as DICOM patient-orientation letters (LPS: +x L, +y P, +z H), major axis first."""
    letters = [("L", "R"), ("P", "A"), ("H", "F")]
    order = np.argsort(-np.abs(np.asarray(vec, float)))
    out = ""
    for k in order[:2]:
        if abs(vec[k]) > 0.3 or not out:
            out += letters[k][0] if vec[k] > 0 else letters[k][1]
    return out


def build_cam_image(source: Any, rgb: np.ndarray, *, series_uid: str, instance_number: int, label: str,
                    prob: float, method: str) -> Any:
    """One Secondary Capture instance: the overlay ``rgb`` (H x W x 3 uint8, the slice's own size) of
    ``source``, referencing it."""

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DicomOutError(f"overlay of {source.SOPInstanceUID}: expected H x W x 3 uint8, got {rgb.dtype} {rgb.shape}")
    orient = [float(v) for v in source.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    spacing = source.get("PixelSpacing")
    with lenient_uids():
        sc = SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=np.ascontiguousarray(rgb), photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid,
            series_number=CAM_SERIES_NUMBER, sop_instance_uid=_new_uid(), instance_number=instance_number,
            manufacturer=MANUFACTURER, patient_orientation=(_orientation_letters(orient[:3]),
                                                            _orientation_letters(orient[3:])),
            pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
            transfer_syntax_uid="1.2.840.10008.1.2.1", series_description=CAM_SERIES_DESCRIPTION)
        _copy_patient_study(source, sc)
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        purpose = Dataset()
        code = codes.DCM.SourceImageForImageProcessingOperation
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = code.value, code.scheme_designator, code.meaning
        item.PurposeOfReferenceCodeSequence = [purpose]
        sc.SourceImageSequence = [item]
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.DerivationDescription = f"{method} for {label} over the brain-window slice"[:1024]
        sc.ImageComments = f"{label}: p={prob:.3f}; {NOT_CLINICAL}"
        sc.BurnedInAnnotation = "NO"
        # the slice's place in the patient, so that viewers sort the overlays as the CT and can sync the two series
        for key in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
                    "SliceThickness"):
            if source.get(key) not in (None, ""):
                setattr(sc, key, source.get(key))
        if "Laterality" not in sc:  # type 2C (General Series): a head is unpaired, so present and empty
            sc.Laterality = source.get("Laterality", "") or ""
    return sc


def iter_cam_overlays(predictor: Any, loaded: Any, frame: pd.DataFrame, threshold: float) -> list[CamOverlay]:
    """``(row, label, prob, rgb, cam)`` for each slice and label at or above ``threshold``: the study explained
    by :func:`ichdlib.serve.pipeline.explain_study`, the same path as ``ichd predict --cam``'s PNGs."""
    return explain_study(predictor, loaded, frame, threshold)


def build_cam_pmap(sources: Sequence[Any], maps: np.ndarray, *, label: str, series_uid: str, instance_number: int,
                   identity: dict[str, str], method: str) -> Any:
    """A Parametric Map (float32 frames in [0, 1], one per source slice, in the sources' order) of one label's
    Grad-CAM. The sources need a FrameOfReferenceUID (hospital data have one; RSNA's files do not)."""

    for key in ("FrameOfReferenceUID", "SliceThickness", "PixelSpacing", "ImagePositionPatient",
                "ImageOrientationPatient"):
        missing = [str(d.SOPInstanceUID) for d in sources if d.get(key) in (None, "")]
        if missing:
            raise DicomOutError(f"Parametric Map of {label} not written: source slice {missing[0]} has no {key} "
                                "(RSNA-style files lack it); the Secondary Capture series has the overlays")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=f"CAM {label}"[:16], lut_explanation=f"{method} for {label} (0 = no evidence, 1 = strongest)",
        unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), slope=1.0, intercept=0.0)

    with lenient_uids():
        pm = hd.pm.ParametricMap(
            source_images=list(sources), pixel_array=np.ascontiguousarray(maps, dtype=np.float32),
            series_instance_uid=series_uid, series_number=PMAP_SERIES_NUMBER, sop_instance_uid=_new_uid(),
            instance_number=instance_number, manufacturer=MANUFACTURER,
            manufacturer_model_name=f"ICH model {identity['name']}"[:64], software_versions=f"ichdlib {__version__}",
            device_serial_number=identity["sha256"][:16], contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping], window_center=0.5, window_width=1.0,
            content_label=f"CAM_{label}"[:16].upper(), content_description=f"{method} {label} - {NOT_CLINICAL}"[:64],
            series_description=PMAP_SERIES_DESCRIPTION)
        _copy_patient_study(sources[0], pm)
        if "Laterality" not in pm:  # type 2C (General Series): a head is unpaired, so present and empty
            pm.Laterality = ""
    return pm


# --------------------------------------------------------------------------------------------------
# One study -> files
# --------------------------------------------------------------------------------------------------
@dataclass
class StudyOutputs:
    """What was written for one study."""

    study_uid: str
    sr: Path
    cams: list[Path] = field(default_factory=list)
    pmaps: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out, and why

    @property
    def paths(self) -> list[Path]:
        return [self.sr, *self.cams, *self.pmaps]


def _safe(uid: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uid)
    return keep[-64:] or "study"


def _save(ds: Any, path: Path) -> Path:

    buf = io.BytesIO()
    with lenient_uids():
        ds.save_as(buf, enforce_file_format=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())
    return path


def write_study(out: str | os.PathLike, frame: pd.DataFrame, *, identity: dict[str, str], threshold: float = 0.5,
                overlays: Sequence[tuple[int, str, float, np.ndarray, np.ndarray]] = (), method: str = "Grad-CAM",
                pmap: bool = False) -> StudyOutputs:
    """Write ``<out>/<study>/sr.dcm`` and, for ``overlays`` (:func:`iter_cam_overlays`), ``cam/<k>.dcm`` for
    one study's predicted slices (``frame``, with a ``path`` column naming each source file); with ``pmap``
    also ``pmap_<label>.dcm`` per label (a Parametric Map of the raw maps; skipped with a note in
    ``result.notes`` when the sources lack a FrameOfReferenceUID)."""

    study = str(frame["study_uid"].iloc[0])
    folder = Path(out) / _safe(study)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder, what="dicom-out"):  # another predict writing the same study's outputs: refused
        _clear_previous(folder)
        return _write_study(folder, frame, identity=identity, threshold=threshold, overlays=overlays,
                            method=method, pmap=pmap)


def _clear_previous(folder: Path) -> None:
    """Remove what an earlier run wrote for this study (only the names written here), so that the folder
    never mixes two runs' series."""
    for p in [folder / "sr.dcm", *folder.glob("pmap_*.dcm"), *(folder / "cam").glob("*.dcm")]:
        p.unlink(missing_ok=True)


def _write_study(folder: Path, frame: pd.DataFrame, *, identity: dict[str, str], threshold: float,
                 overlays: Sequence[tuple[int, str, float, np.ndarray, np.ndarray]], method: str,
                 pmap: bool) -> StudyOutputs:

    study = str(frame["study_uid"].iloc[0])
    sources = [read_source(p) for p in frame["path"]]
    sr = build_sr(sources, frame, identity=identity, threshold=threshold, labels=list(LABELS))
    result = StudyOutputs(study, _save(sr, folder / "sr.dcm"))
    if overlays:
        series_uid = _new_uid()
        for k, (row, label, prob, rgb, _) in enumerate(overlays, start=1):
            sc = build_cam_image(sources[row], rgb, series_uid=series_uid, instance_number=k, label=label,
                                 prob=prob, method=method)
            result.cams.append(_save(sc, folder / "cam" / f"{k:04d}.dcm"))
    if pmap and overlays:
        series_uid = _new_uid()
        labels = [c for c in LABELS if any(o[1] == c for o in overlays)]
        for k, label in enumerate(labels, start=1):
            picked = sorted((o[0], o[4]) for o in overlays if o[1] == label)
            try:
                pm = build_cam_pmap([sources[r] for r, _ in picked], np.stack([m for _, m in picked]), label=label,
                                    series_uid=series_uid, instance_number=k, identity=identity, method=method)
            except DicomOutError as exc:
                result.notes.append(str(exc))
                break
            except Exception as exc:  # optional output: the SR and overlays stay written
                result.notes.append(f"Parametric Map of {label} not written ({type(exc).__name__}: {exc})")
                break
            result.pmaps.append(_save(pm, folder / f"pmap_{label}.dcm"))
    return result


class DicomWriter:
    """The per-study hook of :func:`ichdlib.serve.predict.predict_dir` for ``--dicom-out``: writes each study's SR
    (and CAM series with ``cam=True``) as soon as it is predicted; what was written is in ``written``."""

    def __init__(self, out: str | os.PathLike, bundle: Any, threshold: float = 0.5, cam: bool = False,
                 png_dir: str | os.PathLike | None = None, pmap: bool = False) -> None:
        self.out, self.threshold, self.cam, self.pmap = Path(out), float(threshold), cam, pmap
        self.png_dir = Path(png_dir) if png_dir is not None else None
        self.identity = bundle_identity(bundle)
        self.written: list[StudyOutputs] = []
        self.pngs: list[str] = []

    def __call__(self, predictor: Any, loaded: Any, frame: pd.DataFrame) -> list[dict[str, str]]:
        overlays = explain_study(predictor, loaded, frame, self.threshold) if self.cam else []
        if self.png_dir is not None:  # the PNGs of 'ichd predict --cam', from the same maps (computed once)
            self.pngs += write_cam_pngs(overlays, frame, loaded.scan.study_uid, self.png_dir)
        method = CAM_METHODS[predictor.P.cam.method].label
        result = write_study(self.out, frame, identity=self.identity, threshold=self.threshold,
                             overlays=overlays, method=method, pmap=self.pmap)
        self.written.append(result)

        return [problem(note, study_uid=result.study_uid, series_uid=str(frame["series_uid"].iloc[0]),
                        severity=WARNING) for note in result.notes]

    @property
    def paths(self) -> list[Path]:
        return [p for s in self.written for p in s.paths]


__all__ = ["build_sr", "build_cam_image", "build_cam_pmap", "bundle_identity", "write_study", "iter_cam_overlays", "DicomWriter",
           "read_source", "finding_code", "DicomOutError", "NOT_CLINICAL"]
