"""The phantom written as the public external test sets are laid out: CQ500 and PhysioNet CT-ICH.

``ichd synth --layout cq500|ctich --out DIR`` (:func:`generate_layout`) draws studies with the phantom's own
planner and renderer (:func:`ichdlib.phantom.synth.plan_phantom`, :func:`ichdlib.phantom.anatomy.render_study`)
and writes them as a user downloads those datasets, so that ``ichd validate`` can be exercised end to end.

Each study is rendered once as a **thin** 0.625 mm acquisition; the other reconstructions are derived from
it as a scanner derives them: the 5 mm series averages each 5 mm slab of thin slices (mean HU: partial
volume at a lesion's ends comes for free), the bone-kernel series sharpens the thin slices and adds noise,
the post-contrast series raises enhancing tissue. Study labels are the rendered lesion masks' labels (any
slice of the study), so they always agree with the pixels.

CQ500 layout (as the qure.ai download unzips)::

    DIR/CQ500CT<n> CQ500CT<n>/Unknown Study/<series description>/CT000000.dcm ...
    DIR/reads.csv            name (CQ500-CT-<n>), Category, R1:ICH ... R3:MidlineShift (three readers)
    DIR/phantom_truth.csv    the rendered truth per study (not part of CQ500; for checking the readers)

Per study: a thin soft-tissue series (0.625 mm), a 5 mm soft-tissue series, a thin bone-kernel series (one
image more than the thin soft-tissue one, so "most slices" would pick it), a post-contrast 5 mm series in
about a third of the studies (ContrastBolusAgent in half of those, the description only in the rest), and
a one-image localizer. Series descriptions vary between studies, as in the real data. Each simulated reader
misreads ICH or a subtype with a small probability (:func:`reader_reads`), so the three sometimes disagree
and the majority sometimes differs from the truth.

CT-ICH layout (PhysioNet "Computed Tomography Images for Intracranial Hemorrhage Detection and
Segmentation" 1.3.1)::

    DIR/ct_scans/<NNN>.nii    HU volumes, slices along the last axis, affine in RAS (mm)
    DIR/masks/<NNN>.nii       hemorrhage masks (0/1), same shape and affine
    DIR/hemorrhage_diagnosis_raw_ct.csv   PatientNumber, SliceNumber (from 1), Intraventricular,
                              Intraparenchymal, Subarachnoid, Epidural, Subdural, No_Hemorrhage, Fracture_Yes_No

Patient numbers start at 49, as in the real set; volumes are 5 mm slabs of the thin rendering.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ichdlib.external_sets import (
    CQ500_FINDINGS,
    CQ500_LABELS,
    CTICH_COLUMNS,
    CTICH_CSV,
    CTICH_LABELS,
    CTICH_MASKS,
    CTICH_SCANS,
)
from ichdlib.files import write_text
from ichdlib.labels import SUBTYPES
from ichdlib.phantom.anatomy import render_study
from ichdlib.phantom.encoding import write_ct_dicom
from ichdlib.phantom.shift import get_shift
from ichdlib.phantom.synth import StudyPlan, plan_phantom, valid_uid
from ichdlib.runtime import LazyPool, run_tasks

LAYOUTS = ("cq500", "ctich")
THIN_MM = 0.625
THICK_MM = 5.0
CTICH_FIRST_PATIENT = 49
#: Series descriptions vary between CQ500 studies (and sites); one of each is drawn per study.
_NAMES = {
    "thin": ["CT 0.625mm", "CT Thin Plain", "CT PLAIN THIN", "CT 0.625mm Plain"],
    "thick": ["CT 5mm", "CT Plain", "CT PRE CONTRAST 5MM STD", "CT 5mm Plain"],
    "bone": ["CT BONE", "CT 0.625mm BONE", "CT Thin Bone"],
    "contrast": ["CT POST CONTRAST", "CT C+ 5mm", "CT 5mm POST CONTRAST"],
    "localizer": ["Scout", "TOPOGRAM", "CT Localizer"],
}
_KERNELS = {"soft": ["STANDARD", "H30s", "SOFT"], "bone": ["BONE", "H70h", "BONEPLUS"]}
#: Chance that one simulated reader misreads ICH, or one subtype, of one study.
MISREAD = 0.06


# ----------------------------------------------------------------------------------------------------
# Rendering: one thin acquisition, the other reconstructions derived from it
# ----------------------------------------------------------------------------------------------------
def thin_plan(plan: StudyPlan, size: int) -> StudyPlan:
    """The study's plan re-sampled at :data:`THIN_MM` over the same head extent."""
    extent = (plan.n_slices - 1) * plan.spacing_z
    n = int(round(extent / THIN_MM)) + 1
    return dataclasses.replace(plan, rows=size, cols=size, size=size, spacing_z=THIN_MM, n_slices=n,
                               sop_uids=[], missing=[], corrupt=[], duplicate={}, multi_window=[], slice_encoding={})


