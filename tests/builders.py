"""Builders the tests share: hand-made DICOM slices, fabricated level-1 outputs, study folders.

Plain functions (no fixtures; those live in ``conftest.py``), imported as ``from builders import ...``.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ichdlib.config import Params, load_params
from ichdlib.labels import LABELS, write_long_csv
from ichdlib.phantom.synth import write_ct_dicom
from ichdlib.review.viewer import Study

REPO = Path(__file__).resolve().parents[1]
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


# -- hand-made DICOM slices (ingest tests) ----------------------------------------------------------------
def _without_value_validation(fn):
    """RSNA-style UIDs (ID_...) are not valid DICOM UIDs: write them with pydicom's validation off."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with pydicom.config.disable_value_validation():
            return fn(*args, **kwargs)

    return wrapper


@_without_value_validation
def write_slice(
    path: Path,
    stored: np.ndarray,
    *,
    sop: str = "ID_0001",
    study: str = "ID_st",
    series: str = "ID_se",
    patient: str = "ID_pt",
    z: float = 0.0,
    modality: str = "CT",
    bits_stored: int | None = None,
    intercept: float | None = -1024.0,
    slope: float | None = 1.0,
    photometric: str = "MONOCHROME2",
    window: tuple = (40, 80),
    syntax: str = ExplicitVRLittleEndian,
    frames: int = 1,
) -> Path:
    """Write stored pixel values (their dtype sets BitsAllocated/PixelRepresentation) as a CT slice."""
    stored = np.ascontiguousarray(stored)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop, modality
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
    ds.ImagePositionPatient = [-125.0, -125.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    if frames > 1:
        ds.NumberOfFrames = frames
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if slope is not None:
        ds.RescaleSlope = slope
    ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return path


def hu_image(shape=(64, 64), seed=0) -> np.ndarray:
    """A plausible head-CT-like HU image: air, skull ring, brain, a small bleed."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot((yy - shape[0] / 2) / (shape[0] / 2), (xx - shape[1] / 2) / (shape[1] / 2))
    hu = np.where(r < 0.8, 35.0, -1000.0)
    hu[(r >= 0.7) & (r < 0.8)] = 1200.0
    hu[(yy - shape[0] // 3) ** 2 + (xx - shape[1] // 3) ** 2 < 9] = 70.0
    hu += np.random.default_rng(seed).normal(0, 5, shape) * (r < 0.7)
    return np.rint(hu)


def variant_files(tmp_path: Path) -> list[Path]:
    hu = hu_image((40, 52), seed=1)
    return [
        write_slice(tmp_path / "s16.dcm", (hu + 1024).astype(np.int16)),
        write_slice(tmp_path / "implicit.dcm", (hu + 1024).astype(np.int16), syntax=ImplicitVRLittleEndian),
        write_slice(tmp_path / "slope.dcm", ((hu + 1024) / 2).astype(np.uint16), slope=2.0),
        # 12 stored bits with junk in the high bits: pydicom masks (unsigned) / sign-extends (signed)
        write_slice(tmp_path / "u12hi.dcm", (hu + 1024).astype(np.uint16) | 0xF000, bits_stored=12),
        write_slice(
            tmp_path / "s12.dcm",
            np.clip(hu, -2048, 2047).astype(np.int16) ^ 0x7000,
            bits_stored=12,
            intercept=0.0,
        ),
        write_slice(
            tmp_path / "u8.dcm",
            np.clip(hu / 10 + 100, 0, 255).astype(np.uint8),
            intercept=-1000.0,
            slope=10.0,
        ),
        write_slice(tmp_path / "tiny.dcm", np.full((3, 5), 1064, np.int16)),  # pixel data not deferred
    ]


# -- CT series as a scanner writes them (predict tests) ----------------------------------------------------
def head_hu(seed: int = 0, size: int = 64) -> np.ndarray:
    """A small head-like HU image: air, skull ring, brain with noise."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    hu = np.where(r < 0.8, 35.0, -1000.0) + np.where((r >= 0.7) & (r < 0.8), 1165.0, 0.0)
    return np.rint(hu + np.random.default_rng(seed).normal(0, 8, hu.shape) * (r < 0.7)).astype(np.float32)


def ct_file(path: Path, *, study: str = "1.2.826.0.1.1", series: str = "1.2.826.0.1.1.1", sop: str | None = None,
            z: float = 0.0, modality: str = "CT", orientation=AXIAL, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            seed: int = 0, syntax=None, **meta) -> Path:
    """One CT slice through the phantom's writer (optionally re-encoded with a compressed transfer syntax)."""
    path = write_ct_dicom(path, head_hu(seed), sop_uid=sop or f"{series}.{seed}.{int(z * 100)}", study_uid=study,
                          series_uid=series, z=z, orientation=orientation, modality=modality,
                          ImageType=list(image_type), **meta)
    if syntax is not None:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    return path


def series_files(folder: Path, n: int, *, study: str = "1.2.826.0.1.1", series: str = "1.2.826.0.1.1.1",
                 z0: float = 0.0, dz: float = 5.0, ext: str = ".dcm", **kw) -> list[Path]:
    """``n`` slices written in shuffled order under random-looking names."""
    rng = np.random.default_rng(abs(hash(series)) % 2**32)
    return [ct_file(folder / f"f{rng.integers(1e9):09d}{ext}", study=study, series=series,
                    sop=f"{series}.{k}", z=z0 + dz * k, seed=k, **kw) for k in rng.permutation(n)]


def study_folder(P, out: Path, split: str = "test", k: int = 0, keep: int | None = None) -> Path:
    """A copy of the ``k``-th catalog study of ``split`` (its files only; the first ``keep`` slices) under
    ``out``."""
    from ichdlib.ingest.table import load_catalog

    cat = load_catalog(P.work_dir)
    cat = cat[cat["split"] == split]
    study = cat["study_uid"].unique()[k]
    out.mkdir(parents=True, exist_ok=True)
    for p in cat.loc[cat["study_uid"] == study, "path"][:keep]:
        shutil.copy(p, out / Path(p).name)
    return out


# -- fabricated level-1 outputs: the catalog and notebook 02/03 files (sequence and ensemble tests) -------
def _studies(rng: np.random.Generator, n: int, prefix: str, n_folds: int, lengths=(6, 26)) -> pd.DataFrame:
    rows = []
    for s in range(n):
        patient = f"PAT_{prefix}{s // 2}"  # two studies per patient
        L = int(rng.integers(*lengths))
        spacing = float(rng.choice([2.5, 5.0]))
        z0 = float(rng.normal(0, 20))
        lesion = np.zeros((L, 5))
        if rng.random() < 0.6:
            k = int(rng.integers(5))
            a = int(rng.integers(L))
            lesion[a: a + int(rng.integers(2, 8)), k] = 1
            if rng.random() < 0.3:
                lesion[a: a + 3, (k + 2) % 5] = 1
        for i in range(L):
            rows.append({
                "sop_uid": f"ID_{prefix}{s:03d}{i:03d}", "patient_id": patient, "study_uid": f"ST_{prefix}{s:03d}",
                "series_uid": f"SE_{prefix}{s:03d}", "z": z0 + i * spacing, "slice_index": i, "n_slices": L,
                "rows": 64, "cols": 64, "pixel_spacing": 0.5, "spacing_z": spacing, "path": f"x/{prefix}{s}_{i}.dcm",
                "split": "train" if prefix == "a" else "test",
                "fold": (s // 2) % n_folds if prefix == "a" else -1,
                **{c: float(v) for c, v in zip(LABELS, [lesion[i].max(), *lesion[i]], strict=True)},
            })
    return pd.DataFrame(rows)


def fabricate_level1(P: Params, n_train: int = 16, n_test: int = 6, seed: int = 0, quarantined_test: int = 1,
                     lengths: tuple[int, int] = (6, 26), dims: tuple[int, ...] | None = None) -> dict:
    """Write a catalog, notebook 02/03 outputs for every backbone, a sample submission and an answer key,
    with CNN probabilities and features correlated with the labels (and with neighbouring slices)."""
    rng = np.random.default_rng(seed)
    n_folds = P.ingest.folds
    cat = pd.concat([_studies(rng, n_train, "a", n_folds, lengths), _studies(rng, n_test, "b", n_folds, lengths)],
                    ignore_index=True)
    cat["row"] = np.arange(len(cat))
    cat["prev_row"] = cat["row"]
    cat["next_row"] = cat["row"]
    truth_test = cat[cat.split == "test"][["sop_uid", *LABELS]].copy()
    # One test image quarantined: in the sample submission and the answer key, not in the catalog.
    dropped = truth_test.sop_uid.iloc[:quarantined_test].tolist()
    cat = cat[~cat.sop_uid.isin(dropped)].reset_index(drop=True)
    cat.loc[cat.split == "test", list(LABELS)] = np.nan
    P.work_dir.mkdir(parents=True, exist_ok=True)
    cat.to_parquet(P.catalog_path, index=False)
    data = P.data_root
    data.mkdir(parents=True, exist_ok=True)
    sample = truth_test.copy()
    sample[list(LABELS)] = 0.5
    write_long_csv(sample, data / P.paths.sample_submission)
    write_long_csv(truth_test, data / P.paths.answer_key)
    y_all = np.nan_to_num(cat[list(LABELS)].to_numpy(float))
    # test rows' labels come from the answer key for the simulated CNN outputs
    te = cat.split == "test"
    y_all[te.to_numpy()] = truth_test.set_index("sop_uid").loc[cat.sop_uid[te], list(LABELS)].to_numpy()
    for b, bb in enumerate(P.cnn.backbones):
        key, D = bb.key, (dims[b] if dims else 24 + 8 * b)
        proj = rng.normal(size=(6, D))
        smooth = y_all.copy()
        smooth[1:] += 0.5 * y_all[:-1]
        smooth[:-1] += 0.5 * y_all[1:]
        logit = 2.0 * (2 * y_all - 1) + rng.normal(0, 1.6, size=y_all.shape) - 1.0
        prob = 1 / (1 + np.exp(-logit))
        feat = (smooth @ proj + rng.normal(0, 1.0, size=(len(cat), D))).astype(np.float16)
        for split, prefix in (("train", "oof"), ("test", "test")):
            m = (cat.split == split).to_numpy()
            fdir, cdir = P.work_dir / "features" / key, P.work_dir / "cnn" / key
            fdir.mkdir(parents=True, exist_ok=True)
            cdir.mkdir(parents=True, exist_ok=True)
            np.save(fdir / f"{prefix}_feat.npy", feat[m])
            pf = pd.DataFrame(prob[m], columns=list(LABELS))
            pf.insert(0, "sop_uid", cat.sop_uid[m].to_numpy())
            pf.to_parquet(fdir / f"{prefix}_prob.parquet", index=False)
            if split == "test":  # each fold model's test outputs (their mean is test_prob)
                np.save(fdir / "test_prob_folds.npy", np.stack([prob[m]] * n_folds))
            if split == "train":
                pf.insert(1, "fold", cat.fold[m].to_numpy())
            pf.to_parquet(cdir / f"{prefix}.parquet", index=False)
    return {"catalog": cat, "truth_test": truth_test, "quarantined": dropped}


def smoke(tmp_path: Path, **over) -> Params:
    return load_params(REPO / "params" / "smoke.yaml", {"root": str(tmp_path), **over})


def two_backbones() -> dict:
    return {"cnn": {"backbones": [{"name": "lcnet_050", "size": 48}, {"name": "resnet18", "size": 48}]}}


# -- fabricated studies for the slice viewer (viewer and browser tests) ----------------------------------
def fabricated_studies(n_studies: int = 3, n: int = 8, size: int = 48, seed: int = 0):
    """Small studies: a skull ring with a bright lesion that moves across slices, maps peaking on it.

    Used by tests/test_viewer.py and tests/test_browser.py (imported into the notebook it generates).
    """
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:size, :size]
    d = np.hypot(rr - size / 2, cc - size / 2)
    studies, cams = [], {}
    for s in range(n_studies):
        hu, maps = [], []
        truth = np.zeros((n, len(LABELS)))
        for i in range(n):
            img = np.where(d < size * 0.34, 30.0, -1000.0)
            img[(d >= size * 0.30) & (d < size * 0.34)] = 1200.0
            r0, c0 = size * 0.3 + i * size * 0.4 / n, size * 0.5
            lesion = np.hypot(rr - r0, cc - c0) < size * 0.08
            if 2 <= i < n - 2:
                img[lesion] = 70.0
                truth[i, [0, 5]] = 1
            hu.append(img.astype(np.int16))
            m = np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * (size * 0.1) ** 2))
            maps.append(np.stack([m * (0.5 + 0.5 * k / 5) for k in range(len(LABELS))]).astype(np.float32))
        p2d = np.clip(truth * 0.7 + rng.random((n, len(LABELS))) * 0.3, 0, 1)
        final = np.clip(truth * (0.6 + 0.1 * s) + rng.random((n, len(LABELS))) * 0.2, 0, 1)
        uid = f"1.2.3.{s}"
        studies.append(Study(uid=uid, hu=hu, probs={"2D": p2d, "final": final}, truth=truth))
        cams[uid] = maps
    return studies, cams


