"""A PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) with dicomweb-client: the requests of
``ichd predict --dicomweb URL --study UID [--since YYYYMMDD] [--filter KEY=VALUE] ... [--store]``.

- :func:`select_studies` finds the studies (QIDO-RS): each ``--study`` must exist on the server; ``--since``
  and ``--filter`` add the studies that match (StudyDate from that day on, any QIDO attribute).
- :func:`retrieve_ct` downloads one study's CT series (WADO-RS, streamed) into a folder, one file per instance.
- :func:`store` sends one study's outputs back (STOW-RS) and reads the server's answer instance by instance:
  what was stored, what was refused and why. Nothing is reported as stored that the server did not confirm.

Credentials, TLS, timeouts and retries are the session's (:mod:`ichdlib.serve.transport`); the run over many
studies (one at a time, resumable) is :mod:`ichdlib.serve.dicomweb_run`. Every failure raises
:class:`DicomWebError` whose message is one line naming the URL and the study.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from ichdlib.serve.dicom_out import lenient_uids
from ichdlib.serve.transport import Transport, describe, is_fatal, make_session

_STUDY_IN_URL = re.compile(r"^(?P<base>.+?)/studies/(?P<study>[^/?#]+)/?$")


class DicomWebError(ValueError):
    """A DICOMweb request that failed; the message names the server and the study. ``fatal``: every further
    request would fail the same way (credentials, TLS, server gone), so a many-study run stops."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def split_url(url: str) -> tuple[str, str | None]:
    """``http://host/dicom-web/studies/1.2.3`` -> (``http://host/dicom-web``, ``1.2.3``); a plain service URL
    gives (url, None)."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise DicomWebError(f"{url!r}: not a DICOMweb URL (expected http://host[:port]/path)")
    m = _STUDY_IN_URL.match(url)
    return (m["base"], m["study"]) if m else (url, None)


class Server:
    """A DICOMweb service (QIDO/WADO/STOW under one base URL), reached with ``transport``'s credentials, TLS,
    timeout and retries (:mod:`ichdlib.serve.transport`)."""

    def __init__(self, url: str, transport: Transport | None = None) -> None:
        self.url = url.rstrip("/")
        self.transport = transport or Transport()
        session, self.credentials = make_session(self.url, self.transport)
        self.client = DICOMwebClient(url=self.url, session=session, timeout=self.transport.timeout)
        # retries are the session's (urllib3 Retry: 429/5xx, dropped connections, back-off), not a second layer
        self.client.set_http_retry_params(retry=False)

    def error(self, what: str, exc: BaseException) -> DicomWebError:
        """The one-line error of a failed request (``what``: the request and its study)."""
        return DicomWebError(f"{self.url}: {what} failed: {describe(exc, self.credentials, self.transport.timeout)}",
                             fatal=is_fatal(exc))

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DicomWebError:
            raise
        except Exception as exc:  # requests' and dicomweb-client's errors -> one line
            raise self.error(what, exc) from None

    def find_studies(self, filters: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """QIDO-RS studies matching ``filters`` (attribute keyword -> value), as DICOM JSON; every page of
        the answer (servers cap each answer, e.g. at 100 studies) unless one study is asked for."""
        one = bool(filters and "StudyInstanceUID" in filters)
        what = "QIDO study search" + (f" for study {filters['StudyInstanceUID']}" if one and filters else "")
        return self._call(what, self.client.search_for_studies, search_filters=filters or {},
                          get_remaining=not one) or []

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

    def instances(self, study_uid: str, series_uid: str) -> set[str]:
        """SOPInstanceUIDs the server holds in one series of a study (QIDO-RS)."""
        found = self._call(f"QIDO instance search in study {study_uid}", self.client.search_for_instances,
                           study_instance_uid=study_uid, series_instance_uid=series_uid) or []
        return {_value(i, "00080018") for i in found}

    def instance_url(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The WADO-RS address of one instance (what ``problems.csv`` names for a PACS source)."""
        return f"{self.url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


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


@dataclass
class Retrieved:
    """One study's CT instances downloaded by :func:`retrieve_ct`: local file -> (series, SOP instance UID)."""

    study_uid: str
    files: dict[Path, tuple[str, str]] = field(default_factory=dict)


def retrieve_ct(server: Server, study_uid: str, dest: str | os.PathLike) -> Retrieved:
    """Download the study's CT series (WADO-RS, streamed: one instance in memory at a time) as
    ``dest/<study>/<series>/<SOPInstanceUID>.dcm``. A download that breaks after the server began answering
    (dropped connection, fewer instances than QIDO-RS announced) is tried again, ``retries`` times."""
    series = [s for s in server.series(study_uid) if s["modality"] == "CT"]
    if not series:
        raise DicomWebError(f"{server.url}: study {study_uid} has no CT series")
    out = Retrieved(study_uid)
    for s in series:
        folder = Path(dest) / _safe(study_uid) / _safe(s["uid"])
        what = f"WADO-RS retrieval of series {s['uid']} of study {study_uid}"
        for attempt in range(server.transport.retries + 1):
            got: dict[Path, tuple[str, str]] = {}
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with lenient_uids():
                    for ds in server.client.iter_series(study_instance_uid=study_uid, series_instance_uid=s["uid"]):
                        sop = str(ds.SOPInstanceUID)
                        path = folder / f"{_safe(sop)}.dcm"
                        ds.save_as(path, enforce_file_format=True)
                        got[path] = (s["uid"], sop)
                if s["instances"] and len(got) < s["instances"]:
                    raise requests.exceptions.ChunkedEncodingError(
                        f"{len(got)} of {s['instances']} instances received")
                break
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError,
                    requests.Timeout) as exc:  # broke mid-answer: the session's retries do not cover this
                if attempt == server.transport.retries:
                    raise server.error(what, exc) from None
                time.sleep(server.transport.backoff * 2 ** attempt)
            except requests.ConnectionError as exc:  # refused/unreachable: the session already retried
                raise server.error(what, exc) from None
            except DicomWebError:
                raise
            except Exception as exc:
                raise server.error(what, exc) from None
        out.files.update(got)
    return out


def _safe(uid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uid)[-64:] or "x"


@dataclass
class StoreReport:
    """The server's answer to one STOW-RS request."""

    study_uid: str
    stored: list[str] = field(default_factory=list)  # SOPInstanceUIDs the server confirmed
    failed: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason
    warnings: dict[str, str] = field(default_factory=dict)
    fatal: bool = False  # the request failed in a way every further one would (credentials, TLS, server gone)

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
            report.failed = dict.fromkeys(sent, describe(exc, server.credentials, server.transport.timeout))
            report.fatal = is_fatal(exc)
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


def parse_filters(items: Sequence[str] | None) -> dict[str, str]:
    """``["Modality=CT", "PatientID=X"]`` -> dict; a malformed item is an error naming it."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DicomWebError(f"--filter {item!r}: expected KEY=VALUE, e.g. PatientID=12345 or StudyDate=20240101-")
        out[key.strip()] = value.strip()
    return out


__all__ = ["Server", "DicomWebError", "StoreReport", "Retrieved", "split_url", "select_studies", "retrieve_ct", "store",
           "parse_filters"]
