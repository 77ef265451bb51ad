"""Bad input never gives a silently wrong answer: bundles, params and flags, labels, file discovery and
two ingests on one work folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdlib.cli import main as ichd
from ichdlib.config import ParamsError, load_params
from ichdlib.ingest import table
from ichdlib.ingest.cache import cache_path, open_cache
from ichdlib.ingest.validity import list_files
from ichdlib.labels import KAGGLE_ROW_ORDER, LABELS, LabelFileError, read_labels
from ichdlib.phantom.synth import write_ct_dicom
from ichdlib.serve.bundle import MANIFEST, Bundle, BundleError, manifest_digest

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_bundle(smoke_params, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "u"
    old = os.umask(0o077)  # even a strict umask gives colleagues a readable bundle
    try:
        Bundle.untrained(smoke_params, folds=1).save(out)
    finally:
        os.umask(old)
    return out


def _tamper(src: Path, dst: Path, edit, *, reseal: bool = True) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    edit(m)
    if reseal:  # a deliberate edit with a matching checksum: the schema must still catch it
        m["integrity"] = manifest_digest(m)
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def test_exported_bundle_is_readable_by_others(saved_bundle):
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [saved_bundle, *saved_bundle.rglob("*")]}
    assert all(m == (0o755 if p.is_dir() else 0o644) for p, m in modes.items()), modes
    Bundle.load(saved_bundle)  # and it loads


def _first_file(m: dict) -> tuple[dict, str]:
    entry = m["backbones"][0]
    return entry, entry["files"]["0"]


def _point_outside(target: str):
    def edit(m):
        entry, rel = _first_file(m)
        entry["files"]["0"] = target
        m["files"][target] = m["files"].pop(rel)
    return edit


@pytest.mark.parametrize("name, edit, match", [
    ("absolute", _point_outside("/etc/passwd"), "not a plain relative name"),
    ("dotdot", _point_outside("../../etc/passwd"), "not a plain relative name"),
    ("weights", lambda m: m["ensemble"].update(weights={k: 50.0 for k in m["ensemble"]["weights"]}),
     r"outside \[0, 1\]"),
    ("weights_sum", lambda m: m["ensemble"].update(weights={k: 0.9 for k in m["ensemble"]["weights"]}),
     "sum to"),
    ("member", lambda m: m["ensemble"].update(members=["seq9"], weights={"seq9": 1.0}), "names no model"),
    ("size", lambda m: m["backbones"][0].update(size=100000), r"backbones\.0\.size"),
    ("no_backbones", lambda m: m.pop("backbones"), "backbones: missing"),
    ("no_files", lambda m: m.pop("files"), "files: missing"),
    ("no_params", lambda m: m.pop("params"), "params: missing"),
    ("bad_params", lambda m: m["params"]["cnn"]["backbones"][0].update(epochs=True), "params.cnn"),
    ("bool_size", lambda m: m["backbones"][0].update(size=True), r"backbones\.0\.size"),
    ("not_object", lambda m: m.clear(), "not an ichd-bundle"),
])
def test_bundle_json_is_not_trusted(saved_bundle, tmp_path, capsys, name, edit, match):
    bad = _tamper(saved_bundle, tmp_path / name, edit)
    with pytest.raises(BundleError, match=match) as err:
        Bundle.load(bad)
    assert "\n" not in str(err.value) and str(bad / MANIFEST) in str(err.value)
    # the command line shows the same one line, no traceback
    assert ichd(["predict", str(tmp_path), "--bundle", str(bad), "--out", str(tmp_path / "o")]) == 2
    errtext = capsys.readouterr().err
    assert "Traceback" not in errtext and errtext.count("\n") == 1 and match.split("\\")[0][:8] in errtext


def test_manifest_is_covered_by_the_checksum(saved_bundle, tmp_path):
    bad = _tamper(saved_bundle, tmp_path / "edited", lambda m: m["ensemble"]["weights"].update(
        {k: v for k, v in m["ensemble"]["weights"].items()}) or m.update(run="someone_else"), reseal=False)
    with pytest.raises(BundleError, match="manifest checksum differs"):
        Bundle.load(bad)
    nan = tmp_path / "nan"
    shutil.copytree(saved_bundle, nan)
    text = (nan / MANIFEST).read_text().replace('"val_center_crop": 0.8', '"val_center_crop": NaN')
    (nan / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(nan)


def test_weights_link_out_of_the_bundle_is_refused(saved_bundle, tmp_path):
    bad = tmp_path / "link"
    shutil.copytree(saved_bundle, bad)
    m = json.loads((bad / MANIFEST).read_text())
    w = bad / _first_file(m)[1]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(w, outside)
    w.unlink()
    w.symlink_to(outside)  # same bytes, same checksum, but not inside the bundle
    with pytest.raises(BundleError, match="leads outside the bundle"):
        Bundle.load(bad)


# --------------------------------------------------------------------------------------------------
# Params and flags
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("", "empty params file"),
    ("# only a comment\n", "empty params file"),
    ("- a\n- b\n", "expected a mapping"),
    ("cnn:\n  backbones:\n    - epochs: true\n", r"cnn\.backbones\.0\.epochs: expected a number, got a boolean"),
    ("seq:\n  epochs: false\n", r"seq\.epochs: expected a number"),
    ("cnn:\n  lr_typo: 1\n", "unknown key"),
    ("ensemble:\n  members: [seq1, seq3]\n", r"ensemble\.members: 'seq3'"),
    ("ensemble:\n  members: ['cnn:resnet99_64']\n", "names no backbone"),
    ("seq:\n  backbones: [nope]\n", r"seq\.backbones: \['nope'\]"),
    ("ingest:\n  folds: 3\ncnn:\n  folds: [0, 3]\n", r"cnn\.folds"),
    ("ingest:\n  size: 100000\n", r"ingest\.size"),
])
def test_params_errors_name_the_key(tmp_path, text, match):
    p = tmp_path / "params" / "x.yaml"
    p.parent.mkdir()
    p.write_text(text)
    with pytest.raises(ParamsError, match=match):
        load_params(p)


def test_booleans_stay_booleans_and_numbers_numbers(tmp_path):
    p = tmp_path / "params" / "ok.yaml"
    p.parent.mkdir()
    p.write_text("run: ok\nwindows:\n  learnable: true\ncnn:\n  backbones:\n    - pretrained: true\n      epochs: 2\n")
    P = load_params(p)
    assert P.windows.learnable is True and P.cnn.backbones[0].pretrained is True and P.cnn.backbones[0].epochs == 2


@pytest.fixture(scope="module")
def tiny_rsna(tmp_path_factory) -> Path:
    """3 patients x 3 slices (train) + one slice whose pixels are cut short, labels for all."""
    root = tmp_path_factory.mktemp("tiny_rsna")
    rows = []
    hu = np.where(np.hypot(*np.mgrid[-16:16, -16:16]) < 12, 40.0, -1000.0).astype(np.float32)
    for p in range(3):
        for k in range(3):
            sop = f"ID_{p}{k}aa"
            write_ct_dicom(root / "stage_2_train" / f"{sop}.dcm", hu + 10 * k, sop_uid=sop, study_uid=f"S{p}",
                           series_uid=f"S{p}.1", patient_id=f"P{p}", z=5.0 * k)
            rows += [(f"{sop}_{c}", 0) for c in KAGGLE_ROW_ORDER]
    write_ct_dicom(root / "stage_2_train" / "ID_cut.dcm", hu, sop_uid="ID_cut", study_uid="S0",
                   series_uid="S0.1", patient_id="P0", z=12.5, truncate=0.5)
    rows += [(f"ID_cut_{c}", 0) for c in KAGGLE_ROW_ORDER]
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(root / "stage_2_train.csv", index=False)
    return root


@pytest.mark.parametrize("flags, match", [
    (["--size", "0"], "size"), (["--size", "-5"], "size"), (["--folds", "0"], "folds"),
    (["--workers", "-1"], "workers"),
])
def test_ingest_flags_are_validated_like_yaml(tiny_rsna, tmp_path, capsys, flags, match):
    work = tmp_path / "w"
    rc = ichd(["ingest", "--root", str(tiny_rsna), "--work", str(work), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err and err.count("\n") == 1
    assert not work.exists() or not any(p.suffix != ".lock" for p in work.iterdir())  # nothing half-written


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, ok", [("1", True), ("0.0", True), ("1.0", True), ("2", False), ("-1", False),
                                       ("yes", False), ("", False), ("0.5", False), ("nan", False)])
def test_labels_must_be_0_or_1(tmp_path, value, ok):
    rows = [("ID_ab_" + c, "0") for c in KAGGLE_ROW_ORDER] + [("ID_cd_" + c, "0") for c in KAGGLE_ROW_ORDER]
    rows[8] = (rows[8][0], value)
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\n" + "".join(f"{i},{v}\n" for i, v in rows))
    if ok:
        wide, _ = read_labels(path, values="binary")
        assert list(wide.columns) == list(LABELS) and wide.isin([0.0, 1.0]).all().all()
    else:
        with pytest.raises(LabelFileError, match=rf"stage_2_train.csv: line 10: Label '{value}' for 'ID_cd_"):
            read_labels(path, values="binary")


# --------------------------------------------------------------------------------------------------
# File discovery
# --------------------------------------------------------------------------------------------------
def test_unreadable_folder_is_reported(tmp_path, monkeypatch):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.dcm").write_bytes(b"x")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.dcm").write_bytes(b"x")
    real = os.scandir

    def scandir(path="."):  # as if chmod 000 (the tests may run as root, who reads everything)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    files, skipped = list_files(tmp_path)
    assert files == [str(tmp_path / "ok" / "a.dcm")]
    assert skipped == [(str(tmp_path / "locked"), "skipped: folder cannot be read (Permission denied)")]


# --------------------------------------------------------------------------------------------------
# Two ingests on one work folder
# --------------------------------------------------------------------------------------------------
def _ingest_proc(root: Path, work: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "ichdlib", "ingest", "--root", str(root), "--work", str(work),
                             "--size", "32", "--workers", "1", "--folds", "3", "--no-progress", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_work(work: Path) -> None:
    """A consistent result: the cut slice quarantined, every catalog row a real image in the cache."""
    cat = table.load_catalog(work)
    q = table.load_quarantine(work)
    assert "ID_cut" not in set(cat["sop_uid"]) and "ID_cut" in set(q["sop_uid"])
    assert len(cat) == 9 and not cache_path(work, 32).with_suffix(".npy.partial").exists()
    cache = open_cache(work, 32)
    assert all(np.asarray(cache[r]).std() > 0 for r in cat["row"])


@pytest.mark.slow
def test_two_ingests_never_leave_a_corrupt_catalog(tiny_rsna, tmp_path):
    """Two ingests started together, a third 0.7 s later, a fourth 0.7 s later asked to wait: each ends with
    a correct result or a one-line message naming the holder; the catalog is never corrupt."""
    work = tmp_path / "w"
    procs = [_ingest_proc(tiny_rsna, work), _ingest_proc(tiny_rsna, work)]
    time.sleep(0.7)
    procs.append(_ingest_proc(tiny_rsna, work))
    time.sleep(0.7)
    waiting = _ingest_proc(tiny_rsna, work, "--wait")
    results = [(p.wait(120), *p.communicate()) for p in procs]
    for rc, _out, err in results:
        assert "Traceback" not in err, err
        assert rc == 0 or (rc == 2 and "is being written by pid" in err and "ingest" in err
                           and err.count("\n") == 1), (rc, err)
    assert any(rc == 0 for rc, _, _ in results)
    rc, (out, err) = waiting.wait(120), waiting.communicate()
    assert rc == 0 and "catalog: 9 slices" in out, err
    _check_work(work)


# --------------------------------------------------------------------------------------------------
# Positions: an outlier keeps its place, no arithmetic on its value
# --------------------------------------------------------------------------------------------------
def test_outlier_position_is_handled_by_order(tmp_path, smoke_params):
    from ichdlib.ingest.validity import capped_z
    from ichdlib.serve.predict import predict_dir

    np.testing.assert_array_equal(capped_z(np.array([0.0, 5.0, 10.0, 15.0])), [0.0, 5.0, 10.0, 15.0])
    np.testing.assert_array_equal(capped_z(np.array([0.0, 5.0, 10.0, 9000.0])), [0.0, 5.0, 10.0, 25.0])
    np.testing.assert_array_equal(capped_z(np.array([0.0, 5.0, 10.0, 20.0])), [0.0, 5.0, 10.0, 20.0])  # a missing slice
    hu = np.where(np.hypot(*np.mgrid[-16:16, -16:16]) < 12, 40.0, -1000.0).astype(np.float32)
    for k, z in enumerate([0.0, 5.0, 10.0, 15.0, 9000.0]):
        write_ct_dicom(tmp_path / "s" / f"{k}.dcm", hu + k, sop_uid=f"1.2.3.{k}", study_uid="1.2.3",
                       series_uid="1.2.3.1", z=z)
    pred = predict_dir(tmp_path / "s", Bundle.untrained(smoke_params, folds=1), device="cpu")
    assert len(pred.slices) == 5 and pred.slices["z"].tolist()[-1] == 9000.0  # kept, in its place
    assert np.isfinite(pred.slices.filter(regex="^p_").to_numpy(float)).all()
    (msg,) = pred.problems.loc[pred.problems["message"].str.contains("gap"), "message"]
    assert "8985 mm after z=15" in msg and pred.problems["severity"].eq("warning").all()


def test_fifo_read_directly_fails_at_once(tmp_path, capsys):
    from ichdlib.ingest.dicom import DicomReadError, read_header, read_hu

    fifo = tmp_path / "x.dcm"
    os.mkfifo(fifo)
    for read in (read_header, read_hu):
        with pytest.raises(DicomReadError, match="not a regular file"):
            read(fifo)
    assert ichd(["predict", str(tmp_path), "--bundle", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--threshold", "nan"]) == 2
    assert "--threshold nan" in capsys.readouterr().err
