"""The stage contract: what each stage reads and writes, its stamp, and whether it must rerun.

Every notebook stage declares what it reads (params sections, upstream stages, input files) and what it
writes. Its **stamp** is a digest of exactly those inputs:

- the params sections it reads (dumped as YAML, so a changed epoch count changes the stamp; paths are not
  part of it: where the data lives is covered by the data fingerprint),
- the data fingerprint (label CSVs and other top-level files by content, the DICOM folders by name and
  size) for stages that read the raw data,
- the content digests of the upstream stages' outputs (so a retrained CNN reruns features, sequence
  models, ensemble and review, whoever retrained it: ``ichd run``, ``ichd train`` or a notebook),
- the notebook's own code and the library version.

A stage runs when it never finished, when its stamp changed, or when asked (``--force``). It is told to
recompute (``force``) when what it read from upstream or from the data changed, because its earlier outputs
are then stale; when only its own params or code changed it runs without ``force`` and its library functions
reuse what is still current (a finished fold with the same settings, say). A stage that was interrupted
with the same stamp resumes from its checkpoints.

Stamps live in ``work/<run>/stages/<NN>.json`` and hold no absolute paths: a moved or copied checkout keeps
its finished stages. Content digests of outputs are cached by (size, mtime), so an unchanged rerun only
stats files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ichdlib import __version__
from ichdlib.config import Params
from ichdlib.files import nested_get, read_json, write_json
from ichdlib.layout import STAGE_OUTPUTS
from ichdlib.registry import resolve

__all__ = ["Stage", "STAGES", "StageReport", "stage_for", "stage_named", "stage_enabled", "forced", "applies", "Decision",
           "StampStore", "data_fingerprint", "outputs_digest", "params_digest", "decide"]

#: Files at the top of the data folder larger than this are fingerprinted by size, not content.
_CONTENT_LIMIT = 2 << 30


@dataclass
class StageReport:
    """What one run of a stage did, typed the same for every stage: one summary row per unit of work (a
    backbone, a sequence model, a split, ...), the seconds it took, and the stage function's own result
    (the catalog, the training summaries, ``{model: SeqResult}``, the ``EnsembleReport``, ...) for the
    notebook's plots. ``table()`` is what a notebook displays."""

    stage: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    result: Any = None

    def table(self) -> pd.DataFrame:
        """One row per unit of work."""
        return pd.DataFrame(self.rows)

    def __repr__(self) -> str:
        return f"StageReport({self.stage}: {len(self.rows)} row(s), {self.seconds:.1f} s)"


def forced(force: bool | str | Iterable[str] | None, number: str) -> bool:
    """Whether ``force`` (a notebook's papermill parameter: ``True``, ``"all"``, a stage number or a list of
    them) asks stage ``number`` to recompute."""
    if force is None or isinstance(force, bool):
        return bool(force)
    if isinstance(force, str):
        return force in {number, "all"}
    return number in set(map(str, force))


@dataclass(frozen=True)
class Stage:
    """One node of the pipeline DAG (a notebook): what it reads, what it writes, and ``run(params, force)``,
    the one entry that its notebook, ``ichd train`` and scripts call."""

    number: str
    name: str
    #: Params sections this stage reads (top-level keys or dotted paths such as ``cnn.backbones``).
    sections: tuple[str, ...]
    #: Stage numbers whose outputs this stage reads.
    upstream: tuple[str, ...] = ()
    #: Whether it reads the raw data folder (labels, DICOM listing).
    reads_data: bool = False
    #: Output files (globs relative to the work dir, or ``reports:``-prefixed relative to the reports dir)
    #: whose content identifies what downstream stages read.
    outputs: tuple[str, ...] = ()
    #: Recompute (``force``) when upstream outputs or data changed. Ingest does not need it: its own
    #: fingerprint rebuilds what the new inputs change, and keeps an expensive cache that they do not.
    force_on_change: bool = True
    #: Dotted params key naming a folder the stage reads besides the RSNA data (fingerprinted like it) and
    #: without which the stage does not apply (``ichd run`` leaves it out): notebook 07's ``external.data``.
    needs: str | None = None
    #: A params switch (dotted path, e.g. ``cnn3d.enabled``) that turns an optional stage on; when it is false
    #: ``ichd run`` skips the stage without starting its notebook.
    enabled_by: str | None = None
    #: The stage's work, ``"module:function"`` with ``function(P, force=False, **options) -> StageReport``
    #: (resolved on first use: the core never imports a stage's code).
    entry: str = ""

    def run(self, P: Params, force: bool | str | Iterable[str] | None = False, **options: Any) -> StageReport:
        """Do this stage's work in this process: skip what is current unless ``force`` (a bool, or the
        notebook's papermill ``force`` parameter: a stage number or a list of them) names this stage.
        ``options`` go to the entry (``ichd train``'s backbones, folds, ...)."""
        if not self.entry:
            raise ValueError(f"stage {self.number} ({self.name}) has no entry to run")
        t0 = time.perf_counter()
        report = resolve(self.entry)(P, force=forced(force, self.number), **options)
        if not report.seconds:
            report.seconds = round(time.perf_counter() - t0, 1)
        return report


