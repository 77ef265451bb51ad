"""MLflow tracking of ``ichd run``, ``ichd train`` and ``ichd export`` (optional: the ``track`` extra).

Off unless ``tracking.enabled: true`` in the params or ``--track`` on the command line; while off nothing here
imports MLflow and nothing about a run changes. When on:

- one MLflow run per ``ichd run`` that does work, named after the run, in experiment ``tracking.experiment``;
  params (flattened), the git commit, the data fingerprint and the stage stamps as tags; per-epoch training
  loss and validation wLL of notebooks 02 and 04 as step metrics per model and fold (logged live from
  :mod:`ichdlib.progress` inside the notebook kernels, which find the run in ``ICHD_MLFLOW_RUN_ID`` /
  ``ICHD_MLFLOW_URI``); the final figures of ``metrics.json`` with their 95% intervals; the executed
  notebooks, HTML reports, figures, ``metrics.json``, ``summary.md``, ``submission.csv`` as artifacts.
- ``reports/<run>/mlflow_run.json`` records the MLflow run and the stage stamps it covers. An ``ichd run``
  whose stages are all up to date creates no new MLflow run when that record matches; a finished run that was
  never tracked (or changed since) gets one MLflow run recording its outputs, its curves read back from the
  per-fold logs ``work/<run>/{cnn,seq}/*/fold<k>_log.csv``.
- Store: ``tracking.uri`` (a URI, or a path to a ``.db`` file relative to ``root``), else
  ``MLFLOW_TRACKING_URI``, else SQLite ``reports/<run>/mlflow.db`` with artifacts in
  ``reports/<run>/mlartifacts/`` (``mlflow ui --backend-store-uri sqlite:///reports/<run>/mlflow.db``).
- Under ``torchrun`` only rank 0 logs. A tracking failure prints one warning and never stops a run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ichdlib import __version__, layout
from ichdlib.config import Params
from ichdlib.files import read_json, write_json

ENV_RUN = "ICHD_MLFLOW_RUN_ID"
ENV_URI = "ICHD_MLFLOW_URI"
#: Report files that are the store itself or its bookkeeping (never logged as artifacts).
NOT_ARTIFACTS = {layout.MLFLOW_DB, layout.MLFLOW_ARTIFACTS, layout.MLFLOW_RUN}
REPO = Path(__file__).resolve().parents[1]
_warned: set[str] = set()
_clients: dict[str, Any] = {}


def enabled(P: Params, flag: bool | None = None) -> bool:
    """Whether this run is tracked: ``--track`` or ``tracking.enabled``."""
    return bool(flag) or bool(P.tracking.enabled)


def store_uri(P: Params) -> str:
    """The tracking store: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``reports/<run>/mlflow.db``."""
    uri = P.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return sqlite_uri(P.layout.mlflow_db)
    if "://" in uri or uri.startswith("sqlite:"):
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute() and P.root is not None:
        path = P.root / path
    return sqlite_uri(path if path.suffix == ".db" else path / layout.MLFLOW_DB)


def sqlite_uri(path: Path) -> str:
    """``sqlite:////abs/path.db`` for a database file."""
    return "sqlite:///" + str(Path(path).resolve())


