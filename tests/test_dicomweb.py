"""``ichd predict --dicomweb ... --store`` against a real PACS: Orthanc with its DICOMweb plugin and HTTP
authentication on, started here on 127.0.0.1 (free port, temporary configuration and storage) and stopped at the
end; a second one with TLS (a self-signed certificate made here); and a stub proxy in front of Orthanc
(``tests/pacs_servers.py``) for what Orthanc does not do: bearer tokens, 503 answers, a connection dropped in the
middle of a download. Every test checks that no password or token reaches an output file, the console or a log."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import shutil
from pathlib import Path

import pacs_servers as ps
import pytest
import requests

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")

USER = "radiology-ai"
PASSWORD = "pw-" + secrets.token_hex(8)
TOKEN = "tok-" + secrets.token_hex(8)
SECRETS = (PASSWORD, TOKEN, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A throwaway authenticated Orthanc + DICOMweb on 127.0.0.1; yields its base URL."""
    if ps.missing():
        pytest.skip(ps.missing())
    with ps.orthanc(tmp_path_factory.mktemp("orthanc"), users={USER: PASSWORD}) as url:
        yield url


def upload(url: str, files) -> int:
    """Upload DICOM files through Orthanc's REST API (what a modality's send would do)."""
    for f in files:
        data = f if isinstance(f, bytes) else Path(f).read_bytes()
        requests.post(f"{url}/instances", data=data, auth=(USER, PASSWORD), timeout=30).raise_for_status()
    return len(files)


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory, smoke_params):
    """Orthanc holding six --valid-uids phantom studies (6 slices each; the fourth also has a second, 2-image
    CT series that discovery leaves out), and an untrained bundle."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    from ichdlib.phantom.synth import generate_phantom
    from ichdlib.serve.bundle import Bundle

    root = tmp_path_factory.mktemp("pacs_phantom")
    generate_phantom(root / "p", studies=6, seed=11, size=64, workers=1, progress=False, valid_uids=True)
    studies: dict[str, list[tuple[float, Path]]] = {}
    for f in sorted((root / "p").glob("stage_2_*/*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        studies.setdefault(str(ds.StudyInstanceUID), []).append((float(ds.ImagePositionPatient[2]), f))
    chosen = {}
    for uid in sorted(studies)[:6]:
        files = [f for _, f in sorted(studies[uid])]
        mid = len(files) // 2
        chosen[uid] = files[mid - 3: mid + 3]
        upload(orthanc, chosen[uid])
    extra_uid, extra = generate_uid(), []
    for f in chosen[sorted(chosen)[3]][:2]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = extra_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf)
        extra.append(buf.getvalue())
    upload(orthanc, extra)
    bundle = Bundle.untrained(smoke_params, folds=1).save(root / "bundle")
    return {"url": orthanc, "web": f"{orthanc}/dicom-web", "studies": chosen, "bundle": bundle,
            "extra_series": extra_uid}


@pytest.fixture
def creds(monkeypatch):
    """The Orthanc user's credentials in the environment (as a user would export them)."""
    for k in ("ICHD_DICOMWEB_TOKEN", "ICHD_DICOMWEB_NETRC"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ICHD_DICOMWEB_USER", USER)
    monkeypatch.setenv("ICHD_DICOMWEB_PASSWORD", PASSWORD)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc of the machine


def assert_no_secret(*where) -> None:
    """No password, token or basic-auth header value in any file under the folders or in the texts."""
    for w in where:
        if isinstance(w, Path):
            for f in [w] if w.is_file() else [p for p in w.rglob("*") if p.is_file()]:
                data = f.read_bytes()
                for s in SECRETS:
                    assert s.encode() not in data, f"a credential is written in {f}"
        else:
            for s in SECRETS:
                assert s not in w, "a credential is printed or logged"


def on_server(pacs, study_uid: str) -> dict[str, list[dict]]:
    from ichdlib.serve.dicomweb import Server

    by: dict[str, list[dict]] = {}
    for s in Server(pacs["web"]).series(study_uid):
        by.setdefault(s["modality"], []).append(s)
    return by


def test_round_trip_stores_sr_and_overlays(pacs, creds, tmp_path, capsys, caplog):
    """Query + retrieve two studies (one by --study, one by a .../studies/UID URL) with credentials from the
    environment, predict, store back, and find the SR and the Grad-CAM series in each study on the server."""
    import pydicom

    from ichdlib.cli import main as ichd

    caplog.set_level(logging.DEBUG)
    uid_a, uid_b = sorted(pacs["studies"])[:2]
    out = tmp_path / "out"
    rc = ichd(["predict", "--dicomweb", f"{pacs['web']}/studies/{uid_b}", "--study", uid_a,
               "--bundle", str(pacs["bundle"]), "--out", str(out), "--cam", "--pmap", "--threshold", "0.5", "--store",
               "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert "stored 2, skipped 0, failed 0 of 2 studies" in captured.out
    stored = json.loads((out / "stored.json").read_text())
    assert [s["study_uid"] for s in stored["studies"]] == [uid_a, uid_b]
    doc = json.loads((out / "predictions.json").read_text())
    assert {s["study_uid"] for s in doc["studies"]} == {uid_a, uid_b}
    for st, entry in zip(sorted(doc["studies"], key=lambda s: s["study_uid"]), stored["studies"], strict=True):
        assert entry["failed"] == {} and entry["stored"]
        found = on_server(pacs, st["study_uid"])
        (ct,), (sr,) = found["CT"], found["SR"]
        assert ct["instances"] == 6 and sr["instances"] == 1 and "not for clinical use" in sr["description"]
        by_desc = {s["description"]: s for s in found.get("OT", [])}
        n_cam = sum(1 for s in st["slices"] if s["p"]["any"] >= 0.5 for c in s["p"] if s["p"][c] >= 0.5)
        n_maps = sum(1 for c in st["max"] if any(s["p"]["any"] >= 0.5 and s["p"][c] >= 0.5 for s in st["slices"]))
        if n_cam:  # untrained weights: a study may have no positive slice, then there is no overlay series
            assert by_desc["ICH model Grad-CAM - not for clinical use"]["instances"] == n_cam
            assert by_desc["ICH model Grad-CAM maps - not for clinical use"]["instances"] == n_maps
        assert len(entry["stored"]) == 1 + n_cam + n_maps
        local = next(p for p in (out / "dicom").rglob("sr.dcm") if st["study_uid"] in str(p))
        assert str(pydicom.dcmread(local).SOPInstanceUID) in entry["stored"]  # the SR stored is the one written
        # slices name their PACS instance (WADO-RS), not the deleted download
        assert all(s["sop_uid"] in s_path and s_path.startswith(f"{pacs['web']}/studies/{st['study_uid']}/series/")
                   for s, s_path in ((s, s.get("path", "")) for s in _slices_csv(out, st["study_uid"])))
    assert sum(1 for _ in (out / "dicom").rglob("cam/*.dcm")) > 0  # threshold 0.5 on random weights: some positives
    assert_no_secret(out, captured.out, captured.err, caplog.text)


def _slices_csv(out: Path, study_uid: str) -> list[dict]:
    import pandas as pd

    frame = pd.read_csv(out / "slices.csv", dtype=str)
    return frame[frame["study_uid"] == study_uid].to_dict("records")


def test_credentials_refused_or_missing(pacs, creds, tmp_path, monkeypatch, capsys):
    """A wrong password, no credentials, and credentials in the URL: one line naming the server and the study,
    exit code 2, no secret shown, nothing written."""
    from ichdlib.cli import main as ichd

    uid = sorted(pacs["studies"])[0]
    base = ["--study", uid, "--bundle", str(pacs["bundle"]), "--out", str(tmp_path / "out"), "--device", "cpu"]
    monkeypatch.setenv("ICHD_DICOMWEB_PASSWORD", "wrong-" + PASSWORD)
    assert ichd(["predict", "--dicomweb", pacs["web"], *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and pacs["web"] in err and f"study {uid}" in err and "HTTP 401" in err
    assert "refused the basic auth from ICHD_DICOMWEB_USER/ICHD_DICOMWEB_PASSWORD" in err
    assert PASSWORD not in err and "Traceback" not in err
    monkeypatch.delenv("ICHD_DICOMWEB_USER")
    monkeypatch.delenv("ICHD_DICOMWEB_PASSWORD")
    assert ichd(["predict", "--dicomweb", pacs["web"], *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "HTTP 401" in err and "set ICHD_DICOMWEB_USER and ICHD_DICOMWEB_PASSWORD" in err
    # a netrc file works where the environment is empty ...
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    from ichdlib.serve.dicomweb import Server, select_studies
    from ichdlib.serve.transport import Transport

    assert select_studies(Server(pacs["web"], Transport(netrc=str(netrc))), [uid]) == [uid]
    monkeypatch.setenv("ICHD_DICOMWEB_NETRC", str(netrc))
    assert select_studies(Server(pacs["web"]), [uid]) == [uid]
    # ... and the password never goes on the command line
    with_pw = pacs["web"].replace("http://", f"http://{USER}:{PASSWORD}@")
    assert ichd(["predict", "--dicomweb", with_pw, *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "credentials in the URL" in err and PASSWORD not in err
    assert not (tmp_path / "out").exists()


def test_bearer_token_valid_and_expired(pacs, tmp_path, monkeypatch, capsys):
    """ICHD_DICOMWEB_TOKEN is sent as a bearer token (Orthanc has none: a stand-in proxy checks it and reaches
    Orthanc with basic auth); an expired token gives a one-line 401 naming the server and the study."""
    from ichdlib.cli import main as ichd
    from ichdlib.serve.dicomweb import Server, retrieve_ct, select_studies

    for k in ("ICHD_DICOMWEB_USER", "ICHD_DICOMWEB_PASSWORD", "ICHD_DICOMWEB_NETRC"):
        monkeypatch.delenv(k, raising=False)
    uid = sorted(pacs["studies"])[0]
    with ps.Stub(pacs["url"], token=TOKEN, upstream_auth=(USER, PASSWORD)) as stub:
        monkeypatch.setenv("ICHD_DICOMWEB_TOKEN", TOKEN)
        server = Server(f"{stub.url}/dicom-web")
        assert select_studies(server, [uid]) == [uid]
        got = retrieve_ct(server, uid, tmp_path / "dl")
        assert len(got.files) == 6 and all(p.is_file() for p in got.files)
        assert "Token" not in repr(server.credentials) and TOKEN not in repr(server.credentials)
        monkeypatch.setenv("ICHD_DICOMWEB_TOKEN", "expired-" + TOKEN)
        rc = ichd(["predict", "--dicomweb", f"{stub.url}/dicom-web", "--study", uid, "--bundle", str(pacs["bundle"]),
                   "--out", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and f"study {uid}" in err and stub.url in err
        assert "HTTP 401" in err and "refused the bearer token from ICHD_DICOMWEB_TOKEN" in err and TOKEN not in err
        assert stub.seen_auth[0] == f"Bearer {TOKEN}"


def test_busy_server_and_dropped_download_are_retried(pacs, creds, tmp_path, caplog):
    """503 twice then 200 (QIDO and STOW), and a WADO-RS download cut in the middle: each retried with back-off
    and the study still arrives whole; past the retry budget, a one-line error."""
    from ichdlib.serve.dicomweb import DicomWebError, Server, retrieve_ct, select_studies, store
    from ichdlib.serve.transport import Transport

    caplog.set_level(logging.DEBUG)
    uid = sorted(pacs["studies"])[0]
    fast = Transport(backoff=0.01, retries=3)
    with ps.Stub(pacs["url"]) as stub:
        server = Server(f"{stub.url}/dicom-web", fast)
        stub.faults = [("GET", "/dicom-web/studies?", "503"), ("GET", "/dicom-web/studies?", "503"),
                       ("GET", f"/studies/{uid}/series/", "drop")]
        assert select_studies(server, [uid]) == [uid]
        assert [h[2] for h in stub.hits if "/dicom-web/studies?" in h[1]] == [503, 503, 200]
        got = retrieve_ct(server, uid, tmp_path / "dl")
        assert len(got.files) == 6
        wado = [h for h in stub.hits if h[0] == "GET" and h[1].startswith(f"/dicom-web/studies/{uid}/series/")
                and "?" not in h[1]]
        assert [h[2] for h in wado] == [-1, 200]  # dropped once, then whole
        # a STOW answered 503 twice is sent again; Orthanc then stores it
        import pydicom
        from pydicom.uid import generate_uid

        ds = pydicom.dcmread(pacs["studies"][uid][0])  # the phantom's slices lack a SOPClassUID (as RSNA's)
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.SeriesInstanceUID = generate_uid()
        ds.save_as(tmp_path / "again.dcm")
        stub.faults = [("POST", "/studies/", "503"), ("POST", "/studies/", "503")]
        report = store(server, uid, [tmp_path / "again.dcm"])
        assert report.ok and len(report.stored) == 1
        assert [h[2] for h in stub.hits if h[0] == "POST"] == [503, 503, 200]
        # a server that stays busy: bounded, then one line
        stub.faults = [("GET", "/dicom-web/studies?", "503")] * 5
        with pytest.raises(DicomWebError) as e:
            select_studies(Server(f"{stub.url}/dicom-web", Transport(backoff=0.01, retries=2)), [uid])
        assert "HTTP 503" in str(e.value) and f"study {uid}" in str(e.value) and "\n" not in str(e.value)
    assert_no_secret(tmp_path, caplog.text)


def test_resume_after_kill_stores_nothing_twice(pacs, creds, tmp_path, capsys, monkeypatch):
    """A run over two studies killed right after its first STOW-RS reached the server (before the answer was
    recorded), rerun: the first study is checked on the server and not sent again, the second is predicted and
    stored; a third run skips both. Each study ends with exactly one SR and one Grad-CAM series on the server.
    problems.csv names the PACS instances of the series left out."""
    import ichdlib.serve.dicomweb_run as run_mod
    from ichdlib.cli import main as ichd

    uid_c, uid_d = sorted(pacs["studies"])[2:4]
    out = tmp_path / "out"
    cmd = ["predict", "--dicomweb", pacs["web"], "--study", uid_c, "--study", uid_d, "--bundle", str(pacs["bundle"]),
           "--out", str(out), "--cam", "--threshold", "0.3", "--store", "--device", "cpu"]
    real_store = run_mod.store

    def store_then_die(server, study_uid, paths):
        real_store(server, study_uid, paths)
        raise KeyboardInterrupt  # killed after the server stored, before the run wrote that down

    monkeypatch.setattr(run_mod, "store", store_then_die)
    assert ichd(cmd) == 130
    ledger = [json.loads(line) for line in (out / run_mod.LEDGER).read_text().splitlines()[1:]]
    assert [(r["study_uid"], r["state"]) for r in ledger] == [(uid_c, "predicted"), (uid_c, "storing")]
    monkeypatch.setattr(run_mod, "store", real_store)
    capsys.readouterr()
    assert ichd(cmd) == 0
    printed = capsys.readouterr()
    assert "stored 2, skipped 0, failed 0 of 2 studies" in printed.out
    last = [json.loads(line) for line in (out / run_mod.LEDGER).read_text().splitlines()[1:]]
    c_storing = [r for r in last if r["study_uid"] == uid_c and r["state"] == "storing"]
    assert c_storing[-1]["sending"] == [] and c_storing[-1]["already"]  # found on the server, nothing re-sent
    assert ichd(cmd) == 0
    printed = capsys.readouterr()
    assert "stored 0, skipped 2, failed 0 of 2 studies" in printed.out
    for uid in (uid_c, uid_d):
        found = on_server(pacs, uid)
        assert len(found["SR"]) == 1 and found["SR"][0]["instances"] == 1
        assert len(found.get("OT", [])) <= 1  # one Grad-CAM series at most (none without a positive slice)
    # both studies' tables are in the outputs after the resumed runs
    doc = json.loads((out / "predictions.json").read_text())
    assert sorted(s["study_uid"] for s in doc["studies"]) == [uid_c, uid_d]
    import pandas as pd

    problems = pd.read_csv(out / "problems.csv", dtype=str)
    left_out = problems[problems["series_uid"] == pacs["extra_series"]]
    # one row for the series left out whole (series choice), naming its first instance on the PACS and the count
    assert len(left_out) == 1 and "(2 image(s))" in left_out["message"].iloc[0]
    assert all(p.startswith(f"{pacs['web']}/studies/{uid_d}/series/{pacs['extra_series']}/instances/")
               for p in left_out["path"])
    assert not any(Path(p).exists() or "/tmp" in p for p in problems["path"])
    assert_no_secret(out, printed.out, printed.err)


def test_sigkill_and_rerun_store_nothing_twice(pacs, creds, tmp_path):
    """A real kill: ``ichd predict --dicomweb`` over two studies in a subprocess, SIGKILLed as soon as the ledger
    shows the first study's outputs (wherever it is then: predicting, storing or stored), then the same command
    again: both studies end with exactly one SR on the server, and the second run says what it skipped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ichdlib.serve.dicomweb_run import LEDGER

    uid_e, uid_f = sorted(pacs["studies"])[4:6]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ichdlib", "predict", "--dicomweb", pacs["web"], "--study", uid_e, "--study", uid_f,
           "--bundle", str(pacs["bundle"]), "--out", str(out), "--threshold", "0.3", "--store", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / LEDGER).exists() and '"predicted"' in (out / LEDGER).read_text():
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    first = proc.stdout.read().decode()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "failed 0 of 2 studies" in rerun.stdout
    for uid in (uid_e, uid_f):
        (sr,) = on_server(pacs, uid)["SR"]
        assert sr["instances"] == 1
    ledger = [json.loads(line) for line in (out / LEDGER).read_text().splitlines()[1:] if line.strip()]
    assert sum(1 for r in ledger if r["study_uid"] == uid_e and r["state"] == "predicted") == 1  # never redone
    assert_no_secret(out, first, rerun.stdout, rerun.stderr)


def test_tls_with_ca_bundle_or_insecure(pacs, creds, tmp_path, capsys):
    """The authenticated Orthanc behind HTTPS with a self-signed certificate made here (TLS terminated by the stub:
    Debian's Orthanc 1.10.1 crashes with its own SslEnabled): refused without the CA (one line), accepted with
    --ca-bundle; --insecure works and warns once."""
    from ichdlib.serve.dicomweb import DicomWebError, Server, select_studies
    from ichdlib.serve.transport import Transport

    uid = sorted(pacs["studies"])[0]
    server_pem, ca = ps.self_signed(tmp_path / "tls")
    with ps.Stub(pacs["url"], certificate=server_pem) as stub:
        url = f"{stub.url}/dicom-web"
        assert url.startswith("https://")
        with pytest.raises(DicomWebError) as e:
            select_studies(Server(url, Transport(retries=0)), [uid])
        assert "TLS error" in str(e.value) and "--ca-bundle" in str(e.value) and e.value.fatal
        assert f"study {uid}" in str(e.value) and "\n" not in str(e.value)
        assert select_studies(Server(url, Transport(ca_bundle=str(ca))), [uid]) == [uid]
        capsys.readouterr()
        assert select_studies(Server(url, Transport(insecure=True)), [uid]) == [uid]
        Server(url, Transport(insecure=True))
        assert capsys.readouterr().err.count("--insecure: the TLS certificate of 127.0.0.1 is not checked") == 1
        with pytest.raises(FileNotFoundError, match="no such CA bundle"):
            Server(url, Transport(ca_bundle=str(tmp_path / "nope.pem")))
        assert stub.seen_auth and all(a.startswith("Basic ") for a in stub.seen_auth)  # credentials went over TLS


def test_unreachable_server_and_unknown_study(pacs, creds, tmp_path, capsys):
    """One-line errors, exit code 2, nothing written: a port nobody listens on, a study the server lacks, a
    malformed URL; and a store the server refuses is reported instance by instance."""
    from ichdlib.cli import main as ichd
    from ichdlib.serve.dicomweb import Server, store

    base = ["--bundle", str(pacs["bundle"]), "--out", str(tmp_path / "out"), "--device", "cpu", "--retries", "1"]
    dead = f"http://127.0.0.1:{ps.free_port()}/dicom-web"
    assert ichd(["predict", "--dicomweb", dead, "--study", "1.2.3", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and dead in err and "cannot connect" in err
    assert ichd(["predict", "--dicomweb", pacs["web"], "--study", "1.2.3.4.999", "--store", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study 1.2.3.4.999 not found" in err
    assert ichd(["predict", "--dicomweb", "pacs.example/dicom-web", "--study", "1.2", *base]) == 2
    assert "not a DICOMweb URL" in capsys.readouterr().err
    assert ichd(["predict", "--dicomweb", pacs["web"], "--since", "2024-01-01", *base]) == 2
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


def test_qido_filters_select_studies(pacs, creds):
    """--filter KEY=VALUE and --since go through QIDO-RS; a filter that matches nothing is an error."""
    import pydicom

    from ichdlib.serve.dicomweb import DicomWebError, Server, parse_filters, select_studies

    server = Server(pacs["web"])
    uid_a, uid_b = sorted(pacs["studies"])[:2]
    pid = str(pydicom.dcmread(pacs["studies"][uid_b][0], stop_before_pixels=True).PatientID)
    assert select_studies(server, filters=parse_filters([f"PatientID={pid}"])) == [uid_b]
    assert select_studies(server, [uid_a], filters={"PatientID": pid}) == [uid_a, uid_b]
    with pytest.raises(DicomWebError, match="no study matches"):
        select_studies(server, since="20240101")  # the phantom's studies carry no StudyDate
    with pytest.raises(DicomWebError, match="expected KEY=VALUE"):
        parse_filters(["PatientID"])
    with pytest.raises(DicomWebError, match="name at least one --study"):
        select_studies(server)
