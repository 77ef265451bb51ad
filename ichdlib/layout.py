"""The artifacts layer: every path of a run's work and reports folders, spelled once.

``RunLayout.from_params(P)`` (or ``P.layout``) derives the three roots from the params once; everything a
stage reads or writes is an attribute or method of it::

    work/<run>/
      catalog.parquet  quarantine.csv  cache_<size>.npy        ingest (01)
      ingest_report.json  ingest_state.json
      cnn/<key>/       fold<k>.pt fold<k>_last.pt fold<k>_log.csv fold<k>_val.parquet fold<k>_test.parquet
                       oof.parquet test.parquet                 2D CNN (02)          -> L.cnn(key)
      features/<key>/  meta.json {oof,test}_feat.npy {oof,test}_prob.parquet test_prob_folds.npy
                       part_fold<k>.npz                         features (03)        -> L.features(key)
      seq/<name>/      fold<k>.pt fold<k>_last.pt fold<k>_log.csv oof.parquet test.parquet done.json
                                                                sequence models (04) -> L.seq(name)
      distill/<key>/   fold<k>.pt fold<k>_last.pt fold<k>_val.parquet oof.parquet test.parquet done.json
                                                                the student (08)     -> L.distill(key)
      cnn3d/<key>/     the 2D stage's files (fold<k>.pt ... oof.parquet test.parquet)
                                                                3D CNN (02b)         -> L.cnn3d(key)
      stages/          <NN>.json digests.json <notebook>.lock   stamps (ichd run)
      logs/            <notebook>.kernel.log
      params.yaml
    reports/<run>/
      <notebook>.ipynb  metrics.json submission.csv timings.json summary.md params.yaml figures/<name>.png
      predictions.parquet                                       scored probabilities (05, ichd compare)
      mlflow.db mlartifacts/ mlflow_run.json                    MLflow tracking (when on)
    <data_root>/masks/<sop_uid>.npz                             lesion masks (the phantom writes them)

Moving one output means editing this module only (``tests/test_layering.py`` greps the package for the
file names spelled anywhere else). Stage output globs for the stamps (:data:`STAGE_OUTPUTS`) are derived
from the same names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunLayout", "ModelDir", "FeaturesDir", "STAGE_OUTPUTS", "PARAMS_FILE", "MASKS", "fold_numbers"]

# -- names (the only place they are spelled) -----------------------------------------------------------
CATALOG = "catalog.parquet"
QUARANTINE = "quarantine.csv"
INGEST_REPORT, INGEST_STATE = "ingest_report.json", "ingest_state.json"
CACHE_GLOB = "cache_*"
CNN, FEATURES, SEQ, STAGES, LOGS, INPUTS, FIGURES = "cnn", "features", "seq", "stages", "logs", "inputs", "figures"
DISTILL = "distill"
CNN3D = "cnn3d"
OOF, TEST = "oof.parquet", "test.parquet"
DONE = "done.json"
META = "meta.json"
OOF_FEAT, TEST_FEAT = "oof_feat.npy", "test_feat.npy"
OOF_PROB, TEST_PROB = "oof_prob.parquet", "test_prob.parquet"
TEST_PROB_FOLDS = "test_prob_folds.npy"
DIGESTS = "digests.json"
METRICS, SUBMISSION, TIMINGS, SUMMARY = "metrics.json", "submission.csv", "timings.json", "summary.md"
#: Notebook 05's scored probabilities per stage with the truth and each image's group (``ichd compare`` pairs them).
PREDICTIONS = "predictions.parquet"
#: MLflow tracking (``ichdlib.tracking``): the default SQLite store, its artifacts, the run a report belongs to.
MLFLOW_DB, MLFLOW_ARTIFACTS, MLFLOW_RUN = "mlflow.db", "mlartifacts", "mlflow_run.json"
#: The validated params written next to the work and the reports by every notebook.
PARAMS_FILE = "params.yaml"
#: Per-slice lesion masks under the data folder (``<sop_uid>.npz``).
MASKS = "masks"
_FOLD_MODEL = re.compile(r"^fold(\d+)\.pt$")

#: Output files (globs relative to the work dir, or ``reports:``-prefixed relative to the reports dir) whose
#: content identifies what downstream stages read, by stage name.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "ingest": (CATALOG, QUARANTINE),
    "cnn": (f"{CNN}/*/fold*.pt", f"{CNN}/*/{OOF}", f"{CNN}/*/{TEST}"),
    "features": (f"{FEATURES}/*/{META}", f"{FEATURES}/*/*_prob.parquet", f"{FEATURES}/*/{TEST_PROB_FOLDS}"),
    "seq": (f"{SEQ}/*/{OOF}", f"{SEQ}/*/{TEST}", f"{SEQ}/*/fold*.pt"),
    "cnn3d": (f"{CNN3D}/*/fold*.pt", f"{CNN3D}/*/{OOF}", f"{CNN3D}/*/{TEST}"),
    "ensemble": (f"reports:{SUBMISSION}",),
    "review": (),
    "distill": (f"{DISTILL}/*/fold*.pt", f"{DISTILL}/*/{DONE}"),
    "external": (),
}
#: Notebook 07: the run's own bundle (exported for validation) and the validation outputs' default folder.
BUNDLE, EXTERNAL = "bundle", "external"


def fold_numbers(folder: Path) -> list[int]:
    """The fold numbers of a model folder's finished ``fold<k>.pt`` checkpoints, sorted (``fold<k>_last.pt``
    resume files are not models). The one fold enumerator (review, bundles, features)."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _FOLD_MODEL.match(p.name)))


