"""File helpers every stage shares: atomic writes (a crash never leaves half a file) and JSON.

No heavy imports: the phantom's worker processes and the ingest use these too.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` on a hidden temp file next to ``path`` and move the result into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda t: t.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def json_ready(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers/bools, tuples as lists, keys as strings, NaN/inf as None."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """Atomically write ``data`` as JSON (objects JSON does not know are written as their ``str``)."""
    return write_text(path, json.dumps(data, indent=indent, default=str))


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``, or ``{}`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def save_parquet(df: Any, path: str | os.PathLike) -> Path:
    """Atomically write a DataFrame as parquet (no index)."""
    return atomic_write(path, lambda t: df.to_parquet(t, index=False))


def nested_get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` where any level may be missing or null (metrics.json has nulls without truth)."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d
