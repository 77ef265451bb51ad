"""A PACS round trip over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) with dicomweb-client.

``ichd predict --dicomweb URL --study UID [--study UID ...] [--since YYYYMMDD] [--filter KEY=VALUE] --bundle B
--out OUT [--cam] [--store]``:

1. :func:`select_studies` finds the studies (QIDO-RS): each ``--study`` must exist on the server; ``--since``
   and ``--filter`` add the studies that match (StudyDate from that day on, any QIDO attribute).
2. :func:`retrieve_ct` downloads each study's CT series (WADO-RS) into a folder, one file per instance.
3. ``ichd predict`` predicts that folder as any other and writes ``--dicom-out`` objects.
4. :func:`store` sends them back to the same server (STOW-RS), one request per study, and reads the server's
   answer instance by instance: what was stored, what was refused and why. Nothing is reported as stored
   that the server did not confirm.

Every failure (server unreachable, HTTP error, unknown study, refused store) raises :class:`DicomWebError`
whose message is one line naming the URL and the study.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from ichdlib.files import write_json
from ichdlib.serve.dicom_out import lenient_uids

#: Seconds before a request counts as failed.
TIMEOUT = 60.0
#: Tries per request (dicomweb-client's retry with exponential back-off).
ATTEMPTS = 3
_STUDY_IN_URL = re.compile(r"^(?P<base>.+?)/studies/(?P<study>[^/?#]+)/?$")


class DicomWebError(ValueError):
    """A DICOMweb request that failed; the message names the server and the study."""


def split_url(url: str) -> tuple[str, str | None]:
    """``http://host/dicom-web/studies/1.2.3`` -> (``http://host/dicom-web``, ``1.2.3``); a plain service URL
    gives (url, None)."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise DicomWebError(f"{url!r}: not a DICOMweb URL (expected http://host[:port]/path)")
    m = _STUDY_IN_URL.match(url)
    return (m["base"], m["study"]) if m else (url, None)


def _describe(exc: BaseException) -> str:
    """One line for a requests/HTTP error."""

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        r = exc.response
        text = " ".join((r.text or "").split())[:160]
        return f"HTTP {r.status_code} {r.reason or ''}".strip() + (f": {text}" if text else "")
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect (server down, wrong host or port?)"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {TIMEOUT:g} s"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


class Server:
    """A DICOMweb service (QIDO/WADO/STOW under one base URL)."""

    def __init__(self, url: str, timeout: float = TIMEOUT, attempts: int = ATTEMPTS) -> None:

        self.url = url.rstrip("/")
        session = requests.Session()
        session.request = _with_timeout(session.request, timeout)  # type: ignore[method-assign]
        self.client = DICOMwebClient(url=self.url, session=session)
        # busy servers (429/408/503/504) and dropped connections: a few tries, 0.5 s then 1 s apart
        self.client.set_http_retry_params(retry=attempts > 1, max_attempts=max(1, attempts),
                                          wait_exponential_multiplier=250)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DicomWebError:
            raise
        except Exception as exc:  # requests' and dicomweb-client's errors -> one line
            raise DicomWebError(f"{self.url}: {what} failed: {_describe(exc)}") from exc

    def find_studies(self, filters: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """QIDO-RS studies matching ``filters`` (attribute keyword -> value), as DICOM JSON."""
        return self._call("QIDO study search", self.client.search_for_studies, search_filters=filters or {}) or []

    def ct_series(self, study_uid: str) -> list[str]:
        """SeriesInstanceUIDs of the study's CT series (QIDO-RS)."""
        found = self._call(f"QIDO series search in study {study_uid}", self.client.search_for_series,
                           study_instance_uid=study_uid, search_filters={"Modality": "CT"}) or []
        return [_value(s, "0020000E") for s in found]

    def series(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series of a study (QIDO-RS) as ``{"uid", "modality", "description", "instances"}``."""
        found = self._call(f"QIDO series search in study {study_uid}", self.client.search_for_series,
                           study_instance_uid=study_uid,
                           fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"]) or []
        return [{"uid": _value(s, "0020000E"), "modality": _value(s, "00080060"),
                 "description": _value(s, "0008103E"), "instances": int(_value(s, "00201209") or 0)} for s in found]


def _with_timeout(request: Any, timeout: float) -> Any:
    def call(method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return request(method, url, **kwargs)

    return call


def _value(item: dict[str, Any], tag: str) -> str:
    """First value of a DICOM JSON attribute (empty when absent)."""
    values = (item.get(tag) or {}).get("Value") or [""]
    v = values[0]
    if isinstance(v, dict):  # PN
        v = v.get("Alphabetic", "")
    return str(v)


def select_studies(server: Server, studies: Sequence[str] = (), since: str | None = None,
                   filters: dict[str, str] | None = None) -> list[str]:
    """StudyInstanceUIDs to predict: every ``studies`` entry (each must be on the server) plus, when ``since``
    (YYYYMMDD) or ``filters`` are given, every study QIDO finds with them. Order kept, duplicates dropped."""
    out: list[str] = []
    for uid in studies:
        if not server.find_studies({"StudyInstanceUID": uid}):
            raise DicomWebError(f"{server.url}: study {uid} not found (QIDO-RS returned no match)")
        out.append(uid)
    if since is not None or filters:
        query = dict(filters or {})
        if since is not None:
            if not re.fullmatch(r"\d{8}", since):
                raise DicomWebError(f"--since {since!r}: expected a date as YYYYMMDD")
            query["StudyDate"] = f"{since}-"
        found = [_value(s, "0020000D") for s in server.find_studies(query)]
        if not found:
            raise DicomWebError(f"{server.url}: no study matches {query}")
        out += found
    if not out:
        raise DicomWebError("--dicomweb: name at least one --study (or a .../studies/UID URL), --since or --filter")
    return list(dict.fromkeys(out))


def retrieve_ct(server: Server, study_uid: str, dest: str | os.PathLike) -> list[Path]:
    """Download the study's CT series (WADO-RS) as ``dest/<study>/<series>/<k>.dcm``; returns the files."""

    series = server.ct_series(study_uid)
    if not series:
        raise DicomWebError(f"{server.url}: study {study_uid} has no CT series")
    files = []
    for s in series:
        folder = Path(dest) / _safe(study_uid) / _safe(s)
        folder.mkdir(parents=True, exist_ok=True)
        with lenient_uids():
            instances = server._call(f"WADO-RS retrieval of series {s} of study {study_uid}",
                                     server.client.retrieve_series, study_instance_uid=study_uid,
                                     series_instance_uid=s)
            for k, ds in enumerate(instances):
                path = folder / f"{k:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
    return files


def _safe(uid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uid)[-64:] or "x"


@dataclass
class StoreReport:
    """The server's answer to one STOW-RS request."""

    study_uid: str
    stored: list[str] = field(default_factory=list)  # SOPInstanceUIDs the server confirmed
    failed: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason
    warnings: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def store(server: Server, study_uid: str, paths: Iterable[str | os.PathLike]) -> StoreReport:
    """Send the files (one study's outputs) in one STOW-RS request and report instance by instance. Files that
    the server neither confirmed nor refused count as failed ("no answer for this instance")."""

    with lenient_uids():
        datasets = [pydicom.dcmread(p) for p in paths]
    report = StoreReport(study_uid)
    if not datasets:
        return report
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    with lenient_uids():
        try:
            answer = server.client.store_instances(datasets=datasets, study_instance_uid=study_uid)
        except Exception as exc:
            reason = _describe(exc)
            report.failed = dict.fromkeys(sent, reason)
            return report
    for item in answer.get("ReferencedSOPSequence", []) or []:
        uid = str(item.ReferencedSOPInstanceUID)
        report.stored.append(uid)
        if "WarningReason" in item:
            report.warnings[uid] = f"warning 0x{int(item.WarningReason):04X}"
    for item in answer.get("FailedSOPSequence", []) or []:
        report.failed[str(item.ReferencedSOPInstanceUID)] = f"failure reason 0x{int(item.get('FailureReason', 0)):04X}"
    for uid in sent:
        if uid not in report.stored and uid not in report.failed:
            report.failed[uid] = "no answer for this instance in the server's STOW-RS response"
    return report


__all__ = ["Server", "DicomWebError", "StoreReport", "split_url", "select_studies", "retrieve_ct", "store"]


# --------------------------------------------------------------------------------------------------
# ichd predict --dicomweb
# --------------------------------------------------------------------------------------------------
def parse_filters(items: Sequence[str] | None) -> dict[str, str]:
    """``["Modality=CT", "PatientID=X"]`` -> dict; a malformed item is an error naming it."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DicomWebError(f"--filter {item!r}: expected KEY=VALUE, e.g. PatientID=12345 or StudyDate=20240101-")
        out[key.strip()] = value.strip()
    return out


def fetch(args: Any, dest: str | os.PathLike) -> tuple[Server, list[str]]:
    """``ichd predict --dicomweb``: resolve the studies and download their CT series under ``dest``."""
    base, in_url = split_url(args.dicomweb)
    server = Server(base)
    studies = list(args.study or []) + ([in_url] if in_url else [])
    uids = select_studies(server, studies, since=args.since, filters=parse_filters(args.filter))
    n = 0
    for uid in uids:
        n += len(retrieve_ct(server, uid, dest))
    print(f"retrieved {n} CT instance(s) of {len(uids)} stud{'y' if len(uids) == 1 else 'ies'} from {base}")
    return server, uids


def store_outputs(server: Server, written: Sequence[Any], out: str | os.PathLike) -> int:
    """STOW-RS each study's outputs (:class:`ichdlib.serve.dicom_out.StudyOutputs`) back to ``server``; print and
    write ``out/stored.json`` (per study: stored and failed SOPInstanceUIDs). 0 when everything was stored."""

    reports = [store(server, w.study_uid, w.paths) for w in written]
    doc = {"server": server.url, "studies": [{"study_uid": r.study_uid, "stored": r.stored, "failed": r.failed,
                                              "warnings": r.warnings} for r in reports]}
    write_json(Path(out) / "stored.json", doc)
    bad = 0
    for r in reports:
        total = len(r.stored) + len(r.failed)
        if r.ok:
            print(f"stored {len(r.stored)} instance(s) in study {r.study_uid} on {server.url}")
        else:
            bad += 1
            first = next(iter(r.failed.items()))
            print(f"store incomplete for study {r.study_uid}: {len(r.stored)} of {total} instance(s) stored, "
                  f"{len(r.failed)} refused (e.g. {first[0]}: {first[1]}); see {Path(out) / 'stored.json'}")
    return 0 if bad == 0 else 1
