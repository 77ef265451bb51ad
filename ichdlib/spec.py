"""The typed model specs that travel with every checkpoint and bundle: :class:`CnnSpec` (2D fold models)
and :class:`SeqSpec` (sequence models).

In the spirit of timm's ``pretrained_cfg``: everything needed to build a trained fold model and feed it the
way it was trained, in one frozen dataclass with one reader. Training writes it into the checkpoint's meta,
:func:`ichdlib.checkpoints.load_checkpoint` attaches it to the loaded model (``model.spec``), and the CAM
code, feature extraction, ``ichd predict`` and bundles read it from there (or through :func:`spec_from_meta`),
so they cannot disagree about a default (the learnable-window flag, the window of ``adjacent_header``, ...).

No torch import: bundles and the runner read specs without loading a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ichdlib import __version__
from ichdlib.labels import LABELS
from ichdlib.windows import RECIPES, recipe_windows

if TYPE_CHECKING:  # pragma: no cover
    from ichdlib.config import BackboneCfg, Params

__all__ = ["CnnSpec", "ModelSpec", "SeqSpec", "SpecError", "VolumeSpec", "spec_from_meta"]

#: How the model normalises its input: windowed channels in [0, 1], then (x - 0.456) / 0.224 inside the model.
NORMALISATION = {"input": "windowed channels in [0, 1]", "mean": 0.456, "std": 0.224, "where": "in the model"}


class SpecError(ValueError):
    """A checkpoint or bundle entry whose model spec is missing a key or holds a bad value."""


def _from_dict(cls: Any, d: dict[str, Any], what: str, convert: Any) -> Any:
    """``cls(**d)`` after ``convert(kw)`` fixes the types; unknown or missing keys and bad values raise a
    :class:`SpecError` naming them (the one reading path of both specs)."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise SpecError(f"{what}: unknown key(s) {', '.join(unknown)}")
    try:
        kw = dict(d)
        convert(kw)
        return cls(**kw)
    except SpecError:
        raise
    except KeyError as exc:
        raise SpecError(f"{what}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{what}: {exc}") from None


def _check_shared(what: str, size: int, labels: Any, windows: Any, in_chans: int) -> None:
    """The checks every spec kind shares: input size, label order, one window per channel."""
    if not 16 <= int(size) <= 2048:
        raise SpecError(f"{what}: size {size} outside 16..2048 px")
    if tuple(labels) != tuple(LABELS):
        raise SpecError(f"{what}: label order {list(labels)} differs from {list(LABELS)}")
    if len(windows) != in_chans:
        raise SpecError(f"{what}: {len(windows)} windows for {in_chans} channels")


