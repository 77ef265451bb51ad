"""How ``ichd predict --dicomweb`` talks to a PACS: credentials, TLS, timeouts, retries, and one-line errors.

Every DICOMweb call (QIDO-RS, WADO-RS, STOW-RS) goes through one :class:`requests.Session` made by
:func:`make_session` and handed to dicomweb-client's ``DICOMwebClient``:

- **Credentials** never come from the command line (shell history, process lists): a bearer token from
  ``ICHD_DICOMWEB_TOKEN``, else HTTP basic from ``ICHD_DICOMWEB_USER`` + ``ICHD_DICOMWEB_PASSWORD``, else the
  server's ``machine`` entry of a netrc file (``--netrc PATH``, ``ICHD_DICOMWEB_NETRC``, or ``~/.netrc``).
  A URL with ``user:password@`` in it is refused. Secrets are never printed, logged or written: messages name
  where the credentials came from (``ICHD_DICOMWEB_USER/ICHD_DICOMWEB_PASSWORD``), not what they are.
- **TLS**: the system's certificate store, or ``--ca-bundle PATH`` (a hospital's private CA, PEM), or
  ``--insecure`` (no certificate check; a warning says so once).
- **Timeouts and retries**: each request times out after ``--timeout`` seconds; busy answers (429, 500, 502,
  503, 504) and dropped connections are retried ``--retries`` times with exponential back-off
  (urllib3 ``Retry``: ``backoff`` x 1, 2, 4 ... seconds, at most 30 s; a server's ``Retry-After`` is honoured up
  to 60 s). A download that breaks after its answer began is retried by the caller
  (:func:`ichdlib.serve.dicomweb.retrieve_ct`).
- **Errors** are one line (:func:`describe`): 401/403/404 say what was refused and what to check.
"""

from __future__ import annotations

import netrc as _netrc
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

ENV_USER = "ICHD_DICOMWEB_USER"
ENV_PASSWORD = "ICHD_DICOMWEB_PASSWORD"
ENV_TOKEN = "ICHD_DICOMWEB_TOKEN"
ENV_NETRC = "ICHD_DICOMWEB_NETRC"
#: statuses that mean "try again later"
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 60.0

__all__ = ["Transport", "Credentials", "credentials", "make_session", "describe", "is_fatal", "add_arguments",
           "from_args", "ENV_USER", "ENV_PASSWORD", "ENV_TOKEN", "ENV_NETRC"]


@dataclass(frozen=True)
class Transport:
    """Connection settings of a DICOMweb server (no secrets here: those are read by :func:`credentials`)."""

    ca_bundle: str | None = None  # PEM file of trusted CAs; None: the system store
    insecure: bool = False  # no certificate check (warns)
    timeout: float = 60.0  # seconds per request (connect and each read)
    retries: int = 3  # extra tries on 429/5xx and dropped connections
    backoff: float = 0.5  # seconds; doubles with each retry
    netrc: str | None = None  # netrc-style file; None: ICHD_DICOMWEB_NETRC or ~/.netrc


@dataclass(frozen=True)
class Credentials:
    """What a session authenticates with: ``auth`` (a requests auth object, or None) and ``source``, a
    secret-free description for messages."""

    auth: Any
    source: str

    def __repr__(self) -> str:  # never show the secret, even in a debugger or a traceback
        return f"Credentials(source={self.source!r})"


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>``; its repr hides the token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: Any) -> Any:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "BearerAuth(***)"


class BasicAuth(requests.auth.HTTPBasicAuth):
    """HTTP basic; its repr hides the password."""

    def __repr__(self) -> str:
        return f"BasicAuth({self.username!r}, ***)"


