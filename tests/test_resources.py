"""Loader memory sizing and the /dev/shm check (ichdlib.resources)."""

from __future__ import annotations

import os

import pytest

from ichdlib.config import load_params
from ichdlib.resources import (
    ResourceError,
    check_loader_memory,
    check_training_memory,
    loader_memory,
    requirements_table,
    shm_free_bytes,
)


def test_loader_bytes():
    m = loader_memory(12, 4, 256, 256)
    per = 256 * (3 * 256 * 256 * 2 + 32)
    assert m.batch_bytes == per and m.shm_bytes == 48 * per and m.pinned_bytes == 48 * per
    assert 4.8e9 < m.shm_bytes < 4.9e9  # the issue's ~5 GB at 12 workers x 4 batches of 256
    z = loader_memory(0, 4, 8, 32, pin=True)
    assert z.shm_bytes == 0 and z.pinned_bytes == z.batch_bytes
    assert loader_memory(2, 2, 8, 32, pin=False).pinned_bytes == 0
    with pytest.raises(ValueError, match="prefetch"):
        loader_memory(2, 0, 8, 32)


def test_check_names_the_fix():
    ls = [loader_memory(12, 4, 256, 256, name="training"), loader_memory(12, 4, 512, 256, name="validation")]
    with pytest.raises(ResourceError, match=r"--shm-size=.*--ipc=host") as e:
        check_loader_memory(ls, shm_free=64 * 2**20, ram_free=10**12)
    msg = str(e.value)
    assert "\n" not in msg and "num_workers (now 12)" in msg and "prefetch (now 4)" in msg
    with pytest.raises(ResourceError, match="host memory"):
        check_loader_memory(ls, shm_free=10**12, ram_free=8 * 10**9)
    ok = check_loader_memory([loader_memory(2, 2, 8, 32)], shm_free=10**9, ram_free=10**9)
    assert ok["shm_need_gb"] == pytest.approx(2 * 2 * 8 * (3 * 32 * 32 * 2 + 32) / 1e9)


def test_params_and_real_machine(tmp_path):
    P = load_params("params/rsna_gpu.yaml")
    assert P.cnn.prefetch == 4
    rows = {r["backbone"]: r for r in requirements_table(P)}
    assert rows["densenet121_256"]["shm_gb"] == pytest.approx(14.5, abs=0.2)  # train 256 + val 512 batches
    st = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    assert shm_free_bytes() == (None if st is None else st.f_bavail * st.f_frsize)
    assert shm_free_bytes(str(tmp_path / "no-such-fs")) is None
    small = load_params("params/smoke.yaml")
    check_training_memory(small, small.cnn.backbones[0], cuda=False)  # the smoke run fits anywhere
