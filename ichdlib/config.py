"""One parameter schema for every notebook and command.

A params YAML is validated at load: an unknown key or a wrong type fails at once with a message naming
the key. Relative paths are resolved against ``root``, which defaults to the parent of the folder that
holds the params file (the repository root for files in ``params/``). ``{run}`` in a path is replaced by
the run name.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ichdlib.devices import resolve_device
from ichdlib.layout import RunLayout
from ichdlib.registry import CAM_METHODS, SEQ_MODELS
from ichdlib.windows import RECIPES


class ParamsError(ValueError):
    """A params file that is missing, unreadable or invalid; the message names file and key."""


def _numeric(annotation: Any) -> bool:
    """Whether a field's annotation takes numbers (``int``, ``float``, ``int | None``, ``list[int]``, ...)."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return any(_numeric(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return False


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``epochs: true`` is a mistake, not 1: booleans are refused where a number is expected."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _has_bool(value) and _numeric(field.annotation) \
                and not _takes_bool(field.annotation):
            raise ValueError("expected a number, got a boolean")
        return value


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


class PathsCfg(_Strict):
    """Where the data, the intermediate work and the reports live."""

    data_root: Path = Path("data/phantom")
    work: Path = Path("work/{run}")
    reports: Path = Path("reports/{run}")
    train_dir: str = "stage_2_train"
    test_dir: str = "stage_2_test"
    train_csv: str = "stage_2_train.csv"
    sample_submission: str = "stage_2_sample_submission.csv"
    #: Test-split truth in Kaggle long format; the phantom writes one, real Kaggle data has none.
    answer_key: str | None = "answer_key.csv"


class SynthCfg(_Strict):
    """The phantom generator; used when ``enabled`` and ``paths.data_root`` holds no data yet."""

    enabled: bool = True
    studies: int = Field(60, ge=2)
    seed: int = 0
    size: int = Field(256, ge=32)
    quirks: bool = True
    masks: bool = True
    #: Processes for generation (0 = one per CPU core); the output does not depend on it.
    workers: int = Field(0, ge=0)
    #: Scanner profile of ``ichdlib.phantom.shift.SHIFTS`` (``none``: the ordinary phantom).
    shift: str = "none"


class IngestCfg(_Strict):
    """Header scan, catalog, folds and the resized HU cache."""

    size: int = Field(256, ge=16, le=2048)
    workers: int = Field(0, ge=0, description="0 = one per CPU core")
    folds: int = Field(5, ge=2)
    #: IDs to leave out on purpose (e.g. known-corrupt ``ID_6431af929``); they are quarantined with a reason.
    skip_ids: list[str] = Field(default_factory=list)


class WindowsCfg(_Strict):
    """How HU becomes the network's three channels."""

    #: A registered window recipe (:data:`ichdlib.windows.RECIPES`).
    recipe: str = "seed_3window"
    #: Window (center, width) for ``adjacent_header``.
    single_window: tuple[float, float] = (40.0, 80.0)
    learnable: bool = False

    @field_validator("recipe")
    @classmethod
    def _registered(cls, v: str) -> str:
        return RECIPES.check(v)


