"""External validation (issue 19): phantom layouts, readers, series choice, thin slabs, metrics, outputs,
operating points and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdlib.cli import main as ichd
from ichdlib.external_sets import CTICH_COLUMNS
from ichdlib.labels import LABELS
from ichdlib.serve.series import (
    SeriesInfo,
    choose_series,
    classify,
    is_bone,
    is_contrast,
    slab_groups,
    to_slabs,
)
from ichdlib.validate import readers as rd
from ichdlib.validate.metrics import PROB_COLUMNS, STUDY_COLUMNS, compute_metrics


# ----------------------------------------------------------------------------------------------------
# Fixtures: the phantom in both layouts (small), a trained smoke bundle
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cq500(external_layout) -> Path:
    return external_layout("cq500", 5, 2)


@pytest.fixture(scope="module")
def ctich(external_layout) -> Path:
    return external_layout("ctich", 4, 1)


@pytest.fixture(scope="module")
def bundle(validate_bundle) -> Path:
    """The untrained smoke bundle of ``tests/conftest.py`` (the export itself is tested on the trained run below)."""
    return validate_bundle


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    from ichdlib.serve.bundle import export

    return export(trained, tmp_path_factory.mktemp("validate_exported") / "bundle")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_nan(out: Path) -> None:
    studies = pd.read_csv(out / "studies.csv")
    assert np.isfinite(studies[PROB_COLUMNS].to_numpy(float)).all()
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))


# ----------------------------------------------------------------------------------------------------
# Units: reader majority, series roles, slabs, thresholds
# ----------------------------------------------------------------------------------------------------
def test_reader_majority(tmp_path):
    cols = {f"R{r}:{f}": 0 for r in (1, 2, 3) for f in ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH")}
    rows = [dict(cols, name="CQ500-CT-0"), dict(cols, name="CQ500-CT-1"), dict(cols, name="CQ500-CT-2")]
    for r in (1, 2):  # two of three read ICH + SDH on study 1; one reads EDH
        rows[1].update({f"R{r}:ICH": 1, f"R{r}:SDH": 1})
    rows[1]["R3:EDH"] = 1
    rows[2]["R2:IPH"] = 2  # not a read
    labels, problems = rd.reader_majority(pd.DataFrame(rows).astype(str), tmp_path / "reads.csv")
    assert list(labels.columns) == list(LABELS) and list(labels.index) == ["CQ500-CT-0", "CQ500-CT-1"]
    assert labels.loc["CQ500-CT-1"].to_dict() == {"any": 1, "epidural": 0, "intraparenchymal": 0,
                                                  "intraventricular": 0, "subarachnoid": 0, "subdural": 1}
    assert labels.loc["CQ500-CT-0"].sum() == 0
    (p,) = problems
    assert "CQ500-CT-2" in p["message"] and "R2:IPH='2'" in p["message"] and p["path"].endswith("reads.csv")


def test_series_roles_and_choice():
    assert is_bone("CT BONE", "") and is_bone("CT 0.625mm", "H70h") and is_bone("", "BONEPLUS")
    assert not is_bone("CT 5mm", "STANDARD") and not is_bone("CT Plain", "H30s")
    assert is_contrast("CT POST CONTRAST", "") and is_contrast("CT C+ 5mm", "") and is_contrast("CT 5mm", "IOHEXOL")
    assert not is_contrast("CT NON CONTRAST", "") and not is_contrast("CT 5mm Plain", "")
    tags = {"SeriesDescription": "CT 5mm", "ConvolutionKernel": "STANDARD", "ContrastBolusAgent": ""}
    assert classify("ok", tags, 5.0, 5.0) == "thick_soft"
    assert classify("ok", tags, 0.625, 5.0) == "thin"
    assert classify("ok", dict(tags, ConvolutionKernel="BONE"), 5.0, 5.0) == "bone"
    assert classify("ok", dict(tags, ContrastBolusAgent="IOHEXOL"), 5.0, 5.0) == "contrast"
    assert classify("localizer", tags, None, 5.0) == "localizer" and classify("not_ct", tags, 5.0, 5.0) == "other"

    def info(uid, role, thick, n):
        return SeriesInfo("s", uid, n, role, thickness=thick)

    series = [info("thin", "thin", 0.625, 240), info("bone", "bone", 0.625, 241), info("c", "contrast", 5.0, 30),
              info("t3", "thick_soft", 3.0, 50), info("t5", "thick_soft", 5.0, 30), info("t5b", "thick_soft", 5.0, 31)]
    chosen = choose_series(series, 5.0)
    assert chosen.series_uid == "t5b" and chosen.read  # closest thickness, then most images
    why = {s.series_uid: s.reason for s in series}
    assert "bone" in why["bone"] and "contrast" in why["c"] and "further from the model's 5 mm" in why["t3"]
    assert "fewer images" in why["t5"]
    assert choose_series([info("b", "bone", 5.0, 30), info("c", "contrast", 5.0, 30)], 5.0) is None
    last = [info("b", "bone", 5.0, 30), info("c", "contrast", 5.0, 30)]  # predict: a caveat beats no answer
    assert choose_series(last, 5.0, fallback=True).series_uid == "c" and "less reliable" in last[1].reason
    only_thin = [info("thin", "thin", 0.625, 240)]
    assert choose_series(only_thin, 5.0).series_uid == "thin" and "slabs" in only_thin[0].reason


def test_pre_contrast_is_not_contrast():
    # CQ500 names its plain series e.g. "CT PRE CONTRAST 5MM STD": a pre-contrast series is read
    assert not is_contrast("CT PRE CONTRAST 5MM STD", "")


def test_thin_to_slabs():
    z = np.arange(17) * 0.625
    groups = slab_groups(z, 5.0)
    assert [len(g) for g in groups] == [8, 8, 1]
    hu = [np.full((4, 4), float(i), np.float32) for i in range(17)]
    slices = pd.DataFrame({"sop_uid": [f"s{i}" for i in range(17)], "z": z, "path": "p"})
    table, images = to_slabs(slices, hu, 5.0)
    assert len(images) == 3 and images[0][0, 0] == pytest.approx(3.5) and images[1][0, 0] == pytest.approx(11.5)
    assert table["z"].iloc[0] == pytest.approx(z[:8].mean()) and table["slab"].iloc[0].split(";")[0] == "s0"


def test_operating_point_rules():
    from ichdlib.serve.operating import choose_threshold, operating_points, study_probability

    y = np.array([0] * 10 + [1] * 20)
    p = np.concatenate([np.linspace(0.0, 0.5, 10), np.linspace(0.3, 1.0, 20)])
    t95 = choose_threshold(y, p, "sens95")
    assert (p[y == 1] >= t95).mean() >= 0.95 and (p[y == 1] >= np.nextafter(t95, 2)).mean() < 0.95
    tj = choose_threshold(y, p, "youden")
    j = lambda t: (p[y == 1] >= t).mean() + (p[y == 0] < t).mean() - 1  # noqa: E731
    assert j(tj) == pytest.approx(max(j(t) for t in np.unique(p)))
    with pytest.raises(ValueError):
        choose_threshold(np.ones(4), np.ones(4), "youden")
    frame = pd.DataFrame({c: y for c in LABELS})
    frame["epidural"] = 0  # one class only: 0.5, said so
    op = operating_points(frame, pd.DataFrame({c: p for c in LABELS}), "sens95")
    assert op["thresholds"]["any"] == pytest.approx(t95) and op["thresholds"]["epidural"] == 0.5
    assert op["fallback"] == ["epidural"]
    sp = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4], [0.2, 0.1]])
    assert study_probability(sp).tolist() == [0.5, 0.9]
    assert study_probability(sp, "top3") == pytest.approx([1 / 3, 0.5])


# ----------------------------------------------------------------------------------------------------
# Readers on the phantom layouts
# ----------------------------------------------------------------------------------------------------
def test_cq500_layout_and_series_choice(cq500):
    assert rd.detect_format(cq500) == "cq500"
    reads = pd.read_csv(cq500 / "reads.csv")
    assert reads.columns[:3].tolist() == ["name", "Category", "R1:ICH"] and len(reads.columns) == 2 + 3 * 14
    ds = rd.read_cq500(cq500, 5.0)
    assert len(ds.items) == 5 and not [p for p in ds.problems if p["severity"] == "skipped" and "series" not in p["message"]]
    read = ds.series[ds.series["read"]]
    assert len(read) == 5 and set(read["role"]) == {"thick_soft"}
    assert set(ds.series["role"]) >= {"thick_soft", "thin", "bone", "localizer"}
    bone = ds.series[ds.series["role"] == "bone"]
    thin = ds.series[ds.series["role"] == "thin"]
    # "most slices" would have read the thin bone series: it has one image more than the thin soft one
    assert (bone.set_index("study")["n_images"] > thin.set_index("study")["n_images"]).all()
    truth = pd.read_csv(cq500 / "phantom_truth.csv").set_index("name")
    assert truth["any"].sum() >= 1 and (ds.labels.index == truth.index).all()


def test_flipped_nifti_affine_gives_the_same_slices(ctich, tmp_path):
    import nibabel as nib

    flipped = _copy(ctich, tmp_path / "flipped")
    for sub in ("ct_scans", "masks"):
        for f in sorted((flipped / sub).glob("*.nii")):
            img = nib.load(f)
            data = np.asanyarray(img.dataobj)
            aff = img.affine.copy()
            # store with the first (left-right) and last (z) axes reversed, and say so in the affine
            for axis in (0, 2):
                n = data.shape[axis]
                aff[:3, 3] = aff[:3, 3] + aff[:3, axis] * (n - 1)
                aff[:3, axis] = -aff[:3, axis]
            data = data[::-1, :, ::-1].copy()
            nib.save(nib.Nifti1Image(data, aff, img.header), f)
    # the slice CSV numbers slices as stored: reverse them too
    csv = pd.read_csv(flipped / rd.CTICH_CSV)
    n_by = csv.groupby("PatientNumber")["SliceNumber"].transform("max")
    csv["SliceNumber"] = n_by - csv["SliceNumber"] + 1
    csv.to_csv(flipped / rd.CTICH_CSV, index=False)
    a, b = rd.read_ctich(ctich), rd.read_ctich(flipped)
    assert a.labels.equals(b.labels)
    for ia, ib in zip(a.items, b.items, strict=True):
        ca, _ = rd.load_item(ia)
        cb, _ = rd.load_item(ib)
        np.testing.assert_array_equal(np.stack(ca.loaded.hu), np.stack(cb.loaded.hu))
        np.testing.assert_array_equal(np.stack(ca.masks), np.stack(cb.masks))
        assert ca.slice_labels.to_numpy().tolist() == cb.slice_labels.to_numpy().tolist()
    assert sum(m.sum() for it in a.items for m in rd.load_item(it)[0].masks) > 0


def test_thin_only_study_is_read_as_slabs(cq500, tmp_path):
    d = _copy(cq500, tmp_path / "thin_only")
    ds = rd.read_cq500(d, 5.0)
    study = ds.series[ds.series["study"] == "CQ500-CT-0"]
    keep = set(study.loc[study["role"] == "thin", "description"])
    for folder in (d / "CQ500CT0 CQ500CT0" / "Unknown Study").iterdir():
        if folder.name not in keep:
            shutil.rmtree(folder)
    ds = rd.read_cq500(d, 5.0)
    item = next(it for it in ds.items if it.study == "CQ500-CT-0")
    n_thin = item.scan.n_slices
    case, problems = rd.load_item(item)
    assert item.scan.slab_mm == 5.0 and len(case.loaded.hu) == math.ceil(n_thin / 8)
    assert any("reformatted into" in p["message"] and p["study_uid"] == "CQ500-CT-0" for p in problems)
    row = ds.series[(ds.series["study"] == "CQ500-CT-0") & ds.series["read"]]
    assert row["role"].tolist() == ["thin"] and "slabs" in row["reason"].iloc[0]


# ----------------------------------------------------------------------------------------------------
# ichd validate end to end: the output contract
# ----------------------------------------------------------------------------------------------------
def test_validate_cq500_output_contract(cq500, bundle, tmp_path, capsys):
    from ichdlib.serve.bundle import Bundle

    out = tmp_path / "out"
    rc = ichd(["validate", str(cq500), "--bundle", str(bundle), "--bundle", str(bundle), "--out", str(out),
               "--device", "cpu", "--n-boot", "50"])
    printed = capsys.readouterr().out
    assert rc == 0 and "cq500: 5 studies scored" in printed and "5 thick_soft" in printed
    for name in ("studies.csv", "labels.csv", "series.csv", "problems.csv", "slices.csv", "metrics.json",
                 "report.md", "figures/roc.png", "figures/reliability.png", "compare/1_bundle/studies.csv"):
        assert (out / name).is_file(), name
    studies = pd.read_csv(out / "studies.csv")
    assert studies.columns.tolist() == STUDY_COLUMNS
    assert studies["study"].tolist() == [f"CQ500-CT-{n}" for n in range(5)]
    series = pd.read_csv(out / "series.csv")
    read = series[series["read"]].set_index("study")
    assert (read.loc[studies["study"], "series_uid"].to_numpy() == studies["series_uid"].to_numpy()).all()
    assert set(read["role"]) == {"thick_soft"} and series["reason"].str.len().gt(0).all()
    assert pd.read_csv(out / "problems.csv").columns.tolist() == ["study_uid", "series_uid", "path", "severity",
                                                                   "message"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_studies"] == 5 and set(m["labels"]) == set(LABELS)
    for c, r in m["labels"].items():
        assert {"auc", "auc_ci", "sensitivity", "specificity", "threshold", "n_pos", "n_neg"} <= set(r)
        assert r["n_pos"] + r["n_neg"] == 5
        assert r["threshold"] == pytest.approx(Bundle.load(bundle).thresholds[c])  # the bundle's operating point
    # metrics.json is a function of studies.csv and labels.csv alone
    again = compute_metrics(pd.read_csv(out / "studies.csv"), pd.read_csv(out / "labels.csv"), m["thresholds"],
                            n_boot=50, seed=0)
    assert json.loads(json.dumps(again)) == {"n_studies": m["n_studies"], "labels": m["labels"]}
    # two copies of one bundle: a paired difference of exactly zero
    same = m["comparison"]["1_bundle"]["labels"]["any"]
    assert same["delta"] == 0 and same["p_value"] == 1 and same["auc1"] == m["labels"]["any"]["auc"]
    _no_nan(out)
    assert "External validation" in (out / "report.md").read_text()


def test_validate_ctich_with_masks(ctich, bundle, tmp_path):
    from ichdlib.validate.run import validate

    v = validate(ctich, [bundle], tmp_path / "out", threshold=0.0, device="cpu", n_boot=0)
    studies = pd.read_csv(tmp_path / "out" / "studies.csv")
    assert studies["study"].tolist() == [49, 50, 51, 52] and studies["series_uid"].isna().all()
    assert v.metrics["format"] == "ctich" and v.metrics["n_studies"] == 4
    point = v.metrics["pointing"]
    assert point is not None and point["labels"]["any"]["n_slices"] > 0
    assert 0 <= point["labels"]["any"]["hit_rate"] <= point["labels"]["any"]["hit_rate_tolerance"] <= 1
    _no_nan(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------
# Bad input: one line naming the study and the file, the others still scored, no NaN
# ----------------------------------------------------------------------------------------------------
def _messages(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "problems.csv", dtype=str, keep_default_na=False)


def test_bad_cq500_inputs(cq500, bundle, tmp_path):
    from ichdlib.validate.run import validate

    d = _copy(cq500, tmp_path / "bad")
    ds = rd.read_cq500(d, 5.0)
    # CQ500-CT-1: only bone-kernel and contrast series
    s1 = ds.series[ds.series["study"] == "CQ500-CT-1"]
    for folder in (d / "CQ500CT1 CQ500CT1" / "Unknown Study").iterdir():
        if folder.name in set(s1.loc[s1["role"].isin(["thick_soft", "thin"]), "description"]):
            shutil.rmtree(folder)
    # CQ500-CT-2: a study folder without images
    shutil.rmtree(d / "CQ500CT2 CQ500CT2")
    (d / "CQ500CT2 CQ500CT2" / "Unknown Study").mkdir(parents=True)
    # CQ500-CT-3: reads.csv row without a folder; CQ500CT9: a folder without a reads.csv row
    shutil.move(d / "CQ500CT3 CQ500CT3", d / "CQ500CT9 CQ500CT9")
    v = validate(d, [bundle], tmp_path / "out", device="cpu", n_boot=0)
    msgs = _messages(tmp_path / "out")

    def one(study: str, text: str) -> pd.Series:
        hit = msgs[(msgs["study_uid"] == study) & msgs["message"].str.contains(text, regex=False)]
        assert len(hit) >= 1, (study, text, msgs.to_string())
        row = hit.iloc[0]
        assert "\n" not in row["message"] and row["path"]
        return row

    r = one("CQ500-CT-1", "only bone-kernel")
    assert "CQ500CT1" in r["path"]
    assert "CQ500CT2" in one("CQ500-CT-2", "holds no images")["path"]
    assert one("CQ500-CT-3", "no folder CQ500CT3")["path"].endswith("reads.csv")
    assert "CQ500CT9" in one("CQ500-CT-9", "no row in reads.csv")["path"]
    studies = pd.read_csv(tmp_path / "out" / "studies.csv")
    assert sorted(studies["study"]) == ["CQ500-CT-0", "CQ500-CT-4", "CQ500-CT-9"]
    assert v.metrics["n_studies"] == 2  # CQ500-CT-9 has no reference labels
    _no_nan(tmp_path / "out")


def test_bad_ctich_inputs(ctich, bundle, tmp_path):
    import nibabel as nib

    from ichdlib.validate.run import validate

    d = _copy(ctich, tmp_path / "bad")
    img = nib.load(d / "ct_scans" / "049.nii")  # stored values 0..4095 instead of HU
    raw = (np.asanyarray(img.dataobj).astype(np.int32) + 1024).clip(0, 4095).astype(np.int16)
    nib.save(nib.Nifti1Image(raw, img.affine), d / "ct_scans" / "049.nii")
    m = nib.load(d / "masks" / "050.nii")  # a mask of another shape
    nib.save(nib.Nifti1Image(np.asanyarray(m.dataobj)[:, :, :-2].copy(), m.affine), d / "masks" / "050.nii")  # a copy: the file is mapped
    csv = pd.read_csv(d / rd.CTICH_CSV)
    csv.loc[csv["PatientNumber"] == 51, "Subdural"] = csv.loc[csv["PatientNumber"] == 51, "Subdural"].replace(0, 3)
    csv.to_csv(d / rd.CTICH_CSV, index=False)
    v = validate(d, [bundle], tmp_path / "out", device="cpu", n_boot=0)
    msgs = _messages(tmp_path / "out")
    hu = msgs[msgs["message"].str.contains("not HU")]
    assert hu["study_uid"].astype(str).tolist() == ["49"] and hu["path"].iloc[0].endswith("049.nii")
    shape = msgs[msgs["message"].str.contains("differs from the volume")]
    assert shape["study_uid"].astype(str).tolist() == ["50"] and shape["path"].iloc[0].endswith("masks/050.nii")
    bad = msgs[msgs["message"].str.contains("outside {0, 1}")]
    assert "study 51" in bad["message"].iloc[0] and bad["path"].iloc[0].endswith(rd.CTICH_CSV)
    studies = pd.read_csv(tmp_path / "out" / "studies.csv")
    assert studies["study"].tolist() == [50, 51, 52]  # 49 not scored; 51 scored without labels
    assert v.metrics["n_studies"] == 2
    _no_nan(tmp_path / "out")


def test_dicom_folder_with_bad_labels_csv(cq500, bundle, tmp_path):
    from ichdlib.validate.run import validate

    truth = pd.read_csv(cq500 / "phantom_truth.csv")
    labels = truth.rename(columns={"study_uid": "StudyInstanceUID"})[["StudyInstanceUID", *LABELS]]
    labels.loc[0, "subdural"] = 2
    labels.to_csv(tmp_path / "labels.csv", index=False)
    v = validate(cq500, [bundle], tmp_path / "out", fmt="dicom", labels=tmp_path / "labels.csv", device="cpu",
                 n_boot=0)
    msgs = _messages(tmp_path / "out")
    bad = msgs[msgs["message"].str.contains("outside {0, 1}")]
    assert bad["study_uid"].tolist() == [truth["study_uid"][0]] and bad["path"].iloc[0].endswith("labels.csv")
    assert len(v.studies) == 5 and v.metrics["n_studies"] == 4
    _no_nan(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------
# The bundle: operating point and training thickness recorded; old bundles still load
# ----------------------------------------------------------------------------------------------------
def test_bundle_records_operating_point_and_old_bundles_load(trained, exported, tmp_path):
    from ichdlib.serve.bundle import MANIFEST, Bundle, manifest_digest
    from ichdlib.serve.operating import choose_threshold, internal_oof_studies

    bundle = exported
    b = Bundle.load(bundle)
    y, p = internal_oof_studies(trained, b.ensemble["weights"])
    assert len(y) == b.manifest["operating_point"]["n_studies"] == len(p) and np.isfinite(p.to_numpy()).all()
    op = b.manifest["operating_point"]
    assert op["rule"] == "youden" and set(op["thresholds"]) == set(LABELS) and op["n_studies"] > 0
    assert op["thresholds"]["any"] == pytest.approx(choose_threshold(y["any"], p["any"], "youden"))
    assert b.training_mm > 0 and b.manifest["training"]["n_studies"] > 0
    old = _copy(bundle, tmp_path / "old")
    m = json.loads((old / MANIFEST).read_text())
    del m["operating_point"], m["training"]
    m["integrity"] = manifest_digest(m)
    (old / MANIFEST).write_text(json.dumps(m))
    ob = Bundle.load(old)
    assert ob.thresholds == dict.fromkeys(LABELS, 0.5) and ob.training_mm == 5.0 and ob.aggregate == "max"


def test_predict_uses_the_bundle_thresholds_and_writes_series(cq500, bundle, tmp_path, capsys):
    from ichdlib.serve.bundle import Bundle

    study = cq500 / "CQ500CT0 CQ500CT0"
    assert ichd(["predict", str(study), "--bundle", str(bundle), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "the bundle's operating point" in printed and "read: soft-tissue axial series" in printed
    doc = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert doc["threshold"] == pytest.approx(Bundle.load(bundle).thresholds)
    series = pd.read_csv(tmp_path / "p" / "series.csv")
    assert series["read"].sum() == 1 and series.loc[series["read"], "role"].item() == "thick_soft"
    assert doc["studies"][0]["series_reason"].startswith("read: soft-tissue axial series")
    assert ichd(["predict", str(study), "--bundle", str(bundle), "--out", str(tmp_path / "q"), "--device", "cpu",
                 "--threshold", "0.3"]) == 0
    assert json.loads((tmp_path / "q" / "predictions.json").read_text())["threshold"] == dict.fromkeys(LABELS, 0.3)


def test_synth_layout_cli(tmp_path, capsys):
    assert ichd(["synth", "--layout", "ctich", "--out", str(tmp_path / "c"), "--studies", "2", "--size", "32",
                 "--workers", "1"]) == 0
    assert "2 studies in the ctich layout" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "c" / "ct_scans").iterdir()) == ["049.nii", "050.nii"]
    csv = pd.read_csv(tmp_path / "c" / rd.CTICH_CSV)
    assert csv.columns.tolist() == CTICH_COLUMNS
    assert csv.groupby("PatientNumber")["SliceNumber"].min().tolist() == [1, 1]


def test_demo_external_params_follow_the_demo(repo):
    """params/demo_external.yaml is params/demo.yaml plus the external section (same run: only 07 reruns)."""
    from ichdlib.config import load_params

    demo = load_params(repo / "params" / "demo.yaml").model_dump(mode="json")
    ext = load_params(repo / "params" / "demo_external.yaml").model_dump(mode="json")
    assert ext.pop("external")["data"] and demo.pop("external")["data"] is None
    assert ext == demo


def test_notebook_07_library_call_and_stage(trained, ctich, tmp_path):
    """What notebook 07 runs (its own models exported, outputs under reports/<run>/external) and when."""
    from ichdlib import stages
    from ichdlib.config import load_params
    from ichdlib.validate.run import run_external

    assert not stages.applies(stages.STAGES["07"], trained)
    P = load_params(Path(__file__).resolve().parents[1] / "params" / "smoke.yaml",
                    {"root": str(trained.root), "external": {"data": str(ctich), "n_boot": 0, "pointing": False}})
    assert stages.applies(stages.STAGES["07"], P)
    v = run_external(P)
    assert (P.work_dir / "bundle" / "bundle.json").is_file() and v.out == P.reports_dir / "external"
    assert (v.out / "metrics.json").is_file() and v.metrics["n_studies"] == 4 and v.metrics["pointing"] is None


def test_ichd_run_leaves_stage_07_out_without_external_data(repo, tmp_path):
    from ichdlib.run import plan

    smoke = repo / "params" / "smoke.yaml"
    assert [d.stage.number for d in plan(smoke, overrides={"root": str(tmp_path)})] == [
        "01", "02", "02b", "03", "04", "05", "06"]  # 02b: listed, switched off by cnn3d.enabled
    with pytest.raises(ValueError, match="needs params external.data"):
        plan(smoke, only=["07"], overrides={"root": str(tmp_path)})
    over = {"root": str(tmp_path), "external": {"data": str(tmp_path / "ext")}}
    assert [d.stage.number for d in plan(smoke, only=["07"], overrides=over)] == ["07"]