def _warn(what: str, exc: BaseException) -> None:
    if what not in _warned:
        _warned.add(what)
        print(f"ichd: MLflow tracking: {what} failed ({type(exc).__name__}: {exc}); the run goes on untracked "
              "there", file=sys.stderr, flush=True)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (imports MLflow; its start-up chatter silenced), one per process."""
    if uri not in _clients:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in our output
        warnings.filterwarnings("ignore", module="mlflow.*")
        warnings.filterwarnings("ignore", message=".*noload.*")
        from mlflow.tracking import MlflowClient  # noqa: PLC0415  (MLflow loads only when tracking is on)

        for name in ("mlflow", "alembic", "sqlalchemy"):  # after the import: MLflow sets its level when imported
            logging.getLogger(name).setLevel(logging.WARNING)

        _clients[uri] = MlflowClient(uri)
    return _clients[uri]


def _experiment(c: Any, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database (not in the working directory)
        location = (Path(uri[len("sqlite:///"):]).parent / layout.MLFLOW_ARTIFACTS).resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


# ---------------------------------------------------------------------------------------------------------
# Inside the kernels: step metrics
# ---------------------------------------------------------------------------------------------------------
def metric_key(*parts: Any) -> str:
    """A metric name MLflow accepts everywhere (``cnn:x`` -> ``cnn_x``), parts joined by ``/``."""
    return "/".join(str(p).replace(":", "_").replace(" ", "_") for p in parts)


def log_epoch(model: str, fold: Any, epoch: int, train_loss: float, val_wll: float | None) -> None:
    """Log one epoch as step metrics ``<model>/fold<k>/{train_loss,val_wll}`` (step: the 1-based epoch) to the run
    named by ``ICHD_MLFLOW_RUN_ID``; nothing (and no import) when it is unset or on a rank other than 0."""
    run_id = os.environ.get(ENV_RUN)
    if not run_id or _rank() != 0:
        return
    try:
        from mlflow.entities import Metric  # noqa: PLC0415  (MLflow loads only when tracking is on)

        now = int(time.time() * 1000)
        metrics = [Metric(metric_key(model, f"fold{fold}", "train_loss"), float(train_loss), now, epoch + 1)]
        if val_wll is not None:
            metrics.append(Metric(metric_key(model, f"fold{fold}", "val_wll"), float(val_wll), now, epoch + 1))
        client(os.environ.get(ENV_URI) or "").log_batch(run_id, metrics=metrics)
    except Exception as exc:  # a tracking problem must not stop training
        _warn("logging an epoch", exc)


def logged_curves(P: Params) -> list[tuple[str, int, pd.DataFrame]]:
    """The per-fold logs of notebooks 02 and 04 as (model, fold, frame with epoch/train_loss/val_wll)."""
    out = []
    models = [(b.key, P.layout.cnn(b.key)) for b in P.cnn.backbones] + [(m, P.layout.seq(m)) for m in P.seq.models]
    for name, folder in models:
        for fold in range(P.ingest.folds):
            path = folder.log(fold)
            if path.is_file():
                try:
                    out.append((name, fold, pd.read_csv(path)))
                except (ValueError, OSError):
                    continue
    return out


# ---------------------------------------------------------------------------------------------------------
# The runner side: one MLflow run per `ichd run`
# ---------------------------------------------------------------------------------------------------------
def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def run_params(P: Params) -> dict[str, str]:
    """The params as MLflow params: flattened, where-it-lives keys (``root``) left out, values as text."""
    flat = flatten(P.model_dump(mode="json"))
    flat.pop("root", None)
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000] for k, v in flat.items()}


def git_commit(repo: Path = REPO) -> tuple[str, bool] | None:
    """(HEAD commit, whether the checkout has uncommitted changes) or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return head, dirty
    except (OSError, subprocess.SubprocessError):
        return None


def stage_stamps(P: Params) -> dict[str, str]:
    """The finished stamp of every stage (``work/<run>/stages/NN.json``)."""
    out = {}
    for number in (f"{k:02d}" for k in range(1, 100)):
        path = P.layout.stamp(number)
        if not path.is_file():
            continue
        rec = read_json(path)
        if rec.get("done"):
            out[number] = str(rec["done"])
    return out