def credentials(url: str, netrc_path: str | os.PathLike | None = None,
                environ: dict[str, str] | None = None) -> Credentials:
    """The credentials for ``url``: ``ICHD_DICOMWEB_TOKEN`` (bearer), else ``ICHD_DICOMWEB_USER`` +
    ``ICHD_DICOMWEB_PASSWORD`` (basic), else the netrc entry of the URL's host (``netrc_path``, else
    ``ICHD_DICOMWEB_NETRC``, else ``~/.netrc`` when it exists), else none."""
    env = os.environ if environ is None else environ
    if env.get(ENV_TOKEN):
        return Credentials(BearerAuth(env[ENV_TOKEN]), f"bearer token from {ENV_TOKEN}")
    user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
    if user or password:
        if not (user and password):
            missing = ENV_PASSWORD if user else ENV_USER
            raise ValueError(f"{ENV_USER} and {ENV_PASSWORD} go together: {missing} is not set")
        return Credentials(BasicAuth(user, password), f"basic auth from {ENV_USER}/{ENV_PASSWORD}")
    explicit = netrc_path or env.get(ENV_NETRC)
    path = Path(explicit).expanduser() if explicit else Path("~/.netrc").expanduser()
    if not path.is_file():
        if explicit:
            raise FileNotFoundError(f"{path}: no such netrc file (--netrc / {ENV_NETRC})")
        return Credentials(None, "no credentials")
    host = urlsplit(url).hostname or ""
    try:
        entry = _netrc.netrc(str(path)).authenticators(host)
    except _netrc.NetrcParseError as exc:  # its message may quote the file's line: name the line only
        raise ValueError(f"{path}: not a netrc file (line {exc.lineno})") from None
    if entry is None or not entry[2]:
        if explicit:
            raise ValueError(f"{path}: no 'machine {host}' entry with a password")
        return Credentials(None, "no credentials")
    login, _, password = entry
    if not login:  # "machine host password TOKEN": a bearer token
        return Credentials(BearerAuth(password), f"bearer token from {path} (machine {host})")
    return Credentials(BasicAuth(login, password), f"basic auth from {path} (machine {host})")


class CappedRetry(Retry):
    """urllib3's Retry with a server's ``Retry-After`` capped (a PACS asking for an hour stops the run)."""

    def get_retry_after(self, response: Any) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, MAX_RETRY_AFTER)


def _retry(transport: Transport) -> Retry:
    n = max(0, int(transport.retries))
    # POST (STOW-RS) is retried too: storing the same SOP instances again is idempotent on a PACS
    return CappedRetry(total=n, connect=n, read=n, status=n, other=0, backoff_factor=transport.backoff,
                       backoff_max=MAX_BACKOFF, status_forcelist=RETRY_STATUSES,
                       allowed_methods=frozenset({"GET", "HEAD", "POST"}), respect_retry_after_header=True,
                       raise_on_status=False)