# -- a toy catalog and HU cache without DICOM (2D CNN tests) ---------------------------------------------
def toy_catalog(studies: int = 12, slices: int = 16, size: int = 48, folds: int = 3, test_studies: int = 2,
                seed: int = 0, positive_rate: float = 0.5) -> tuple[pd.DataFrame, np.ndarray]:
    """A catalog frame (the ingest contract's columns) and a matching int16 HU cache, without DICOM.

    Each study is a stack of head-like slices (air, skull ring, brain); in every other study (or a
    ``positive_rate`` share) a run of slices carries a bright blob (hemorrhage-like, 75 HU) whose position
    encodes the subtype, cycling through the five, so a small network learns it in a few dozen steps.
    Folds are grouped by study. Rows are in catalog order (split, study, z).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    rr = np.sqrt(xx**2 + (yy * 1.15) ** 2)
    centres = [(0.0, -0.55), (0.45, 0.0), (0.0, 0.45), (-0.45, 0.0), (0.0, 0.0)]  # one per subtype
    records, images = [], []
    for s in range(studies):
        split = "test" if s >= studies - test_studies else "train"
        n = int(slices + rng.integers(-2, 3))
        positive = (s % 2 == 0) if positive_rate == 0.5 else bool(rng.random() < positive_rate)
        sub = (s // 2) % (len(LABELS) - 1) + 1  # every subtype in every fold once there are enough studies
        first = int(rng.integers(0, n // 3))
        lesion = range(first, first + int(rng.integers(n // 3, n // 2 + 1))) if positive else range(0)
        for i in range(n):
            scale = 1 - 0.5 * abs(i / max(1, n - 1) - 0.5)
            img = np.where(rr < 0.85 * scale, 32.0, -1000.0) + rng.normal(0, 6, (size, size))
            img = np.where((rr >= 0.85 * scale) & (rr < 0.95 * scale), 900.0, img)
            y = np.zeros(len(LABELS), dtype=np.float64)
            if i in lesion:
                cx, cy = centres[sub - 1]
                blob = ((xx - cx * scale) ** 2 + (yy - cy * scale) ** 2) < (0.3 * scale) ** 2
                img = np.where(blob & (rr < 0.85 * scale), 75.0, img)
                y[0] = y[sub] = 1.0
            images.append(img)
            records.append({
                "sop_uid": f"ID_{s:03d}{i:03d}{rng.integers(16**4):04x}", "patient_id": f"ID_p{s:04d}",
                "study_uid": f"ID_s{s:04d}", "series_uid": f"ID_r{s:04d}", "z": float(5 * i),
                "slice_index": i,
                "n_slices": n, "rows": size, "cols": size, "pixel_spacing": 0.5, "spacing_z": 5.0,
                "path": f"toy/{s}/{i}.dcm", "split": split,
                "fold": ((s // 2) % folds) if split == "train" else -1,
                **{c: (float(v) if split == "train" else np.nan) for c, v in zip(LABELS, y, strict=True)},
            })
    cat = pd.DataFrame.from_records(records)
    cat["row"] = np.arange(len(cat))
    first = cat.groupby("study_uid")["row"].transform("min")
    last = cat.groupby("study_uid")["row"].transform("max")
    cat["prev_row"] = np.maximum(cat["row"] - 1, first)
    cat["next_row"] = np.minimum(cat["row"] + 1, last)
    cache = np.clip(np.stack(images), -32768, 32767).astype(np.int16)
    return cat, cache
