"""Shared file helpers: atomic writes leave either the old file or the new one, and JSON-ready values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ichdlib.files import atomic_write, json_ready, read_json, write_json, write_text


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = write_text(tmp_path / "sub" / "a.txt", "old")
    assert path.read_text() == "old"

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]  # no temp file left behind


def test_json_ready_and_round_trip(tmp_path):
    data = {1: (np.float32(0.5), np.int64(3)), "nan": np.float64("nan"), "inf": math.inf, "ok": np.bool_(True)}
    ready = json_ready(data)
    assert ready == {"1": [0.5, 3], "nan": None, "inf": None, "ok": True}
    json.dumps(ready, allow_nan=False)
    write_json(tmp_path / "d.json", ready)
    assert read_json(tmp_path / "d.json") == ready
    (tmp_path / "bad.json").write_text("{not json")
    assert read_json(tmp_path / "bad.json") == {} and read_json(tmp_path / "missing.json") == {}