STAGES: dict[str, Stage] = {s.number: s for s in (
    Stage("01", "ingest", ("seed", "synth", "ingest"), reads_data=True,
          outputs=STAGE_OUTPUTS["ingest"], force_on_change=False, entry="ichdlib.ingest.catalog:run_stage"),
    Stage("02", "cnn", ("seed", "windows", "cnn"), ("01",), outputs=STAGE_OUTPUTS["cnn"],
          entry="ichdlib.cnn.train:run_stage"),
    Stage("02b", "cnn3d", ("seed", "windows", "cnn.augment", "cnn.class_weights", "cnn.grad_clip", "cnn3d"), ("01",),
          outputs=STAGE_OUTPUTS["cnn3d"], entry="ichdlib.cnn3d.train:run_stage", enabled_by="cnn3d.enabled"),
    Stage("03", "features", ("seed", "windows", "cnn", "features"), ("01", "02"), outputs=STAGE_OUTPUTS["features"],
          entry="ichdlib.cnn.features:run_stage"),
    Stage("04", "seq", ("seed", "cnn.backbones", "seq"), ("01", "03"), outputs=STAGE_OUTPUTS["seq"],
          entry="ichdlib.seq.train:run_stage"),
    Stage("05", "ensemble", ("seed", "cnn.backbones", "seq.models", "ensemble", "cnn3d"), ("01", "02b", "03", "04"),
          reads_data=True, outputs=STAGE_OUTPUTS["ensemble"], entry="ichdlib.ensemble.blend:run_stage"),
    Stage("06", "review", ("seed", "cnn.backbones", "cam", "cnn3d"), ("01", "02", "02b", "05"), reads_data=True,
          outputs=STAGE_OUTPUTS["review"], entry="ichdlib.review.stage:run_stage"),
    Stage("07", "external", ("seed", "cnn.backbones", "seq.models", "ensemble", "cnn3d", "external"),
          ("01", "02", "02b", "04", "05"),
          outputs=STAGE_OUTPUTS["external"], entry="ichdlib.validate.run:run_stage", needs="external.data"),
    # no notebook (off in the demo): ``ichd train PARAMS --stage distill`` runs it (ichdlib.distill)
    Stage("08", "distill", ("seed", "windows", "cnn", "distill"), ("01", "05"), reads_data=True,
          outputs=STAGE_OUTPUTS["distill"], entry="ichdlib.distill.train:run_stage"),
)}


def applies(stage: Stage, P: Params) -> bool:
    """Whether ``ichd run`` runs the stage for these params (a stage with ``needs`` only when that key is set)."""
    return stage.needs is None or nested_get(P.model_dump(mode="json"), *stage.needs.split(".")) is not None


_NUMBERED = re.compile(r"^\d\d[a-z]?_.*\.ipynb$")


def stage_number(nb: Path | str) -> str:
    """The stage number of ``NN_name.ipynb`` or ``NNx_name.ipynb`` (``02b_cnn3d_training`` -> ``02b``, after
    ``02`` and before ``03``)."""
    return Path(nb).name.split("_", 1)[0]


def numbered_notebooks(folder: Path) -> list[Path]:
    """The stage notebooks (``NN_name.ipynb``, ``NNx_name.ipynb``) in a folder, in stage order."""
    return sorted(p for p in folder.glob("[0-9][0-9]*_*.ipynb") if _NUMBERED.match(p.name))


def stage_enabled(P: Params, stage: Stage) -> bool:
    """Whether an optional stage is switched on in ``P`` (always True for the others)."""
    return stage.enabled_by is None or bool(nested_get(P.model_dump(mode="json"), *stage.enabled_by.split(".")))


def stage_named(name: str) -> Stage:
    """The stage called ``name`` (``cnn``, ``features``, ``seq``, ...)."""
    for s in STAGES.values():
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(s.name for s in STAGES.values())}")


def stage_for(number: str, known: Iterable[str] = ()) -> Stage:
    """The declared stage, or for an unknown notebook number a conservative one: all params, every earlier
    stage upstream, the data read."""
    if number in STAGES:
        return STAGES[number]
    earlier = tuple(k for k in sorted(set(known)) if k < number)
    return Stage(number, f"stage{number}", ("*",), earlier, reads_data=True, outputs=())


# -- digests ---------------------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


