"""Servers for the PACS tests (and ``tools/pacs_screenshot.py``), all on 127.0.0.1 and stopped at the end:

- :func:`orthanc`: a throwaway Orthanc with its DICOMweb plugin (temporary configuration and storage), with
  HTTP authentication and, given a certificate, TLS;
- :func:`self_signed`: a certificate for 127.0.0.1 made with ``cryptography`` (PEM with the key, as Orthanc's
  ``SslCertificate`` wants it);
- :class:`Stub`: a small HTTP(S) proxy in front of a server that can demand a bearer token, answer 503, or drop
  the connection in the middle of an answer, and counts what it saw. It also terminates TLS for the TLS test:
  Debian's Orthanc 1.10.1 (civetweb with OpenSSL 3) has ``SslEnabled`` but dies (SIGSEGV) on its first HTTPS
  request here, so a real Orthanc with TLS is not started.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")


def plugin(name: str) -> str | None:
    """Path of an Orthanc plugin (``libOrthancDicomWeb.so``, ``libOrthancWebViewer.so``), or None."""
    for d in PLUGIN_DIRS:
        for p in sorted(Path(d).glob(f"{name}.so*")) if Path(d).is_dir() else []:
            return str(p)
    return None


def missing() -> str | None:
    """Why the Orthanc tests cannot run here (None when they can)."""
    if ORTHANC is None or plugin("libOrthancDicomWeb") is None:
        return ("Orthanc or its DICOMweb plugin is not installed (Debian orthanc orthanc-dicomweb; "
                ".ci/install_pacs.sh installs them)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def orthanc(root: Path, users: dict[str, str] | None = None, certificate: Path | None = None,
            plugins: tuple[str, ...] = ()) -> Iterator[str]:
    """Run Orthanc + DICOMweb on a free port (``RemoteAccessAllowed: false``: loopback clients only); with
    ``users``, HTTP basic authentication on; with ``certificate`` (PEM cert + key), HTTPS (``SslEnabled``; see the
    module doc: Orthanc 1.10.1 of Debian crashes with it). Yields the base URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"Name": "ichd-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
              "RegisteredUsers": users or {}, "DicomServerEnabled": False, "StableAge": 1,
              "Plugins": [p for p in (plugin("libOrthancDicomWeb"), *map(plugin, plugins)) if p],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    if certificate is not None:
        config.update({"SslEnabled": True, "SslCertificate": str(certificate)})
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"{'https' if certificate else 'http'}://127.0.0.1:{port}"
    auth = next(iter(users.items())) if users else None
    try:
        for _ in range(150):
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({proc.returncode}): {(root / 'orthanc.log').read_text()[-2000:]}")
            try:
                r = requests.get(f"{url}/system", auth=auth, timeout=1, verify=str(certificate) if certificate else True)
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"Orthanc did not answer on {url}: {(root / 'orthanc.log').read_text()[-2000:]}")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost: (PEM of cert + key for the server, PEM of the cert
    alone for clients' ``--ca-bundle``)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ichd test PACS")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    folder.mkdir(parents=True, exist_ok=True)
    server, ca = folder / "server.pem", folder / "ca.pem"
    server.write_bytes(pem + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    ca.write_bytes(pem)
    return server, ca


class Stub:
    """A proxy on 127.0.0.1 in front of ``upstream``. ``token``: demand ``Authorization: Bearer <token>`` (401
    otherwise) and reach the upstream with ``upstream_auth``. ``faults``: (method, path part, action) consumed in
    order as requests match: ``"503"`` answers 503; ``"drop"`` sends the headers and half the body, then closes
    the connection. ``hits``: (method, path, status) of every request."""

    def __init__(self, upstream: str, token: str | None = None, upstream_auth: tuple[str, str] | None = None,
                 certificate: Path | None = None) -> None:
        self.upstream, self.token, self.upstream_auth = upstream.rstrip("/"), token, upstream_auth
        self.faults: list[tuple[str, str, str]] = []
        self.hits: list[tuple[str, str, int]] = []
        self.seen_auth: list[str] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.seen_auth.append(self.headers.get("Authorization", ""))
                if stub.token is not None and self.headers.get("Authorization") != f"Bearer {stub.token}":
                    return self._send(401, b'{"error": "invalid or expired token"}', "application/json",
                                      extra={"WWW-Authenticate": 'Bearer error="invalid_token"'})
                action = stub._fault(self.command, self.path)
                if action == "503":
                    return self._send(503, b"busy", "text/plain")
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")}
                auth = stub.upstream_auth
                if auth is None and self.headers.get("Authorization"):
                    headers["Authorization"] = self.headers["Authorization"]
                r = requests.request(self.command, stub.upstream + self.path, data=body or None, headers=headers,
                                     auth=auth, timeout=30)
                if action == "drop":
                    self.send_response(r.status_code)
                    self.send_header("Content-Type", r.headers.get("Content-Type", ""))
                    self.send_header("Content-Length", str(len(r.content)))
                    self.end_headers()
                    self.wfile.write(r.content[: len(r.content) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    stub._hit(self.command, self.path, -1)
                    return None
                return self._send(r.status_code, r.content, r.headers.get("Content-Type", ""))

            def _send(self, status: int, content: bytes, ctype: str, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(content)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(content)
                stub._hit(self.command, self.path, status)

            do_GET = do_POST = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if certificate is not None:  # HTTPS in front of the upstream (TLS terminated here)
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(certificate))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault(self, method: str, path: str) -> str | None:
        with self._lock:
            for i, (m, part, action) in enumerate(self.faults):
                if m == method and part in path:
                    del self.faults[i]
                    return action
        return None

    def _hit(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.hits.append((method, path, status))

    def __enter__(self) -> Stub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