def data_fingerprint(P: Params) -> str | None:
    """The data fingerprint stage 01 was stamped with (no walk over the data folder)."""
    return (read_json(P.layout.stamp("01")).get("parts") or {}).get("data")


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``metrics.json`` as flat MLflow metrics: per stage and split ``wll``, ``auc_any``, ``ece`` and the interval
    ends ``*_ci_lo`` / ``*_ci_hi``; the prior; the pointing game."""
    out: dict[str, float] = {}

    def put(key: str, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[key] = float(v)

    def put_ci(key: str, ci: Any) -> None:
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            put(f"{key}_ci_lo", ci[0])
            put(f"{key}_ci_hi", ci[1])

    entries = [*(metrics.get("stages") or {}).items(), ("prior", metrics.get("prior") or {})]
    for name, s in entries:
        for split in ("oof", "test"):
            sc = (s or {}).get(split) or {}
            base = metric_key(name, split)
            put(f"{base}/wll", sc.get("wll"))
            put_ci(f"{base}/wll", sc.get("wll_ci"))
            put(f"{base}/ece", sc.get("ece"))
            put(f"{base}/auc_any", (sc.get("auc") or {}).get("any"))
            put_ci(f"{base}/auc_any", (sc.get("auc_ci") or {}).get("any"))
    pg = metrics.get("pointing_game") or {}
    put("pointing_game/overall", pg.get("overall"))
    put_ci("pointing_game/overall", pg.get("overall_ci"))
    return out


def _batches(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class RunTracker:
    """One MLflow run for one ``ichd run`` / ``ichd train``: :meth:`begin` before the first stage that runs
    (returns the kernels' environment), :meth:`stage` after each, :meth:`finish` at the end."""

    def __init__(self, P: Params, command: str = "ichd run") -> None:
        self.P = P
        self.command = command
        self.uri = store_uri(P)
        self.run_id: str | None = None
        self.stages: dict[str, str] = {}
        self.active = _rank() == 0

    def _client(self) -> Any:
        return client(self.uri)

    def begin(self) -> dict[str, str]:
        """Start the MLflow run (once); the environment that lets notebook kernels log to it."""
        if not self.active:
            return {}
        if self.run_id is None:
            try:
                c = self._client()
                exp = _experiment(c, self.P.tracking.experiment, self.uri)
                run = c.create_run(exp, run_name=self.P.run, tags={"ichd.command": self.command})
                self.run_id = run.info.run_id
            except Exception as exc:
                _warn("starting a run", exc)
                self.active = False
                return {}
        os.environ[ENV_RUN], os.environ[ENV_URI] = self.run_id, self.uri  # `ichd train` logs in this process
        return {ENV_RUN: self.run_id, ENV_URI: self.uri}

    def stage(self, number: str, status: str, seconds: float = 0.0) -> None:
        """Record what happened to a stage (tag ``ichd.stage.NN``)."""
        self.stages[number] = status if status != "ran" else f"ran in {seconds:.0f} s"

    def finish(self, failed: bool = False, record: bool = True) -> str | None:
        """Log tags, params, final metrics and artifacts and end the run; returns its id (None untracked).

        Nothing ran and ``mlflow_run.json`` names a run of the same stamps: no new run (that one is current).
        ``record``: write ``mlflow_run.json`` (``ichd run``; not ``ichd train``, which runs one stage).
        """
        if not self.active:
            return None
        for k in (ENV_RUN, ENV_URI):
            os.environ.pop(k, None)
        stamps = stage_stamps(self.P)
        prev = read_json(self.P.layout.mlflow_run) or {}
        try:
            if self.run_id is None:
                if failed:
                    return None
                if prev.get("stamps") == stamps and prev.get("uri") == self.uri and self._exists(prev):
                    print(f"tracking: up to date; MLflow run {prev['run_id']} records these outputs", flush=True)
                    return str(prev["run_id"])
                self.begin()
                if self.run_id is None:
                    return None
            if record:
                self._log_curves()
            self._log_run(stamps, outputs=record)
            self._client().set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        except Exception as exc:
            _warn("finishing the run", exc)
            return None
        if record and not failed:
            write_json(self.P.layout.mlflow_run, {"run_id": self.run_id, "uri": self.uri,
                                                       "experiment": self.P.tracking.experiment, "stamps": stamps})
        print(f"tracking: MLflow run {self.run_id} ({self.uri})", flush=True)
        return self.run_id

    def _exists(self, record: dict[str, Any]) -> bool:
        try:
            return self._client().get_run(str(record["run_id"])).info.lifecycle_stage == "active"
        except Exception:
            return False

    def _log_curves(self) -> None:
        """Step metrics from the per-fold logs for every epoch the run lacks: stages that did not run here,
        folds reused or resumed (their earlier epochs), a finished run tracked afterwards."""
        from mlflow.entities import Metric  # noqa: PLC0415  (MLflow loads only when tracking is on)

        c = self._client()
        have = set(c.get_run(self.run_id).data.metrics)
        metrics = []
        now = int(time.time() * 1000)
        for model, fold, log in logged_curves(self.P):
            for col in ("train_loss", "val_wll"):
                if col not in log.columns:
                    continue
                key = metric_key(model, f"fold{fold}", col)
                steps = {m.step for m in c.get_metric_history(self.run_id, key)} if key in have else set()
                for epoch, val in zip(log["epoch"], log[col], strict=True):
                    if val == val and int(epoch) + 1 not in steps:
                        metrics.append(Metric(key, float(val), now, int(epoch) + 1))
        for chunk in _batches(metrics, 1000):
            c.log_batch(self.run_id, metrics=chunk)

    def _log_run(self, stamps: dict[str, str], outputs: bool = True) -> None:
        from mlflow.entities import Metric, Param, RunTag  # noqa: PLC0415  (only when tracking is on)

        c, P = self._client(), self.P
        tags = {"ichd.run": P.run, "ichd.library": __version__}
        git = git_commit()
        if git:
            tags.update({"mlflow.source.git.commit": git[0], "ichd.git_commit": git[0], "ichd.git_dirty": str(git[1])})
        fp = data_fingerprint(P)
        if fp:
            tags["ichd.data_fingerprint"] = fp
        tags.update({f"ichd.stamp.{n}": s for n, s in stamps.items()})
        tags.update({f"ichd.stage.{n}": s for n, s in self.stages.items()})
        now = int(time.time() * 1000)
        for chunk in _batches([RunTag(k, v) for k, v in tags.items()], 100):
            c.log_batch(self.run_id, tags=chunk)
        for chunk in _batches([Param(k, v) for k, v in run_params(P).items()], 100):
            c.log_batch(self.run_id, params=chunk)
        if not outputs:  # `ichd train`: one stage's curves; the reports belong to `ichd run`
            return
        metrics = read_json(P.layout.metrics) or {}
        flat = [Metric(k, v, now, 0) for k, v in final_metrics(metrics).items()]
        for chunk in _batches(flat, 1000):
            c.log_batch(self.run_id, metrics=chunk)
        self._log_reports()

    def _log_reports(self) -> None:
        rep = self.P.layout.reports
        if not rep.is_dir():
            return
        c = self._client()
        for f in sorted(rep.iterdir()):
            if f.name in NOT_ARTIFACTS or f.name.startswith("."):
                continue
            if f.is_file():
                sub = "notebooks" if f.suffix in (".ipynb", ".html") else None
                c.log_artifact(self.run_id, str(f), sub)
            elif f.is_dir() and f == self.P.layout.figures:
                c.log_artifacts(self.run_id, str(f), f.name)


# ---------------------------------------------------------------------------------------------------------
# ichd export and ichd compare
# ---------------------------------------------------------------------------------------------------------
def tracked_run(P: Params) -> dict[str, Any] | None:
    """``reports/<run>/mlflow_run.json`` when this run was tracked, else None."""
    rec = read_json(P.layout.mlflow_run)
    return rec if isinstance(rec, dict) and rec.get("run_id") and rec.get("uri") else None


def log_bundle(P: Params, bundle: Path) -> str | None:
    """Log an exported bundle's manifest and its digest to the run's MLflow run (when the run was tracked)."""
    rec = tracked_run(P)
    if rec is None or _rank() != 0:
        return None
    manifest = Path(bundle) / "bundle.json"  # serve.bundle.MANIFEST (the core may not import serve)
    try:
        c = client(str(rec["uri"]))
        c.log_artifact(str(rec["run_id"]), str(manifest), "bundle")
        digest = (read_json(manifest) or {}).get("integrity", "")
        c.set_tag(str(rec["run_id"]), "ichd.bundle.integrity", str(digest))
        c.set_tag(str(rec["run_id"]), "ichd.bundle.path", Path(bundle).name)
    except Exception as exc:
        _warn("logging the bundle", exc)
        return None
    return str(rec["run_id"])


#: What ``ichd compare`` needs of a run.
COMPARE_FILES = (layout.METRICS, layout.PARAMS_FILE, layout.TIMINGS, layout.PREDICTIONS)


def is_run_id(spec: str) -> bool:
    """An MLflow run id: 32 lowercase hex digits."""
    return len(spec) == 32 and all(ch in "0123456789abcdef" for ch in spec)


def candidate_stores(uri: str | None = None, reports: Path = Path("reports")) -> list[str]:
    """Where to look for a run id: ``uri``, ``MLFLOW_TRACKING_URI``, then every ``reports/*/mlflow.db`` and
    ``reports/mlflow.db``."""
    out = [u for u in (uri, os.environ.get("MLFLOW_TRACKING_URI")) if u]
    for db in [reports / layout.MLFLOW_DB, *sorted(reports.glob(f"*/{layout.MLFLOW_DB}"))]:
        if db.is_file():
            out.append(sqlite_uri(db))
    return list(dict.fromkeys(out))


def download_run(run_id: str, dest: Path, uri: str | None = None) -> tuple[Path, str]:
    """Fetch a tracked run's ``metrics.json`` (and params, timings, predictions where logged) into ``dest``;
    returns (folder, the run's name). Raises FileNotFoundError naming the stores searched."""
    stores = candidate_stores(uri)
    for store in stores:
        c = client(store)
        try:
            run = c.get_run(run_id)
        except Exception:
            continue
        folder = Path(dest) / run_id
        folder.mkdir(parents=True, exist_ok=True)
        have = {a.path for a in c.list_artifacts(run_id)}
        for name in COMPARE_FILES:
            if name in have:
                c.download_artifacts(run_id, name, str(folder))
        if not (folder / layout.METRICS).is_file():
            raise FileNotFoundError(f"MLflow run {run_id} ({store}) has no metrics.json artifact")
        return folder, str(run.info.run_name or run_id[:8])
    where = ", ".join(stores) or "no store found (set MLFLOW_TRACKING_URI or --tracking-uri)"
    raise FileNotFoundError(f"{run_id}: no such MLflow run in {where}")