#: Settings that change how fast a stage runs, never what it writes: left out of the stamps, so flipping
#: them reruns nothing (and stamps written before they existed stay current).
UNSTAMPED = (("cnn", "fold_jobs"), ("seq", "fold_jobs"))


def _without_unstamped(dump: dict[str, Any]) -> dict[str, Any]:
    out = dict(dump)
    for section, key in UNSTAMPED:
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def params_digest(P: Params, sections: Iterable[str], dump: dict[str, Any] | None = None) -> str:
    """Digest of the named params sections (dotted paths such as ``cnn.backbones`` allowed; ``*`` = all but
    paths, root, device and run). ``dump``: ``P.model_dump(mode="json")`` when the caller has it already."""
    dump = _without_unstamped(P.model_dump(mode="json") if dump is None else dump)
    skip = {"paths", "root", "device", "run"}
    keys = sorted(k for k in dump if k not in skip) if "*" in sections else sorted(sections)
    return _sha(yaml.safe_dump({k: nested_get(dump, *k.split(".")) for k in keys}, sort_keys=True).encode())


class _HashCache:
    """Content digests keyed by (relative path, size, mtime): unchanged files are only stat'ed."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, list] = (read_json(path) or {}) if path is not None else {}
        self.dirty = False

    def digest(self, f: Path, key: str) -> str:
        st = f.stat()
        hit = self.data.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        d = h.hexdigest()[:16]
        self.data[key] = [st.st_size, st.st_mtime_ns, d]
        self.dirty = True
        return d

    def save(self) -> None:
        if self.dirty and self.path is not None:
            write_json(self.path, self.data)
            self.dirty = False


def data_fingerprint(root: Path, cache: _HashCache | None = None) -> str:
    """The data folder: top-level files by content (label CSVs, answer key, manifests), everything below by
    relative name and size. ``missing`` when the folder does not exist yet (a phantom still to generate)."""
    if not root.is_dir():
        return "missing"
    cache = cache or _HashCache(None)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if name.endswith(".lock") or name.startswith(".") and name != ".phantom_complete":
                continue
            f = Path(dirpath) / name
            try:
                st = f.stat()
            except OSError:
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel_dir == "." and st.st_size <= _CONTENT_LIMIT:
                h.update(f"{rel}|{cache.digest(f, 'data:' + rel)}\n".encode())
            else:
                h.update(f"{rel}|{st.st_size}\n".encode())
    return h.hexdigest()[:16]


def outputs_digest(P: Params, stage: Stage, cache: _HashCache | None = None) -> str:
    """Digest of a stage's declared outputs as they are on disk now (``none`` when there are none)."""
    cache = cache or _HashCache(None)
    h = hashlib.sha256()
    found = 0
    for pattern in stage.outputs:
        base, pat = P.layout.outputs_root(pattern)
        for f in sorted(base.glob(pat)):
            if f.is_file():
                rel = f.relative_to(base).as_posix()
                h.update(f"{pattern}|{rel}|{cache.digest(f, 'out:' + pattern + ':' + rel)}\n".encode())
                found += 1
    return h.hexdigest()[:16] if found else "none"


# -- stamps ------------------------------------------------------------------------------------------------
@dataclass
class Decision:
    """Whether a stage runs, why, and with ``force`` or not."""

    stage: Stage
    run: bool
    force: bool
    reasons: list[str] = field(default_factory=list)
    parts: dict[str, str] = field(default_factory=dict)

    @property
    def stamp(self) -> str:
        return _sha(json.dumps(self.parts, sort_keys=True).encode())

    def explain(self) -> str:
        if not self.run:
            return "up to date"
        how = " (recompute)" if self.force else ""
        return "; ".join(self.reasons) + how


