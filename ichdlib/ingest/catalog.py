"""RSNA-layout folder -> slice catalog, patient folds, quarantine list and the resized HU cache.

``build_catalog`` (and ``ingest(params)``, ``ichd ingest``) writes into ``work/``:

- ``catalog.parquet``: one row per usable slice, ordered by split (train first), study, z (ties by
  ``sop_uid``); the contract columns of docs/architecture.md plus ``dup_z`` (another slice of the study
  has the same z; both are kept) and the header fields the cache pass decodes with (``modality``,
  ``instance_number``, ``slope``, ``intercept``, ``bits_*``, ``pixel_representation``, ``photometric``,
  ``transfer_syntax``, ``window_center``, ``window_width``, ``fixes``, ``pixel_offset``, ``pixel_nbytes``);
- ``quarantine.csv``: ``sop_uid, path, split, reason`` for every file or label row left out; the reason
  starts with a short kind (``unreadable:``, ``not CT:``, ``unlabelled:`` ...);
- ``ingest_report.json``: counts, label conflicts, fixes applied, duplicate positions, timings;
- ``ingest_state.json``: a fingerprint of the inputs; a rerun with the same inputs does no work;
- ``cache_<size>.npy`` (see :mod:`ichdlib.ingest.cache`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ichdlib.config import IngestCfg, Params, check_values, load_params
from ichdlib.files import atomic_write, read_json, write_json
from ichdlib.ingest import cache as _cache
from ichdlib.ingest.dicom import read_headers
from ichdlib.ingest.table import (
    _SPLITS,
    CATALOG,
    CATALOG_COLUMNS,
    HEADER_COLUMNS,
    QUARANTINE,
    QUARANTINE_COLUMNS,
    REPORT,
    STATE,
    load_catalog,
    load_quarantine,
    order_slices,
)
from ichdlib.ingest.validity import list_files, slice_problem
from ichdlib.labels import LABELS, read_labels
from ichdlib.locks import output_lock
from ichdlib.runtime import LazyPool, run_tasks
from ichdlib.stages import StageReport

#: Modules the ingest pool's workers import once (forkserver preload).
INGEST_MODULES = ("ichdlib.ingest.dicom", "ichdlib.ingest.cache", "ichdlib.ingest.catalog")

_VERSION = 1


# -- small I/O helpers ------------------------------------------------------------------------------
def _save(work: Path, cat: pd.DataFrame, quarantine: pd.DataFrame) -> None:
    atomic_write(work / CATALOG, lambda t: cat.to_parquet(t, index=False))
    atomic_write(work / QUARANTINE, lambda t: quarantine.to_csv(t, index=False))


# -- scanning -------------------------------------------------------------------------------------------
def _list_files(folder: Path, skipped: list[tuple[str, str]] | None = None) -> list[str]:
    """Every regular file under ``folder`` (sorted; :func:`ichdlib.ingest.validity.list_files`: hidden files,
    FIFOs, devices and unreadable folders go to ``skipped`` with the reason); none when it does not exist."""
    if not folder.is_dir():
        return []
    files, left = list_files(folder)
    if skipped is not None:
        skipped += left
    return files


def _fingerprint(root: Path, files: dict[str, list[str]], csvs: Iterable[Path], **params: Any) -> str:
    """Hash of the input file names, the label files' size/mtime and the parameters that shape the catalog."""
    h = hashlib.sha256(f"v{_VERSION}|{root.resolve()}|{json.dumps(params, sort_keys=True)}".encode())
    for split in _SPLITS:
        h.update(f"|{split}|{len(files[split])}|".encode())
        h.update("\n".join(files[split]).encode())
    for p in csvs:
        st = p.stat() if p.is_file() else None
        h.update(f"|{p.name}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()


def _header_task(paths: list[str]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Worker: headers of some files as a frame (compact to send back) plus the unreadable ones."""
    metas, errors = read_headers(paths)
    for m in metas:
        m["invalid"] = slice_problem(m) or ""  # the slice-validity rule predict applies too
        del m["position"], m["orientation"]
        m["fixes"] = ";".join(m["fixes"])
    return pd.DataFrame(metas), errors


def _scan_headers(paths: list[str], pool: LazyPool, progress: bool) -> tuple[pd.DataFrame, list]:
    n = len(paths)
    step = int(np.clip(n // (8 * pool.workers), 8, 256))
    chunks = [paths[i : i + step] for i in range(0, n, step)]
    frames, errors = [], []
    with tqdm(total=n, desc="headers", unit="file", disable=not progress, mininterval=1.0) as bar:
        for frame, errs in run_tasks(_header_task, chunks, pool):
            frames.append(frame)
            errors += errs
            bar.update(len(frame) + len(errs))
    frames = [f for f in frames if len(f)]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), errors


# -- ordering, neighbours, folds ----------------------------------------------------------------------
def assign_folds(cat: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """Fold per row: StratifiedGroupKFold over studies grouped by patient, stratified on study-level ``any``.

    Test rows get -1. Raises ``ValueError`` when there are fewer patients than folds.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold  # noqa: PLC0415  (scikit-learn/SciPy load only to fit)

    out = np.full(len(cat), -1, dtype=np.int64)
    train = cat["split"].to_numpy() == "train"
    if not train.any():
        return out
    t = cat.loc[train]
    study = t.groupby("study_uid", sort=True).agg(patient=("patient_id", "first"), any=("any", "max"))
    n_patients = study["patient"].nunique()
    if n_patients < folds:
        raise ValueError(
            f"only {n_patients} patient(s) in the training data: cannot make {folds} folds grouped "
            f"by patient (lower ingest.folds / --folds to at most {n_patients})"
        )
    y = (study["any"].fillna(0) > 0.5).astype(int).to_numpy()
    fold_of = np.empty(len(study), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on tiny data
        try:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            splits = list(splitter.split(study, y, groups=study["patient"]))
        except ValueError:  # e.g. one class only
            splits = list(GroupKFold(n_splits=folds).split(study, y, groups=study["patient"]))
    for k, (_, val) in enumerate(splits):
        fold_of[val] = k
    out[train] = pd.Series(fold_of, index=study.index).loc[t["study_uid"]].to_numpy()
    return out


# -- the catalog --------------------------------------------------------------------------------------
def _q(
    sop: Iterable[str], path: Iterable[str], split: Iterable[str] | str, reason: Iterable[str] | str
) -> pd.DataFrame:
    frame = pd.DataFrame({"sop_uid": list(sop), "path": list(path)})
    frame["split"] = split if isinstance(split, str) else list(split)
    frame["reason"] = reason if isinstance(reason, str) else list(reason)
    return frame


def _rows_without_image(wanted: pd.Index, frame: pd.DataFrame, split: str, left_out: set[str],
                        reason: str) -> list[pd.DataFrame]:
    """Quarantine rows for IDs a label/submission file lists but no file of ``split`` provides (IDs already
    quarantined for another reason are not listed twice)."""
    missing = wanted.difference(pd.Index(frame.loc[frame["split"] == split, "sop_uid"]))
    missing = missing.difference(pd.Index(sorted(left_out)))
    return [_q(missing, [""] * len(missing), split, reason)] if len(missing) else []


def _stem(p: str) -> str:
    name = os.path.basename(p)
    return name[:-4] if name.lower().endswith(".dcm") else name


def _scan(
    root: Path,
    files: dict[str, list[str]],
    train_csv: Path,
    sample_sub: Path,
    folds: int,
    seed: int,
    skip_ids: set[str],
    pool: LazyPool,
    progress: bool,
    not_files: dict[str, list[tuple[str, str]]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Headers + labels -> (catalog, quarantine, report). ``not_files``: per split, what file discovery
    left unopened (hidden, FIFOs, unreadable folders), quarantined with the reason."""
    t0 = time.monotonic()
    # scikit-learn takes a second or two to import: do it while the workers read headers
    threading.Thread(target=importlib.import_module, args=("sklearn.model_selection",), daemon=True).start()
    quarantine: list[pd.DataFrame] = []
    split_of = {p: s for s in _SPLITS for p in files[s]}
    for s, entries in (not_files or {}).items():
        if entries:
            quarantine.append(_q([_stem(p) for p, _ in entries], [p for p, _ in entries], s,
                                 [r for _, r in entries]))
    skipped = [p for p in split_of if _stem(p) in skip_ids]
    if skipped:
        quarantine.append(
            _q(
                map(_stem, skipped),
                skipped,
                [split_of[p] for p in skipped],
                "skipped on purpose: listed in ingest.skip_ids",
            )
        )
    to_read = [p for p in split_of if _stem(p) not in skip_ids]
    frame, errors = _scan_headers(to_read, pool, progress)
    t_headers = time.monotonic() - t0
    if errors:
        quarantine.append(
            _q(
                [_stem(p) for p, _ in errors],
                [p for p, _ in errors],
                [split_of[p] for p, _ in errors],
                [f"unreadable: {e}" for _, e in errors],
            )
        )
    left_out = {_stem(p) for p in skipped} | {_stem(p) for p, _ in errors}
    left_out |= {_stem(p) for entries in (not_files or {}).values() for p, _ in entries}
    if frame.empty:
        raise ValueError(
            f"{root}: no readable DICOM files in {sorted({Path(p).parent.name for p in split_of})}"
        )
    frame["split"] = frame["path"].map(split_of)

    def drop(mask: pd.Series, reason: Any) -> None:
        nonlocal frame
        if mask.any():
            bad = frame[mask]
            quarantine.append(
                _q(bad["sop_uid"], bad["path"], bad["split"], reason(bad) if callable(reason) else reason)
            )
            left_out.update(bad["sop_uid"])
            frame = frame[~mask]

    drop(frame["sop_uid"].isin(skip_ids), "skipped on purpose: listed in ingest.skip_ids")
    drop(frame["invalid"] != "", lambda b: b["invalid"])
    frame = frame.assign(_s=frame["split"].map({s: i for i, s in enumerate(_SPLITS)}))
    frame = frame.sort_values(["_s", "path"], kind="mergesort").drop(columns="_s")
    first_path = frame.drop_duplicates("sop_uid").set_index("sop_uid")["path"]
    drop(
        frame.duplicated("sop_uid"),
        lambda b: "duplicate SOP UID: same SOPInstanceUID as " + b["sop_uid"].map(first_path),
    )

    # labels: train images need a complete set of six; label rows need an image
    report: dict[str, Any] = {"label_conflicts": []}
    n_train = int((frame["split"] == "train").sum())
    labels = pd.DataFrame(columns=list(LABELS), dtype=float)
    if n_train or train_csv.is_file():
        if not train_csv.is_file():
            raise FileNotFoundError(
                f"label file {train_csv} not found (needed for {n_train} training images)"
            )
        labels, problems = read_labels(train_csv, values="binary")
        conflicts = problems["reason"].str.startswith("conflicting")
        report["label_conflicts"] = sorted(problems.loc[conflicts, "sop_uid"])
        missing = problems[~conflicts].drop_duplicates("sop_uid").set_index("sop_uid")["reason"]
        drop(
            (frame["split"] == "train") & frame["sop_uid"].isin(missing.index),
            lambda b: "incomplete labels: " + b["sop_uid"].map(missing),
        )
        drop(
            (frame["split"] == "train") & ~frame["sop_uid"].isin(labels.index),
            f"unlabelled: training image without rows in {train_csv.name}",
        )
        quarantine.extend(_rows_without_image(
            labels.index, frame, "train", left_out,
            f"label rows without an image: in {train_csv.name}, no file in the training folder"))
    if sample_sub.is_file():
        wanted = read_labels(sample_sub)[0].index
        drop(
            (frame["split"] == "test") & ~frame["sop_uid"].isin(wanted),
            f"not in sample submission: test image not in {sample_sub.name}",
        )
        quarantine.extend(_rows_without_image(
            wanted, frame, "test", left_out,
            f"submission rows without an image: in {sample_sub.name}, no file in the test folder"))

    # assemble and order
    cat = frame.reset_index(drop=True)
    cat["study_uid"] = cat["study_uid"].where(cat["study_uid"] != "", "series:" + cat["series_uid"])
    cat["patient_id"] = cat["patient_id"].where(cat["patient_id"] != "", "study:" + cat["study_uid"])
    lab = labels.reindex(cat["sop_uid"]).to_numpy(dtype=np.float64, copy=True)
    lab[cat["split"].to_numpy() != "train"] = np.nan
    for j, name in enumerate(LABELS):
        cat[name] = lab[:, j]
    cat["row"] = 0
    cat = order_slices(cat)
    cat["row"] = np.arange(len(cat), dtype=np.int64)
    cat = order_slices(cat)  # neighbours now in cache rows
    cat["fold"] = assign_folds(cat, folds, seed)
    cat = cat[CATALOG_COLUMNS + HEADER_COLUMNS]
    q = pd.concat(quarantine, ignore_index=True) if quarantine else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    report["files"] = {s: len(files[s]) for s in _SPLITS}
    report.update(_counts(cat, q))
    report["seconds"] = {"headers": round(t_headers, 2), "catalog": round(time.monotonic() - t0, 2)}
    return cat, q, report


def _counts(cat: pd.DataFrame, q: pd.DataFrame) -> dict[str, Any]:
    """The report's numbers about a catalog and its quarantine."""
    fixes = cat["fixes"].str.split(";").explode()
    return {
        "slices": {s: int((cat["split"] == s).sum()) for s in _SPLITS},
        "studies": int(cat["study_uid"].nunique()),
        "patients": int(cat.loc[cat["split"] == "train", "patient_id"].nunique()),
        "fold_slices": {
            int(k): int(v) for k, v in cat.loc[cat["fold"] >= 0, "fold"].value_counts().sort_index().items()
        },
        "quarantined": {str(k): int(v) for k, v in q["reason"].str.split(":").str[0].value_counts().items()},
        "dup_z_slices": int(cat["dup_z"].sum()),
        "multi_series_studies": int((cat.groupby("study_uid")["series_uid"].nunique() > 1).sum()),
        "fixes": {str(k): int(v) for k, v in fixes[fixes != ""].value_counts().items()},
    }


def _apply_cache_failures(work: Path, cat: pd.DataFrame, failures: dict[int, str]) -> pd.DataFrame:
    """Drop slices whose pixels failed to decode, quarantine them, recompute neighbours; rewrite files."""
    bad = cat["row"].isin(list(failures))
    if not bad.any():
        return cat
    gone = cat[bad]
    q = load_quarantine(work)
    new = _q(gone["sop_uid"], gone["path"], gone["split"], gone["row"].map(failures))
    q = pd.concat([q, new], ignore_index=True).drop_duplicates(["sop_uid", "path", "reason"])
    cat = order_slices(
        cat[~bad].drop(columns=["slice_index", "n_slices", "prev_row", "next_row", "spacing_z", "dup_z"])
    )
    cat = cat[CATALOG_COLUMNS + HEADER_COLUMNS]
    _save(work, cat, q)
    report = read_json(work / REPORT)
    write_json(work / REPORT, report | _counts(cat, q))
    return cat


def build_catalog(
    root: str | os.PathLike,
    work: str | os.PathLike,
    *,
    size: int = 256,
    workers: int = 0,
    folds: int = 5,
    seed: int = 42,
    skip_ids: Iterable[str] = (),
    train_dir: str = "stage_2_train",
    test_dir: str = "stage_2_test",
    train_csv: str = "stage_2_train.csv",
    sample_submission: str = "stage_2_sample_submission.csv",
    force: bool = False,
    rebuild_cache: bool = False,
    progress: bool = True,
    wait: bool | float = False,
) -> pd.DataFrame:
    """Scan ``root`` (RSNA layout) into ``work``: catalog, quarantine, report and ``cache_<size>.npy``.

    Idempotent: with the same inputs (file names, label files, folds, seed, skip_ids) the catalog is
    loaded, not rebuilt, and a finished cache is left alone; an interrupted cache build resumes.
    ``force`` rebuilds everything; ``rebuild_cache`` only the cache at ``size``. Arguments are validated as
    the ``ingest`` params section is (``ParamsError`` naming the key). The work folder's catalog is locked
    while this runs (:func:`ichdlib.locks.output_lock`): a second ingest of the same work folder raises
    :class:`ichdlib.locks.LockHeld` naming the holder, or waits with ``wait=True`` (seconds with a number).
    """

    check_values(IngestCfg, {"size": size, "workers": workers, "folds": folds, "skip_ids": list(skip_ids)},
                 "ingest settings")
    root, work = Path(root), Path(work)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    work.mkdir(parents=True, exist_ok=True)
    # one writer of this work folder's catalog and caches at a time (a second ingest is told who holds it)
    with output_lock(work / CATALOG, what="ingest", wait=wait):
        return _build_catalog(root, work, size, workers, folds, seed, skip_ids, train_dir, test_dir, train_csv,
                              sample_submission, force, rebuild_cache, progress)


def _build_catalog(root: Path, work: Path, size: int, workers: int, folds: int, seed: int,
                   skip_ids: Iterable[str], train_dir: str, test_dir: str, train_csv: str,
                   sample_submission: str, force: bool, rebuild_cache: bool, progress: bool) -> pd.DataFrame:
    not_files: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    files = {"train": _list_files(root / train_dir, not_files["train"]),
             "test": _list_files(root / test_dir, not_files["test"])}
    if not files["train"] and not files["test"]:
        raise FileNotFoundError(f"{root}: no files in {train_dir}/ or {test_dir}/ (expected the RSNA layout)")
    csv_path, sub_path = root / train_csv, root / sample_submission
    skip = sorted(set(skip_ids))
    fp = _fingerprint(root, files, (csv_path, sub_path), folds=folds, seed=seed, skip_ids=skip,
                      not_files=not_files)
    state = read_json(work / STATE)
    with LazyPool(workers, preload=INGEST_MODULES) as pool:
        if force or state.get("fingerprint") != fp or not (work / CATALOG).is_file():
            for name in (CATALOG, QUARANTINE, REPORT, STATE):
                (work / name).unlink(missing_ok=True)
            _cache.remove_caches(work)
            cat, q, report = _scan(root, files, csv_path, sub_path, folds, seed, set(skip), pool, progress,
                                   not_files)
            _save(work, cat, q)
            write_json(work / REPORT, report)
            state = {"fingerprint": fp, "n_rows": len(cat), "version": _VERSION}
            write_json(work / STATE, state)
        else:
            cat = load_catalog(work)
        t0 = time.monotonic()
        built = not _cache.cache_path(work, size).is_file() or rebuild_cache
        current = {"cat": cat}

        def drop_failed(failures: dict[int, str]) -> None:
            current["cat"] = _apply_cache_failures(work, current["cat"], failures)

        _cache.build_cache(
            cat,
            work,
            size,
            n_rows=int(state["n_rows"]),
            fingerprint=fp,
            pool=pool,
            force=rebuild_cache,
            progress=progress,
            before_publish=drop_failed,
        )
    cat = current["cat"]
    _cache.finish_cache(work, size)
    if built:
        report = read_json(work / REPORT)
        report.setdefault("seconds", {})[f"cache_{size}"] = round(time.monotonic() - t0, 2)
        write_json(work / REPORT, report)
    return cat


def ingest(
    params: Params,
    force: bool = False,
    *,
    size: int | None = None,
    rebuild_cache: bool = False,
    progress: bool = True,
    wait: bool | float = False,
) -> pd.DataFrame:
    """:func:`build_catalog` with the paths and ``ingest`` section of ``params`` (fold seed: ``params.seed``).

    With ``synth.enabled`` the phantom is generated first when the data folder holds no data
    (:func:`ichdlib.phantom.synth.ensure_phantom`; real data is never touched).
    """
    root = params.data_root
    p = params.paths
    if params.synth.enabled:
        from ichdlib.phantom.synth import ensure_phantom  # noqa: PLC0415  (the phantom loads only for synth.enabled, never for real data)

        ensure_phantom(params, progress=progress)
    i = params.ingest
    return build_catalog(
        root,
        params.layout.work,
        size=i.size if size is None else size,
        workers=i.workers,
        folds=i.folds,
        seed=params.seed,
        skip_ids=i.skip_ids,
        train_dir=p.train_dir,
        test_dir=p.test_dir,
        train_csv=p.train_csv,
        sample_submission=p.sample_submission,
        force=force,
        rebuild_cache=rebuild_cache,
        progress=progress,
        wait=wait,
    )


def run_stage(P: Params, force: bool = False, *, progress: bool = True) -> StageReport:
    """Stage 01 (:data:`ichdlib.stages.STAGES`): :func:`ingest`; the report's ``result`` is the catalog, its
    rows the slices and studies per split (and the files quarantined, in ``quarantine.csv``)."""
    cat = ingest(P, force=force, progress=progress)
    n_quarantined = len(load_quarantine(P.layout.work))
    rows = [{"split": split, "slices": int((cat["split"] == split).sum()),
             "studies": int(cat.loc[cat["split"] == split, "study_uid"].nunique()), "files left out": n_quarantined}
            for split in ("train", "test")]
    return StageReport("ingest", rows, result=cat)


def ensure_cache(params: Params, size: int, force: bool = False) -> np.memmap:
    """Open the cache at ``size`` for ``params``' work folder, building it from the catalog when missing."""
    final = params.layout.cache(size)
    if force or not final.is_file() or _cache._sidecar(final).exists():
        ingest(params, force=False, size=size, rebuild_cache=force)
    return _cache.open_cache(params.layout.work, size)


# -- command line ----------------------------------------------------------------------------------
def _cli_defaults() -> dict[str, Any]:
    """``ichd ingest``'s defaults without ``--params``: the params schema's (``ingest`` section, ``seed``)."""
    d = {name: f.default for name, f in IngestCfg.model_fields.items()}
    return {"size": d["size"], "workers": d["workers"], "folds": d["folds"], "seed": Params.model_fields["seed"].default}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd ingest``."""
    parser.add_argument("--params", help="params YAML (paths and ingest section); flags below override it")
    parser.add_argument("--root", help="data folder in the RSNA layout (stage_2_train/, stage_2_test/, CSVs)")
    parser.add_argument("--work", help="output folder for catalog.parquet, quarantine.csv, cache_<size>.npy")
    d = _cli_defaults()
    parser.add_argument("--size", type=int, help=f"cache image size in pixels (default {d['size']})")
    parser.add_argument("--workers", type=int, help=f"worker processes; 0 = one per CPU core (default {d['workers']})")
    parser.add_argument("--folds", type=int, help=f"number of patient folds (default {d['folds']})")
    parser.add_argument("--seed", type=int, help=f"fold seed (default {d['seed']})")
    parser.add_argument(
        "--skip-ids", default=None, help="comma-separated IDs to leave out, e.g. ID_6431af929"
    )
    parser.add_argument("--force", action="store_true", help="rebuild catalog and cache even if up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--wait", action="store_true",
                        help="when another ingest is writing this work folder, wait for it instead of stopping")


def cli(args: argparse.Namespace) -> int:
    """Run ``ichd ingest``."""
    skip = [s.strip() for s in args.skip_ids.split(",") if s.strip()] if args.skip_ids else None
    if args.params:

        over: dict[str, Any] = {
            "ingest": {
                k: v
                for k, v in (
                    ("size", args.size),
                    ("workers", args.workers),
                    ("folds", args.folds),
                    ("skip_ids", skip),
                )
                if v is not None
            }
        }
        if args.seed is not None:
            over["seed"] = args.seed
        paths = {k: v for k, v in (("data_root", args.root), ("work", args.work)) if v}
        if paths:
            over["paths"] = paths
        params = load_params(args.params, over)
        work = params.layout.work
        cat = ingest(params, force=args.force, progress=not args.no_progress, wait=args.wait)
    else:
        if not args.root or not args.work:
            raise ValueError("give --root and --work (or --params)")
        work = Path(args.work)
        d = _cli_defaults()
        cat = build_catalog(
            args.root,
            work,
            # the schema's defaults; 0 or -5 are errors, not "use the default"
            **{k: d[k] if getattr(args, k) is None else getattr(args, k) for k in ("size", "workers", "folds", "seed")},
            skip_ids=skip or (),
            force=args.force,
            progress=not args.no_progress,
            wait=args.wait,
        )
    q = load_quarantine(work)
    kinds = q["reason"].str.split(":").str[0].value_counts() if len(q) else pd.Series(dtype=int)
    n_train, n_test = int((cat["split"] == "train").sum()), int((cat["split"] == "test").sum())
    print(
        f"catalog: {len(cat)} slices ({n_train} train, {n_test} test) in {cat['study_uid'].nunique()} studies"
    )
    print(f"  -> {work / CATALOG}")
    print(f"quarantine: {len(q)} entries -> {work / QUARANTINE}")
    for kind, count in kinds.items():
        print(f"  {kind}: {count}")
    return 0