class AugmentCfg(_Strict):
    """Training augmentations, run batched on the device; each is a per-image probability (0 = off).

    Geometry is applied to the HU stack before windowing, with air (-1024 HU, black in every window) as fill.
    """

    #: Reverse the slice direction: swap s-1 and s+1 before windowing.
    slice_swap: float = Field(0.5, ge=0, le=1)
    hflip: float = Field(0.5, ge=0, le=1)
    shift_scale_rotate: float = Field(0.5, ge=0, le=1)
    rotate_deg: float = 30.0
    #: Shift as a fraction of the image side, scale and aspect as relative changes (the original's 0.1).
    shift: float = Field(0.1, ge=0, le=0.5)
    scale: float = Field(0.1, ge=0, lt=1)
    aspect: float = Field(0.1, ge=0, lt=1)
    erase: float = Field(0.5, ge=0, le=1)
    #: Erased rectangle: area as a fraction of the image, and aspect ratio range (the original's values).
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    random_crop: float = Field(0.5, ge=0, le=1)
    crop_range: tuple[float, float] = (0.6, 0.99)
    val_center_crop: float = Field(0.8, gt=0, le=1)
    #: Scanner robustness (after the geometry, in HU, before windowing; 0 = off, the original had none).
    #: ``intensity``: calibration drift ``hu * (1 + U(-hu_scale, hu_scale)) + U(-hu_offset, hu_offset)``.
    intensity: float = Field(0.0, ge=0, le=1)
    hu_offset: float = Field(6.0, ge=0)
    hu_scale: float = Field(0.05, ge=0, lt=1)
    #: ``noise``: added Gaussian noise with a standard deviation drawn from U(0, noise_std) HU.
    noise: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(6.0, ge=0)
    #: ``kernel``: another reconstruction kernel, ``x + a * (x - gauss(x, kernel_sigma px))`` with ``a`` drawn
    #: from ``kernel_range`` (-1: fully blurred, > 0: edge enhancement).
    kernel: float = Field(0.0, ge=0, le=1)
    kernel_sigma: float = Field(1.0, gt=0, le=8)
    kernel_range: tuple[float, float] = (-1.0, 1.0)

    @field_validator("kernel_range")
    @classmethod
    def _kernel(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not -1 <= v[0] <= v[1]:
            raise ValueError("expected (low, high) with -1 <= low <= high")
        return v

    @field_validator("erase_area", "erase_ratio", "crop_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("expected (low, high) with 0 < low <= high")
        return v


class BackboneCfg(_Strict):
    """One 2D CNN to train: a timm model name at one image size."""

    name: str = "densenet121"
    size: int = Field(256, ge=16, le=2048)
    batch: int = Field(32, ge=1)
    epochs: int = Field(10, ge=1)
    lr: float = Field(5e-4, gt=0)
    #: ``false``, ``true`` (timm hub; needs network) or a path to a local weights file.
    pretrained: bool | str = False
    #: Optional label used for output folders; default ``<name>_<size>``.
    tag: str | None = None

    @property
    def key(self) -> str:
        return self.tag or f"{self.name}_{self.size}"


class CnnCfg(_Strict):
    """2D CNN training (notebook 02)."""

    backbones: list[BackboneCfg] = Field(default_factory=lambda: [BackboneCfg()])
    #: Which folds to train: ``all`` or a list of fold numbers.
    folds: Literal["all"] | list[int] = "all"
    sampler: Literal["study", "slice"] = "study"
    #: Epoch length for the study sampler: ``k`` x number of training studies.
    study_sampler_k: int = Field(4, ge=1)
    max_steps_per_epoch: int | None = None
    #: ``seed_restarts``: ``lr`` for ``flat_epochs`` epochs, then cosine cycles of ``restart_epochs`` epochs
    #: down to ``lr * min_lr_ratio`` (the original: 5e-4 -> 1e-5, one LR per epoch);
    #: ``cosine``: one per-step cosine from ``lr`` to ``lr * min_lr_ratio`` over all epochs.
    schedule: Literal["seed_restarts", "cosine"] = "seed_restarts"
    flat_epochs: int = Field(11, ge=0)
    restart_epochs: int = Field(5, ge=1)
    min_lr_ratio: float = Field(0.02, ge=0, le=1)
    #: BCE weight per label (label order): the metric's [2,1,1,1,1,1]; the original trained unweighted.
    class_weights: list[float] = Field(default_factory=lambda: [2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    grad_clip: float | None = 5.0
    #: Adam weight decay (the original's 2e-5).
    weight_decay: float = Field(2e-5, ge=0)
    #: bf16 autocast (CUDA only; on the CPU the loop runs in float32).
    amp: bool = True
    #: channels_last memory format (CUDA only).
    channels_last: bool = True
    compile: bool = False
    #: Autocast dtype on CUDA: ``bf16`` (Ampere and newer) or ``fp16`` with a GradScaler (GPUs without fast
    #: bf16, e.g. V100/T4).
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    #: Under torchrun (DDP, several GPUs): BatchNorm statistics over the global batch (CUDA only).
    sync_bn: bool = False
    #: Full validation every ``val_every`` epochs and always at the last epoch; the best checkpoint is chosen
    #: among fully validated epochs.
    val_every: int = Field(1, ge=1)
    #: Between full validations, score a fixed seeded subset of this many validation slices (None: skip).
    val_subset: int | None = Field(None, ge=1)
    #: DataLoader worker processes (0 = load in the main process).
    num_workers: int = Field(0, ge=0)
    #: Batches each loader worker keeps ready (DataLoader ``prefetch_factor``); with ``num_workers`` it sets
    #: the shared and pinned memory the loaders need (``ichdlib.resources``).
    prefetch: int = Field(4, ge=1)
    #: torch CPU threads while training / extracting on the CPU (None = torch's default). On a small shared
    #: CPU one thread avoids the many-fold slowdown of OpenMP threads competing with other processes.
    cpu_threads: int | None = Field(None, ge=1)
    augment: AugmentCfg = Field(default_factory=AugmentCfg)
    #: Folds trained side by side, each in its own process with ``cpu_threads`` threads (same results as one
    #: after another; not under torchrun; on one GPU the folds share it). Not part of the stage stamp.
    fold_jobs: int = Field(1, ge=1)

    @field_validator("class_weights")
    @classmethod
    def _six(cls, v: list[float]) -> list[float]:
        if len(v) != 6:
            raise ValueError("class_weights needs one weight per label (6)")
        return v


class FeaturesCfg(_Strict):
    """Pooled features and probabilities with TTA (notebook 03)."""

    #: Views per image: the validation view, then h-flip, slice-order swap, both, then seeded random crops.
    tta: int = Field(4, ge=1)
    batch: int = Field(64, ge=1)


class SeqCfg(_Strict):
    """Sequence models 1 and 2 (notebook 04)."""

    #: Registered sequence models (:data:`ichdlib.registry.SEQ_MODELS`).
    models: list[str] = Field(default_factory=lambda: ["seq1", "seq2"])
    epochs: int = Field(40, ge=1)
    batch: int = Field(64, ge=1)
    crop: int = Field(24, ge=2)
    lr: float = Field(3e-4, gt=0)
    milestones: list[int] = Field(default_factory=lambda: [20, 30])
    gamma: float = 0.1
    #: Widths: seq1's per-slice reduction D -> ``mid`` -> ``reduce_dim``, the GRUs' ``hidden`` size and
    #: seq2's conv channels (the original: 512, 128, 96, [512, 256]; smaller ones suit the CPU demo).
    mid: int = Field(512, ge=1)
    reduce_dim: int = Field(128, ge=1)
    hidden: int = Field(96, ge=1)
    conv: tuple[int, int] = (512, 256)
    dropout: float = Field(0.5, ge=0, lt=1)
    #: Seq model 1's per-slice input: the backbones' ``pooled`` features (the original), or their ``logits``
    #: (6 per backbone). Pooled features of CNNs trained from scratch are not comparable between fold models
    #: (each fold learns its own feature space), so level 2 cannot transfer them; logits can.
    slice_input: Literal["pooled", "logits"] = "pooled"
    #: Residual heads: every head adds a correction to the logit of the backbones' mean probability and
    #: starts at zero (training starts from the 2D prediction instead of the prior). The original: False.
    residual: bool = False
    #: ``fold``: each 2D fold model's probabilities are standardised (per backbone and class, in logit space)
    #: with the statistics of its own OOF outputs and mapped onto the pooled statistics before they feed the
    #: sequence models (test rows per fold model, before the fold mean); fold models trained from scratch
    #: are calibrated differently. ``none``: the raw probabilities (the original).
    input_norm: Literal["none", "fold"] = "none"
    #: Backbone keys (``BackboneCfg.key``) whose features feed the models; empty = every ``cnn.backbones``.
    backbones: list[str] = Field(default_factory=list)
    #: Training augmentations: keep every other slice (studies > 10 slices), reverse the slice order.
    subsample_p: float = Field(0.5, ge=0, le=1)
    reverse_p: float = Field(0.5, ge=0, le=1)
    #: CPU threads for this stage's small tensors (None = torch's default). One thread is as fast as two
    #: here and avoids the 5-10x slowdown of spinning OpenMP threads on a busy, shared CPU.
    cpu_threads: int | None = Field(1, ge=1)
    #: (model, fold) pairs trained side by side in worker processes, like ``cnn.fold_jobs`` (same results; not
    #: under torchrun; not part of the stage stamp).
    fold_jobs: int = Field(1, ge=1)
    #: Which epoch a fold keeps: ``last`` (honest OOF) or ``best`` val loss (the original; biases OOF low).
    select: Literal["last", "best"] = "last"

    @field_validator("models")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        return [SEQ_MODELS.check(m) for m in v]


class EnsembleCfg(_Strict):
    """Blending and submission (notebook 05)."""

    #: ``mean`` of the members, or non-negative weights summing to 1 fitted on OOF weighted log loss
    #: (the OOF score of ``fit`` is cross-fitted: each fold's weights come from the other folds; when that
    #: blend scores worse than its best member, ``fit`` uses the best member alone).
    method: Literal["mean", "fit"] = "mean"
    #: Stages to blend: ``seq1``, ``seq2``, ``cnn:<key>`` or ``cnn:*`` (every backbone).
    members: list[str] = Field(default_factory=lambda: ["seq1", "seq2"])
    #: 95% intervals in metrics.json: bootstrap replicates over patients, and the seed of their draws (one fixed
    #: seed, so that runs with different ``seed`` values are scored with the same draws).
    bootstrap: int = Field(1000, ge=100)
    bootstrap_seed: int = 0
    #: Threshold rule ``ichd export`` applies per label to the OOF study-level predictions (recorded in the
    #: bundle; ``ichd predict``/``ichd validate`` use it): ``youden`` (max sensitivity + specificity) or
    #: ``sens95`` (the highest threshold with sensitivity >= 0.95). See ``ichdlib.serve.operating``.
    operating_point: Literal["youden", "sens95"] = "youden"


class CamCfg(_Strict):
    """Grad-CAM review (notebook 06)."""

    #: A registered CAM method (:data:`ichdlib.registry.CAM_METHODS`).
    method: str = "gradcam"
    cases_per_group: int = Field(3, ge=1)
    #: (slice, class) maps per forward/backward pass.
    batch: int = Field(16, ge=1)
    #: Module name of the CAM's target layer; default by backbone family (or a forward-hook probe).
    target_layer: str | None = None
    #: Coarsest CAM grid accepted: when the family layer's map is smaller, the deepest earlier stage with at
    #: least this size is used instead (0 = always the family layer). 8 keeps the family layer at 256 px and
    #: up (DenseNet/ResNet: 8 x 8) and steps ResNet ``layer4`` at 96 px (3 x 3) back to ``layer2`` (12 x 12).
    min_map: int = Field(8, ge=0)
    #: Probability at which a slice counts as positive when picking TP/FP/FN cases and pointing-game slices.
    threshold: float = Field(0.5, gt=0, lt=1)
    #: Pointing game: a peak within this many pixels of the lesion counts as a hit (0 = strictly inside).
    tolerance_px: int = Field(0, ge=0)

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        return CAM_METHODS.check(v)


class TrackingCfg(_Strict):
    """MLflow tracking (``ichdlib.tracking``; the ``track`` extra). Off unless ``enabled`` or ``ichd run --track``."""

    enabled: bool = False
    #: Store: a URI (``sqlite:///...``, ``http://lab-server:5000``) or a path (a ``.db`` file, relative to
    #: ``root``); empty: ``MLFLOW_TRACKING_URI`` if set, else ``reports/<run>/mlflow.db``.
    uri: str | None = None
    experiment: str = "ichd"


class DistillCfg(_Strict):
    """The distilled student (``ichd train --stage distill``, :mod:`ichdlib.distill`): one 2D network, one
    view, trained on the full ensemble's per-slice probabilities."""

    enabled: bool = False  # off: ``ichd run`` leaves it out; ``ichd train --stage distill`` runs it anyway
    #: The student's architecture and schedule (default: the first of ``cnn.backbones``).
    backbone: BackboneCfg | None = None
    #: Share of the true labels in the training target (0: the ensemble's probabilities only).
    hard_weight: float = Field(0.0, ge=0, le=1)


class ExternalCfg(_Strict):
    """External validation (notebook 07, ``ichd validate``); the stage runs only when ``data`` is set."""

    #: A CQ500-style folder, a PhysioNet CT-ICH-style folder or a folder of DICOM studies (None: no stage 07).
    data: Path | None = None
    format: Literal["auto", "cq500", "ctich", "dicom"] = "auto"
    #: Study-level labels CSV for ``format: dicom`` (StudyInstanceUID or PatientID + the six labels).
    labels: Path | None = None
    #: Bundle to validate; None = this run's own models (exported to ``work/<run>/bundle``).
    bundle: Path | None = None
    #: Further bundles compared with the first on the same studies (paired DeLong test).
    compare: list[Path] = Field(default_factory=list)
    #: Slice -> study probability: ``max`` (default), ``top3`` (mean of the 3 highest), ``mean``.
    aggregate: Literal["max", "top3", "mean"] = "max"
    #: Where the outputs go; relative paths resolve against the reports folder of the run.
    out: Path = Path("external")
    #: Bootstrap resamples for the confidence intervals other than DeLong's (0: none).
    n_boot: int = Field(1000, ge=0)
    #: Pointing game on the dataset's lesion masks (CT-ICH) with Grad-CAM of the first fold model.
    pointing: bool = True
    #: Demo: when ``data`` does not exist yet, write the phantom there in this layout first (``ichd synth
    #: --layout``); None for real data (nothing is generated).
    phantom: Literal["cq500", "ctich"] | None = None
    phantom_studies: int = Field(20, ge=2)
    phantom_size: int = Field(128, ge=32)
    #: The demo phantom drawn as another scanner (``ichd synth --shift``: ``scannerB``, ``scannerC``).
    phantom_shift: str = "none"
    #: Resample series whose in-plane field of view lies outside the training range (``ichdlib.serve.inplane``).
    fov_norm: bool = True


class Cnn3dCfg(_Strict):
    """The 3D CNN member (notebook 02b): a MONAI ResNet over K consecutive slices, per-slice logits."""

    enabled: bool = False
    #: MONAI's ResNet (``monai.networks.nets.resnet10/18/34``, the MedicalNet layout).
    arch: Literal["resnet"] = "resnet"
    depth: Literal[10, 18, 34] = 18
    #: Channel width factor (MONAI ``widen_factor``): 1.0 is the MedicalNet width (64..512 channels); smaller
    #: ones suit the CPU (a MedicalNet weights file needs 1.0).
    widen: float = Field(1.0, gt=0, le=4)
    #: In-plane side in pixels (an HU cache size; z stays at slice resolution).
    size: int = Field(256, ge=16, le=2048)
    #: Slices per training crop (K); inference reads the whole study, any length.
    slices: int = Field(16, ge=1, le=256)
    #: Training crops per study and epoch (random start, seeded per epoch).
    crops_per_study: int = Field(2, ge=1)
    epochs: int = Field(10, ge=1)
    #: Crops per global batch.
    batch: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(2e-5, ge=0)
    #: Per-step cosine from ``lr`` down to ``lr * min_lr_ratio``.
    min_lr_ratio: float = Field(0.02, ge=0, le=1)
    #: A local MedicalNet weights file (``resnet_18_23dataset.pth``; never downloaded), or None.
    pretrained: str | None = None
    folds: Literal["all"] | list[int] = "all"
    #: DataLoader worker processes (0 = load in the main process).
    num_workers: int = Field(0, ge=0)
    cpu_threads: int | None = Field(None, ge=1)
    #: Offer the member to the blend (notebook 05 keeps it only when it lowers the OOF loss, and says so).
    blend: bool = True

    @property
    def key(self) -> str:
        width = "" if self.widen == 1.0 else f"w{self.widen:g}"
        return f"{self.arch}{self.depth}{width}_{self.size}"


class Params(_Strict):
    """A whole experiment."""

    run: str = "demo"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    root: Path | None = None
    paths: PathsCfg = Field(default_factory=PathsCfg)
    synth: SynthCfg = Field(default_factory=SynthCfg)
    ingest: IngestCfg = Field(default_factory=IngestCfg)
    windows: WindowsCfg = Field(default_factory=WindowsCfg)
    cnn: CnnCfg = Field(default_factory=CnnCfg)
    features: FeaturesCfg = Field(default_factory=FeaturesCfg)
    seq: SeqCfg = Field(default_factory=SeqCfg)
    ensemble: EnsembleCfg = Field(default_factory=EnsembleCfg)
    cam: CamCfg = Field(default_factory=CamCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    distill: DistillCfg = Field(default_factory=DistillCfg)
    external: ExternalCfg = Field(default_factory=ExternalCfg)
    cnn3d: Cnn3dCfg = Field(default_factory=Cnn3dCfg)

    @model_validator(mode="after")
    def _cross_references(self) -> Params:
        """Names that refer to other sections exist there (checked at load, before any work)."""
        keys = [b.key for b in self.cnn.backbones]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"cnn.backbones: key(s) {dup} used twice (set a distinct tag)")
        unknown = [k for k in self.seq.backbones if k not in keys]
        if unknown:
            raise ValueError(f"seq.backbones: {unknown} not among cnn.backbones keys {keys}")
        for m in self.ensemble.members:
            if m.startswith("cnn:"):
                if m != "cnn:*" and m[4:] not in keys:
                    raise ValueError(f"ensemble.members: {m!r} names no backbone; cnn.backbones keys are {keys}")
            elif m == "cnn3d":
                if not self.cnn3d.enabled:
                    raise ValueError("ensemble.members: 'cnn3d' is listed but cnn3d.enabled is false")
            elif m not in self.seq.models:
                raise ValueError(f"ensemble.members: {m!r} is neither a sequence model of seq.models "
                                 f"{list(self.seq.models)} nor cnn:<key> / cnn:*")
        if not self.ensemble.members:
            raise ValueError("ensemble.members: empty; name at least one stage to blend")
        if self.cnn.folds != "all":
            bad = sorted({f for f in self.cnn.folds if not 0 <= f < self.ingest.folds})
            if bad or len(set(self.cnn.folds)) != len(self.cnn.folds) or not self.cnn.folds:
                raise ValueError(f"cnn.folds: {self.cnn.folds} must be distinct fold numbers in "
                                 f"0..{self.ingest.folds - 1} (ingest.folds is {self.ingest.folds})")
        if self.cnn3d.folds != "all" and (not self.cnn3d.folds or any(
                not 0 <= f < self.ingest.folds for f in self.cnn3d.folds)):
            raise ValueError(f"cnn3d.folds: {self.cnn3d.folds} must be fold numbers in 0..{self.ingest.folds - 1}")
        return self

    # -- resolved locations ---------------------------------------------------------------------
    def _resolve(self, p: Path) -> Path:
        p = Path(str(p).replace("{run}", self.run))
        if not p.is_absolute() and self.root is not None:
            p = self.root / p
        return p

    @property
    def layout(self) -> RunLayout:
        """Every path of this run's work and reports folders (:class:`ichdlib.layout.RunLayout`)."""
        return RunLayout.from_params(self)

    @property
    def data_root(self) -> Path:
        return self._resolve(self.paths.data_root)

    @property
    def work_dir(self) -> Path:
        return self._resolve(self.paths.work)

    @property
    def reports_dir(self) -> Path:
        return self._resolve(self.paths.reports)

    @property
    def catalog_path(self) -> Path:
        return self.layout.catalog

    def torch_device(self) -> str:
        """``cuda`` when asked for or available under ``auto``, else ``cpu``; ``device: cuda`` without a GPU is
        an error (:func:`ichdlib.devices.resolve_device`, the one device resolver)."""
        return resolve_device(self.device)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    """One line: ``<file>: invalid parameters: <key>: <problem> (got <value>); <key>: ...``."""
    lines = [f"{source}: invalid parameters:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top>"
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key;")
        elif not e["loc"]:  # a cross-reference check: the message names the keys
            lines.append(f"{msg};")
        else:
            got = repr(e.get("input"))
            lines.append(f"{key}: {msg} (got {got if len(got) <= 60 else got[:57] + '...'});")
    return " ".join(lines).rstrip(";")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``['cnn.epochs=2', 'run=x']`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ParamsError(f"override {item!r}: expected KEY=VALUE, e.g. cnn.epochs=2")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _read_params_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One params YAML as a dict, with its ``extends:`` chain merged in (the file's own keys win)."""
    if path in chain:
        raise ParamsError(f"{path}: 'extends' goes round in a circle ({' -> '.join(p.name for p in (*chain, path))})")
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot read ({exc})") from exc
    if data is None:
        raise ParamsError(f"{path}: empty params file (write at least 'run: NAME'; see params/demo.yaml)")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of keys at the top level, got a "
                          f"{type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ParamsError(f"{path}: extends: expected the path of another params file, e.g. demo.yaml "
                          f"(got {base!r})")
    parent = (path.parent / Path(base).expanduser()).resolve()
    return _deep_merge(_read_params_file(parent, (*chain, path)), data)


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate a params YAML (or the defaults when ``path`` is None), with nested overrides.

    ``extends: other.yaml`` (a path relative to the file) starts from that file's keys; the file's own keys
    are merged over them section by section (a list replaces the list)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    root: Path | None = None
    if path is not None:
        path = Path(path).expanduser().resolve()
        source = str(path)
        data = _read_params_file(path)
        root = path.parent.parent
    if overrides:
        data = _deep_merge(data, overrides)
    if data.get("root") is not None:
        r = Path(data["root"]).expanduser()
        data["root"] = r if r.is_absolute() or root is None else (root / r)
    elif root is not None:
        data["root"] = root
    else:
        data["root"] = Path.cwd()
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_format_errors(exc, source)) from None


def check_values(model: type[BaseModel], values: dict[str, Any], source: str) -> BaseModel:
    """Validate ``values`` (e.g. command-line flags) against a params section exactly as the YAML would be;
    a :class:`ParamsError` on one line names each bad key and value."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']} (got {e.get('input')!r})"
                 for e in exc.errors()]
        raise ParamsError(f"{source}: invalid value: " + "; ".join(parts)) from None


def dump_params(params: Params, at: str | Path | None = None) -> str:
    """The validated params as YAML (for reports and bundles), with no absolute path of this machine: ``root``
    is written relative to where the file goes (``at``, read back by :func:`load_params` to the same root) or,
    without ``at`` (a bundle, which travels), left out."""
    data = params.model_dump(mode="json")
    root = data.get("root")
    if at is None or root is None:
        data.pop("root", None)
    else:
        data["root"] = os.path.relpath(Path(root).resolve(), Path(at).resolve().parent.parent)
    return yaml.safe_dump(data, sort_keys=False)
