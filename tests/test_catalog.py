"""ichdlib.ingest.catalog / ichdlib.ingest.cache: z order, neighbours, folds, labels, quarantine, the resumable HU cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from builders import hu_image, variant_files, write_slice

from ichdlib.cli import main
from ichdlib.files import read_json
from ichdlib.ingest import cache, catalog, table
from ichdlib.ingest.dicom import read_hu
from ichdlib.labels import LABELS, SUBTYPES

SIZE = 24


def _label_rows(sop: str, values: dict[str, float]) -> list[tuple[str, float]]:
    return [(f"{sop}_{k}", values.get(k, 0.0)) for k in (*SUBTYPES, "any")]


def make_rsna(root: Path, seed: int = 0) -> dict:
    """A small RSNA-layout folder with every quirk the ingest must handle; returns what was planted."""
    rng = np.random.default_rng(seed)
    train, test = root / "stage_2_train", root / "stage_2_test"
    plan: dict = {"studies": {}, "positive": set()}
    labels: list[tuple[str, float]] = []

    def new_id() -> str:
        return "ID_" + rng.bytes(5).hex()

    def slice_file(
        folder: Path, study: str, patient: str, z: float, shape=(40, 40), **kw
    ) -> tuple[str, Path]:
        sop = kw.pop("sop", None) or new_id()
        hu = hu_image(shape, seed=int(rng.integers(1 << 30)))
        path = write_slice(
            folder / f"{new_id()}.dcm",
            (hu + 1024).astype(np.int16),
            sop=sop,
            study=study,
            series=study + "_se",
            patient=patient,
            z=z,
            **kw,
        )
        return sop, path

    # 8 training studies of 6 patients (P0, P1 have two studies each), 5 slices each, files in random order
    for s, patient in enumerate(["P0", "P0", "P1", "P1", "P2", "P3", "P4", "P5"]):
        study = f"ID_study{s}"
        zs = list(100.0 + 5.0 * rng.permutation(5))  # z written out of order
        sops = []
        for k, z in enumerate(zs):
            shape = (44, 36) if (s, k) == (3, 0) else (40, 40)
            sop, path = slice_file(train, study, patient, z, shape=shape)
            if shape != (40, 40):
                plan["odd"] = path
            positive = s % 2 == 0 and z in (105.0, 110.0)
            labels += _label_rows(sop, {"any": 1.0, "subdural": 1.0} if positive else {})
            if positive:
                plan["positive"].add(sop)
            sops.append((z, sop, path))
        plan["studies"][study] = sorted(sops)
    # a second slice at the same z in study 0 (kept, flagged)
    z_dup = plan["studies"]["ID_study0"][2][0]
    sop, path = slice_file(train, "ID_study0", "P0", z_dup, sop="ID_0000dup")
    labels += _label_rows(sop, {})
    plan["dup"] = (sop, plan["studies"]["ID_study0"][2][1])
    # duplicated label rows for one image, a conflicting row for another
    dup_sop = plan["studies"]["ID_study1"][0][1]
    labels += _label_rows(dup_sop, {})
    conflict_sop = plan["studies"]["ID_study1"][1][1]
    labels.append((f"{conflict_sop}_subdural", 1.0))
    plan["label_dup"], plan["label_conflict"] = dup_sop, conflict_sop
    # pixels cut short: the header reads, the cache pass fails -> dropped with its neighbours recomputed
    z_cut, cut_sop, cut_path = plan["studies"]["ID_study5"][2]
    cut_path.write_bytes(cut_path.read_bytes()[:-100])
    plan["cut"] = (cut_sop, cut_path)
    # a file that is not DICOM, with labels
    (train / "ID_corrupt.dcm").write_bytes(b"\x00garbage" * 50)
    labels += _label_rows("ID_corrupt", {})
    # unlabelled image, label rows without an image, an MR image, a duplicate SOP, an ID skipped on purpose
    plan["unlabelled"] = slice_file(train, "ID_lonely", "P9", 0.0)[1]
    labels += _label_rows("ID_ghost", {"any": 1.0, "epidural": 1.0})
    mr_sop, plan["mr"] = slice_file(train, "ID_mr", "P8", 0.0, modality="MR")
    labels += _label_rows(mr_sop, {})
    src = plan["studies"]["ID_study4"][0][2]
    plan["copy"] = train / "ID_zzzzcopy.dcm"
    shutil.copy(src, plan["copy"])
    skip_sop, plan["skipped"] = slice_file(train, "ID_study7", "P5", 500.0, sop="ID_skipme")
    labels += _label_rows(skip_sop, {})
    # test split: two studies, one extra file that is not in the sample submission
    test_sops = []
    for t in range(2):
        for z in (20.0, 10.0, 30.0):
            test_sops.append(slice_file(test, f"ID_test{t}", f"T{t}", z)[0])
    plan["test_extra"] = slice_file(test, "ID_test0", "T0", 40.0)[1]
    plan["test_sops"] = test_sops
    pd.DataFrame(labels, columns=["ID", "Label"]).to_csv(root / "stage_2_train.csv", index=False)
    sub = [row for sop in test_sops for row in _label_rows(sop, {})]
    pd.DataFrame([(i, 0.5) for i, _ in sub], columns=["ID", "Label"]).to_csv(
        root / "stage_2_sample_submission.csv", index=False
    )
    return plan


def ingest(root: Path, work: Path, workers: int = 1, **kw) -> pd.DataFrame:
    opts = {
        "size": SIZE,
        "workers": workers,
        "folds": 3,
        "seed": 0,
        "skip_ids": ["ID_skipme"],
        "progress": False,
    }
    return catalog.build_catalog(root, work, **(opts | kw))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    plan = make_rsna(root)
    work = root / "work"
    cat = ingest(root, work, workers=2)  # the process-pool path
    return plan, root, work, cat, table.load_quarantine(work)


def test_catalog_columns_and_order(data):
    plan, root, work, cat, _ = data
    assert list(cat.columns[: len(table.CATALOG_COLUMNS)]) == table.CATALOG_COLUMNS
    pd.testing.assert_frame_equal(cat, table.load_catalog(work))
    n_train = int((cat["split"] == "train").sum())
    assert (cat["split"].iloc[:n_train] == "train").all() and (cat["split"].iloc[n_train:] == "test").all()
    for study, slices in plan["studies"].items():
        got = cat[cat["study_uid"] == study]
        if study in ("ID_study0", "ID_study5"):
            continue  # checked below (duplicate z, dropped slice)
        assert got["sop_uid"].tolist() == [s for _, s, _ in slices]
        assert got["z"].tolist() == sorted(z for z, _, _ in slices)
        assert got["slice_index"].tolist() == list(range(5)) and (got["n_slices"] == 5).all()
        assert got["spacing_z"].tolist() == [5.0] * 5
    assert cat.loc[cat["split"] == "test", "z"].tolist() == [10.0, 20.0, 30.0] * 2
    assert cat.loc[cat["split"] == "test", LABELS].isna().all().all()
    assert (cat.loc[cat["split"] == "test", "fold"] == -1).all()


def test_neighbours_point_to_z_neighbours(data):
    _, _, _, cat, _ = data
    by_row = cat.set_index("row")
    for _, study in cat.groupby(["split", "study_uid"]):
        rows = study["row"].tolist()
        assert study["prev_row"].tolist() == [rows[0], *rows[:-1]]  # first slice points to itself
        assert study["next_row"].tolist() == [*rows[1:], rows[-1]]
        assert (by_row.loc[study["prev_row"], "z"].to_numpy() <= study["z"].to_numpy()).all()


def test_duplicate_z_kept_and_flagged(data):
    plan, _, _, cat, q = data
    dup, other = plan["dup"]
    study = cat[cat["study_uid"] == "ID_study0"]
    assert len(study) == 6 and (study["n_slices"] == 6).all()
    same = study[study["dup_z"]]
    assert sorted(same["sop_uid"]) == sorted([dup, other]) and same["z"].nunique() == 1
    assert same["sop_uid"].tolist() == sorted(same["sop_uid"])  # ties broken by sop_uid
    assert int(same["slice_index"].diff().iloc[1]) == 1 and same["spacing_z"].iloc[0] == 0.0
    assert dup not in set(q["sop_uid"])


def test_folds_group_patients_and_stratify(data):
    _, _, _, cat, _ = data
    train = cat[cat["split"] == "train"]
    assert set(train["fold"]) == {0, 1, 2}
    assert (train.groupby("patient_id")["fold"].nunique() == 1).all()
    assert (train.groupby("study_uid")["fold"].nunique() == 1).all()
    positive_folds = train.loc[train["any"] == 1, "fold"].unique()
    assert len(positive_folds) >= 2  # positives spread over folds
    again = catalog.assign_folds(cat, 3, seed=0)
    np.testing.assert_array_equal(again, cat["fold"].to_numpy())


def test_labels_with_duplicate_and_conflicting_rows(data):
    plan, _, work, cat, q = data
    lab = cat.set_index("sop_uid")
    assert lab.loc[plan["label_dup"], list(LABELS)].tolist() == [0.0] * 6
    assert lab.loc[plan["label_conflict"], "subdural"] == 1.0  # the conflict keeps the maximum
    for sop in plan["positive"]:
        assert (
            lab.loc[sop, "any"] == 1.0 and lab.loc[sop, "subdural"] == 1.0 and lab.loc[sop, "epidural"] == 0.0
        )
    report = read_json(work / catalog.REPORT)
    assert report["label_conflicts"] == [plan["label_conflict"]]
    assert plan["label_conflict"] not in set(q["sop_uid"])


def test_quarantine_names_every_file_left_out(data):
    plan, root, _, cat, q = data
    assert list(q.columns) == table.QUARANTINE_COLUMNS
    by_path = q.set_index("path")
    corrupt = str(root / "stage_2_train" / "ID_corrupt.dcm")
    assert by_path.loc[corrupt, "reason"].startswith(f"unreadable: {corrupt}: not a DICOM file")
    assert by_path.loc[corrupt, "sop_uid"] == "ID_corrupt"
    cut_sop, cut_path = plan["cut"]
    assert by_path.loc[str(cut_path), "reason"].startswith(f"unreadable: {cut_path}: truncated pixel data")
    assert by_path.loc[str(plan["unlabelled"]), "reason"].startswith("unlabelled:")
    assert by_path.loc[str(plan["mr"]), "reason"] == "not CT: modality MR"
    assert by_path.loc[str(plan["copy"]), "reason"].startswith("duplicate SOP UID: same SOPInstanceUID as ")
    assert by_path.loc[str(plan["skipped"]), "reason"].startswith("skipped on purpose")
    assert by_path.loc[str(plan["test_extra"]), "reason"].startswith("not in sample submission")
    ghost = q[q["sop_uid"] == "ID_ghost"]
    assert ghost["reason"].str.startswith("label rows without an image").all() and ghost["path"].tolist() == [
        ""
    ]
    assert (
        len(q) == 8 and q["sop_uid"].is_unique
    )  # ID_corrupt listed once, not also as "label rows without..."
    left_out = set(q["path"]) - {""}
    assert not left_out & set(cat["path"])
    files = {str(p) for p in (root / "stage_2_train").iterdir()} | {
        str(p) for p in (root / "stage_2_test").iterdir()
    }
    assert files == set(cat["path"]) | left_out  # nothing dropped silently


def test_undecodable_slice_dropped_and_neighbours_skip_it(data):
    plan, _, _, cat, _ = data
    cut_sop, _ = plan["cut"]
    study = cat[cat["study_uid"] == "ID_study5"]
    assert cut_sop not in set(study["sop_uid"]) and len(study) == 4 and (study["n_slices"] == 4).all()
    assert study["slice_index"].tolist() == [0, 1, 2, 3]
    rows = study["row"].tolist()
    assert rows[2] - rows[1] == 2  # the cache row of the dropped slice is skipped ...
    assert (
        study["next_row"].iloc[1] == rows[2] and study["prev_row"].iloc[2] == rows[1]
    )  # ... by the neighbours
    assert study["spacing_z"].tolist() == [5.0, 10.0, 5.0, 5.0]


def test_cache_matches_read_hu_and_resize(data):
    plan, _, work, cat, _ = data
    mm = cache.open_cache(work, SIZE)
    assert isinstance(mm, np.memmap) and mm.dtype == np.int16 and not mm.flags.writeable
    assert mm.shape == (len(cat) + 1, SIZE, SIZE)  # + the zero row of the dropped slice
    odd = cat.index[cat["path"] == str(plan["odd"])][0]
    for i in [0, 7, odd, len(cat) - 1]:
        r = cat.iloc[i]
        hu, _ = read_hu(r["path"])
        want = np.rint(cv2.resize(hu, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
        np.testing.assert_allclose(mm[r["row"]], want, atol=1)  # float rounding at .5 ties
        assert np.mean(mm[r["row"]] == want) > 0.99
    assert cat.iloc[odd][["rows", "cols"]].tolist() == [44, 36]
    dropped = sorted(set(range(mm.shape[0])) - set(cat["row"]))
    assert len(dropped) == 1 and not mm[dropped[0]].any()
    assert -1100 < mm[cat["row"].to_numpy()].min() and mm.max() == 1200  # air and the skull ring


def test_decode_resized_matches_read_hu_then_resize(tmp_path):
    from ichdlib.ingest.dicom import read_header

    wrap = np.mod(hu_image((50, 50), seed=4), 4096).astype(np.uint16)
    files = [
        *variant_files(tmp_path),
        write_slice(tmp_path / "wrap.dcm", wrap, bits_stored=12, intercept=0.0),
    ]
    for path in files:
        meta = read_header(path)
        for size in (24, 64):
            got = cache.decode_resized(path, meta, size)
            want = cache.resize_hu(read_hu(path)[0], size)
            assert got.dtype == np.int16 and got.shape == (size, size)
            np.testing.assert_allclose(got, want, atol=1, err_msg=f"{path.name} {size}")
            assert np.mean(got == want) > 0.98


def test_resize_hu_enlarges_and_clips():
    small = np.array([[0.0, 100.0], [40000.0, -40000.0]], np.float32)
    out = cache.resize_hu(small, 4)
    assert out.shape == (4, 4) and out.dtype == np.int16
    assert out.max() == 32767 and out.min() == -32768
    np.testing.assert_array_equal(cache.resize_hu(np.full((7, 9), 12.4), 3), np.full((3, 3), 12))


def _mtimes(work: Path) -> dict[str, int]:
    # the lock file records who last ran (not an output)
    return {p.name: p.stat().st_mtime_ns for p in sorted(work.iterdir()) if p.suffix != ".lock"}


def test_rerun_is_idempotent(data, monkeypatch):
    _, root, work, cat, _ = data
    before = _mtimes(work)
    assert {"catalog.parquet", "quarantine.csv", f"cache_{SIZE}.npy", "ingest_state.json"} <= set(before)

    def no_work(*a, **k):
        raise AssertionError("a rerun with the same inputs must not scan or decode")

    monkeypatch.setattr(catalog, "_scan", no_work)
    monkeypatch.setattr(cache, "_fill_chunk", no_work)
    again = ingest(root, work, workers=2)
    pd.testing.assert_frame_equal(again, cat)
    assert _mtimes(work) == before


def test_interrupted_cache_build_resumes(data, tmp_path, monkeypatch):
    _, root, work, cat, _ = data
    calls = []
    real = cache._fill_chunk

    def flaky(task):
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the build
        calls.append(task[2])
        return real(task)

    monkeypatch.setattr(cache, "_fill_chunk", flaky)
    work2 = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        ingest(root, work2)
    final = cache.cache_path(work2, SIZE)
    assert not final.exists() and final.with_name(final.name + ".partial").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        cache.open_cache(work2, SIZE)
    # rerun: the two finished chunks are not decoded again
    done, calls[:] = list(calls), []
    monkeypatch.setattr(cache, "_fill_chunk", lambda task: (calls.append(task[2]), real(task))[1])
    cat2 = ingest(root, work2)
    assert calls and not set(calls) & set(done)
    pd.testing.assert_frame_equal(cat2.drop(columns="path"), cat.drop(columns="path"))
    np.testing.assert_array_equal(cache.open_cache(work2, SIZE), cache.open_cache(work, SIZE))
    assert sorted(p.name for p in work2.glob("cache_*")) == [f"cache_{SIZE}.npy"]


def test_interrupted_while_dropping_failed_slices(data, tmp_path, monkeypatch):
    """Killed after every chunk is done but before the catalog drops the undecodable slice: a rerun
    finishes without decoding anything again and quarantines the slice once."""
    plan, root, work, cat, q = data
    real = catalog._apply_cache_failures

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(catalog, "_apply_cache_failures", die)
    work2 = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        ingest(root, work2)
    assert not cache.cache_path(work2, SIZE).exists()
    monkeypatch.setattr(catalog, "_apply_cache_failures", real)
    monkeypatch.setattr(cache, "_fill_chunk", lambda task: pytest.fail("nothing left to decode"))
    cat2 = ingest(root, work2)
    pd.testing.assert_frame_equal(cat2.drop(columns="path"), cat.drop(columns="path"))
    q2 = table.load_quarantine(work2)
    assert (q2["sop_uid"] == plan["cut"][0]).sum() == 1 and len(q2) == len(q)
    assert sorted(p.name for p in work2.glob("cache_*")) == [f"cache_{SIZE}.npy"]


def test_force_and_changed_inputs_rebuild(data, tmp_path):
    _, root, work, cat, _ = data
    work2 = tmp_path / "w"
    shutil.copytree(work, work2)
    before = _mtimes(work2)
    ingest(root, work2, force=True)
    after = _mtimes(work2)
    assert all(after[k] > before[k] for k in ("catalog.parquet", f"cache_{SIZE}.npy"))
    other = ingest(root, work2, folds=2)  # different parameters: a new catalog
    assert set(other["fold"]) == {-1, 0, 1}


def test_another_size_from_the_same_catalog(data, tmp_path):
    _, root, work, cat, _ = data
    work2 = tmp_path / "w"
    shutil.copytree(work, work2)
    cat_mtime = (work2 / "catalog.parquet").stat().st_mtime_ns
    cat16 = ingest(root, work2, size=16)
    pd.testing.assert_frame_equal(cat16, cat)
    assert (work2 / "catalog.parquet").stat().st_mtime_ns == cat_mtime
    assert cache.open_cache(work2, 16).shape == (cache.open_cache(work, SIZE).shape[0], 16, 16)


def test_ingest_and_ensure_cache_from_params(data, tmp_path):
    from ichdlib.config import load_params

    _, root, work, cat, _ = data
    work2 = tmp_path / "w"
    shutil.copytree(work, work2)
    P = load_params(
        None,
        {
            "root": str(tmp_path),
            "seed": 0,
            "synth": {"enabled": False},
            "paths": {"data_root": str(root), "work": str(work2)},
            "ingest": {"size": SIZE, "workers": 1, "folds": 3, "skip_ids": ["ID_skipme"]},
        },
    )
    before = _mtimes(work2)
    pd.testing.assert_frame_equal(catalog.ingest(P, progress=False), cat)  # same inputs: loaded, not rebuilt
    assert _mtimes(work2) == before
    mm = catalog.ensure_cache(P, 16)  # another size from the same catalog
    assert (
        mm.shape == (len(cat) + 1, 16, 16)
        and (work2 / "catalog.parquet").stat().st_mtime_ns == before["catalog.parquet"]
    )
    r = cat.iloc[3]
    np.testing.assert_allclose(mm[r["row"]], cache.resize_hu(read_hu(r["path"])[0], 16), atol=1)
    assert catalog.ensure_cache(P, 16).filename == mm.filename


def test_missing_cache_and_catalog_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ichd ingest"):
        cache.open_cache(tmp_path, 64)
    with pytest.raises(FileNotFoundError, match="ichd ingest"):
        table.load_catalog(tmp_path)
    with pytest.raises(FileNotFoundError, match="no files in stage_2_train/ or stage_2_test/"):
        catalog.build_catalog(tmp_path, tmp_path / "w")


def test_too_few_patients_for_folds(data, tmp_path):
    _, root, _, _, _ = data
    with pytest.raises(ValueError, match="patient"):
        ingest(root, tmp_path / "w", folds=20)


def test_cli(data, tmp_path, capsys):
    _, root, _, cat, _ = data
    rc = main(
        [
            "ingest",
            "--root",
            str(root),
            "--work",
            str(tmp_path / "w"),
            "--size",
            "16",
            "--workers",
            "1",
            "--folds",
            "3",
            "--seed",
            "0",
            "--skip-ids",
            "ID_skipme",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and f"catalog: {len(cat)} slices" in out and "unreadable: 2" in out
    assert (tmp_path / "w" / "cache_16.npy").is_file()
    assert main(["ingest", "--root", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_corrupt_file_never_stops_the_run_in_workers(tmp_path):
    """A folder of nothing but broken files is reported as such, not as a crash."""
    train = tmp_path / "stage_2_train"
    train.mkdir()
    for i in range(3):
        (train / f"ID_{i}.dcm").write_text("x")
    pd.DataFrame(columns=["ID", "Label"]).to_csv(tmp_path / "stage_2_train.csv", index=False)
    with pytest.raises(ValueError, match="no readable DICOM files"):
        catalog.build_catalog(tmp_path, tmp_path / "w", workers=1, progress=False)
    assert [f for f in os.listdir(tmp_path / "w") if not f.endswith(".lock")] == []


def test_phantom_quirks_are_handled(ingested):
    """The shared smoke phantom (ichdlib.phantom.synth, quirks on): every injected quirk ends up where it belongs."""
    import json

    P = ingested
    cat, q = table.load_catalog(P.work_dir), table.load_quarantine(P.work_dir)
    quirks = json.loads((P.data_root / "phantom_manifest.json").read_text())["quirks"]
    checked = (
        "corrupt",
        "intercept_wrap",
        "duplicate_slice",
        "missing_slice",
        "odd_size",
        "multi_window",
        "monochrome1",
        "duplicate_label_rows",
    )
    assert all(quirks[k] for k in checked), {k: len(quirks[k]) for k in checked}
    mm = cache.open_cache(P.work_dir, P.ingest.size)
    by_sop = cat.set_index("sop_uid")
    for item in quirks["corrupt"]:
        assert q.loc[q["sop_uid"] == item["sop_uid"], "reason"].str.startswith("unreadable:").all()
        assert item["sop_uid"] not in by_sop.index
    wrapped = [i["sop_uid"] for i in quirks["intercept_wrap"] if i["sop_uid"] in by_sop.index]
    assert wrapped and all("intercept_wrap_12bit" in by_sop.loc[s, "fixes"] for s in wrapped)
    hu = mm[by_sop.loc[wrapped, "row"].to_numpy()]
    assert hu.max() < 3000 and (hu < -900).mean() > 0.1  # air is air again (unfixed it would read ~3097 HU)
    for item in quirks["duplicate_slice"]:
        dup = by_sop.loc[item["sop_uids"]]
        assert dup["dup_z"].all() and dup["z"].nunique() == 1
    for item in quirks["missing_slice"]:
        a, b = by_sop.loc[item["between"][0]], by_sop.loc[item["between"][1]]
        study = cat[cat["study_uid"] == item["study_uid"]]
        assert a["next_row"] == b["row"] and a["spacing_z"] > 1.5 * study["spacing_z"].median()
    for item in quirks["odd_size"]:
        study = cat[cat["study_uid"] == item["study_uid"]]
        assert (study["rows"] == item["rows"]).all() and (study["cols"] == item["cols"]).all()
    for item in quirks["multi_window"]:
        assert "window_first_value" in by_sop.loc[item["sop_uid"], "fixes"]
    for item in quirks["monochrome1"]:
        assert "monochrome1" in by_sop.loc[item["sop_uid"], "fixes"].split(";")
        slab = mm[by_sop.loc[item["sop_uid"], "row"]]
        assert slab.max() < 3100 and (slab < -900).mean() > 0.1
    for item in quirks["duplicate_label_rows"]:
        if item["sop_uid"] in by_sop.index:
            assert by_sop.loc[item["sop_uid"], list(LABELS)].notna().all()
    files = {str(p) for d in ("stage_2_train", "stage_2_test") for p in (P.data_root / d).iterdir()}
    assert files == set(cat["path"]) | (set(q["path"]) - {""})
