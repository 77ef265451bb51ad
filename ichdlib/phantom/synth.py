"""A synthetic head-CT phantom written in the exact RSNA 2019 / Kaggle layout.

``generate_phantom(out, studies, seed)`` (and ``ichd synth``) writes flat ``stage_2_train/`` and
``stage_2_test/`` folders of ``ID_<hex>.dcm`` slices, ``stage_2_train.csv`` (long ``ID,Label``),
``stage_2_sample_submission.csv``, ``answer_key.csv`` (test truth), optional per-slice lesion masks and
``phantom_manifest.json`` (see the "Phantom" section of ``docs/architecture.md``).

Each study is rendered slice by slice at the target size with vectorised numpy: air, scalp, a two-table
skull with diploe, parenchyma with cortex/white matter, sulci, fissures, cisterns and ventricles whose shape
changes along z, deep grey nuclei, the skull base (petrous bone, clivus, sinuses, orbits) in the lowest
slices and the vertex at the top; noise, blur, head size, position and rotation vary by study. The five
hemorrhage subtypes are drawn at their usual places and shapes, tapering over contiguous slices and fading
at their ends (each slice is a slab as thick as the slice spacing; a lesion filling part of it is drawn
fainter: partial volume), and the labels are counted from the rendered lesion masks, so labels and masks
always agree. Mimics (choroid plexus / pineal / falx calcifications, beam-hardening streaks, a bright rim
under the skull) appear on negative slices too. ``quirks=True`` injects the real data's problems and lists them in the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ichdlib.config import SynthCfg, check_values
from ichdlib.files import write_text
from ichdlib.labels import LABELS, SUBTYPES, wide_to_long
from ichdlib.layout import MASKS
from ichdlib.phantom import PHANTOM_VERSION
from ichdlib.phantom.anatomy import render_study
from ichdlib.phantom.encoding import ds_value, write_ct_dicom, write_mask
from ichdlib.phantom.lesions import MASK_BITS
from ichdlib.phantom.shift import ScannerShift, get_shift
from ichdlib.runtime import LazyPool, run_tasks

if TYPE_CHECKING:
    from ichdlib.config import Params

TRAIN_DIR = "stage_2_train"
TEST_DIR = "stage_2_test"
TRAIN_CSV = "stage_2_train.csv"
SAMPLE_SUBMISSION = "stage_2_sample_submission.csv"
ANSWER_KEY = "answer_key.csv"
MASK_DIR = MASKS
MANIFEST = "phantom_manifest.json"
#: Written first / last: a folder with ``COMPLETE_MARKER`` holds a finished phantom.
PROGRESS_MARKER = ".phantom_in_progress"
COMPLETE_MARKER = ".phantom_complete"
#: The corrupt training file of the real data; the phantom's corrupt file gets the same name.
CORRUPT_ID = "ID_6431af929"
_QUIRK_KEYS = ("corrupt", "intercept_wrap", "duplicate_label_rows", "duplicate_slice", "missing_slice",
               "odd_size", "multi_window", "monochrome1", "fov_padding")


# ----------------------------------------------------------------------------------------------------
# Planning (main process, deterministic): patients, studies, split, IDs, quirks
# ----------------------------------------------------------------------------------------------------
@dataclass
class StudyPlan:
    """Everything a worker needs to render and write one study."""

    index: int
    seed: int
    patient_id: str
    study_uid: str
    series_uid: str
    split: str
    n_slices: int
    spacing_z: float
    z0: float
    s0: float
    head_height: float
    positive: bool
    rows: int
    cols: int
    size: int
    sop_uids: list[str]
    encoding: str = "signed"
    window: tuple[float, float] = (40.0, 80.0)
    fov_padding: bool = False
    #: slice index -> encoding override (quirks).
    slice_encoding: dict[int, str] = field(default_factory=dict)
    multi_window: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    #: slice index -> SOP of a second file at the same position.
    duplicate: dict[int, str] = field(default_factory=dict)
    #: FrameOfReferenceUID written with ``valid_uids`` (with SliceThickness; RSNA's files have neither).
    frame_of_reference: str | None = None
    #: Scanner settings (:mod:`ichdlib.phantom.shift`); None = the ordinary phantom.
    shift: ScannerShift | None = None


class _Ids:
    """Unique random ``ID_<hex>`` strings from one generator."""

    def __init__(self, rng: np.random.Generator, reserved: set[str]):
        self.rng, self.used = rng, set(reserved)

    def new(self, digits: int) -> str:
        while True:
            uid = f"ID_{int(self.rng.integers(0, 16**digits)):0{digits}x}"
            if uid not in self.used:
                self.used.add(uid)
                return uid


def plan_phantom(studies: int, seed: int, size: int = 512, quirks: bool = False,
                 shift: str | ScannerShift | None = None) -> tuple[list[StudyPlan], dict]:
    """Draw patients, studies, split by patient, IDs, geometry along z and the quirks (no pixels yet).

    ``shift`` (a :data:`ichdlib.phantom.shift.SHIFTS` name) draws slice spacing, header windows and encodings
    as that scanner would and hands its pixel settings to the renderer.
    """
    sh = get_shift(shift)
    rng = np.random.default_rng([seed, 20191])
    ids = _Ids(rng, {CORRUPT_ID})
    # Patients: about 1 in 5 has two studies; at least two patients so both splits are populated.
    patients: list[int] = []
    left = studies
    while left > 0:
        two = left >= 3 and rng.random() < 0.2
        patients.append(2 if two else 1)
        left -= patients[-1]
    n_pat = len(patients)
    order = rng.permutation(n_pat)
    target, n_test, test_pat = 0.25 * studies, 0, set()
    for p in order:
        if n_test >= target or len(test_pat) >= n_pat - 1:
            break
        test_pat.add(int(p))
        n_test += patients[p]
    if not test_pat:
        test_pat.add(int(order[0]))
    n_pos = int(round(0.42 * studies))
    positive = np.zeros(studies, bool)
    positive[rng.permutation(studies)[:n_pos]] = True
    encodings = rng.choice(list(sh.encodings), size=studies)
    windows = list(sh.windows)
    plans: list[StudyPlan] = []
    k = 0
    for p, n_st in enumerate(patients):
        pid = ids.new(8)
        for _ in range(n_st):
            dz = round(float(rng.uniform(*sh.spacing_z)), 2)
            extent = rng.uniform(125.0, 160.0)
            n = int(np.clip(round(extent / dz) + 1, *sh.slices))
            s0 = float(rng.uniform(-0.04, 0.04))
            s1 = float(rng.uniform(0.94, 1.0))
            height = float(np.clip((n - 1) * dz / (s1 - s0), 118.0, 170.0))
            plans.append(StudyPlan(
                index=k, seed=int(rng.integers(0, 2**31)), patient_id=pid, study_uid=ids.new(10),
                series_uid=ids.new(10), split="test" if p in test_pat else "train", n_slices=n,
                spacing_z=dz, z0=round(float(rng.uniform(-160.0, 40.0)), 3), s0=s0, head_height=height,
                positive=bool(positive[k]), rows=size, cols=size, size=size,
                sop_uids=[ids.new(9) for _ in range(n)], encoding=str(encodings[k]),
                window=tuple(float(w) for w in windows[int(rng.integers(len(windows)))]),
                shift=None if sh.is_default else sh,
            ))
            k += 1
    quirk_log: dict[str, list] = {key: [] for key in _QUIRK_KEYS}
    if quirks:
        _plan_quirks(plans, rng, ids, quirk_log)
    return plans, quirk_log


def _plan_quirks(plans: list[StudyPlan], rng: np.random.Generator, ids: _Ids, log: dict[str, list]) -> None:
    """Assign the real data's problems to studies/slices; record what can be known before rendering."""
    train = [plans[i] for i in rng.permutation(len(plans)) if plans[i].split == "train"]
    test = [pl for pl in plans if pl.split == "test"]
    taken: set[tuple[int, int]] = set()

    def pick(pl: StudyPlan, interior: bool = True) -> int:
        lo, hi = (2, pl.n_slices - 2) if interior else (0, pl.n_slices)
        free = [i for i in range(lo, hi) if (pl.index, i) not in taken]
        i = int(free[int(rng.integers(len(free)))])
        taken.add((pl.index, i))
        return i

    def nth(i: int) -> StudyPlan:
        return train[i % len(train)]

    odd = nth(0)
    odd.cols = max(16, int(round(odd.size * 0.9)))
    log["odd_size"].append({"study_uid": odd.study_uid, "rows": odd.rows, "cols": odd.cols})
    wrap_study = nth(1)
    wrap_study.encoding = "wrap12"
    wrap_test = test[int(rng.integers(len(test)))]
    for _ in range(min(3, wrap_test.n_slices - 4)):
        wrap_test.slice_encoding[pick(wrap_test)] = "wrap12"
    dup = nth(2)
    i = pick(dup)
    dup.duplicate[i] = ids.new(9)
    miss = nth(3)
    miss.missing.append(pick(miss))
    corrupt = nth(4)
    i = pick(corrupt)
    corrupt.corrupt.append(i)
    corrupt.sop_uids[i] = CORRUPT_ID
    mw = nth(5)
    mw.multi_window.extend(sorted(pick(mw, interior=False) for _ in range(2)))
    mono = nth(6)
    mono.slice_encoding[pick(mono)] = "monochrome1"
    for pl in plans:
        if pl.encoding == "signed" and rng.random() < 0.5:
            pl.fov_padding = True


