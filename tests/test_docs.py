"""The examples in the docs run: adding a window recipe, a CAM method and a sequence model is one
registration each (``docs/architecture.md``, "Registries")."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ichdlib.config import ParamsError, load_params
from ichdlib.registry import CAM_METHODS, SEQ_MODELS
from ichdlib.windows import RECIPES, WINDOWS, channels, window

REPO = Path(__file__).resolve().parents[1]


def doc_example(name: str) -> str:
    """The python block after ``<!-- example: NAME -->`` in docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    m = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"no example {name!r} in docs/architecture.md"
    return m.group(1)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.chdir(REPO)
    before = {r: r.names() for r in (RECIPES, CAM_METHODS, SEQ_MODELS)}
    ns: dict = {}
    exec(compile(doc_example("registries"), "docs/architecture.md", "exec"), ns)
    yield ns
    for reg, names in before.items():
        for n in reg.names():
            if n not in names:
                reg.unregister(n)


def test_the_registry_example_is_short():
    assert len(doc_example("registries").strip().splitlines()) <= 12


def test_one_registration_each_is_enough(registered):
    from ichdlib.review.cam import cam_class
    from ichdlib.seq.models import build_seq_model

    P = registered["P"]
    assert (P.windows.recipe, P.cam.method, P.seq.models) == ("brain_only", "layercam", ["seq1_narrow"])
    hu = np.random.default_rng(0).uniform(-200, 200, (3, 8, 8)).astype(np.float32)
    ch = channels(hu[0], hu[1], hu[2], "brain_only")
    np.testing.assert_allclose(ch[1], window(hu[1], *WINDOWS["brain"]))
    import pytorch_grad_cam

    assert cam_class("layercam") is pytorch_grad_cam.LayerCAM
    m = build_seq_model("seq1_narrow", 16, 1, 4, mid=8, reduce_dim=8, dropout=0.0)
    assert m.gru.hidden_size == 32 and isinstance(m, torch.nn.Module)


def test_unregistered_names_fail_at_load_naming_the_choices():
    with pytest.raises(ParamsError, match=r"windows.recipe: unknown channel recipe 'brain_only'; choose one of "
                                          r"seed_3window"):
        load_params(REPO / "params" / "demo.yaml", {"windows": {"recipe": "brain_only"}})
    with pytest.raises(ParamsError, match="seq.models: unknown sequence model 'seq3'; choose one of seq1, seq2"):
        load_params(REPO / "params" / "demo.yaml", {"seq": {"models": ["seq3"]}})
