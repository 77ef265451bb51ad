"""``ichd predict --dicomweb``: many studies from a PACS, one at a time, resumable.

Each selected study (:func:`ichdlib.serve.dicomweb.select_studies`) goes through

1. **retrieve**: its CT series (WADO-RS, streamed) into a temporary folder of its own;
2. **predict** with the one :class:`~ichdlib.serve.pipeline.Predictor` of the run (models loaded once), the DICOM
   outputs written (``--dicom-out``); the temporary folder is removed as soon as the study is predicted, so
   disk holds one study's download at a time; per-study tables go to ``OUT/parts/<study>/``;
3. **store** (``--store``): its outputs back to the server (STOW-RS).

Every step is recorded in ``OUT/dicomweb_ledger.jsonl`` (one JSON line per step, flushed to disk before the
next begins), so a run that is killed or stopped picks up where it was: a study already stored (without
``--store``: already predicted) is skipped; a study predicted but not stored is stored from its local files
(never predicted again, which would make new UIDs and a second copy on the server); and a STOW-RS request that
was cut off (``storing`` with no answer recorded) is checked against the server (QIDO-RS) first: only the
instances it does not hold are sent. At the end: a table of stored / skipped / failed studies, and the output
tables (``slices.csv`` ...) of every study in the ledger, this run's and earlier runs'.

``problems.csv`` names PACS sources by their WADO-RS address
(``<server>/studies/<study>/series/<series>/instances/<sop>``), not by the deleted temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
from tqdm import tqdm

from ichdlib.files import write_json, write_text
from ichdlib.locks import output_lock
from ichdlib.serve.dicom_out import DicomWriter, bundle_identity, lenient_uids
from ichdlib.serve.dicomweb import (
    DicomWebError,
    Server,
    parse_filters,
    retrieve_ct,
    select_studies,
    split_url,
    store,
)
from ichdlib.serve.discover import PROBLEM_COLUMNS, problem, problems_frame
from ichdlib.serve.pipeline import Prediction, Predictor, predict_dir, summarize_studies
from ichdlib.serve.transport import from_args

LEDGER = "dicomweb_ledger.jsonl"
#: ledger states after which a study is not touched again (with --store / without)
DONE_STORE, DONE_PREDICT = {"stored"}, {"stored", "predicted", "storing", "store_failed"}

__all__ = ["Ledger", "RunResult", "run", "LEDGER"]


class Ledger:
    """``OUT/dicomweb_ledger.jsonl``: what happened to each study, one line per step; the last line of a study
    is its state. The first line names the server and the model; a folder of another server or model is
    refused (its skips would be wrong)."""

    def __init__(self, out: str | os.PathLike, server: str, model: str) -> None:
        self.path = Path(out) / LEDGER
        self.last: dict[str, dict[str, Any]] = {}
        head = {"ledger": 1, "server": server, "model": model}
        if self.path.exists():
            text = self.path.read_text()
            lines = text.splitlines()
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                self.last[rec["study_uid"]] = rec
            try:
                old = json.loads(lines[0]) if lines else {}
            except ValueError:
                old = {}
            if old and (old.get("server"), old.get("model")) != (server, model):
                raise ValueError(f"{self.path}: this folder holds a run against {old.get('server')} with model "
                                 f"{str(old.get('model'))[:12]}...; use another --out for {server} with this bundle")
            if text and not text.endswith("\n"):
                self._append("")  # finish a line cut short, so the next record starts on its own line
            if not lines:
                self._append(json.dumps(head))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(json.dumps(head))

    def _append(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def state(self, study_uid: str) -> str | None:
        rec = self.last.get(study_uid)
        return rec["state"] if rec else None

    def record(self, study_uid: str, state: str, **info: Any) -> None:
        """Append one step (flushed and synced before returning)."""
        rec = {"study_uid": study_uid, "state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        self._append(json.dumps(rec))
        self.last[study_uid] = rec


@dataclass
class RunResult:
    """What :func:`run` hands back to ``ichd predict``: the tables of every study in the ledger, the DICOM
    outputs written now, the exit code and (when the run stopped early) the reason."""

    pred: Prediction
    writer: DicomWriter | None
    rc: int
    stopped: str = ""
    table: list[tuple[str, str, str]] = field(default_factory=list)  # (study, result, note)


def _parts(out: Path, study_uid: str) -> Path:
    return out / "parts" / "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in study_uid)[-64:]


def _write_parts(out: Path, study_uid: str, slices: pd.DataFrame, problems: pd.DataFrame) -> None:
    folder = _parts(out, study_uid)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "slices.csv", slices.to_csv(index=False))
    write_text(folder / "problems.csv", problems.reindex(columns=PROBLEM_COLUMNS).to_csv(index=False))


def _gather(out: Path, uids: list[str], threshold: float, seconds: dict[str, float], cams: list[str]) -> Prediction:
    """The output tables of the studies ``uids`` from their parts (earlier runs' included)."""
    slices, problems = [], []
    for uid in uids:
        folder = _parts(out, uid)
        for name, into in (("slices.csv", slices), ("problems.csv", problems)):
            if (folder / name).is_file() and (folder / name).stat().st_size > 1:
                frame = pd.read_csv(folder / name, dtype={"study_uid": str, "series_uid": str, "sop_uid": str},
                                    keep_default_na=False if name == "problems.csv" else True)
                if len(frame):
                    into.append(frame)
    sl = pd.concat(slices, ignore_index=True) if slices else pd.DataFrame()
    pr = pd.concat(problems, ignore_index=True) if problems else problems_frame([])
    return Prediction(sl, summarize_studies(sl, threshold), pr.reindex(columns=PROBLEM_COLUMNS), seconds, cams)


def _pacs_path(path: Any, where: dict[str, str], study_url: str) -> Any:
    """A local path of a downloaded instance as its WADO-RS address; a series left out whole is named by its
    first file and ``(+N more)``: the suffix is kept. Anything else of the study: the study's address."""
    if not isinstance(path, str) or not path:
        return path
    first, sep, more = path.partition(" (+")
    return where.get(str(Path(first).resolve()), study_url) + (sep + more if sep else "")


def _sops(paths: list[Path]) -> list[list[str]]:
    """[path, SeriesInstanceUID, SOPInstanceUID] of each output file."""
    with lenient_uids():
        heads = [pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
                 for p in paths]
    return [[str(p), str(h.SeriesInstanceUID), str(h.SOPInstanceUID)] for p, h in zip(paths, heads, strict=True)]


class _Study:
    """One study's trip: retrieve, predict, store; each step recorded in the ledger."""

    def __init__(self, ctx: dict[str, Any], uid: str) -> None:
        self.ctx, self.uid = ctx, uid
        self.server: Server = ctx["server"]
        self.ledger: Ledger = ctx["ledger"]

    def predict(self) -> list[list[str]]:
        """Retrieve and predict; the study's outputs as [path, series, sop] (empty without --dicom-out)."""
        c = self.ctx
        writer: DicomWriter | None = c["writer"]
        before = len(writer.written) if writer is not None else 0
        with tempfile.TemporaryDirectory(prefix="ichd-dicomweb-") as tmp:
            got = retrieve_ct(self.server, self.uid, tmp)
            pred = predict_dir(tmp, c["bundle"], threshold=c["threshold"], cam_dir=c["cam_dir"],
                               predictor=c["predictor"], on_study=writer)
            # name the PACS instance, not the temporary file (gone in a moment)
            where = {str(Path(p).resolve()): self.server.instance_url(self.uid, series, sop)
                     for p, (series, sop) in got.files.items()}
            study_url = f"{self.server.url}/studies/{self.uid}"
            for frame in (pred.slices, pred.problems):
                if "path" in frame:
                    frame["path"] = [_pacs_path(p, where, study_url) for p in frame["path"]]
        for k in ("read", "model"):
            c["seconds"][k] = c["seconds"].get(k, 0.0) + float(pred.seconds.get(k, 0.0))
        _write_parts(c["out"], self.uid, pred.slices, pred.problems)
        if pred.slices.empty:
            first = next(iter(pred.problems["message"]), "no slice could be predicted")
            raise DicomWebError(f"study {self.uid}: not predicted ({first}); see problems.csv")
        outputs = []
        if writer is not None:
            outputs = _sops([p for w in writer.written[before:] if w.study_uid == self.uid for p in w.paths])
        self.ledger.record(self.uid, "predicted", outputs=outputs)
        return outputs

    def store(self, outputs: list[list[str]], resumed: bool) -> int:
        """STOW-RS the outputs (after a cut-off STOW, only what the server lacks); the number stored."""
        missing = [p for p, _, _ in outputs if not Path(p).is_file()]
        if missing:
            raise DicomWebError(f"study {self.uid}: {len(missing)} output file(s) of an earlier run are gone (e.g. "
                                f"{missing[0]}); not predicting again (it would store a second copy)")
        held: set[str] = set()
        if resumed:  # a STOW that may have reached the server before the run was stopped
            for series in sorted({s for _, s, _ in outputs}):
                held |= self.server.instances(self.uid, series)
        send = [(p, sop) for p, _, sop in outputs if sop not in held]
        already = [sop for _, _, sop in outputs if sop in held]
        self.ledger.record(self.uid, "storing", sending=[sop for _, sop in send], already=already)
        report = store(self.server, self.uid, [p for p, _ in send])
        report.stored = already + report.stored
        info = {"stored": report.stored, "failed": report.failed, "warnings": report.warnings}
        if not report.ok:
            self.ledger.record(self.uid, "store_failed", **info)
            sop, why = next(iter(report.failed.items()))
            raise DicomWebError(f"{self.server.url}: STOW-RS of study {self.uid}: {len(report.stored)} of "
                                f"{len(outputs)} instance(s) stored, {len(report.failed)} refused (e.g. {sop}: {why})",
                                fatal=report.fatal)
        self.ledger.record(self.uid, "stored", **info)
        return len(report.stored)


def run(args: Any, bundle: Any) -> RunResult:
    """``ichd predict --dicomweb``: select, then retrieve / predict / store study by study (see the module doc)."""
    base, in_url = split_url(args.dicomweb)
    server = Server(base, from_args(args))
    studies = list(args.study or []) + ([in_url] if in_url else [])
    uids = select_studies(server, studies, since=args.since, filters=parse_filters(args.filter))
    out, do_store = Path(args.out), bool(getattr(args, "store", False))
    dicom_out = getattr(args, "dicom_out", None) or (out / "dicom" if do_store else None)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with output_lock(out / LEDGER, what="ichd predict --dicomweb"):
        ledger = Ledger(out, server.url, bundle_identity(bundle)["sha256"])
        writer = None
        if dicom_out is not None:  # with --cam the writer also writes the PNGs (each Grad-CAM computed once)
            writer = DicomWriter(dicom_out, bundle, _any(args.threshold), cam=args.cam,
                                 png_dir=out / "cam" if args.cam else None, pmap=getattr(args, "pmap", False))
        ctx = {"server": server, "ledger": ledger, "bundle": bundle, "threshold": args.threshold, "out": out,
               "writer": writer, "cam_dir": out / "cam" if args.cam and writer is None else None, "seconds": {}}
        done_states = DONE_STORE if do_store else DONE_PREDICT
        table: list[tuple[str, str, str]] = []
        counts = {"stored" if do_store else "predicted": 0, "skipped": 0, "failed": 0}
        stopped = ""
        bar = tqdm(uids, desc="studies", unit="study", disable=len(uids) < 2)
        for uid in bar:
            if stopped:
                table.append((uid, "not tried", "the run stopped"))
                continue
            state = ledger.state(uid)
            if state in done_states:
                counts["skipped"] += 1
                table.append((uid, "skipped", f"{state} by an earlier run"))
                continue
            try:
                trip = _Study(ctx, uid)
                if state in ("predicted", "storing", "store_failed"):  # outputs exist: store them, never redo
                    outputs = ledger.last[uid]["outputs"] if state == "predicted" else _outputs_of(ledger, uid)
                else:
                    if "predictor" not in ctx:
                        ctx["predictor"] = Predictor(bundle, args.device, fov_norm=not getattr(args, "no_fov_norm", False))
                    outputs = trip.predict()
                n = trip.store(outputs, resumed=state in ("storing", "store_failed")) if do_store else len(outputs)
                counts["stored" if do_store else "predicted"] += 1
                table.append((uid, "stored" if do_store else "predicted", f"{n} instance(s)"))
            except DicomWebError as exc:
                counts["failed"] += 1
                now = ledger.state(uid)
                if now in (None, "failed"):  # nothing predicted: the next run predicts it again
                    ledger.record(uid, "failed", message=str(exc))
                elif now != "store_failed":  # predicted: the next run stores these outputs, never new ones
                    ledger.record(uid, "store_failed", message=str(exc))
                if not _parts(out, uid).joinpath("slices.csv").exists():
                    _write_parts(out, uid, pd.DataFrame(), problems_frame(
                        [problem(str(exc), study_uid=uid, path=f"{server.url}/studies/{uid}")]))
                table.append((uid, "failed", str(exc)))
                if exc.fatal:
                    stopped = str(exc)
            bar.set_postfix(counts, refresh=False)
        bar.close()
        seconds = {"load_models": 0.0, **ctx["seconds"], "total": time.perf_counter() - t0, "studies": len(uids)}
        cams = sorted(str(p) for p in (out / "cam").rglob("*.png")) if args.cam and (out / "cam").is_dir() else []
        selected = set(uids)  # this run's studies, and earlier runs' that did not fail
        pred = _gather(out, [u for u in ledger.last if u in selected or ledger.state(u) != "failed"],
                       args.threshold, seconds, cams)
        if do_store:
            _write_stored(out, server.url, ledger, uids)
    _print_table(table, counts, ledger.path)
    rc = 2 if stopped else (1 if counts["failed"] else 0)
    return RunResult(pred, writer, rc, stopped, table)


def _outputs_of(ledger: Ledger, uid: str) -> list[list[str]]:
    """The outputs recorded when the study was predicted (its 'predicted' line, before 'storing')."""
    for line in reversed(ledger.path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("study_uid") == uid and rec.get("state") == "predicted":
            return rec["outputs"]
    raise DicomWebError(f"study {uid}: {ledger.path} has no 'predicted' line for it")


def _write_stored(out: Path, server: str, ledger: Ledger, uids: list[str]) -> None:
    """``OUT/stored.json``: per study of this run, the SOP Instance UIDs the server confirmed and refused."""
    studies = []
    for uid in uids:
        rec = ledger.last.get(uid) or {}
        if rec.get("state") in ("stored", "store_failed"):
            studies.append({"study_uid": uid, "state": rec["state"], "stored": rec.get("stored", []),
                            "failed": rec.get("failed", {}), "warnings": rec.get("warnings", {})})
    write_json(out / "stored.json", {"server": server, "studies": studies})


def _print_table(table: list[tuple[str, str, str]], counts: dict[str, int], ledger: Path) -> None:
    if not table:
        return
    width = max(len(u) for u, _, _ in table)
    print(f"{'study':<{width}}  {'result':<9}  note")
    for uid, result, note in table:
        print(f"{uid:<{width}}  {result:<9}  {note}")
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f" of {len(table)} stud{'y' if len(table) == 1 else 'ies'}"
          f"; ledger {ledger} (rerun the same command to resume)")


def _any(threshold: float | dict[str, float]) -> float:
    """The ``any`` threshold of per-label thresholds (the DICOM outputs call findings at one threshold)."""
    return float(threshold["any"]) if isinstance(threshold, dict) else float(threshold)