@dataclass(frozen=True)
class ModelDir:
    """One trained stage's folder: ``cnn/<key>`` or ``seq/<name>`` (per-fold files and the OOF/test tables)."""

    path: Path

    def checkpoint(self, fold: int) -> Path:
        """``fold<k>.pt``: the fold's chosen model (``{"state_dict", "meta"}``)."""
        return self.path / f"fold{fold}.pt"

    def last(self, fold: int) -> Path:
        """``fold<k>_last.pt``: the resume checkpoint after every epoch."""
        return self.path / f"fold{fold}_last.pt"

    def log(self, fold: int) -> Path:
        return self.path / f"fold{fold}_log.csv"

    def val(self, fold: int) -> Path:
        return self.path / f"fold{fold}_val.parquet"

    def test_part(self, fold: int) -> Path:
        return self.path / f"fold{fold}_test.parquet"

    def fold_lock(self, fold: int) -> Path:
        """The path whose lock one fold's writer holds."""
        return self.path / f"fold{fold}"

    @property
    def oof(self) -> Path:
        return self.path / OOF

    @property
    def test(self) -> Path:
        return self.path / TEST

    @property
    def done(self) -> Path:
        return self.path / DONE

    def folds(self) -> list[int]:
        """Folds with a finished checkpoint (:func:`fold_numbers`)."""
        return fold_numbers(self.path)


@dataclass(frozen=True)
class FeaturesDir:
    """``features/<key>``: pooled features and TTA probabilities of one backbone (03)."""

    path: Path

    @property
    def meta(self) -> Path:
        return self.path / META

    @property
    def oof_feat(self) -> Path:
        return self.path / OOF_FEAT

    @property
    def test_feat(self) -> Path:
        return self.path / TEST_FEAT

    @property
    def oof_prob(self) -> Path:
        return self.path / OOF_PROB

    @property
    def test_prob(self) -> Path:
        return self.path / TEST_PROB

    @property
    def test_prob_folds(self) -> Path:
        return self.path / TEST_PROB_FOLDS

    def outputs(self) -> list[Path]:
        """Every final output (present together when the stage finished)."""
        return [self.oof_feat, self.test_feat, self.oof_prob, self.test_prob, self.test_prob_folds, self.meta]

    def part(self, fold: int) -> Path:
        """One fold model's partial outputs, assembled into the final files."""
        return self.path / f"part_fold{fold}.npz"

    def parts(self) -> Iterable[Path]:
        return self.path.glob("part_fold*.npz")


