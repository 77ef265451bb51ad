"""``ichd synth --layout cq500|ctich --shift``: the external layouts drawn as another scanner."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from ichdlib.phantom.layouts import generate_layout
from ichdlib.phantom.shift import SHIFTS


@pytest.mark.parametrize("layout", ["ctich"])
def test_layout_shift_changes_scanner_not_labels(tmp_path, layout):
    plain = generate_layout(tmp_path / "a", layout, studies=2, seed=3, size=32, workers=1, progress=False)
    moved = generate_layout(tmp_path / "b", layout, studies=2, seed=3, size=32, workers=1, progress=False,
                            shift="scannerB")
    assert plain["shift"] == "none" and moved["shift"] == "scannerB"
    assert json.loads((tmp_path / "b" / "phantom_layout.json").read_text())["shift"] == "scannerB"
    # the same patients, drawn with another field of view: the voxel size grows by the profile's fov_scale
    assert sorted(p.name for p in (tmp_path / "a" / "ct_scans").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "ct_scans").iterdir())
    va = [nib.load(p) for p in sorted((tmp_path / "a" / "ct_scans").iterdir())]
    vb = [nib.load(p) for p in sorted((tmp_path / "b" / "ct_scans").iterdir())]
    ratio = np.mean([v.header.get_zooms()[0] for v in vb]) / np.mean([v.header.get_zooms()[0] for v in va])
    assert ratio > 1 + (SHIFTS["scannerB"].fov_scale - 1) / 2  # heads vary in size; the wider field dominates
    assert not np.array_equal(np.asarray(va[0].dataobj), np.asarray(vb[0].dataobj))


def test_layout_unknown_shift_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown scanner shift 'scannerZ'"):
        generate_layout(tmp_path / "c", "cq500", studies=2, seed=0, size=32, workers=1, progress=False,
                        shift="scannerZ")


def test_demo_external_phantom_follows_its_params(tmp_path):
    """Stage 07's demo phantom is rewritten when its params change (e.g. phantom_shift), real data never."""
    from ichdlib.config import ExternalCfg
    from ichdlib.validate.run import _ensure_phantom

    data = tmp_path / "ext"
    E = ExternalCfg(data=data, phantom="ctich", phantom_studies=2, phantom_size=32)
    _ensure_phantom(data, E, seed=1, progress=False)
    first = (data / "phantom_layout.json").stat().st_mtime_ns
    _ensure_phantom(data, E, seed=1, progress=False)  # same settings: reused
    assert (data / "phantom_layout.json").stat().st_mtime_ns == first
    _ensure_phantom(data, E.model_copy(update={"phantom_shift": "scannerC"}), seed=1, progress=False)
    assert json.loads((data / "phantom_layout.json").read_text())["shift"] == "scannerC"
    real = tmp_path / "real"
    (real / "ct_scans").mkdir(parents=True)
    _ensure_phantom(real, E, seed=1, progress=False)
    assert sorted(p.name for p in real.iterdir()) == ["ct_scans"]
