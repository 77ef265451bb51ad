"""``ichd validate`` readers on CQ500 / CT-ICH copies as other tools and real downloads write them: file and
folder names, nesting, NIfTI storage, CSV spellings, junk files, series by UID, labels CSV values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from ichdlib.external_sets import CTICH_COLUMNS, CTICH_CSV
from ichdlib.labels import LABELS
from ichdlib.validate import readers as rd
from ichdlib.validate.metrics import PROB_COLUMNS

N_SLICES, SIDE = 6, 24
#: A 0.5 mm in-plane, 5 mm slice affine in RAS, slices along the last axis.
AFFINE = np.diag([0.5, 0.5, 5.0, 1.0])
LESION = slice(1, 3)  # slices with a lesion (0-based, stored order; not symmetric in z)


# ----------------------------------------------------------------------------------------------------
# Tiny CT-ICH-style volumes written with nibabel
# ----------------------------------------------------------------------------------------------------
def _head(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (air, skull, brain, a lesion in LESION slices) and its 0/1 mask, [x, y, z]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    r = np.hypot(yy - SIDE / 2, xx - SIDE / 2)
    hu = np.where(r < 10, 1000.0, -1000.0)
    hu = np.where(r < 8, 35.0, hu)[..., None].repeat(N_SLICES, axis=2)
    hu += rng.normal(0, 3, hu.shape).round()
    mask = np.zeros(hu.shape, np.uint8)
    mask[9 + seed % 3:13 + seed % 3, 8:12, LESION] = 1
    hu[mask == 1] = 70.0
    return hu.round().astype(np.int16), mask


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, slope_inter: tuple[float, float] | None = None
          ) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, path)


def _csv_rows(pid: int, n: int = N_SLICES) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        pos = int(s - 1 in range(LESION.start, LESION.stop))
        rows.append({"PatientNumber": pid, "SliceNumber": s, "Intraventricular": 0, "Intraparenchymal": pos,
                     "Subarachnoid": 0, "Epidural": 0, "Subdural": 0, "No_Hemorrhage": 1 - pos, "Fracture_Yes_No": 0})
    return rows


@pytest.fixture(scope="module")
def ctich_download(tmp_path_factory) -> Path:
    """A CT-ICH 1.3.1 download as unzipped: a top folder, .nii and .nii.gz, padded and unpadded names, the
    JPG folder and the demographics CSV, macOS metadata, ``Masks/``; patient 52 in the CSV only, 53 without a mask, 51 with
    CSV rows for 4 of its 6 slices."""
    top = tmp_path_factory.mktemp("ctich_download")
    root = top / "computed-tomography-images-for-intracranial-hemorrhage-detection-and-segmentation-1.3.1"
    names = {49: ("049.nii.gz", "049.nii.gz"), 50: ("50.nii", "050.nii"), 51: ("051.nii", "51.nii.gz"),
             53: ("053.nii", None)}
    for pid, (vol, mask) in names.items():
        hu, m = _head(pid)
        _save(root / "ct_scans" / vol, hu)
        if mask:
            _save(root / "Masks" / mask, m)  # another tool's spelling of masks/
    (root / "ct_scans" / "._049.nii").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    jpg = root / "Patients_CT" / "049" / "brain"
    jpg.mkdir(parents=True)
    (jpg / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a volume")
    (root / "Patient_demographics.csv").write_text("Patient Number,Age\n49,35\n")
    (root / "hemorrhage_diagnosis.csv").write_text("PatientNumber,SliceNumber\n49,1\n")
    rows = _csv_rows(49) + _csv_rows(50) + _csv_rows(51, 4) + _csv_rows(52) + _csv_rows(53)
    pd.DataFrame(rows, columns=CTICH_COLUMNS).to_csv(root / CTICH_CSV, index=False)
    return top


def test_ctich_download_names_nesting_and_extras(ctich_download):
    assert rd.detect_format(ctich_download) == "ctich"
    ds = rd.read_ctich(ctich_download)
    assert ds.root.name.endswith("-1.3.1")
    assert [it.study for it in ds.items] == ["49", "50", "51", "53"]
    assert [it.mask is not None for it in ds.items] == [True, True, True, False]
    assert ds.labels.loc[["49", "50", "52"], "intraparenchymal"].tolist() == [1, 1, 1]
    msgs = pd.DataFrame(ds.problems)
    text = " | ".join(msgs["message"])
    assert "Patients_CT" not in text and "demographics" not in text.lower()
    assert msgs.loc[msgs["path"].str.endswith("._049.nii"), "message"].str.contains("hidden").all()
    assert "in hemorrhage_diagnosis_raw_ct.csv but no volume" in msgs.set_index("study_uid").loc["52", "message"]
    assert "no mask file" in msgs.set_index("study_uid").loc["53", "message"]
    for it in ds.items:
        case, probs = rd.load_item(it)
        hu, mask = _head(int(it.study))
        # canonical: rows posterior (y flipped), columns patient-left (x flipped), slices inferior -> superior
        np.testing.assert_array_equal(np.stack(case.loaded.hu), hu.transpose(2, 1, 0)[:, ::-1, ::-1])
        if it.mask is None:
            assert case.masks is None
        else:
            assert [int(m.sum()) for m in case.masks] == [int(mask[..., k].sum()) for k in range(N_SLICES)]
        assert case.slice_labels["intraparenchymal"].tolist() == [int(k in range(6)[LESION]) for k in range(6)]
        short = [p for p in probs if "slice row(s)" in p["message"]]
        assert (len(short) == 1) == (it.study == "51")


def test_ctich_csv_spellings(ctich_download, tmp_path):
    root = next(ctich_download.iterdir())
    clean = rd.read_ctich(root)
    d = shutil.copytree(root, tmp_path / "ct", ignore=shutil.ignore_patterns("Patients_CT"))
    csv = pd.read_csv(root / CTICH_CSV)
    # another column order, an extra column, spaces and another case in the header, 1.0 / True and padded numbers
    odd = csv[["SliceNumber", "PatientNumber", *CTICH_COLUMNS[2:]]].assign(Note="x").astype(object)
    odd["PatientNumber"] = odd["PatientNumber"].map("{:03d}".format)
    odd["Intraparenchymal"] = odd["Intraparenchymal"].map({0: "0.0", 1: "1.0"})
    odd["Subdural"] = odd["Subdural"].map({0: "False", 1: "True"})
    odd.columns = [" sliceNumber", "PatientNumber ", *CTICH_COLUMNS[2:], "Note"]
    text = odd.to_csv(index=False) + ",,,,,,,,,\n" * 3  # a byte-order mark, blank rows from a spreadsheet
    (d / CTICH_CSV).write_text(text, encoding="utf-8-sig")
    ds = rd.read_ctich(d)
    assert ds.labels.equals(clean.labels) and not [p for p in ds.problems if "outside" in p["message"]]
    for a, b in zip(ds.items, clean.items, strict=True):
        assert a.slice_labels.equals(b.slice_labels)
    odd.loc[3, "Epidural"] = "yes"  # refused: line 6 of the file (header, an empty line, 3 rows), column Epidural
    lines = odd.to_csv(index=False).splitlines(keepends=True)
    (d / CTICH_CSV).write_text("".join([lines[0], "\n", *lines[1:]]))
    ds = rd.read_ctich(d)
    (bad,) = [p for p in ds.problems if "outside" in p["message"]]
    assert "study 49" in bad["message"] and "row 6: Epidural='yes'" in bad["message"]
    assert "49" not in ds.labels.index and "50" in ds.labels.index


def test_nifti_storage_variants(tmp_path):
    hu, mask = _head(7)
    ref_hu = np.stack(rd.canonical(nib.Nifti1Image(hu, AFFINE))[0])
    ref_mask = rd.canonical(nib.Nifti1Image(mask, AFFINE))[0] > 0
    flip = AFFINE.copy()
    flip[:3, 2], flip[2, 3] = -flip[:3, 2], 5.0 * (N_SLICES - 1)
    volumes = {
        "scaled_uint16": lambda p: _save(p, (hu.astype(np.int32) + 1024).astype(np.uint16), slope_inter=(1.0, -1024.0)),
        "float32": lambda p: _save(p, hu.astype(np.float32)),
        "4d": lambda p: _save(p, hu[..., None]),
        "flipped_z": lambda p: _save(p, hu[..., ::-1].copy(), flip),
    }
    masks = {
        "scaled_uint16": lambda p: _save(p, mask.astype(np.float32)),  # float 0/1
        "float32": lambda p: _save(p, mask.astype(np.uint8) * 255),  # uint8 0/255
        "4d": lambda p: _save(p, (mask * 255.0)[..., None]),  # float 0/255, 4-D
        "flipped_z": lambda p: _save(p, mask[..., ::-1].copy(), np.eye(4)),  # same grid, identity affine
    }
    for name, write in volumes.items():
        write(tmp_path / f"{name}.nii.gz")
        masks[name](tmp_path / f"{name}_mask.nii")
        case, probs = rd.load_item(rd.Item(name, volume=tmp_path / f"{name}.nii.gz", mask=tmp_path / f"{name}_mask.nii"))
        assert case is not None, (name, probs)
        np.testing.assert_array_equal(np.stack(case.loaded.hu), ref_hu, err_msg=name)
        np.testing.assert_array_equal(np.stack(case.masks), ref_mask, err_msg=name)
        oriented = [p for p in probs if "orients it differently" in p["message"]]
        assert len(oriented) == (name == "flipped_z"), (name, probs)


# ----------------------------------------------------------------------------------------------------
# CQ500 copies
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cq_small(external_layout) -> Path:
    return external_layout("cq500", 2, 2)


@pytest.fixture(scope="module")
def cq_reference(cq_small) -> rd.ExternalData:
    return rd.read_cq500(cq_small, 5.0)


def _read_series(ds: rd.ExternalData) -> dict[str, tuple[str, int]]:
    return {it.study: (it.scan.series_uid, it.scan.n_slices) for it in ds.items}


def test_cq500_folder_names_nesting_and_reads_spellings(cq_small, cq_reference, tmp_path):
    top = tmp_path / "download"
    root = shutil.copytree(cq_small, top / "CQ500")
    shutil.move(root / "CQ500CT0 CQ500CT0", root / "CQ500-CT-0")  # a folder per zip, named like the zip
    (root / "qct02" / "CQ500-CT-1").mkdir(parents=True)  # in a batch folder, the zip's own folder inside
    shutil.move(root / "CQ500CT1 CQ500CT1", root / "qct02" / "CQ500-CT-1" / "CQ500CT1 CQ500CT1")
    (root / "CQ500CT0").mkdir()  # an empty second copy of CQ500-CT-0: listed, the full one read
    (root / "__MACOSX" / "CQ500CT0 CQ500CT0").mkdir(parents=True)  # macOS unzip debris: not a copy
    (root / "__MACOSX" / "CQ500CT0 CQ500CT0" / "._CT000000.dcm").write_bytes(b"\x00\x05\x16\x07")
    reads = pd.read_csv(root / "reads.csv").drop(columns="Category")
    reads = pd.concat([reads, reads.iloc[[0]].assign(name="CQ500-CT-7")], ignore_index=True).astype(object)
    for c in [c for c in reads.columns if c.startswith("R2:")]:
        reads[c] = reads[c].map({0: "False", 1: "True"})
    for c in [c for c in reads.columns if c.startswith("R1:")]:
        reads[c] = reads[c].map({0: "0.0", 1: "1.0"})
    reads.columns = [c.replace(":", ": ") for c in reads.columns]
    (root / "reads.csv").write_text(reads.to_csv(index=False), encoding="utf-8-sig")
    (root / "CQ500-CT-7.zip").write_bytes(b"PK\x03\x04")  # downloaded, not unzipped
    assert rd.detect_format(top) == "cq500"
    ds = rd.read_cq500(top, 5.0)
    assert ds.root == root
    assert _read_series(ds) == _read_series(cq_reference)
    assert ds.labels.loc[["CQ500-CT-0", "CQ500-CT-1"]].equals(cq_reference.labels)
    (twice,) = [p for p in ds.problems if "2 folders" in p["message"]]
    assert twice["study_uid"] == "CQ500-CT-0" and twice["path"].endswith("CQ500CT0")
    (missing,) = [p for p in ds.problems if p["study_uid"] == "CQ500-CT-7"]
    assert "only as CQ500-CT-7.zip, not unzipped" in missing["message"] and missing["path"].endswith(".zip")
    assert not [p for p in ds.problems if p["severity"] == "skipped" and "series" not in p["message"]
                and p["study_uid"] != "CQ500-CT-7"], ds.problems


def _rewrite(paths: list[Path], **tags: str) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(p)


def _odd_cq500_copy(cq_small: Path, cq_reference: rd.ExternalData, dst: Path) -> Path:
    """CQ500-CT-0 with files without ``.dcm``, a DICOMDIR, ``.DS_Store`` and ``Thumbs.db``; CQ500-CT-1 with the
    bone series in the thick series' folder, the thick series split over two folders and given a
    StudyInstanceUID of its own (series are told apart by SeriesInstanceUID, the folder is the study)."""
    root = shutil.copytree(cq_small, dst)
    series = cq_reference.series.set_index(["study", "role"])
    s0 = root / "CQ500CT0 CQ500CT0"
    thick0 = s0 / "Unknown Study" / series.loc[("CQ500-CT-0", "thick_soft"), "description"]
    for f in thick0.glob("*.dcm"):
        f.rename(f.with_suffix(""))  # copies without the extension
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dicomdir = pydicom.Dataset()
    dicomdir.file_meta = meta
    dicomdir.FileSetID = "CQ500"
    dicomdir.save_as(s0 / "DICOMDIR", enforce_file_format=True)
    (s0 / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (s0 / "Unknown Study" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not DICOM" * 8)
    study1 = root / "CQ500CT1 CQ500CT1" / "Unknown Study"
    thick1 = study1 / series.loc[("CQ500-CT-1", "thick_soft"), "description"]
    bone1 = study1 / series.loc[("CQ500-CT-1", "bone"), "description"]
    for f in sorted(bone1.iterdir()):
        f.rename(thick1 / f"bone_{f.name}")
    bone1.rmdir()
    files = sorted(f for f in thick1.iterdir() if not f.name.startswith("bone_"))
    (study1 / "part 2").mkdir()
    for f in files[: len(files) // 2]:
        f.rename(study1 / "part 2" / f.name)
    _rewrite([*files[len(files) // 2:], *(study1 / "part 2").iterdir()], StudyInstanceUID=pydicom.uid.generate_uid())
    return root


def test_cq500_file_names_junk_and_series_by_uid(cq_small, cq_reference, tmp_path):
    from ichdlib.serve.discover import discover_all

    root = _odd_cq500_copy(cq_small, cq_reference, tmp_path / "cq")
    found = discover_all(root / "CQ500CT0 CQ500CT0")  # ichd predict's discovery: the DICOMDIR is no study either
    assert len({s.study_uid for s in found.series}) == 1 and len(found.scans) == 1
    ds = rd.read_cq500(root, 5.0)
    assert _read_series(ds) == _read_series(cq_reference)
    by_study = ds.series.groupby("study")["role"].apply(sorted)
    assert by_study.equals(cq_reference.series.groupby("study")["role"].apply(sorted))
    msgs = pd.DataFrame(ds.problems)
    junk = msgs[msgs["path"].str.contains("DICOMDIR|DS_Store|Thumbs", regex=True)]
    assert set(junk["study_uid"]) == {"CQ500-CT-0"} and len(junk) == 3  # each listed once, none a series
    assert "a DICOMDIR" in junk.loc[junk["path"].str.endswith("DICOMDIR"), "message"].item()
    (two,) = msgs[msgs["message"].str.contains("StudyInstanceUIDs")].itertuples()
    assert two.study_uid == "CQ500-CT-1" and two.severity == "warning"
    assert not msgs["message"].str.contains("not scored").any()


def test_validate_on_a_cq500_copy(cq_small, cq_reference, validate_bundle, tmp_path):
    from ichdlib.validate.run import validate

    root = _odd_cq500_copy(cq_small, cq_reference, tmp_path / "cq")
    v = validate(root, [validate_bundle], tmp_path / "out", device="cpu", n_boot=0)
    studies = pd.read_csv(tmp_path / "out" / "studies.csv")
    assert studies["study"].tolist() == ["CQ500-CT-0", "CQ500-CT-1"] and v.metrics["n_studies"] == 2
    assert np.isfinite(studies[PROB_COLUMNS].to_numpy(float)).all()
    problems = pd.read_csv(tmp_path / "out" / "problems.csv", dtype=str, keep_default_na=False)
    assert not problems["message"].str.contains("\n").any()
    assert problems.loc[problems["path"].str.endswith("Thumbs.db"), "study_uid"].tolist() == ["CQ500-CT-0"]


# ----------------------------------------------------------------------------------------------------
# Generic DICOM + labels CSV
# ----------------------------------------------------------------------------------------------------
def test_labels_csv_spellings_and_refusals(cq_small, tmp_path):
    truth = pd.read_csv(cq_small / "phantom_truth.csv")
    frame = truth[["study_uid", *LABELS]].astype(object)
    frame["any"] = frame["any"].map({0: "0.0", 1: "1.0"})
    frame["subdural"] = frame["subdural"].map({0: " False", 1: "TRUE "})
    frame.columns = ["studyinstanceuid", "ANY", *[c.capitalize() for c in LABELS[1:]]]
    path = tmp_path / "labels.csv"
    path.write_text(frame.to_csv(index=False), encoding="utf-8-sig")
    labels, key, problems = rd.read_labels_csv(path)
    assert key == "StudyInstanceUID" and not problems
    assert labels.equals(truth.set_index("study_uid")[list(LABELS)].rename_axis("StudyInstanceUID"))
    ds = rd.read_dicom(cq_small, path, 5.0)
    assert sorted(it.study for it in ds.items) == sorted(truth["study_uid"]) and len(ds.labels) == 2
    frame.loc[1, "Epidural"] = "2"
    frame = frame.rename(columns={"studyinstanceuid": "patient_id"})
    frame["patient_id"] = ["p0", "p1"]
    frame.to_csv(path, index=False)
    labels, key, problems = rd.read_labels_csv(path)
    assert key == "PatientID" and list(labels.index) == ["p0"]
    (p,) = problems
    assert p["study_uid"] == "p1" and "row 3: Epidural='2'" in p["message"] and "\n" not in p["message"]


# ----------------------------------------------------------------------------------------------------
# End to end: one line per problem, the other studies scored, no NaN
# ----------------------------------------------------------------------------------------------------
def test_validate_on_a_ctich_download(ctich_download, validate_bundle, tmp_path):
    from ichdlib.validate.run import validate

    v = validate(ctich_download, [validate_bundle], tmp_path / "out", device="cpu", n_boot=0)
    studies = pd.read_csv(tmp_path / "out" / "studies.csv")
    assert studies["study"].tolist() == [49, 50, 51, 53]
    assert np.isfinite(studies[PROB_COLUMNS].to_numpy(float)).all()
    assert v.metrics["n_studies"] == 4 and v.metrics["n_labelled"] == 5
    problems = pd.read_csv(tmp_path / "out" / "problems.csv", dtype=str, keep_default_na=False)
    assert not problems["message"].str.contains("\n").any() and (problems["path"] != "").all()
    json.loads((tmp_path / "out" / "metrics.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
