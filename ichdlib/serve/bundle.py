"""Model bundles: everything ``ichd predict`` needs from a finished run, in one folder, loadable without
executing pickled code.

``ichd export --run PARAMS_OR_WORK_DIR --out BUNDLE`` writes::

    BUNDLE/
      bundle.json                      the manifest (below)
      params.yaml                      the run's validated params
      cnn/<key>/fold<k>.safetensors    2D CNN weights, one file per fold
      seq/<model>/fold<k>.safetensors  sequence model weights, one file per fold

``bundle.json``: ``format`` (``ichd-bundle``), ``format_version``, ``created`` (UTC, ISO 8601), ``run``,
``labels`` (the output order), ``windows`` (recipe, single window, learnable, the presets),
``val_center_crop``, ``tta`` (views), ``backbones`` (per 2D CNN: key, timm name, image size, HU cache size,
folds, feature dim, checkpoint meta, files), ``seq`` (backbone keys in input order, models with their folds,
meta and files), ``ensemble`` (method, members, weights), ``params`` (the params as JSON), ``versions``
(ichdlib, python, torch, timm, numpy, pydicom, safetensors), ``files`` (sha256 of every weights file,
checked at load) and ``integrity`` (sha256 of the manifest itself without this key, checked at load); optional
``training`` (the training data's slice thickness, z and pixel spacing and in-plane field of view,
:mod:`ichdlib.serve.inplane`) and ``operating_point``.

``bundle.json`` is not trusted as written: :class:`Manifest` (pydantic; the per-backbone entry is its own
model, :class:`BackboneEntry`) checks it at load. File entries must be plain relative names inside the
bundle (no absolute paths, ``..``, backslashes, links out of the folder); image sizes, folds, feature widths,
TTA views and crop are range-checked; blend weights are finite, in [0, 1] and sum to 1, and every blend
member names a model of the bundle; the params validate as a params file does. Each failure is a one-line
:class:`BundleError` naming ``bundle.json`` and the key. Exported files are 0644, folders 0755.

:class:`Bundle` is the in-memory form. ``Bundle.from_run(P)`` loads the run's own checkpoints (what the
notebooks used), ``bundle.save(out)`` writes the folder, ``Bundle.load(out)`` reads it back; prediction
takes either, so the round trip can be checked exactly.

The bundle code is split along its seams: :mod:`ichdlib.serve.bundle_schema` (the manifest schema),
:mod:`ichdlib.serve.bundle_build` (members from a run's checkpoints, the manifest), this module (the
:class:`Bundle`, saving and loading) and :mod:`ichdlib.serve.bundle_cli` (``ichd export``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from ichdlib.config import Params, dump_params, load_params
from ichdlib.files import json_ready
from ichdlib.labels import LABELS
from ichdlib.layout import PARAMS_FILE
from ichdlib.serve.bundle_build import (  # noqa: F401  (re-exported: the bundle API in one import)
    Member,
    collect_run,
    ensemble_spec,
    library_versions,
    untrained_members,
)
from ichdlib.serve.bundle_schema import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MAX_SIZE,
    BackboneEntry,
    BundleError,
    EnsembleSpec,
    Manifest,
    SeqModelEntry,
    VolumeEntry,
    _schema_error,
    manifest_digest,
    validate_manifest,
)
from ichdlib.serve.operating import DEFAULT_AGGREGATE, DEFAULT_THRESHOLD
from ichdlib.serve.series import DEFAULT_THICKNESS_MM
from ichdlib.tracking import log_bundle


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """The models, recipe and blend of one run (see the module docstring)."""

    manifest: dict[str, Any]
    cnn: dict[str, Member]
    seq: dict[str, Member]
    #: The 3D CNN member (at most one, key ``cnn3d``), when the run has one.
    cnn3d: dict[str, Member] = field(default_factory=dict)
    source: str = ""

    # -- views on the manifest --------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def seq_backbones(self) -> list[str]:
        """Backbone keys in the order the sequence models read them."""
        return list(self.manifest["seq"]["backbones"])

    @property
    def ensemble(self) -> dict[str, Any]:
        return self.manifest["ensemble"]

    def backbone(self, key: str) -> dict[str, Any]:
        """The manifest entry of a backbone."""
        for b in self.manifest["backbones"]:
            if b["key"] == key:
                return b
        raise KeyError(key)

    @property
    def training_mm(self) -> float:
        """Slice thickness (mm) of the training data; :data:`ichdlib.serve.series.DEFAULT_THICKNESS_MM` (5 mm)
        for a bundle that does not record it."""
        t = self.manifest.get("training") or {}
        return float(t.get("slice_thickness_mm") or DEFAULT_THICKNESS_MM)

    @property
    def thresholds(self) -> dict[str, float]:
        """Per-label operating point chosen at export; 0.5 for every label in a bundle without one."""
        op = self.manifest.get("operating_point") or {}
        return {c: float((op.get("thresholds") or {}).get(c, DEFAULT_THRESHOLD)) for c in LABELS}

    @property
    def aggregate(self) -> str:
        """How slice probabilities became study probabilities when the thresholds were chosen (``max``)."""
        return str((self.manifest.get("operating_point") or {}).get("aggregate") or DEFAULT_AGGREGATE)

    def params(self) -> Params:
        """The run's params (validated again; paths point to where the run was made)."""

        return Params.model_validate(self.manifest["params"])

    # -- from a run ---------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, P: Params) -> Bundle:
        """Collect a finished run's checkpoints, recipe and blend (nothing is written;
        :func:`ichdlib.serve.bundle_build.collect_run`)."""
        return cls(*collect_run(P), source=str(P.layout.work))

    @classmethod
    def untrained(cls, P: Params, folds: int | None = None) -> Bundle:
        """Randomly initialised models with the architectures, sizes and folds of ``P`` (every backbone,
        every sequence model, an equal-weight blend): for timing and smoke checks, never for predictions."""
        return cls(*untrained_members(P, folds), source="untrained")

    # -- saving and loading -------------------------------------------------------------------------
    def save(self, out: str | os.PathLike, force: bool = False) -> Path:
        """Write the bundle folder atomically (a temporary folder renamed into place)."""
        out = Path(out)
        if out.exists():
            if not force and any(out.iterdir()):
                raise BundleError(f"{out}: exists and is not empty (choose another --out, or --force)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            # NaN in a checkpoint's metrics becomes null: bundle.json is strict JSON
            manifest = json_ready(json.loads(json.dumps(self.manifest)))
            files: dict[str, str] = {}
            for kind, members in (("cnn", self.cnn), ("seq", self.seq), ("cnn3d", self.cnn3d)):
                entries = {"cnn": manifest["backbones"], "seq": manifest["seq"]["models"],
                           "cnn3d": manifest.get("cnn3d", [])}[kind]
                for entry in entries:
                    member = members[entry["key"]]
                    entry["files"] = {}
                    for fold, state in zip(member.folds, member.states, strict=True):
                        rel = f"{kind}/{member.key}/fold{fold}.safetensors"
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        # clone: tensors that share storage cannot be written by safetensors
                        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                                  str(tmp / rel), metadata={"format": "pt", "member": member.key, "fold": str(fold)})
                        entry["files"][str(fold)] = rel
                        files[rel] = _sha256(tmp / rel)
            manifest["files"] = files
            manifest["format_version"] = FORMAT_VERSION
            manifest.pop("integrity", None)
            manifest["integrity"] = manifest_digest(manifest)
            try:
                Manifest.model_validate(manifest)
            except ValidationError as exc:
                raise _schema_error(tmp / MANIFEST, exc) from None
            (tmp / PARAMS_FILE).write_text(dump_params(Params.model_validate(manifest["params"])))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _normal_permissions(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.manifest = manifest
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Read a bundle folder (weights through safetensors; no pickle) and check its files."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path}: not a model bundle (no {MANIFEST}); write one with 'ichd export'")
        try:
            raw = json.loads(mpath.read_text(), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{mpath}: not valid JSON ({exc})") from exc
        manifest = validate_manifest(mpath, raw)
        base = path.resolve()

        def read(entry: dict[str, Any], kind: str, metas: list[dict]) -> Member:
            what = {"cnn": "backbone", "cnn3d": "3D CNN"}.get(kind, "sequence model")
            folds = [int(k) for k in entry["folds"]]
            states = []
            for fold in folds:
                rel = entry["files"][str(fold)]
                f = path / rel
                if not f.resolve().is_relative_to(base):  # a link pointing out of the bundle
                    raise BundleError(f"{f}: weights file of {what} {entry['key']!r} leads outside the bundle")
                if not f.is_file():
                    raise BundleError(f"{f}: missing weights file of {what} {entry['key']!r} fold {fold}")
                if verify and _sha256(f) != manifest["files"].get(rel):
                    raise BundleError(f"{f}: checksum differs from {MANIFEST} (damaged or replaced file)")
                try:
                    states.append(load_file(str(f)))
                except Exception as exc:
                    raise BundleError(f"{f}: cannot read weights ({type(exc).__name__}: {exc})") from exc
            return Member(kind, entry["key"], folds, metas, states)

        cnn = {b["key"]: read(b, "cnn", b["metas"]) for b in manifest["backbones"]}
        seq = {m["key"]: read(m, "seq", m["metas"]) for m in manifest["seq"]["models"]}
        cnn3d = {m["key"]: read(m, "cnn3d", m["metas"]) for m in manifest.get("cnn3d", [])}
        return cls(manifest, cnn, seq, cnn3d, source=str(path))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _normal_permissions(folder: Path) -> None:
    """Folders 0755, files 0644 (``mkdtemp`` makes 0700: colleagues could not read the bundle)."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


# --------------------------------------------------------------------------------------------------
# A run -> a bundle folder
# --------------------------------------------------------------------------------------------------
def resolve_run(spec: str | os.PathLike) -> Params:
    """``--run``: a params YAML, or a run's work folder / reports folder holding ``params.yaml``."""

    p = Path(spec)
    if p.is_file():
        return load_params(p)
    if p.is_dir():
        for name in (PARAMS_FILE, "params_used.yaml"):
            if (p / name).is_file():
                return load_params(p / name)
        raise BundleError(f"{p}: no params.yaml in this folder; pass the params file the run was made with "
                          "(e.g. --run params/demo.yaml)")
    guess = Path("params") / f"{spec}.yaml"
    if guess.is_file():
        return load_params(guess)
    raise BundleError(f"--run {spec}: neither a params file, a run folder nor a run name with params/{spec}.yaml")


def export(run: str | os.PathLike | Params, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the bundle of a finished run (a Params object, a params file or a run folder) to ``out``."""

    P = run if isinstance(run, Params) else resolve_run(run)
    path = Bundle.from_run(P).save(out, force=force)
    log_bundle(P, path)  # a tracked run (reports/<run>/mlflow_run.json) gets the manifest and its checksum
    return path
