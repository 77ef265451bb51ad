"""Output locks: contention names the holder, a killed holder frees the lock, re-entrance works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ichdlib.locks import LockHeld, holder, lock_path, output_lock

HOLD = """
import sys, time
from ichdlib.locks import output_lock
with output_lock(sys.argv[1], what="test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(target: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(target), str(seconds)], stdout=subprocess.PIPE,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_is_told_who_holds_it(tmp_path):
    target = tmp_path / "catalog.parquet"
    p = _hold(target, 30)
    try:
        with pytest.raises(LockHeld) as exc, output_lock(target):
            pass
        msg = str(exc.value)
        assert f"pid {p.pid}" in msg and "test holder" in msg and "catalog.parquet" in msg
        assert holder(target)["pid"] == p.pid
    finally:
        p.kill()
        p.wait()


def test_killed_holder_frees_the_lock(tmp_path):
    target = tmp_path / "fold0"
    p = _hold(target, 30)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with output_lock(target, what="after kill") as path:
        assert path == lock_path(target).resolve()
        assert holder(target)["pid"] == os.getpid()


def test_wait_for_a_short_holder_and_timeout_for_a_long_one(tmp_path):
    short = _hold(tmp_path / "a", 1.0)
    t0 = time.monotonic()
    with output_lock(tmp_path / "a", wait=20):
        assert time.monotonic() - t0 < 15
    short.wait()
    long_ = _hold(tmp_path / "b", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockHeld), output_lock(tmp_path / "b", wait=0.5):
            pass
        assert 0.4 < time.monotonic() - t0 < 10
    finally:
        long_.kill()
        long_.wait()


def test_reentrant_in_one_process(tmp_path):
    target = tmp_path / "x"
    with output_lock(target, what="outer"), output_lock(target, what="inner") as path:
        assert holder(target)["what"] == "outer"  # the inner block re-entered, it did not re-lock
        assert path == lock_path(target).resolve()
    p = _hold(target, 0.1)  # released after the outer block: another process takes it at once
    p.wait()
    assert p.returncode == 0