# ----------------------------------------------------------------------------------------------------
# Writing one study (runs in a worker process)
# ----------------------------------------------------------------------------------------------------
def _write_study(job: tuple[StudyPlan, str, bool]) -> dict[str, Any]:
    """Render one study and write its DICOMs (and masks); returns its image records (worker entry point)."""
    plan, out_str, with_masks = job
    try:
        return _write_study_files(plan, Path(out_str), with_masks)
    except Exception as exc:
        raise RuntimeError(f"phantom study #{plan.index} ({plan.study_uid}, seed {plan.seed}) failed: "
                           f"{type(exc).__name__}: {exc}") from exc


def _write_study_files(plan: StudyPlan, out: Path, with_masks: bool) -> dict[str, Any]:
    folder = out / (TRAIN_DIR if plan.split == "train" else TEST_DIR)
    study = render_study(plan)
    ps = study.pixel_spacing
    x0 = round(-(plan.cols / 2) * ps + (plan.seed % 41 - 20) * 0.5, 3)
    y0 = round(-(plan.rows / 2) * ps + (plan.seed % 23 - 11) * 0.5, 3)
    images = []
    for i in range(plan.n_slices):
        if i in plan.missing:
            continue
        z = round(plan.z0 + i * plan.spacing_z, 3)
        meta = {
            "patient_id": plan.patient_id, "study_uid": plan.study_uid, "series_uid": plan.series_uid,
            "position": (x0, y0, z), "pixel_spacing": ps,
            "encoding": plan.slice_encoding.get(i, plan.encoding),
            "window_center": plan.window[0], "window_width": plan.window[1],
        }
        if meta["encoding"] == "signed":
            meta["fov_padding"] = plan.fov_padding
        if plan.frame_of_reference:  # valid_uids: the header fields hospital data carry and RSNA's files lack
            meta["FrameOfReferenceUID"] = plan.frame_of_reference
            meta["SliceThickness"] = ds_value(plan.spacing_z)  # each slice is rendered as a slab this thick
        if i in plan.multi_window:
            meta["window_center"] = [plan.window[0], 600.0]
            meta["window_width"] = [plan.window[1], 2800.0]
        if i in plan.corrupt:
            meta["truncate"] = 0.35
        sops = [plan.sop_uids[i]] + ([plan.duplicate[i]] if i in plan.duplicate else [])
        label = study.labels[i]
        for sop in sops:
            write_ct_dicom(folder / f"{sop}.dcm", study.hu[i], sop_uid=sop, **meta)
            if with_masks and study.masks[i].any():
                write_mask(out / MASK_DIR / f"{sop}.npz", study.masks[i])
            images.append({"sop_uid": sop, "split": plan.split, "study_uid": plan.study_uid, "slice": i, "z": z,
                           "encoding": meta["encoding"], **{n: int(v) for n, v in zip(SUBTYPES, label, strict=True)}})
    lesions = []
    for les in study.lesions:
        lesions.append({"kind": les.kind, "variant": les.variant, "hu": round(les.hu, 1),
                        "slices": int(study.labels[:, SUBTYPES.index(les.kind)].sum())})
    return {"index": plan.index, "images": images, "pixel_spacing": ps, "lesions": lesions}


