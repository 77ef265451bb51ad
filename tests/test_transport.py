"""How ``ichd predict --dicomweb`` authenticates and retries (``ichdlib.serve.transport``) and what its ledger does
with a line cut short by a kill (``ichdlib.serve.dicomweb_run.Ledger``). No server: tests/test_dicomweb.py
covers the same against Orthanc."""

from __future__ import annotations

import json

import pytest
import requests

from ichdlib.serve.transport import Transport, credentials, describe, make_session

URL = "https://pacs.example.org:8443/dicom-web"


def test_credentials_come_from_env_then_netrc(tmp_path, monkeypatch):
    """Token beats user/password beats a netrc file; the description names the source, never the secret."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example.org login alice password n3trc-secret\n"
                     "machine tokens.example.org password t0ken-in-netrc\n")
    env = {"ICHD_DICOMWEB_TOKEN": "t0k", "ICHD_DICOMWEB_USER": "bob", "ICHD_DICOMWEB_PASSWORD": "pw"}
    c = credentials(URL, environ=env)
    assert c.source == "bearer token from ICHD_DICOMWEB_TOKEN" and "t0k" not in repr(c) and "t0k" not in repr(c.auth)
    r = c.auth(requests.Request("GET", URL).prepare())
    assert r.headers["Authorization"] == "Bearer t0k"
    del env["ICHD_DICOMWEB_TOKEN"]
    c = credentials(URL, environ=env)
    assert c.source.startswith("basic auth from ICHD_DICOMWEB_USER") and "pw" not in repr(c.auth)
    c = credentials(URL, netrc_path=netrc, environ={})
    assert (c.auth.username, c.auth.password) == ("alice", "n3trc-secret") and "n3trc" not in repr(c) + repr(c.auth)
    c = credentials(URL, environ={"ICHD_DICOMWEB_NETRC": str(netrc)})
    assert c.auth.username == "alice" and str(netrc) in c.source
    c = credentials("https://tokens.example.org/dicom-web", netrc_path=netrc, environ={})
    assert c.auth(requests.Request("GET", URL).prepare()).headers["Authorization"] == "Bearer t0ken-in-netrc"
    with pytest.raises(ValueError, match="ICHD_DICOMWEB_PASSWORD is not set"):
        credentials(URL, environ={"ICHD_DICOMWEB_USER": "bob"})
    with pytest.raises(FileNotFoundError, match="no such netrc file"):
        credentials(URL, netrc_path=tmp_path / "none", environ={})
    with pytest.raises(ValueError, match="no 'machine other.example.org' entry"):
        credentials("http://other.example.org/x", netrc_path=netrc, environ={})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert credentials(URL, environ={}).auth is None  # no ~/.netrc
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".netrc").write_text(netrc.read_text())
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert credentials(URL, environ={}).auth.username == "alice"


def test_session_refuses_secrets_in_url_and_retries_busy_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("ICHD_DICOMWEB_TOKEN", "ICHD_DICOMWEB_USER", "ICHD_DICOMWEB_PASSWORD", "ICHD_DICOMWEB_NETRC"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="credentials in the URL") as e:
        make_session("https://alice:hunter2@pacs.example.org/dicom-web")
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError, match="contradict"):
        make_session(URL, Transport(ca_bundle=str(__file__), insecure=True))
    session, creds = make_session(URL, Transport(retries=4, backoff=0.25))
    assert creds.auth is None
    retry = session.get_adapter(URL).max_retries
    assert retry.total == 4 and retry.backoff_factor == 0.25 and {429, 503}.issubset(retry.status_forcelist)
    assert "POST" in retry.allowed_methods  # STOW-RS of the same instances again is idempotent


def test_describe_names_what_to_fix_without_secrets():
    def http_error(status: int, body: str = "") -> requests.HTTPError:
        r = requests.Response()
        r.status_code, r.reason, r._content = status, {401: "Unauthorized", 403: "Forbidden"}.get(status, ""), body.encode()
        return requests.HTTPError(response=r)

    msg = describe(http_error(401, "Authorization: Basic c2VjcmV0"))
    assert "set ICHD_DICOMWEB_USER and ICHD_DICOMWEB_PASSWORD" in msg and "c2VjcmV0" not in msg
    creds = credentials(URL, environ={"ICHD_DICOMWEB_TOKEN": "t"})
    assert "refused the bearer token from ICHD_DICOMWEB_TOKEN" in describe(http_error(401), creds)
    assert "not allowed" in describe(http_error(403), creds)
    assert "HTTP 503" in describe(http_error(503, "busy")) and "busy" in describe(http_error(503, "busy"))
    assert "TLS error" in describe(requests.exceptions.SSLError("x"))


def test_ledger_survives_a_line_cut_by_a_kill(tmp_path):
    from ichdlib.serve.dicomweb_run import LEDGER, Ledger

    ledger = Ledger(tmp_path, "http://pacs/dicom-web", "abc")
    ledger.record("1.2.3", "predicted", outputs=[])
    with open(tmp_path / LEDGER, "a") as f:
        f.write('{"study_uid": "1.2.4", "sta')  # the process died while writing
    again = Ledger(tmp_path, "http://pacs/dicom-web", "abc")
    assert again.state("1.2.3") == "predicted" and again.state("1.2.4") is None
    again.record("1.2.4", "stored")
    assert Ledger(tmp_path, "http://pacs/dicom-web", "abc").state("1.2.4") == "stored"
    lines = (tmp_path / LEDGER).read_text().splitlines()
    assert json.loads(lines[-1])["study_uid"] == "1.2.4"
    with pytest.raises(ValueError, match="use another --out"):
        Ledger(tmp_path, "http://other/dicom-web", "abc")