@dataclass(frozen=True)
class RunLayout:
    """The folders of one run: ``work`` (intermediate artifacts), ``reports`` (what people read) and ``data``
    (the RSNA-layout input folder)."""

    work: Path
    reports: Path
    data: Path

    @classmethod
    def from_params(cls, P: Any) -> RunLayout:
        """The layout of a :class:`ichdlib.config.Params`: ``P.paths`` resolved (``{run}`` replaced, relative
        paths against ``P.root``). Typed ``Any``: the layout sits below the params schema, which uses it."""
        return cls(P._resolve(P.paths.work), P._resolve(P.paths.reports), P._resolve(P.paths.data_root))

    @classmethod
    def of_work(cls, work: str | Path) -> RunLayout:
        """A layout from a work folder alone (``ichd ingest --work``): reports and data unknown (``work``)."""
        return cls(Path(work), Path(work), Path(work))

    @classmethod
    def of_reports(cls, reports: str | Path) -> RunLayout:
        """A layout from a reports folder alone (``ichd compare``)."""
        return cls(Path(reports), Path(reports), Path(reports))

    # -- ingest (01) ----------------------------------------------------------------------------------------
    @property
    def catalog(self) -> Path:
        return self.work / CATALOG

    @property
    def quarantine(self) -> Path:
        return self.work / QUARANTINE

    def cache(self, size: int) -> Path:
        """The resized HU cache ``cache_<size>.npy``."""
        return self.work / f"cache_{int(size)}.npy"

    def caches(self) -> Iterable[Path]:
        """Every cache file (and its partial and progress files)."""
        return self.work.glob(CACHE_GLOB)

    # -- stages ---------------------------------------------------------------------------------------------
    def cnn(self, key: str) -> ModelDir:
        """``cnn/<key>``: one backbone's fold models and OOF/test tables (02)."""
        return ModelDir(self.work / CNN / key)

    def features(self, key: str) -> FeaturesDir:
        """``features/<key>`` (03)."""
        return FeaturesDir(self.work / FEATURES / key)

    @property
    def features_root(self) -> Path:
        return self.work / FEATURES

    def seq(self, name: str) -> ModelDir:
        """``seq/<name>``: one sequence model's fold models and OOF/test tables (04)."""
        return ModelDir(self.work / SEQ / name)

    def distill(self, key: str) -> ModelDir:
        """``distill/<key>``: the student's fold models, OOF/test tables and ``done.json`` (08)."""
        return ModelDir(self.work / DISTILL / key)

    def cnn3d(self, key: str) -> ModelDir:
        """``cnn3d/<key>``: the 3D CNN member's fold models and OOF/test tables (02b)."""
        return ModelDir(self.work / CNN3D / key)

    @property
    def inputs_lock(self) -> Path:
        """Held while ``ichd train`` prepares the shared inputs (phantom, catalog, cache)."""
        return self.work / INPUTS

    # -- the runner -----------------------------------------------------------------------------------------
    @property
    def stages(self) -> Path:
        return self.work / STAGES

    def stamp(self, number: str) -> Path:
        return self.stages / f"{number}.json"

    @property
    def digests(self) -> Path:
        return self.stages / DIGESTS

    def stage_lock(self, stem: str) -> Path:
        return self.stages / stem

    def kernel_log(self, stem: str) -> Path:
        return self.work / LOGS / f"{stem}.kernel.log"

    def report(self, name: str) -> Path:
        """An executed notebook (or its HTML) in the reports folder."""
        return self.reports / name

    # -- reports --------------------------------------------------------------------------------------------
    @property
    def metrics(self) -> Path:
        return self.reports / METRICS

    @property
    def submission(self) -> Path:
        return self.reports / SUBMISSION

    @property
    def timings(self) -> Path:
        return self.reports / TIMINGS

    @property
    def summary(self) -> Path:
        return self.reports / SUMMARY

    @property
    def figures(self) -> Path:
        return self.reports / FIGURES

    @property
    def predictions(self) -> Path:
        return self.reports / PREDICTIONS

    @property
    def mlflow_db(self) -> Path:
        """The default MLflow store of a tracked run (SQLite; artifacts in :attr:`mlflow_artifacts`)."""
        return self.reports / MLFLOW_DB

    @property
    def mlflow_artifacts(self) -> Path:
        return self.reports / MLFLOW_ARTIFACTS

    @property
    def mlflow_run(self) -> Path:
        """Which MLflow run records this report folder, and the stage stamps it covers."""
        return self.reports / MLFLOW_RUN

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"

    @property
    def bundle(self) -> Path:
        """``work/<run>/bundle``: the run's own models exported for notebook 07."""
        return self.work / BUNDLE

    def external(self, out: str | Path = EXTERNAL) -> Path:
        """Notebook 07's output folder: ``out`` when absolute, else under the reports folder."""
        out = Path(out)
        return out if out.is_absolute() else self.reports / out

    def params_copies(self) -> tuple[Path, Path]:
        """``params.yaml`` in the work and the reports folder."""
        return self.work / PARAMS_FILE, self.reports / PARAMS_FILE

    # -- data -----------------------------------------------------------------------------------------------
    @property
    def masks(self) -> Path:
        return self.data / MASKS

    def mask(self, sop_uid: str) -> Path:
        return self.masks / f"{sop_uid}.npz"

    def outputs_root(self, pattern: str) -> tuple[Path, str]:
        """A :data:`STAGE_OUTPUTS` pattern -> (base folder, glob)."""
        if pattern.startswith("reports:"):
            return self.reports, pattern.split(":", 1)[1]
        return self.work, pattern