# ----------------------------------------------------------------------------------------------------
# The phantom
# ----------------------------------------------------------------------------------------------------
_OWNED = (TRAIN_DIR, TEST_DIR, MASK_DIR, TRAIN_CSV, SAMPLE_SUBMISSION, ANSWER_KEY, MANIFEST, COMPLETE_MARKER)


def valid_uid(rsna_id: str) -> str:
    """A numeric DICOM UID (``2.25.<decimal>``, at most 64 characters) derived from an RSNA-style ``ID_<hex>``
    string: the same ID always gives the same UID, different IDs different UIDs (a name-based UUID, version 5,
    as ISO/IEC 9834-8 forms ``2.25`` UIDs)."""

    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, rsna_id).int}"


_UID_NAMESPACE = __import__("uuid").UUID("7c1d4a52-2f4e-5b8e-9a63-1c3e0b7d9f10")  # fixed: the phantom's UIDs


def _use_valid_uids(plans: list[StudyPlan], quirk_log: dict[str, list]) -> None:
    """Replace the planned ``ID_...`` study, series and SOP UIDs by :func:`valid_uid` (patient IDs stay)."""
    for pl in plans:
        pl.study_uid, pl.series_uid = valid_uid(pl.study_uid), valid_uid(pl.series_uid)
        pl.sop_uids = [valid_uid(u) for u in pl.sop_uids]
        pl.duplicate = {i: valid_uid(u) for i, u in pl.duplicate.items()}
        pl.frame_of_reference = valid_uid(f"{pl.series_uid}/frame-of-reference")
    for entries in quirk_log.values():  # only study UIDs are logged before rendering
        for entry in entries:
            if "study_uid" in entry:
                entry["study_uid"] = valid_uid(entry["study_uid"])


