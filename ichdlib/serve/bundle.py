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
checked at load) and ``integrity`` (sha256 of the manifest itself without this key, checked at load).

``bundle.json`` is not trusted as written: :class:`Manifest` (pydantic; the per-backbone entry is its own
model, :class:`BackboneEntry`) checks it at load. File entries must be plain relative names inside the
bundle (no absolute paths, ``..``, backslashes, links out of the folder); image sizes, folds, feature widths,
TTA views and crop are range-checked; blend weights are finite, in [0, 1] and sum to 1, and every blend
member names a model of the bundle; the params validate as a params file does. Each failure is a one-line
:class:`BundleError` naming ``bundle.json`` and the key. Exported files are 0644, folders 0755.

:class:`Bundle` is the in-memory form. ``Bundle.from_run(P)`` loads the run's own checkpoints (what the
notebooks used), ``bundle.save(out)`` writes the folder, ``Bundle.load(out)`` reads it back; prediction
takes either, so the round trip can be checked exactly.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ichdlib.config import Params, dump_params, load_params
from ichdlib.ensemble.blend import resolve_members, stage_files
from ichdlib.ensemble.optional import blended_members
from ichdlib.files import json_ready
from ichdlib.labels import LABELS
from ichdlib.spec import ModelSpec, VolumeSpec
from ichdlib.windows import WINDOWS

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ichdlib.config import Params

FORMAT = "ichd-bundle"
#: 2: ``integrity`` (the manifest's own checksum) added; format 1 bundles are refused (export again).
FORMAT_VERSION = 2
MANIFEST = "bundle.json"
#: Largest image side a bundle may ask for (a 100000 px entry would try a 40 GB allocation).
MAX_SIZE = 2048


