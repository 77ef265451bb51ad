"""``ichd predict --dicomweb ... --store`` against a real PACS: Orthanc with its DICOMweb plugin, started here on
127.0.0.1 (free port, temporary configuration and storage) and stopped at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ORTHANC = shutil.which("Orthanc")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")


def dicomweb_plugin() -> str | None:
    """Path of Debian's orthanc-dicomweb plugin (``dpkg -L orthanc-dicomweb``), or None."""
    for d in PLUGIN_DIRS:
        for p in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []:
            return str(p)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A throwaway Orthanc + DICOMweb on 127.0.0.1; yields its base URL (``http://127.0.0.1:PORT``)."""
    plugin = dicomweb_plugin()
    if ORTHANC is None or plugin is None:
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (Debian orthanc orthanc-dicomweb; "
                    ".ci/install_pacs.sh installs them)")
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {"Name": "ichd-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "RemoteAccessAllowed": False,  # answers loopback requests only
              "AuthenticationEnabled": False, "DicomServerEnabled": False, "Plugins": [plugin],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited ({proc.returncode}): {(root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/dicom-web/studies", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"Orthanc did not answer on {url}: {(root / 'orthanc.log').read_text()[-2000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def upload(url: str, files) -> int:
    """Upload DICOM files through Orthanc's REST API (what a modality's send would do)."""
    n = 0
    for f in files:
        r = requests.post(f"{url}/instances", data=Path(f).read_bytes(), timeout=30)
        r.raise_for_status()
        n += 1
    return n


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory, smoke_params):
    """Orthanc holding two --valid-uids phantom studies (6 slices each), and an untrained bundle."""
    import pydicom

    from ichdlib.phantom.synth import generate_phantom
    from ichdlib.serve.bundle import Bundle

    root = tmp_path_factory.mktemp("pacs_phantom")
    generate_phantom(root / "p", studies=3, seed=11, size=64, workers=1, progress=False, valid_uids=True)
    studies: dict[str, list[tuple[float, Path]]] = {}
    for f in sorted((root / "p").glob("stage_2_*/*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        studies.setdefault(str(ds.StudyInstanceUID), []).append((float(ds.ImagePositionPatient[2]), f))
    chosen = {}
    for uid in sorted(studies)[:2]:
        files = [f for _, f in sorted(studies[uid])]
        mid = len(files) // 2
        chosen[uid] = files[mid - 3: mid + 3]
        upload(orthanc, chosen[uid])
    bundle = Bundle.untrained(smoke_params, folds=1).save(root / "bundle")
    return {"url": orthanc, "studies": chosen, "bundle": bundle}


def test_round_trip_stores_sr_and_overlays(pacs, tmp_path, capsys):
    """Query + retrieve two studies (one by --study, one by a .../studies/UID URL), predict, store back, and
    find the SR and the Grad-CAM series in each study on the server."""
    from ichdlib.cli import main as ichd
    from ichdlib.serve.dicomweb import Server

    uid_a, uid_b = sorted(pacs["studies"])
    out = tmp_path / "out"
    rc = ichd(["predict", "--dicomweb", f"{pacs['url']}/dicom-web/studies/{uid_b}", "--study", uid_a,
               "--bundle", str(pacs["bundle"]), "--out", str(out), "--cam", "--pmap", "--threshold", "0.5", "--store",
               "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "retrieved 12 CT instance(s) of 2 studies" in printed
    stored = json.loads((out / "stored.json").read_text())
    assert [s["study_uid"] for s in stored["studies"]] == [uid_a, uid_b]
    server = Server(f"{pacs['url']}/dicom-web")
    doc = json.loads((out / "predictions.json").read_text())
    assert {s["study_uid"] for s in doc["studies"]} == {uid_a, uid_b}
    for st, entry in zip(sorted(doc["studies"], key=lambda s: s["study_uid"]), stored["studies"], strict=True):
        assert entry["failed"] == {} and entry["stored"]
        found = server.series(st["study_uid"])
        (ct,) = [s for s in found if s["modality"] == "CT"]
        (sr,) = [s for s in found if s["modality"] == "SR"]
        assert ct["instances"] == 6 and sr["instances"] == 1 and "not for clinical use" in sr["description"]
        by_desc = {s["description"]: s for s in found if s["modality"] == "OT"}
        n_cam = sum(1 for s in st["slices"] if s["p"]["any"] >= 0.5 for c in s["p"] if s["p"][c] >= 0.5)
        n_maps = sum(1 for c in st["max"] if any(s["p"]["any"] >= 0.5 and s["p"][c] >= 0.5 for s in st["slices"]))
        if n_cam:  # untrained weights: a study may have no positive slice, then there is no overlay series
            assert by_desc["ICH model Grad-CAM - not for clinical use"]["instances"] == n_cam
            assert by_desc["ICH model Grad-CAM maps - not for clinical use"]["instances"] == n_maps
        assert len(entry["stored"]) == 1 + n_cam + n_maps
        # the stored SR is the file written locally (same SOP instance)
        local = next(p for p in (out / "dicom").rglob("sr.dcm") if st["study_uid"] in str(p))
        import pydicom

        assert str(pydicom.dcmread(local).SOPInstanceUID) in entry["stored"]
    assert sum(1 for _ in (out / "dicom").rglob("cam/*.dcm")) > 0  # threshold 0.5 on random weights: some positives


def test_unreachable_server_and_unknown_study(pacs, tmp_path, capsys):
    """One-line errors, exit code 2, nothing written: a port nobody listens on, a study the server lacks, a
    malformed URL; and a store the server refuses is reported instance by instance."""
    from ichdlib.cli import main as ichd
    from ichdlib.serve.dicomweb import Server, store

    base = ["--bundle", str(pacs["bundle"]), "--out", str(tmp_path / "out"), "--device", "cpu"]
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert ichd(["predict", "--dicomweb", dead, "--study", "1.2.3", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and dead in err and "cannot connect" in err
    assert ichd(["predict", "--dicomweb", f"{pacs['url']}/dicom-web", "--study", "1.2.3.4.999", "--store", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study 1.2.3.4.999 not found" in err
    assert ichd(["predict", "--dicomweb", "pacs.example/dicom-web", "--study", "1.2", *base]) == 2
    assert "not a DICOMweb URL" in capsys.readouterr().err
    assert ichd(["predict", "--dicomweb", f"{pacs['url']}/dicom-web", "--since", "2024-01-01", *base]) == 2
    assert "expected a date as YYYYMMDD" in capsys.readouterr().err
    assert ichd(["predict", str(tmp_path), "--store", *base]) == 2
    assert "need --dicomweb" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # a server that refuses a store: the report lists every instance as failed, nothing counted as stored
    bogus = tmp_path / "bogus.dcm"
    shutil.copy(next(iter(pacs["studies"].values()))[0], bogus)
    report = store(Server(f"{pacs['url']}/no-such-service"), "1.2.3", [bogus])
    assert not report.ok and report.stored == [] and len(report.failed) == 1
    assert "HTTP 404" in next(iter(report.failed.values()))


def test_qido_filters_select_studies(pacs):
    """--filter KEY=VALUE and --since go through QIDO-RS; a filter that matches nothing is an error."""
    import pydicom

    from ichdlib.serve.dicomweb import DicomWebError, Server, parse_filters, select_studies

    server = Server(f"{pacs['url']}/dicom-web")
    uid_a, uid_b = sorted(pacs["studies"])
    pid = str(pydicom.dcmread(pacs["studies"][uid_b][0], stop_before_pixels=True).PatientID)
    assert select_studies(server, filters=parse_filters([f"PatientID={pid}"])) == [uid_b]
    assert select_studies(server, [uid_a], filters={"PatientID": pid}) == [uid_a, uid_b]
    with pytest.raises(DicomWebError, match="no study matches"):
        select_studies(server, since="20240101")  # the phantom's studies carry no StudyDate
    with pytest.raises(DicomWebError, match="expected KEY=VALUE"):
        parse_filters(["PatientID"])
    with pytest.raises(DicomWebError, match="name at least one --study"):
        select_studies(server)