def _prepare_out(out: Path) -> None:
    """Make ``out`` ready: clear an earlier phantom there, refuse to touch anything else."""
    ours = (out / COMPLETE_MARKER).exists() or (out / PROGRESS_MARKER).exists()
    if not ours:
        foreign = [name for name in (TRAIN_CSV, TRAIN_DIR, TEST_DIR) if (out / name).exists()
                   and ((out / name).is_file() or any((out / name).iterdir()))]
        if foreign:
            raise ValueError(f"{out}: holds {', '.join(foreign)} but no phantom marker ({COMPLETE_MARKER}); "
                             "refusing to overwrite what may be real data. Choose another --out folder.")
    for name in _OWNED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _config(studies: int, seed: int, size: int, quirks: bool, masks: bool, valid_uids: bool = False,
            shift: str = "none") -> dict[str, Any]:
    cfg = {"studies": studies, "seed": seed, "size": size, "quirks": quirks, "masks": masks, "version": PHANTOM_VERSION}
    if valid_uids:  # only when set, so that markers of ordinary phantoms keep their form
        cfg["valid_uids"] = True
    if shift != "none":  # likewise
        cfg["shift"] = shift
    return cfg


def generate_phantom(out: str | os.PathLike, studies: int, seed: int, size: int = 512, quirks: bool = False,
                     masks: bool = False, workers: int = 0, progress: bool = True, valid_uids: bool = False,
                     shift: str = "none") -> dict:
    """Write a phantom in the RSNA/Kaggle layout under ``out``; returns the manifest (also written).

    Same arguments -> identical files and labels (independent of ``workers``). ``workers=0`` uses one
    process per CPU core. An earlier phantom in ``out`` is replaced; a folder holding other data is refused.
    ``valid_uids``: numeric study, series and SOP instance UIDs (:func:`valid_uid` of the ``ID_...`` ones,
    also in file names and CSV rows), a FrameOfReferenceUID per series and SliceThickness, as hospital data
    carry, for the DICOM-output and PACS tests; the pixels, labels and layout are the same. Such a phantom is
    not for ``ichd ingest``: the Kaggle label files' IDs must read ``ID_<hex>`` (it fails there with a message
    naming the row). ``shift`` names a scanner profile of :data:`ichdlib.phantom.shift.SHIFTS` (other
    slice spacing, field of view, noise, kernel, HU calibration, header windows and encodings; the manifest
    records its settings); ``none`` is the ordinary phantom.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415  (progress bars load only when shown)

    sh = get_shift(shift)

    if studies < 2:
        raise ValueError(f"studies={studies}: need at least 2 (one patient per split)")
    if size < 32:
        raise ValueError(f"size={size}: need at least 32 pixels")
    out = Path(out)
    t0 = time.perf_counter()
    _prepare_out(out)
    config = _config(studies, seed, size, quirks, masks, valid_uids, sh.name)
    write_text(out / PROGRESS_MARKER, json.dumps(config))
    (out / TRAIN_DIR).mkdir()
    (out / TEST_DIR).mkdir()
    if masks:
        (out / MASK_DIR).mkdir()
    plans, quirk_log = plan_phantom(studies, seed, size, quirks, sh)
    if valid_uids:
        _use_valid_uids(plans, quirk_log)
    jobs = [(pl, str(out), masks) for pl in plans]
    if workers == 0:
        # One process per core, except for tiny phantoms where starting the pool costs more than it saves.
        workers = 1 if studies * size * size < 40 * 64 * 64 else (os.cpu_count() or 1)
    workers = max(1, min(workers, len(jobs)))
    results: list[dict] = [{}] * len(jobs)
    with tqdm(total=len(jobs), desc="synth studies", unit="study", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                res = _write_study(job)
                results[res["index"]] = res
                bar.update()
        else:
            with LazyPool(workers, preload=["ichdlib.phantom.synth"]) as pool:
                for res in run_tasks(_write_study, jobs, pool):
                    results[res["index"]] = res
                    bar.update()
    manifest = _finish(out, plans, results, quirk_log, config, seed)
    if not sh.is_default:
        manifest["shift"] = sh.summary()
        write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    return manifest


def _finish(out: Path, plans: list[StudyPlan], results: list[dict], quirk_log: dict, config: dict,
            seed: int) -> dict:
    """Write the CSVs, the manifest and the completion marker."""
    rng = np.random.default_rng([seed, 4242])
    images = pd.DataFrame([img for res in results for img in res["images"]])
    for name in SUBTYPES:
        images[name] = images[name].astype(int)
    images["any"] = images[list(SUBTYPES)].max(axis=1)
    train = images[images.split == "train"].iloc[rng.permutation(int((images.split == "train").sum()))]
    test = images[images.split == "test"].iloc[rng.permutation(int((images.split == "test").sum()))]
    train_long = wide_to_long(train.set_index("sop_uid")[list(LABELS)])
    if config["quirks"]:
        blocks = rng.choice(len(train), size=min(3, len(train)), replace=False)
        parts, start = [], 0
        for b in sorted(int(x) for x in blocks):
            cut = (b + 1) * 6
            parts += [train_long.iloc[start:cut], train_long.iloc[b * 6:cut]]
            start = cut
            quirk_log["duplicate_label_rows"].append({"sop_uid": str(train.iloc[b]["sop_uid"]), "rows": 6})
        parts.append(train_long.iloc[start:])
        train_long = pd.concat(parts, ignore_index=True)
    write_text(out / TRAIN_CSV, train_long.to_csv(index=False))
    test_wide = test.set_index("sop_uid")[list(LABELS)]
    write_text(out / ANSWER_KEY, wide_to_long(test_wide).to_csv(index=False))
    sample = wide_to_long(test_wide.astype(float) * 0 + 0.5)
    write_text(out / SAMPLE_SUBMISSION, sample.to_csv(index=False))
    # Quirks known only after rendering.
    by_index = {pl.index: pl for pl in plans}
    for pl in plans:
        folder = TRAIN_DIR if pl.split == "train" else TEST_DIR
        for i in pl.corrupt:
            quirk_log["corrupt"].append({"sop_uid": pl.sop_uids[i], "study_uid": pl.study_uid,
                                         "path": f"{folder}/{pl.sop_uids[i]}.dcm",
                                         "reason": "pixel data truncated to 35% after a valid header"})
        for i, dup in pl.duplicate.items():
            quirk_log["duplicate_slice"].append({"study_uid": pl.study_uid, "sop_uids": [pl.sop_uids[i], dup],
                                                 "z": round(pl.z0 + i * pl.spacing_z, 3)})
        for i in pl.missing:
            quirk_log["missing_slice"].append({"study_uid": pl.study_uid, "z": round(pl.z0 + i * pl.spacing_z, 3),
                                               "between": [pl.sop_uids[i - 1], pl.sop_uids[i + 1]]})
        if pl.fov_padding:
            quirk_log["fov_padding"].append({"study_uid": pl.study_uid, "raw": -2000})
    corrupt_id = valid_uid(CORRUPT_ID) if config.get("valid_uids") else CORRUPT_ID
    wraps = images[(images.encoding == "wrap12") & ~images.sop_uid.isin([corrupt_id])]
    quirk_log["intercept_wrap"] = [{"sop_uid": r.sop_uid, "study_uid": r.study_uid, "split": r.split}
                                   for r in wraps.itertuples()]
    mono = images[images.encoding == "monochrome1"]
    quirk_log["monochrome1"] = [{"sop_uid": r.sop_uid, "study_uid": r.study_uid,
                                 "note": "inverted storage, RescaleSlope -1: the modality LUT gives HU"}
                                for r in mono.itertuples()]
    for pl in plans:
        for i in pl.multi_window:
            quirk_log["multi_window"].append({"sop_uid": pl.sop_uids[i], "study_uid": pl.study_uid})
    study_any = images.groupby("study_uid")["any"].max()
    counts = {
        "studies": len(plans), "patients": len({pl.patient_id for pl in plans}),
        "train_studies": sum(pl.split == "train" for pl in plans),
        "test_studies": sum(pl.split == "test" for pl in plans),
        "train_images": int((images.split == "train").sum()), "test_images": int((images.split == "test").sum()),
        "positive_studies": int(study_any.sum()), "positive_slices": {n: int(images[n].sum()) for n in LABELS},
        "train_label_rows": len(train_long),
    }
    studies = []
    for res in results:
        pl = by_index[res["index"]]
        studies.append({"study_uid": pl.study_uid, "patient_id": pl.patient_id, "series_uid": pl.series_uid,
                        "split": pl.split, "images": len(res["images"]), "rows": pl.rows, "cols": pl.cols,
                        "pixel_spacing": res["pixel_spacing"], "spacing_z": pl.spacing_z,
                        "encoding": pl.encoding, "lesions": res["lesions"]})
    manifest = {"seed": seed, "config": config, "counts": counts, "quirks": quirk_log,
                "mask_bits": MASK_BITS, "studies": studies}
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    write_text(out / COMPLETE_MARKER, json.dumps(config))
    (out / PROGRESS_MARKER).unlink(missing_ok=True)
    return manifest


def ensure_phantom(params: Params, force: bool = False, progress: bool = True) -> Path:
    """Generate the phantom under ``params.data_root`` from ``params.synth`` unless data is already there.

    A complete phantom (marker present) with the same settings is kept; one with other settings raises
    unless ``force``. A folder with a ``stage_2_train.csv`` but no phantom marker is taken as real data
    and never touched. An interrupted phantom is regenerated.
    """
    root = params.data_root
    cfg = params.synth
    want = _config(cfg.studies, cfg.seed, cfg.size, cfg.quirks, cfg.masks, shift=get_shift(cfg.shift).name)
    done = root / COMPLETE_MARKER
    if done.exists() and not force:
        have = json.loads(done.read_text())
        if have == want:
            return root
        settings = {k: v for k, v in want.items() if k != "version"}
        if {k: v for k, v in have.items() if k != "version"} != settings:
            raise ValueError(f"{root}: holds a phantom made with {have}, params.synth asks for {want}; "
                             "delete the folder, point paths.data_root elsewhere or pass force=True")
        print(f"{root}: phantom version {have.get('version')} -> {PHANTOM_VERSION}: regenerating", flush=True)
    ours = done.exists() or (root / PROGRESS_MARKER).exists()
    if (root / params.paths.train_csv).exists() and not ours:
        return root
    if not cfg.enabled:
        raise FileNotFoundError(f"{root}: no {params.paths.train_csv} and synth.enabled is false; "
                                "point paths.data_root at RSNA data or enable the phantom")
    names = (params.paths.train_dir, params.paths.test_dir, params.paths.train_csv, params.paths.sample_submission)
    if names != (TRAIN_DIR, TEST_DIR, TRAIN_CSV, SAMPLE_SUBMISSION):
        raise ValueError(f"the phantom writes the Kaggle names {TRAIN_DIR}, {TEST_DIR}, {TRAIN_CSV}, "
                         f"{SAMPLE_SUBMISSION}; params.paths names {names}")
    generate_phantom(root, cfg.studies, cfg.seed, cfg.size, cfg.quirks, cfg.masks, workers=cfg.workers,
                     progress=progress, shift=cfg.shift)
    return root


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd synth``; the defaults are the params schema's (:class:`ichdlib.config.SynthCfg`)."""
    d = {name: f.default for name, f in SynthCfg.model_fields.items()}
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created; an old phantom is replaced)")
    parser.add_argument("--studies", type=int, default=d["studies"], help=f"number of studies (default {d['studies']})")
    parser.add_argument("--seed", type=int, default=d["seed"], help=f"random seed (default {d['seed']})")
    parser.add_argument("--size", type=int, default=d["size"], help=f"rows/columns of a slice (default {d['size']})")
    parser.add_argument("--quirks", action=argparse.BooleanOptionalAction, default=d["quirks"],
                        help="inject the real data's problems (see the manifest)")
    parser.add_argument("--masks", action=argparse.BooleanOptionalAction, default=d["masks"],
                        help="write per-slice lesion masks to masks/<sop>.npz")
    parser.add_argument("--workers", type=int, default=d["workers"],
                        help=f"processes (default {d['workers']} = one per CPU core)")
    parser.add_argument("--valid-uids", action="store_true",
                        help="numeric DICOM UIDs (2.25.<n>) instead of RSNA's ID_<hex> strings, as hospital data "
                             "carry (for DICOM-output/PACS tests; not ingestible, its label IDs lack 'ID_')")
    parser.add_argument("--shift", default="none", metavar="PROFILE",
                        help="draw the studies as another scanner would: scannerB, scannerC (other slice spacing, "
                             "field of view, noise, kernel, HU calibration, windows; default none)")


def cli(args: argparse.Namespace) -> int:
    """Run ``ichd synth``."""
    check_values(SynthCfg, {k: getattr(args, k) for k in ("studies", "seed", "size", "quirks", "masks", "workers")},
                 "ichd synth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        man = generate_phantom(args.out, args.studies, args.seed, args.size, args.quirks, args.masks,
                               args.workers, valid_uids=args.valid_uids, shift=args.shift)
    c = man["counts"]
    print(f"wrote {c['train_images']} train + {c['test_images']} test slices of {c['studies']} studies "
          f"({c['patients']} patients) to {args.out} in {man['seconds']} s; "
          f"{c['positive_studies']} positive studies, {c['positive_slices']['any']} positive slices")
    if "shift" in man:
        print(f"scanner {man['shift']['name']}: {man['shift']['description']}")
    if args.quirks:
        print("quirks: " + ", ".join(f"{k}={len(v)}" for k, v in man["quirks"].items()))
    return 0


__all__ = ["generate_phantom", "ensure_phantom", "plan_phantom", "StudyPlan", "CORRUPT_ID", "PHANTOM_VERSION",
           "write_ct_dicom", "write_mask", "render_study", "valid_uid", "MASK_BITS"]