def slabs(hu: np.ndarray, per: int) -> np.ndarray:
    """Mean over consecutive groups of ``per`` slices (the last group only when complete)."""
    n = (len(hu) // per) * per
    return hu[:n].reshape(n // per, per, *hu.shape[1:]).mean(axis=1, dtype=np.float64).astype(np.float32)


def bone_kernel(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sharp (bone) reconstruction of soft-tissue slices: unsharp masking and more noise."""

    out = np.empty_like(hu)
    for i, im in enumerate(hu):
        out[i] = im + 1.5 * (im - cv2.GaussianBlur(im, (0, 0), 1.2)) + rng.normal(0, 12.0, im.shape).astype(np.float32)
    return out


def contrast_enhanced(hu: np.ndarray) -> np.ndarray:
    """Post-contrast look: enhancing soft tissue (20-90 HU) gains up to 35 HU."""
    gain = np.clip((hu - 20.0) / 20.0, 0, 1) * np.clip((90.0 - hu) / 20.0, 0, 1)
    return (hu + 35.0 * gain).astype(np.float32)


def study_truth(labels: np.ndarray) -> dict[str, int]:
    """Slice labels ``(n, 5)`` in SUBTYPES order -> study labels (any slice), ``any`` included."""
    sub = {c: int(labels[:, k].any()) for k, c in enumerate(SUBTYPES)}
    return {"any": int(any(sub.values())), **sub}


# ----------------------------------------------------------------------------------------------------
# CQ500
# ----------------------------------------------------------------------------------------------------
def cq500_folder(n: int) -> str:
    """``CQ500CT<n> CQ500CT<n>`` (the download's doubled folder name)."""
    return f"CQ500CT{n} CQ500CT{n}"


def _write_cq500_study(job: tuple[StudyPlan, int, str, int, int]) -> dict[str, Any]:
    plan, n, out_str, size, seed = job
    rng = np.random.default_rng([seed, n, 500])
    study = render_study(thin_plan(plan, size))
    thin = study.hu
    per = int(round(THICK_MM / THIN_MM))
    thick = slabs(thin, per)
    root = Path(out_str) / cq500_folder(n) / "Unknown Study"
    study_uid = valid_uid(f"cq500/{seed}/{n}")
    ps = study.pixel_spacing
    x0, y0 = -(size / 2) * ps, -(size / 2) * ps
    z0 = plan.z0

    def pick(kind: str) -> str:
        return str(rng.choice(_NAMES[kind]))

    soft, bone = str(rng.choice(_KERNELS["soft"])), str(rng.choice(_KERNELS["bone"]))
    series = [("thin", pick("thin"), thin, THIN_MM, soft, {}),
              ("thick", pick("thick"), thick, THICK_MM, soft, {}),
              ("bone", pick("bone"), np.concatenate([bone_kernel(thin, rng), bone_kernel(thin[-1:], rng)]),
               THIN_MM, bone, {})]
    if rng.random() < 0.35:
        agent = {"ContrastBolusAgent": "IOHEXOL"} if rng.random() < 0.5 else {}
        series.append(("contrast", pick("contrast"), contrast_enhanced(thick), THICK_MM, soft, agent))
    written = []
    for kind, desc, vol, step, kernel, extra in series:
        series_uid = valid_uid(f"cq500/{seed}/{n}/{kind}")
        folder = root / desc
        for i, im in enumerate(vol):
            z = z0 + (i * step if kind != "thick" and kind != "contrast" else (i + 0.5) * step - THIN_MM / 2)
            write_ct_dicom(folder / f"CT{i:06d}.dcm", im, sop_uid=valid_uid(f"{series_uid}/{i}"),
                           patient_id=f"CQ500-CT-{n}", study_uid=study_uid, series_uid=series_uid,
                           position=(x0, y0, round(z, 4)), pixel_spacing=ps, SeriesDescription=desc,
                           ConvolutionKernel=kernel, SliceThickness=f"{step:g}",
                           ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], InstanceNumber=i + 1, **extra)
        written.append({"kind": kind, "description": desc, "images": len(vol), "series_uid": series_uid})
    # localizer: one coronal projection image
    loc = thin.mean(axis=1)[::-1]  # (z, cols): a rough frontal projection, top of the head up
    desc = pick("localizer")
    series_uid = valid_uid(f"cq500/{seed}/{n}/localizer")
    write_ct_dicom(root / desc / "CT000000.dcm", np.ascontiguousarray(loc), sop_uid=valid_uid(f"{series_uid}/0"),
                   patient_id=f"CQ500-CT-{n}", study_uid=study_uid, series_uid=series_uid,
                   position=(x0, 0.0, z0 + len(thin) * THIN_MM), orientation=(1, 0, 0, 0, 0, -1),
                   pixel_spacing=(THIN_MM, ps), SeriesDescription=desc,
                   ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    written.append({"kind": "localizer", "description": desc, "images": 1, "series_uid": series_uid})
    return {"n": n, "study_uid": study_uid, "truth": study_truth(study.labels), "series": written}


def reader_reads(truth: dict[str, int], rng: np.random.Generator) -> dict[str, int]:
    """One simulated reader's reads.csv findings for a study: ICH is the truth, misread with probability
    :data:`MISREAD`; a reader who reads no ICH reads no subtype; one who reads ICH reads each subtype as it is,
    misread with the same probability (and names one subtype when the study has none). The location,
    fracture and mass-effect findings are drawn loosely."""
    ich = truth["any"] if rng.random() >= MISREAD else 1 - truth["any"]
    reads = dict.fromkeys(CQ500_FINDINGS, 0)
    reads["ICH"] = ich
    if ich:
        for finding, label in CQ500_LABELS.items():
            if finding != "ICH":
                reads[finding] = truth[label] if rng.random() >= MISREAD else 1 - truth[label]
        subtypes = [f for f, lab in CQ500_LABELS.items() if f != "ICH"]
        if not any(reads[f] for f in subtypes):
            reads[str(rng.choice(subtypes))] = 1
        reads["BleedLocation-Left"] = int(rng.random() < 0.6)
        reads["BleedLocation-Right"] = int(rng.random() < 0.6)
        reads["MassEffect"] = int(rng.random() < 0.3)
        reads["MidlineShift"] = int(rng.random() < 0.2)
    for finding in ("ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture"):
        reads[finding] = int(rng.random() < 0.05)
    return reads


def _finish_cq500(out: Path, results: list[dict], seed: int) -> None:
    rng = np.random.default_rng([seed, 501])
    rows, truth_rows = [], []
    for res in sorted(results, key=lambda r: r["n"]):
        name = f"CQ500-CT-{res['n']}"
        row: dict[str, Any] = {"name": name, "Category": "B1" if res["n"] % 2 else "B2"}
        for r in (1, 2, 3):
            for finding, value in reader_reads(res["truth"], rng).items():
                row[f"R{r}:{finding}"] = value
        rows.append(row)
        truth_rows.append({"name": name, "study_uid": res["study_uid"], **res["truth"]})
    write_text(out / "reads.csv", pd.DataFrame(rows).to_csv(index=False))
    write_text(out / "phantom_truth.csv", pd.DataFrame(truth_rows).to_csv(index=False))


# ----------------------------------------------------------------------------------------------------
# CT-ICH
# ----------------------------------------------------------------------------------------------------
def ras_affine(pixel_spacing: float, thickness: float, n_cols: int, n_rows: int) -> np.ndarray:
    """Affine of a volume stored ``[col, row, slice]`` from DICOM-like slices (column index -> patient left,
    row index -> posterior, slice -> superior), in RAS mm as NIfTI wants it."""
    aff = np.diag([-pixel_spacing, -pixel_spacing, thickness, 1.0])
    aff[:3, 3] = [(n_cols / 2) * pixel_spacing, (n_rows / 2) * pixel_spacing, 0.0]
    return aff


def volume_from_slices(hu: np.ndarray) -> np.ndarray:
    """``(n, rows, cols)`` slices -> ``[col, row, slice]`` array (slices along the last axis)."""
    return np.ascontiguousarray(np.transpose(hu, (2, 1, 0)))


def _write_ctich_study(job: tuple[StudyPlan, int, str, int, int]) -> dict[str, Any]:

    plan, number, out_str, size, seed = job
    study = render_study(thin_plan(plan, size))
    per = int(round(THICK_MM / THIN_MM))
    hu = np.round(slabs(study.hu, per))
    n = len(hu)
    lab = study.labels[: n * per].reshape(n, per, len(SUBTYPES)).max(axis=1)
    mask = (study.masks[: n * per].reshape(n, per, size, size) > 0).any(axis=1).astype(np.uint8)
    aff = ras_affine(study.pixel_spacing, THICK_MM, size, size)
    out = Path(out_str)
    vol = nib.Nifti1Image(volume_from_slices(hu).astype(np.int16), aff)
    vol.header.set_xyzt_units("mm")
    nib.save(vol, out / CTICH_SCANS / f"{number:03d}.nii")
    nib.save(nib.Nifti1Image(volume_from_slices(mask), aff), out / CTICH_MASKS / f"{number:03d}.nii")
    rows = []
    for k in range(n):
        sub = {c: int(lab[k, SUBTYPES.index(v)]) for c, v in CTICH_LABELS.items()}
        rows.append({"PatientNumber": number, "SliceNumber": k + 1, **sub,
                     "No_Hemorrhage": int(not any(sub.values())), "Fracture_Yes_No": 0})
    return {"n": number, "rows": rows, "truth": study_truth(study.labels)}


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------
def generate_layout(out: str | os.PathLike, layout: str, studies: int = 12, seed: int = 0, size: int = 128,
                    workers: int = 0, progress: bool = True, shift: str = "none") -> dict[str, Any]:
    """Write ``studies`` phantom studies in the ``layout`` (``cq500`` or ``ctich``) under ``out``; returns a
    summary (also written as ``phantom_layout.json``). Same arguments -> same files.

    ``shift`` (a :data:`ichdlib.phantom.shift.SHIFTS` name) renders the studies as that scanner would: its
    field of view, noise, kernel and HU calibration; the layout keeps its own slice thicknesses (0.625 mm
    thin, 5 mm thick)."""

    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if studies < 2 or size < 32:
        raise ValueError(f"studies={studies}, size={size}: need at least 2 studies of at least 32 pixels")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "phantom_layout.json").exists():
        raise ValueError(f"{out}: exists, is not empty and holds no phantom_layout.json; choose another --out")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    plans, _ = plan_phantom(studies, seed, size, shift=shift)
    if layout == "cq500":
        fn, jobs = _write_cq500_study, [(pl, k, str(out), size, seed) for k, pl in enumerate(plans)]
    else:
        (out / CTICH_SCANS).mkdir(exist_ok=True)
        (out / CTICH_MASKS).mkdir(exist_ok=True)
        fn, jobs = _write_ctich_study, [(pl, CTICH_FIRST_PATIENT + k, str(out), size, seed) for k, pl in enumerate(plans)]
    workers = workers or (1 if studies * size * size < 16 * 64 * 64 else (os.cpu_count() or 1))
    results = []
    with LazyPool(min(workers, len(jobs)), preload=["ichdlib.phantom.layouts"]) as pool, \
            tqdm(total=len(jobs), desc=f"synth {layout}", unit="study", disable=not progress) as bar:
        for res in run_tasks(fn, jobs, pool):
            results.append(res)
            bar.update()
    if layout == "cq500":
        _finish_cq500(out, results, seed)
    else:
        slices = pd.DataFrame([r for res in sorted(results, key=lambda r: r["n"]) for r in res["rows"]],
                              columns=CTICH_COLUMNS)
        write_text(out / CTICH_CSV, slices.to_csv(index=False))
    positive = sum(r["truth"]["any"] for r in results)
    summary = {"layout": layout, "studies": studies, "seed": seed, "size": size, "positive_studies": positive,
               "shift": get_shift(shift).name, "seconds": round(time.perf_counter() - t0, 1)}
    write_text(out / "phantom_layout.json", json.dumps(summary, indent=1))
    return summary