@dataclass(frozen=True)
class CnnSpec:
    """What a 2D fold model is and how it reads a slice."""

    #: Which model builder reads this spec (:data:`ichdlib.checkpoints.BUILDERS`).
    kind = "cnn"

    name: str                                   # timm architecture, e.g. densenet121
    size: int                                   # input side in pixels
    recipe: str                                 # channel recipe (seed_3window, adjacent_header, three_window)
    windows: tuple[tuple[float, float], ...]    # (center, width) of each input channel
    single_window: tuple[float, float]          # the one window of adjacent_header
    learnable_window: bool                      # a LearnableWindow first layer: the model takes HU stacks
    val_center_crop: float                      # evaluation view: centre crop share before resizing to size
    in_chans: int = 3
    num_classes: int = len(LABELS)
    labels: tuple[str, ...] = LABELS
    normalisation: dict[str, Any] = field(default_factory=lambda: dict(NORMALISATION))
    feature_dim: int | None = None
    key: str | None = None
    library_version: str = __version__

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise SpecError(f"model spec: unknown recipe {self.recipe!r} (one of {', '.join(RECIPES)})")
        _check_shared("model spec", self.size, self.labels, self.windows, self.in_chans)
        if not 0.1 <= float(self.val_center_crop) <= 1.0:
            raise SpecError(f"model spec: val_center_crop {self.val_center_crop} outside 0.1..1")

    # -- writing -----------------------------------------------------------------------------------------
    @classmethod
    def from_params(cls, P: Params, cfg: BackboneCfg, feature_dim: int | None = None) -> CnnSpec:
        """The spec a backbone of ``P`` is trained with."""
        single = tuple(float(v) for v in P.windows.single_window)
        return cls(name=cfg.name, size=int(cfg.size), recipe=P.windows.recipe,
                   windows=tuple(tuple(float(v) for v in w) for w in recipe_windows(P.windows.recipe, single)),
                   single_window=single, learnable_window=bool(P.windows.learnable),
                   val_center_crop=float(P.cnn.augment.val_center_crop), feature_dim=feature_dim, key=cfg.key)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists for tuples)."""
        d = asdict(self)
        d["windows"] = [list(w) for w in self.windows]
        d["single_window"] = list(self.single_window)
        d["labels"] = list(self.labels)
        return d

    def with_feature_dim(self, feature_dim: int) -> CnnSpec:
        return CnnSpec(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "feature_dim": int(feature_dim)})

    # -- reading -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CnnSpec:
        def convert(kw: dict[str, Any]) -> None:
            kw["windows"] = tuple(tuple(float(v) for v in w) for w in kw["windows"])
            kw["single_window"] = tuple(float(v) for v in kw["single_window"])
            kw["labels"] = tuple(kw.get("labels", LABELS))
            kw["size"] = int(kw["size"])
            kw["learnable_window"] = bool(kw["learnable_window"])
            kw["val_center_crop"] = float(kw["val_center_crop"])

        return _from_dict(cls, d, "model spec", convert)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> CnnSpec:
        """The one reader: ``meta["spec"]`` when present, else the flat keys of checkpoints written before the
        spec existed. Older checkpoints carried every field the spec needs except (sometimes) ``windows``,
        which follows from the recipe; a missing ``learnable_window`` means False (the default then)."""
        if isinstance(meta.get("spec"), dict):
            return cls.from_dict(meta["spec"])
        try:
            recipe = meta["recipe"]
            single = tuple(float(v) for v in meta.get("single_window", (40.0, 80.0)))
            return cls(name=meta["name"], size=int(meta["size"]), recipe=recipe,
                       windows=tuple(tuple(float(v) for v in w) for w in
                                     (meta.get("windows") or recipe_windows(recipe, single))),
                       single_window=single, learnable_window=bool(meta.get("learnable_window", False)),
                       val_center_crop=float(meta.get("val_center_crop", 0.8)),
                       num_classes=int(meta.get("num_classes", len(LABELS))),
                       labels=tuple(meta.get("labels", LABELS)), feature_dim=meta.get("feature_dim"),
                       key=meta.get("key"), library_version=str(meta.get("library_version", "<0.1.0")))
        except KeyError as exc:
            raise SpecError(f"checkpoint meta has no model spec and no {exc.args[0]!r}") from None

    # -- using -------------------------------------------------------------------------------------------
    def cam_kwargs(self) -> dict[str, Any]:
        """The preprocessing arguments of :func:`ichdlib.review.cam.compute_cams` for this model."""
        return {"recipe": self.recipe, "crop": self.val_center_crop, "size": self.size,
                "single_window": self.single_window, "learnable": self.learnable_window}


@dataclass(frozen=True)
class VolumeSpec:
    """What a 3D fold model (``cnn3d``) is and how it reads a study: a MONAI ResNet over ``(C, n, size, size)``
    volumes, one channel per window of the recipe (on the slice itself: z is a real axis here, so the
    recipe's slice offsets do not apply), z at slice resolution, one logit vector per slice."""

    arch: str                                   # "resnet" (monai.networks.nets.ResNet, MedicalNet layout)
    depth: int                                  # 10, 18 or 34
    widen: float                                # channel width factor (1.0: MedicalNet's)
    size: int                                   # in-plane side in pixels
    slices: int                                 # K, consecutive slices per training crop
    recipe: str
    windows: tuple[tuple[float, float], ...]    # (center, width) of each input channel
    val_center_crop: float
    kind: str = "cnn3d"
    in_chans: int = 3
    num_classes: int = len(LABELS)
    labels: tuple[str, ...] = LABELS
    normalisation: dict[str, Any] = field(default_factory=lambda: dict(NORMALISATION))
    #: How z is kept: stride 1 along z in conv1, the max-pool and every stage (in-plane strides only).
    z: str = "slice resolution (z stride 1 everywhere, in-plane strides 2)"
    key: str | None = None
    library_version: str = __version__

    def __post_init__(self) -> None:
        if self.kind != "cnn3d":
            raise SpecError(f"3D model spec: kind {self.kind!r} is not 'cnn3d'")
        if self.arch != "resnet" or int(self.depth) not in (10, 18, 34):
            raise SpecError(f"3D model spec: {self.arch}{self.depth} is not resnet10/18/34")
        _check_shared("3D model spec", self.size, self.labels, self.windows, self.in_chans)

    @classmethod
    def from_params(cls, P: Params) -> VolumeSpec:
        """The spec ``P.cnn3d`` trains."""
        c = P.cnn3d
        single = tuple(float(v) for v in P.windows.single_window)
        wins = tuple(tuple(float(v) for v in w) for w in recipe_windows(P.windows.recipe, single))
        return cls(arch=c.arch, depth=int(c.depth), widen=float(c.widen), size=int(c.size), slices=int(c.slices), recipe=P.windows.recipe,
                   windows=wins, val_center_crop=float(P.cnn.augment.val_center_crop), in_chans=len(wins),
                   key=c.key)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = [list(w) for w in self.windows]
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeSpec:
        def convert(kw: dict[str, Any]) -> None:
            kw["windows"] = tuple(tuple(float(v) for v in w) for w in kw["windows"])
            kw["labels"] = tuple(kw.get("labels", LABELS))
            for k in ("depth", "size", "slices"):
                kw[k] = int(kw[k])
            kw["val_center_crop"] = float(kw["val_center_crop"])
            kw["widen"] = float(kw["widen"])

        return _from_dict(cls, d, "3D model spec", convert)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> VolumeSpec:
        """The one reader of a 3D checkpoint's ``meta["spec"]``."""
        spec = meta.get("spec")
        if not isinstance(spec, dict) or spec.get("kind") != "cnn3d":
            raise SpecError("checkpoint meta holds no 3D model spec (kind 'cnn3d'); is this a 2D checkpoint?")
        return cls.from_dict(spec)


#: The name older code and checkpoints' readers use (kept: ``ModelSpec`` is ``CnnSpec``).
ModelSpec = CnnSpec


@dataclass(frozen=True)
class SeqSpec:
    """What a sequence model fold is: its registered name (``seq.models``), input widths and architecture."""

    kind = "seq"

    model: str                                  # registered sequence model (seq1, seq2, ...)
    in_dim: int                                 # per-slice feature width (the widest backbone)
    n_cnn: int                                  # backbones feeding it
    x_channels: int                             # channels of the probability image (2 per backbone + 2)
    arch: dict[str, Any] = field(default_factory=dict)  # builder keywords (widths, slice_input, residual)
    backbones: tuple[str, ...] | None = None    # backbone keys in input order (None: not recorded)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> SeqSpec:
        """The one reader of a sequence checkpoint's meta: widths under ``arch`` (checkpoints before ``arch``
        kept ``reduce_dim``/``hidden``/``dropout`` flat; the rest then had the defaults)."""
        try:
            arch = meta.get("arch")
            if arch is None:
                arch = {k: meta[k] for k in ("reduce_dim", "hidden", "dropout") if k in meta}
            backbones = meta.get("backbones")
            return cls(model=str(meta["model"]), in_dim=int(meta["in_dim"]), n_cnn=int(meta["n_cnn"]),
                       x_channels=int(meta["x_channels"]), arch=dict(arch),
                       backbones=None if backbones is None else tuple(backbones))
        except KeyError as exc:
            raise SpecError(f"sequence checkpoint meta has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise SpecError(f"sequence model spec: {exc}") from None

    def to_meta(self) -> dict[str, Any]:
        """The keys a sequence checkpoint's meta holds for this spec."""
        out = {"model": self.model, "in_dim": self.in_dim, "n_cnn": self.n_cnn, "x_channels": self.x_channels,
               "arch": dict(self.arch)}
        if self.backbones is not None:
            out["backbones"] = list(self.backbones)
        return out


def spec_from_meta(meta: dict[str, Any]) -> CnnSpec | SeqSpec | VolumeSpec:
    """A checkpoint's spec, whichever kind: sequence checkpoints name their ``model``, 3D ones carry a spec of
    kind ``cnn3d``, 2D ones neither."""
    if "model" in meta and "spec" not in meta:
        return SeqSpec.from_meta(meta)
    if isinstance(meta.get("spec"), dict) and meta["spec"].get("kind") == "cnn3d":
        return VolumeSpec.from_meta(meta)
    return CnnSpec.from_meta(meta)