class BundleError(ValueError):
    """A bundle or run that cannot be exported or loaded; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# The manifest schema
# --------------------------------------------------------------------------------------------------
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.+-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _plain_name(value: str) -> str:
    """A file entry: a relative POSIX path of plain names inside the bundle (``cnn/<key>/fold0.safetensors``)."""
    parts = value.split("/")
    if not value or value.startswith("/") or any(p in ("", ".", "..") or not _SAFE_PART.match(p) for p in parts):
        raise ValueError(f"file entry {value!r} is not a plain relative name inside the bundle")
    return value


def _sha(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"{value!r} is not a sha256 hex digest")
    return value


PlainName = Annotated[str, AfterValidator(_plain_name)]
Sha256 = Annotated[str, AfterValidator(_sha)]
Fold = Annotated[int, Field(strict=True, ge=0, le=99)]
Size = Annotated[int, Field(strict=True, ge=16, le=MAX_SIZE)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _MemberEntry(_Schema):
    key: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.+-]+$")]
    folds: Annotated[list[Fold], Field(min_length=1)]
    metas: list[dict[str, Any]]
    files: dict[str, PlainName] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _per_fold(self) -> _MemberEntry:
        if len(set(self.folds)) != len(self.folds):
            raise ValueError(f"folds {self.folds} repeat a fold")
        if len(self.metas) != len(self.folds):
            raise ValueError(f"{len(self.metas)} metas for {len(self.folds)} folds")
        if self.files and sorted(self.files) != sorted(str(f) for f in self.folds):
            raise ValueError(f"files {sorted(self.files)} do not match folds {self.folds}")
        return self


class BackboneEntry(_MemberEntry):
    """One 2D CNN of the bundle, with its typed model spec (:class:`ichdlib.spec.ModelSpec`)."""

    name: Annotated[str, Field(min_length=1)]
    size: Size
    cache_size: Size
    feature_dim: Annotated[int, Field(strict=True, ge=1, le=65536)]
    spec: dict[str, Any]

    @field_validator("spec")
    @classmethod
    def _spec_reads(cls, v: dict[str, Any]) -> dict[str, Any]:
        ModelSpec.from_dict(v)  # SpecError (a ValueError) names the bad key
        return v

    @model_validator(mode="after")
    def _sizes_agree(self) -> BackboneEntry:
        spec = ModelSpec.from_dict(self.spec)
        if (spec.name, spec.size, spec.feature_dim) != (self.name, self.size, self.feature_dim):
            raise ValueError(f"the spec says {spec.name} at {spec.size} px with {spec.feature_dim} features, "
                             f"the entry {self.name} at {self.size} px with {self.feature_dim}")
        for meta in self.metas:
            if ModelSpec.from_meta(meta).size != self.size:
                raise ValueError(f"a fold's meta says size {ModelSpec.from_meta(meta).size}, the entry {self.size}")
        return self


class VolumeEntry(_MemberEntry):
    """The 3D CNN member (``cnn3d``) with its typed spec (:class:`ichdlib.spec.VolumeSpec`)."""

    size: Size
    spec: dict[str, Any]

    @field_validator("spec")
    @classmethod
    def _spec_reads(cls, v: dict[str, Any]) -> dict[str, Any]:
        VolumeSpec.from_dict(v)
        return v


class SeqModelEntry(_MemberEntry):
    """One sequence model of the bundle."""

    key: Literal["seq1", "seq2"]


class SeqSection(_Schema):
    backbones: list[str]
    models: list[SeqModelEntry]


def _weight(value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"blend weight {value!r} outside [0, 1]")
    return value


class EnsembleSpec(_Schema):
    method: Literal["mean", "fit"]
    members: Annotated[list[str], Field(min_length=1)]
    weights: dict[str, Annotated[float, AfterValidator(_weight)]]
    sources: dict[str, Literal["seq", "features", "cnn", "cnn3d"]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _weights_match(self) -> EnsembleSpec:
        if sorted(self.weights) != sorted(self.members):
            raise ValueError(f"weights for {sorted(self.weights)} but members {self.members}")
        total = sum(self.weights.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"blend weights sum to {total:g}, not 1")
        return self


class WindowsSection(_Schema):
    recipe: Literal["seed_3window", "adjacent_header", "three_window"]
    single_window: tuple[float, float]
    learnable: bool
    presets: dict[str, tuple[float, float]]


class Manifest(_Schema):
    """``bundle.json`` (see the module docstring)."""

    format: Literal["ichd-bundle"]
    format_version: Annotated[int, Field(strict=True, ge=FORMAT_VERSION, le=FORMAT_VERSION)]
    created: str
    run: str
    labels: list[str]
    windows: WindowsSection
    val_center_crop: Annotated[float, Field(gt=0, le=1)]
    tta: Annotated[int, Field(strict=True, ge=1, le=64)]
    backbones: Annotated[list[BackboneEntry], Field(min_length=1)]
    seq: SeqSection
    #: The 3D CNN member, when the run trained one (older bundles: none).
    cnn3d: list[VolumeEntry] = Field(default_factory=list, max_length=1)
    ensemble: EnsembleSpec
    params: dict[str, Any]
    versions: dict[str, str]
    files: dict[PlainName, Sha256]
    integrity: Sha256

    @model_validator(mode="after")
    def _references(self) -> Manifest:
        if self.labels != list(LABELS):
            raise ValueError(f"label order {self.labels} differs from {list(LABELS)}")
        keys = [b.key for b in self.backbones]
        if len(set(keys)) != len(keys):
            raise ValueError(f"backbone keys {keys} repeat")
        seq_keys = [m.key for m in self.seq.models]
        unknown = [k for k in self.seq.backbones if k not in keys]
        if unknown or (seq_keys and not self.seq.backbones):
            raise ValueError(f"seq.backbones {self.seq.backbones} must name backbones of the bundle {keys}")
        for m in self.ensemble.members:
            if not ((m.startswith("cnn:") and m[4:] in keys) or m in seq_keys or (m == "cnn3d" and self.cnn3d)):
                raise ValueError(f"ensemble member {m!r} names no model of the bundle (backbones {keys}, "
                                 f"sequence models {seq_keys})")
        listed = [f for e in [*self.backbones, *self.seq.models, *self.cnn3d] for f in e.files.values()]
        missing = sorted(set(listed) - set(self.files))
        if missing:
            raise ValueError(f"weights file(s) {missing} have no checksum in 'files'")
        return self


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its ``integrity`` key (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _schema_error(path: Path, exc: ValidationError) -> BundleError:
    parts = []
    for e in exc.errors()[:3]:
        key = ".".join(str(p) for p in e["loc"]) or "<top>"
        msg = str(e["msg"]).removeprefix("Value error, ")
        got = "" if e["type"] == "missing" or not e["loc"] else f" (got {_short(e.get('input'))})"
        parts.append(f"{key}: {'missing' if e['type'] == 'missing' else msg}{got}")
    more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return BundleError(f"{path}: invalid manifest: " + "; ".join(parts) + more)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_manifest(path: Path, raw: Any) -> dict[str, Any]:
    """Check a parsed ``bundle.json`` (schema, integrity, params); the dict itself on success."""
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise BundleError(f"{path}: not an {FORMAT} manifest (format={raw.get('format')!r})")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: format version {version} is newer than this ichdlib understands "
                          f"({FORMAT_VERSION}); update ichdlib")
    if version < FORMAT_VERSION:
        raise BundleError(f"{path}: format version {version} (no manifest checksum) is older than this ichdlib "
                          f"reads ({FORMAT_VERSION}); export the bundle again with 'ichd export'")
    try:
        Manifest.model_validate(raw)
    except ValidationError as exc:
        raise _schema_error(path, exc) from None
    if manifest_digest(raw) != raw["integrity"]:
        raise BundleError(f"{path}: manifest checksum differs from its 'integrity' entry (edited or damaged "
                          "bundle.json)")

    try:
        Params.model_validate(raw["params"])
    except ValidationError as exc:
        e = exc.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        raise BundleError(f"{path}: params.{key}: {str(e['msg']).removeprefix('Value error, ')}") from None
    return raw


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Checkpoint meta -> plain JSON (tuples as lists, numpy/torch scalars as numbers, paths as text)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalar
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (recorded in the manifest, compared at load)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("ichdlib", "torch", "timm", "numpy", "pydicom", "safetensors", "opencv-python-headless"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fold_files(folder: Path) -> dict[int, Path]:
    """``fold<k>.pt`` files of a stage folder (``fold<k>_last.pt`` resume files are not models)."""
    out = {}
    for p in folder.glob("fold*.pt"):
        k = p.stem[4:]
        if k.isdigit():
            out[int(k)] = p
    return dict(sorted(out.items()))


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from ichdlib.cnn.models import read_checkpoint

    try:
        return read_checkpoint(path)
    except (ValueError, FileNotFoundError) as exc:
        raise BundleError(str(exc)) from exc


# --------------------------------------------------------------------------------------------------
# Building the models from meta (the same constructors the stages use)
# --------------------------------------------------------------------------------------------------
def _build_cnn(meta: dict[str, Any], state: dict[str, torch.Tensor], device: str) -> torch.nn.Module:
    from ichdlib.cnn.models import build_from_meta

    model = build_from_meta(meta)
    model.load_state_dict(state)
    return model.to(device).eval()


def _build_cnn3d(meta: dict[str, Any], state: dict[str, torch.Tensor], device: str) -> torch.nn.Module:
    from ichdlib.cnn3d.models import build_from_meta3d

    return build_from_meta3d(meta, state).to(device).eval()


def _build_seq(meta: dict[str, Any], state: dict[str, torch.Tensor], device: str) -> torch.nn.Module:
    from ichdlib.seq.models import build_seq_model

    # the same arguments as ichdlib.seq.infer.load_seq_model (checkpoints keep the widths under "arch")
    arch = meta.get("arch") or {k: meta[k] for k in ("reduce_dim", "hidden", "dropout") if k in meta}
    model = build_seq_model(meta["model"], meta["in_dim"], meta["n_cnn"], meta["x_channels"], **arch)
    model.load_state_dict(state)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------------
@dataclass
class Member:
    """One trained stage: a 2D backbone or a sequence model, with one model per fold."""

    kind: str  # "cnn" | "seq" | "cnn3d"
    key: str  # backbone key (``BackboneCfg.key``) or sequence model name
    folds: list[int]
    metas: list[dict[str, Any]]
    states: list[dict[str, torch.Tensor]]
    models: list[torch.nn.Module] = field(default_factory=list)

    def build(self, device: str) -> list[torch.nn.Module]:
        """The fold models in eval mode on ``device`` (built once, moved when the device changes)."""
        build = {"cnn": _build_cnn, "cnn3d": _build_cnn3d}.get(self.kind, _build_seq)
        if not self.models:
            self.models = [build(m, s, device) for m, s in zip(self.metas, self.states, strict=True)]
        else:
            self.models = [m.to(device) for m in self.models]
        return self.models


@dataclass
class Bundle:
    """The models, recipe and blend of one run (see the module docstring)."""

    manifest: dict[str, Any]
    cnn: dict[str, Member]
    seq: dict[str, Member]
    source: str = ""
    #: The 3D CNN member (at most one, key ``cnn3d``), when the run has one.
    cnn3d: dict[str, Member] = field(default_factory=dict)

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

    def params(self) -> Params:
        """The run's params (validated again; paths point to where the run was made)."""

        return Params.model_validate(self.manifest["params"])

    # -- from a run ---------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, P: Params) -> Bundle:
        """Collect a finished run's checkpoints, recipe and blend (nothing is written)."""
        from ichdlib.seq.inputs import backbone_keys

        work = P.work_dir
        seq_keys = backbone_keys(P)
        members = list(P.ensemble.members)
        want_cnn = list(seq_keys)
        for m in members:
            if m.startswith("cnn:"):
                name = m[4:]
                for k in ([b.key for b in P.cnn.backbones] if name == "*" else [name]):
                    if k not in want_cnn:
                        want_cnn.append(k)
        by_key = {b.key: b for b in P.cnn.backbones}
        cnn: dict[str, Member] = {}
        for key in want_cnn:
            if key not in by_key:
                raise BundleError(f"backbone {key!r} is not among cnn.backbones ({', '.join(by_key)})")
            cnn[key] = _collect(work / "cnn" / key, "cnn", key, P.cnn.folds, "run notebook 02 (2D CNN) first")
        seq: dict[str, Member] = {}
        seq_models = [m for m in members if not m.startswith("cnn:") and m != "cnn3d"]
        for name in seq_models:
            seq[name] = _collect(work / "seq" / name, "seq", name, "all", "run notebook 04 (sequence models) first")
            used = seq[name].metas[0].get("backbones")
            if used is not None and list(used) != seq_keys:
                raise BundleError(f"{work / 'seq' / name}: trained on backbones {used}, but the params name "
                                  f"{seq_keys}; rerun notebook 04")
        cnn3d = {}
        if P.cnn3d.enabled:  # in the bundle whenever trained; the blend weights say whether it counts
            cnn3d["cnn3d"] = _collect(work / "cnn3d" / P.cnn3d.key, "cnn3d", "cnn3d", P.cnn3d.folds,
                                      "run notebook 02b (3D CNN) first")
        manifest = _manifest(P, cnn, seq, seq_keys, cnn3d=cnn3d)
        return cls(manifest, cnn, seq, source=str(work), cnn3d=cnn3d)

    @classmethod
    def untrained(cls, P: Params, folds: int | None = None) -> Bundle:
        """Randomly initialised models with the architectures, sizes and folds of ``P`` (every backbone,
        every sequence model, an equal-weight blend): for timing and smoke checks, never for predictions."""
        import torch

        from ichdlib.cnn.models import build_cnn
        from ichdlib.seq.inputs import backbone_keys, seq_arch
        from ichdlib.seq.models import build_seq_model

        n_folds = folds or (len(P.cnn.folds) if P.cnn.folds != "all" else P.ingest.folds)
        torch.manual_seed(P.seed)
        cnn: dict[str, Member] = {}
        for cfg in P.cnn.backbones:
            metas, states = [], []
            for k in range(n_folds):
                model = build_cnn(cfg.name, learnable_window=P.windows.recipe if P.windows.learnable else None,
                                  recipe=P.windows.recipe, single_window=tuple(P.windows.single_window))
                states.append(model.state_dict())
                metas.append({"spec": ModelSpec.from_params(P, cfg, model.feature_dim).to_dict(), "key": cfg.key,
                              "fold": k, "config": {"cache_size": cfg.size}, "untrained": True})
            cnn[cfg.key] = Member("cnn", cfg.key, list(range(n_folds)), metas, states)
        keys = backbone_keys(P)
        dims = [ModelSpec.from_meta(cnn[k].metas[0]).feature_dim for k in keys]
        arch = seq_arch(P)  # the same architecture notebook 04 trains (slice_input, residual included)
        seq: dict[str, Member] = {}
        for name in P.seq.models:
            meta = {"model": name, "in_dim": max(dims), "n_cnn": len(keys), "x_channels": 2 * len(keys) + 2,
                    "arch": arch, "backbones": keys, "untrained": True}
            states = [build_seq_model(name, meta["in_dim"], meta["n_cnn"], meta["x_channels"], **arch).state_dict()
                      for _ in range(n_folds)]
            seq[name] = Member("seq", name, list(range(n_folds)), [dict(meta, fold=k) for k in range(n_folds)], states)
        cnn3d = {}
        if P.cnn3d.enabled:
            from ichdlib.cnn3d.models import build_net3d

            spec3 = VolumeSpec.from_params(P)
            states = [build_net3d(spec3).state_dict() for _ in range(n_folds)]
            metas = [{"spec": spec3.to_dict(), "key": spec3.key, "fold": k, "untrained": True} for k in range(n_folds)]
            cnn3d["cnn3d"] = Member("cnn3d", "cnn3d", list(range(n_folds)), metas, states)
        members = (list(P.seq.models) or [f"cnn:{k}" for k in cnn]) + list(cnn3d)
        ensemble = {"method": "mean", "members": members, "weights": {m: 1.0 / len(members) for m in members},
                    "sources": {m: "features" if m.startswith("cnn:") else "cnn3d" if m == "cnn3d" else "seq"
                                for m in members}}
        manifest = _manifest(P, cnn, seq, keys, ensemble, cnn3d)
        return cls(manifest, cnn, seq, source="untrained", cnn3d=cnn3d)

    # -- saving and loading -------------------------------------------------------------------------
    def save(self, out: str | os.PathLike, force: bool = False) -> Path:
        """Write the bundle folder atomically (a temporary folder renamed into place)."""
        from safetensors.torch import save_file


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
            (tmp / "params.yaml").write_text(dump_params(Params.model_validate(manifest["params"])))
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
        from safetensors.torch import load_file

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
        return cls(manifest, cnn, seq, source=str(path), cnn3d=cnn3d)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _normal_permissions(folder: Path) -> None:
    """Folders 0755, files 0644 (``mkdtemp`` makes 0700: colleagues could not read the bundle)."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def _collect(folder: Path, kind: str, key: str, folds: Any, advice: str) -> Member:
    files = _fold_files(folder)
    if folds != "all":
        missing = [k for k in folds if k not in files]
        if missing:
            raise BundleError(f"{folder}: no checkpoint for fold(s) {missing}; {advice}")
        files = {k: files[k] for k in folds}
    if not files:
        raise BundleError(f"{folder}: no fold<k>.pt checkpoints; {advice}")
    states, metas = [], []
    for path in files.values():
        state, meta = _read_checkpoint(path)
        states.append(state)
        metas.append(_jsonable(meta))
    return Member(kind, key, list(files), metas, states)


def _manifest(P: Params, cnn: dict[str, Member], seq: dict[str, Member], seq_keys: list[str],
              ensemble: dict[str, Any] | None = None, cnn3d: dict[str, Member] | None = None) -> dict[str, Any]:

    backbones = []
    for key, m in cnn.items():
        meta = m.metas[0]
        spec = ModelSpec.from_meta(meta)
        dim = spec.feature_dim
        if dim is None:  # older checkpoints: build one model to read it
            dim = m.build("cpu")[0].feature_dim
            m.models = []
        size = spec.size
        backbones.append({"key": key, "name": spec.name, "size": size, "spec": spec.with_feature_dim(dim).to_dict(),
                          "cache_size": int(meta.get("config", {}).get("cache_size", size)),
                          "folds": m.folds, "feature_dim": int(dim), "metas": m.metas})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "run": P.run,
        "labels": list(LABELS),
        "windows": {"recipe": P.windows.recipe, "single_window": list(P.windows.single_window),
                    "learnable": P.windows.learnable, "presets": {k: list(v) for k, v in WINDOWS.items()}},
        "val_center_crop": float(P.cnn.augment.val_center_crop),
        "tta": int(P.features.tta),
        "backbones": backbones,
        "seq": {"backbones": seq_keys,
                "models": [{"key": k, "folds": m.folds, "metas": m.metas} for k, m in seq.items()]},
        "cnn3d": [{"key": k, "size": VolumeSpec.from_meta(m.metas[0]).size, "spec": m.metas[0]["spec"],
                   "folds": m.folds, "metas": m.metas} for k, m in (cnn3d or {}).items()],
        "ensemble": ensemble or ensemble_spec(P),
        "params": json.loads(json.dumps(P.model_dump(mode="json"))),
        "versions": library_versions(),
    }


def ensemble_spec(P: Params) -> dict[str, Any]:
    """Blend method, members and weights: equal for ``mean``; for ``fit`` the weights notebook 05 fitted
    (``reports/<run>/metrics.json``, ``submission.weights``)."""

    members = blended_members(P, resolve_members(P))  # the 3D member when notebook 05 took it
    # which table notebook 05 blended for each 2D member: notebook 03's TTA probabilities ("features") or
    # notebook 02's validation-view probabilities ("cnn")
    sources = {m: ("cnn3d" if m == "cnn3d" else "seq" if not m.startswith("cnn:")
                   else stage_files(P, m)[1].parent.parent.name) for m in members}
    if P.ensemble.method == "mean":
        weights = {m: 1.0 / len(members) for m in members}
    else:
        path = P.reports_dir / "metrics.json"
        sub = json.loads(path.read_text()).get("submission", {}) if path.is_file() else {}
        weights = sub.get("weights") or {}
        if sorted(weights) != sorted(members) or sub.get("method") != P.ensemble.method:
            raise BundleError(f"{path}: no fitted ensemble weights for members {members}; run notebook 05 "
                              "(ensemble) first")
        weights = {m: float(weights[m]) for m in members}
    return {"method": P.ensemble.method, "members": members, "weights": weights, "sources": sources}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def resolve_run(spec: str | os.PathLike) -> Params:
    """``--run``: a params YAML, or a run's work folder / reports folder holding ``params.yaml``."""

    p = Path(spec)
    if p.is_file():
        return load_params(p)
    if p.is_dir():
        for name in ("params.yaml", "params_used.yaml"):
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
    return Bundle.from_run(P).save(out, force=force)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd export``."""
    parser.add_argument("--run", required=True,
                        help="the run: its params YAML (e.g. params/demo.yaml) or its work folder with params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder")


def cli(args: argparse.Namespace) -> int:
    """``ichd export``."""
    out = export(args.run, args.out, force=args.force)
    manifest = json.loads((out / MANIFEST).read_text())
    n_files = len(manifest["files"])
    size = sum((out / f).stat().st_size for f in manifest["files"]) / 1e6
    print(f"bundle written: {out} ({n_files} weight files, {size:.1f} MB; backbones "
          f"{', '.join(b['key'] for b in manifest['backbones'])}; sequence models "
          f"{', '.join(m['key'] for m in manifest['seq']['models']) or 'none'})")
    return 0
