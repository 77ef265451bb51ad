"""Output locks: one process writes a given output at a time, and a second one is told who holds it.

A lock covers what a process writes (a stage's output folder, one fold's checkpoint files), not the whole
work folder, so independent fold jobs on several GPUs can run side by side on one work folder while two
ingests of the same folder cannot interleave.

The lock is an advisory ``flock`` on ``<target>.lock`` next to the target. The kernel releases it when the
holder dies (also on ``kill -9``), so a stale lock never blocks a rerun; the file's JSON content names the
holder (pid, host, command, since) for the message a second process prints. The holder removes the file when
it is done (a waiter that locked the removed file notices and locks the new one), so finished outputs, such
as a ``--dicom-out`` folder handed to a PACS, hold no lock files.

    with output_lock(work / "catalog.parquet", what="ingest"):
        ...  # write the catalog

Locks are re-entrant within a process (a stage that takes the lock of its folder may call a helper that
takes it again).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LockHeld", "lock_path", "output_lock", "holder"]

_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth) held by this process
_GUARD = threading.Lock()


class LockHeld(RuntimeError):
    """Another process holds the lock; the message names it and the fix."""


def lock_path(target: str | Path) -> Path:
    """The lock file for ``target``: ``<target>.lock`` beside it (``<folder>.lock`` for a folder)."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def holder(target: str | Path) -> dict | None:
    """Who holds (or last held) the lock on ``target``, from the lock file; None when unknown."""
    try:
        text = lock_path(target).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('what') or 'a stage'}: "
            f"{info.get('command', '?')}) since {since}")


@contextmanager
def output_lock(target: str | Path, *, what: str = "", wait: bool | float = False,
                poll: float = 0.2) -> Iterator[Path]:
    """Hold the lock on ``target`` for the ``with`` block.

    ``wait=False`` raises :class:`LockHeld` at once when another process holds it; ``wait=True`` waits for
    it; a number waits that many seconds and then raises.
    """
    path = lock_path(target).resolve()
    key = str(path)
    with _GUARD:
        if key in _HELD:  # re-entrant within this process
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _GUARD:
                fd, depth = _HELD[key]
                _HELD[key] = (fd, depth - 1)
        return
    deadline = None if wait is True else time.monotonic() + (0.0 if wait is False else float(wait))
    fd = _acquire(path, target, wait, deadline, poll)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
                "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        with _GUARD:
            _HELD[key] = (fd, 1)
        try:
            yield path
        finally:
            with _GUARD:
                _HELD.pop(key, None)
            with _suppress_os_error():
                path.unlink()  # still locked: a waiter on this file re-checks and locks a fresh one
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _suppress_os_error() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def _acquire(path: Path, target: str | Path, wait: bool | float, deadline: float | None, poll: float) -> int:
    """Open and ``flock`` the lock file; retry when the file was removed (by its last holder) meanwhile."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        info = holder(target)
                        hint = "wait for it to finish" if not wait else "it is still running"
                        raise LockHeld(f"{Path(target).name} is being written by {_describe(info)}; "
                                       f"{hint}, or stop that process (lock: {path})") from None
                    time.sleep(poll)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # locked a file its holder removed on release: lock the current one
