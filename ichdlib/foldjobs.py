"""Folds trained side by side in worker processes (``cnn.fold_jobs``, ``seq.fold_jobs``).

On a CPU, one fold trained with one torch thread leaves the other cores idle, and more threads on one fold
compete (OpenMP) more than they add up on a small shared machine. :func:`run_fold_jobs` trains the folds
that still need it as independent processes instead, at most ``jobs`` at a time, through
:class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method (safe with torch threads and
inside a Jupyter kernel). Every fold is seeded from (seed, fold), so the results are those of training the
folds one after another.

- Progress: a worker's :class:`QueueProgress` puts its fold starts and finished epochs on a queue; the
  parent drains it while it waits and feeds one :class:`~ichdlib.progress.TrainingProgress` per fold, which
  prints the headless lines (``<model> fold <k> epoch ...``), shows one bar per fold live and logs to MLflow.
- Errors: a fold that fails does not stop the others; once all are done one error names every failed fold.
  A worker that dies (killed, out of memory) breaks the pool: the error names the folds left unfinished, and
  a rerun resumes them from their last epoch checkpoints. An interrupt stops the workers.
- Memory: a worker gets the params and opens its inputs itself (the HU cache mapped read-only); nothing
  large travels through pickling.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.managers import SyncManager
from typing import Any

from ichdlib.procs import exit_with_parent
from ichdlib.progress import TrainingProgress

__all__ = ["FoldJobError", "QueueProgress", "run_fold_jobs"]


class FoldJobError(RuntimeError):
    """A fold job's worker process died, or fold jobs failed with different kinds of errors."""


class QueueProgress(TrainingProgress):
    """A worker's progress: fold starts and finished epochs go to the parent through ``events`` (a
    ``multiprocessing.Manager().Queue()``) under the job's ``key`` (default: the fold); nothing is printed in
    the worker."""

    def __init__(self, model: str, events: Any, key: Any = None) -> None:
        super().__init__(model, live=False, lines_per_fold=0)
        self.events, self.key = events, key

    def fold(self, fold: int | str, epochs: int, start: int = 0, best: float | None = None) -> None:
        self._fold = fold
        self.events.put(("fold", self._key(), fold, epochs, start, best))

    def epoch(self, epoch: int, train_loss: float, val_wll: float | None = None,
              images_per_s: float | None = None, seconds: float | None = None) -> str:
        self.events.put(("epoch", self._key(), epoch, train_loss, val_wll, images_per_s, seconds))
        return ""

    def _key(self) -> Any:
        return self._fold if self.key is None else self.key


def _drain(events: Any, shown: dict[Any, TrainingProgress], progress: Callable[[Any], TrainingProgress]) -> None:
    """Replay the workers' events on the parent's progress, one per job key."""
    while True:
        try:
            kind, key, *args = events.get_nowait()
        except queue.Empty:
            return
        if key not in shown:
            shown[key] = progress(key)
        if kind == "fold":
            shown[key].fold(*args)
        else:
            shown[key].epoch(*args)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _failure(what: str, errors: dict[Any, BaseException], broken: list[Any]) -> BaseException:
    """One error naming every failed fold: of the folds' own type when they share one (a ValueError stays
    a ValueError, so the CLI shows its one line), else :class:`FoldJobError`."""
    parts = [f"fold {k}: {_one_line(e)}" for k, e in sorted(errors.items())]
    if broken:
        folds = ", ".join(str(k) for k in sorted(broken))
        parts.append(f"fold(s) {folds}: the worker process died (killed, out of memory?); rerun to resume "
                     "from the last finished epoch")
    msg = f"{what}: {'; '.join(parts)}"
    kinds = {type(e) for e in errors.values()}
    if not broken and len(kinds) == 1:
        try:
            return kinds.pop()(msg)
        except Exception:  # an exception type that wants other arguments
            pass
    return FoldJobError(msg)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Interrupted: cancel what has not started and end the running workers (their folds resume later)."""
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


def run_fold_jobs(target: Callable[..., Any], jobs: dict[Any, tuple], workers: int,
                  progress: Callable[[Any], TrainingProgress], what: str, poll: float = 0.25) -> dict[Any, Any]:
    """``target(*jobs[fold], events)`` for every fold in at most ``workers`` spawned processes; returns
    ``{fold: result}`` in the order of ``jobs``.

    ``target`` is a module-level function (spawned workers import it); ``events`` is the queue its
    :class:`QueueProgress` reports to, replayed here on ``progress(fold)`` (a new
    :class:`~ichdlib.progress.TrainingProgress` for each fold, closed at the end). When folds fail, the
    others still finish, then one error names them (``what`` says what was running).
    """
    ctx = multiprocessing.get_context("spawn")
    results: dict[Any, Any] = {}
    errors: dict[Any, BaseException] = {}
    broken: list[Any] = []
    shown: dict[Any, TrainingProgress] = {}
    # the queue's server and the workers end with this process even when it is killed (kill -9)
    manager = SyncManager(ctx=ctx)
    manager.start(exit_with_parent, (os.getpid(),))
    with manager:
        events = manager.Queue()
        pool = ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=ctx,
                                   initializer=exit_with_parent, initargs=(os.getpid(),))
        try:
            futures: dict[Future, Any] = {pool.submit(target, *args, events): fold for fold, args in jobs.items()}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=poll, return_when=FIRST_COMPLETED)
                _drain(events, shown, progress)
                for fut in done:
                    fold, exc = futures[fut], fut.exception()
                    if exc is None:
                        results[fold] = fut.result()
                    elif isinstance(exc, BrokenProcessPool):
                        broken.append(fold)
                    else:
                        errors[fold] = exc
            pool.shutdown(wait=True)
            _drain(events, shown, progress)
        except BaseException:
            _stop(pool)
            raise
        finally:
            for p in shown.values():
                p.close()
    if errors or broken:
        first = next(iter(errors.values()), None)
        raise _failure(what, errors, broken) from first
    return {fold: results[fold] for fold in jobs}
