"""The bundle manifest's schema: ``bundle.json`` is validated at load (pydantic), every failure a one-line
:class:`BundleError` naming the file and the key (see :mod:`ichdlib.serve.bundle`)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ichdlib.config import Params
from ichdlib.labels import LABELS
from ichdlib.spec import ModelSpec, VolumeSpec

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


class FovRange(_Schema):
    """A field of view (mm) over the training studies: 2nd percentile, median, 98th percentile."""

    p02: Annotated[float, Field(gt=0, le=2000)]
    median: Annotated[float, Field(gt=0, le=2000)]
    p98: Annotated[float, Field(gt=0, le=2000)]

    @model_validator(mode="after")
    def _ordered(self) -> FovRange:
        if not self.p02 <= self.median <= self.p98:
            raise ValueError(f"expected p02 <= median <= p98, got {self.p02}, {self.median}, {self.p98}")
        return self


class InplaneSection(_Schema):
    """The training slices' in-plane field of view (``training.inplane``, :mod:`ichdlib.serve.inplane`)."""

    fov_x_mm: FovRange
    fov_y_mm: FovRange
    n_studies: Annotated[int, Field(ge=0)]
    source: str = ""


class TrainingSection(_Schema):
    """What the training data looked like (``training``; optional: older bundles lack it)."""

    slice_thickness_mm: Annotated[float, Field(gt=0, le=50)]
    spacing_z_mm: Annotated[float, Field(gt=0, le=50)]
    pixel_spacing_mm: Annotated[float, Field(gt=0, le=10)] | None = None
    n_studies: Annotated[int, Field(ge=0)]
    source: str
    #: Optional: bundles exported before the in-plane normalisation lack it (and are not normalised).
    inplane: InplaneSection | None = None


def _threshold(value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"threshold {value!r} outside [0, 1]")
    return value


Thresholds = dict[Literal[LABELS], Annotated[float, AfterValidator(_threshold)]]  # type: ignore[valid-type]


class OperatingPointSection(_Schema):
    """Thresholds chosen on the internal OOF study-level predictions (``operating_point``; optional)."""

    rule: Literal["youden", "sens95"]
    aggregate: Literal["max", "top3", "mean"]
    thresholds: Thresholds
    rules: dict[str, Thresholds] = Field(default_factory=dict)
    fallback: list[str] = Field(default_factory=list)
    n_studies: Annotated[int, Field(ge=0)]
    n_pos: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    source: str = ""

    @model_validator(mode="after")
    def _every_label(self) -> OperatingPointSection:
        if sorted(self.thresholds) != sorted(LABELS):
            raise ValueError(f"thresholds for {sorted(self.thresholds)}, expected every label {list(LABELS)}")
        return self


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
    #: The 3D CNN member, when the run trained one (bundles without one: empty).
    cnn3d: list[VolumeEntry] = Field(default_factory=list, max_length=1)
    ensemble: EnsembleSpec
    params: dict[str, Any]
    versions: dict[str, str]
    files: dict[PlainName, Sha256]
    integrity: Sha256
    runtime: dict[str, Any] | None = None  # ONNX graphs and engine (ichdlib.serve.onnx_runtime)
    profile: dict[str, Any] | None = None  # folds, views, members kept (ichdlib.serve.profiles)
    #: Optional (bundles written before issue 19 lack them; ``Bundle.training_mm`` and ``Bundle.thresholds``
    #: state the defaults).
    training: TrainingSection | None = None
    operating_point: OperatingPointSection | None = None

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