class StampStore:
    """``work/<run>/stages/``: one JSON per stage plus the digest cache."""

    def __init__(self, P: Params):
        self.P = P
        self.layout = P.layout
        self.dir = self.layout.stages
        self.cache = _HashCache(self.layout.digests)
        #: data fingerprint and upstream output digests, computed once until a stage starts running (which may
        #: change them): a full-size data folder is walked once per `ichd run`, not once per stage.
        self._memo: dict[str, str] = {}

    def _once(self, key: str, compute: Any) -> str:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def read(self, number: str) -> dict[str, Any]:
        return read_json(self.layout.stamp(number)) or {}

    def write(self, number: str, record: dict[str, Any]) -> None:
        write_json(self.layout.stamp(number), record)
        self.cache.save()

    def parts(self, stage: Stage, notebook: Path | None, known: Iterable[str]) -> dict[str, str]:
        """What the stage reads, digested part by part (compared part by part to explain a rerun)."""
        dump = self.P.model_dump(mode="json")
        parts = {f"params:{sec}": params_digest(self.P, [sec], dump) for sec in stage.sections}
        parts["library"] = __version__
        if notebook is not None and notebook.is_file():
            parts["notebook"] = self.cache.digest(notebook, "notebook:" + notebook.name)
        if stage.reads_data:
            parts["data"] = self._once("data", lambda: data_fingerprint(self.P.data_root, self.cache))
            if self.P.synth.enabled:
                # the phantom's package (its version constant only) loads for phantom runs, never for real data
                from ichdlib.phantom import PHANTOM_VERSION  # noqa: PLC0415

                parts["phantom_version"] = str(PHANTOM_VERSION)
        if stage.needs is not None:
            folder = nested_get(dump, *stage.needs.split("."))
            if folder is not None:
                parts[f"data:{stage.needs}"] = self._once(
                    f"data:{stage.needs}", lambda: data_fingerprint(self.P._resolve(Path(folder)), self.cache))
        known = set(known)
        for up in stage.upstream:
            upstage = stage_for(up, known)
            parts[f"upstream:{up}"] = self._once(f"outputs:{up}", lambda s=upstage: outputs_digest(self.P, s, self.cache))
        return parts

    def mark_started(self, number: str, decision: Decision) -> None:
        self._memo.clear()  # the stage about to run may change the data (the phantom) or outputs
        rec = self.read(number)
        rec.update({"stage": number, "name": decision.stage.name, "started": decision.stamp,
                    "started_parts": decision.parts, "started_at": time.time(), "status": "running"})
        self.write(number, rec)

    def mark_done(self, number: str, parts: dict[str, str], seconds: float) -> None:
        rec = self.read(number)
        stamp = _sha(json.dumps(parts, sort_keys=True).encode())
        rec.update({"stage": number, "done": stamp, "parts": parts, "status": "done",
                    "seconds": round(seconds, 2), "finished_at": time.time()})
        self.write(number, rec)

    def mark_failed(self, number: str, seconds: float, message: str) -> None:
        rec = self.read(number)
        rec.update({"status": "failed", "seconds": round(seconds, 2), "message": message[:500]})
        self.write(number, rec)


_LABELS = {"params": "its params changed (stamped by an older version)", "library": "the library version changed",
           "notebook": "the notebook changed", "data": "the data changed",
           "phantom_version": "the phantom version changed"}
_STALE = ("data", "phantom_version", "upstream:")


def decide(store: StampStore, stage: Stage, notebook: Path | None, known: Iterable[str], *,
           force: bool = False, report_exists: bool = True) -> Decision:
    """Compare a stage's current inputs with its last finished (and last started) run."""
    parts = store.parts(stage, notebook, known)
    rec = store.read(stage.number)
    d = Decision(stage, run=False, force=False, parts=parts)
    if force:
        d.run, d.force, d.reasons = True, True, ["--force"]
        return d
    done_parts = rec.get("parts") if rec.get("status") == "done" else None
    if rec.get("done") and done_parts is None:  # finished earlier, then restarted and interrupted
        done_parts = rec.get("parts")
    if done_parts is None:
        d.run = True
        if rec.get("status") in ("running", "failed") and rec.get("started_parts") == parts:
            d.reasons = ["interrupted earlier: resumes"]
        elif rec:
            d.reasons = ["its last run did not finish"]
            d.force = stage.force_on_change and _stale(rec.get("started_parts") or {}, parts)
        else:
            d.reasons = ["never ran"]
        return d
    changed = sorted(k for k in set(parts) | set(done_parts) if parts.get(k) != done_parts.get(k))
    if changed:
        d.run = True
        d.reasons = _reasons(changed)
        resumed = rec.get("status") in ("running", "failed") and rec.get("started_parts") == parts
        d.force = stage.force_on_change and not resumed and any(k.startswith(_STALE) for k in changed)
        if resumed:
            d.reasons.append("interrupted earlier: resumes")
    elif not report_exists:
        d.run, d.reasons = True, ["its report is missing"]
    return d


def _reasons(changed: list[str]) -> list[str]:
    """Readable reasons, one per kind of change: ``params changed: cnn, seq``, ``upstream 02 changed``, ..."""
    sections = [k.split(":", 1)[1] for k in changed if k.startswith("params:")]
    out = [f"params changed: {', '.join(sections)}"] if sections else []
    for k in changed:
        if k.startswith("upstream:"):
            out.append(f"upstream {k.split(':', 1)[1]} changed")
        elif not k.startswith("params"):
            out.append(_LABELS.get(k, f"{k} changed"))
    return out


def _stale(old: dict[str, str], new: dict[str, str]) -> bool:
    return any(old.get(k) != new.get(k) for k in set(old) | set(new) if k.startswith(_STALE))