class Session(requests.Session):
    """A Session whose own ``verify`` wins: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a
    session's CA bundle or ``verify=False`` (psf/requests#3829), so it is passed with every request."""

    def request(self, method: str, url: str, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.verify is not True:
            kwargs.setdefault("verify", self.verify)
        return super().request(method, url, **kwargs)


_WARNED_INSECURE: set[str] = set()


def make_session(url: str, transport: Transport = Transport()) -> tuple[Any, Credentials]:
    """A requests Session for the DICOMweb service at ``url``: credentials, TLS, retries (see the module doc).
    The per-request timeout is for the caller to pass (``DICOMwebClient(timeout=...)``)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError(f"{parts.scheme}://{parts.hostname}: credentials in the URL end up in shell history and "
                         f"logs; remove them and set {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN} (or --netrc FILE)")
    if transport.ca_bundle is not None and not Path(transport.ca_bundle).is_file():
        raise FileNotFoundError(f"{transport.ca_bundle}: no such CA bundle (--ca-bundle expects a PEM file)")
    if transport.ca_bundle and transport.insecure:
        raise ValueError("--ca-bundle and --insecure contradict each other: give one")
    creds = credentials(url, transport.netrc)
    session = Session()
    adapter = HTTPAdapter(max_retries=_retry(transport))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.auth = creds.auth
    if creds.auth is None:
        session.trust_env = False  # no silent ~/.netrc lookup by requests behind our back (it was checked above)
    if transport.insecure:
        session.verify = False
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # one warning of ours instead
        if parts.scheme == "https" and url not in _WARNED_INSECURE:
            _WARNED_INSECURE.add(url)
            print(f"warning: --insecure: the TLS certificate of {parts.hostname} is not checked; anyone on the "
                  "network path can read and change this traffic", file=sys.stderr)
    elif transport.ca_bundle:
        session.verify = str(transport.ca_bundle)
    return session, creds


def is_fatal(exc: BaseException) -> bool:
    """Errors that every further request would repeat (credentials, TLS, server gone): stop the run."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code in (401, 403)
    return isinstance(exc, (requests.ConnectionError, requests.Timeout))


def describe(exc: BaseException, creds: Credentials | None = None, timeout: float | None = None) -> str:
    """One line for a requests/HTTP error; no secret (response bodies of 401/403 are left out)."""
    how = creds.source if creds is not None else "no credentials"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        r = exc.response
        status = f"HTTP {r.status_code} {r.reason or ''}".strip()
        if r.status_code == 401:
            if creds is None or creds.auth is None:
                return (f"{status}: the server wants credentials; set {ENV_USER} and {ENV_PASSWORD} (or "
                        f"{ENV_TOKEN}, or a netrc file with --netrc)")
            return f"{status}: the server refused the {how} (wrong or expired?)"
        if r.status_code == 403:
            return f"{status}: the {how} is not allowed to do this"
        if r.status_code == 404:
            return f"{status}: no such resource on the server (right DICOMweb root and UID?)"
        text = " ".join((r.text or "").split())[:160]
        return status + (f": {text}" if text else "")
    if isinstance(exc, requests.exceptions.SSLError):
        return ("TLS error: the server's certificate is not trusted or does not match its name (give the CA with "
                "--ca-bundle PEM, or --insecure to skip the check)")
    if isinstance(exc, requests.exceptions.RetryError):
        return "still failing after the retries (server busy?)"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return "the connection broke during the download"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect (server down, wrong host or port?)"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s" if timeout else "no answer in time"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def add_arguments(group: Any) -> None:
    """``--netrc``, ``--ca-bundle``, ``--insecure``, ``--timeout``, ``--retries`` (an argparse group)."""
    group.add_argument("--netrc", default=None, metavar="PATH",
                       help=f"with --dicomweb: netrc-style file with the server's credentials (default: {ENV_NETRC} "
                            f"or ~/.netrc); or set {ENV_USER}+{ENV_PASSWORD} or {ENV_TOKEN}")
    group.add_argument("--ca-bundle", default=None, metavar="PATH",
                       help="with --dicomweb: PEM file of the certificate authorities to trust (default: the system's)")
    group.add_argument("--insecure", action="store_true",
                       help="with --dicomweb: do not check the server's TLS certificate (warns)")
    group.add_argument("--timeout", type=float, default=Transport.timeout, metavar="S",
                       help=f"with --dicomweb: seconds before a request counts as failed (default {Transport.timeout:g})")
    group.add_argument("--retries", type=int, default=Transport.retries, metavar="N",
                       help="with --dicomweb: retries on busy answers (429/5xx) and dropped connections "
                            f"(default {Transport.retries})")


def from_args(args: Any) -> Transport:
    """The :class:`Transport` of parsed ``ichd predict`` options."""
    timeout, retries = float(getattr(args, "timeout", Transport.timeout)), int(getattr(args, "retries", Transport.retries))
    if not timeout > 0:
        raise ValueError(f"--timeout {timeout}: expected seconds > 0")
    if retries < 0:
        raise ValueError(f"--retries {retries}: expected 0 or more")
    return Transport(ca_bundle=getattr(args, "ca_bundle", None), insecure=bool(getattr(args, "insecure", False)),
                     timeout=timeout, retries=retries, netrc=getattr(args, "netrc", None))
