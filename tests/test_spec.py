"""The typed model spec: written once by training, read the same way everywhere."""

from __future__ import annotations

import pytest

from ichdlib.cnn.infer import spec_augment
from ichdlib.cnn.models import build_from_spec
from ichdlib.config import load_params
from ichdlib.labels import LABELS
from ichdlib.spec import ModelSpec, SpecError


@pytest.fixture
def P(repo):
    return load_params(repo / "params" / "smoke.yaml",
                       {"windows": {"recipe": "adjacent_header", "single_window": [50, 100], "learnable": True}})


def test_round_trip_and_fields_from_params(P):
    cfg = P.cnn.backbones[0]
    spec = ModelSpec.from_params(P, cfg, feature_dim=16)
    assert spec.windows == ((50.0, 100.0),) * 3 and spec.learnable_window is True
    assert spec.size == cfg.size and spec.labels == LABELS and spec.key == cfg.key
    back = ModelSpec.from_meta({"spec": spec.to_dict(), "fold": 0})
    assert back == spec


def test_older_checkpoint_meta_reads_with_one_set_of_defaults():
    old = {"name": "lcnet_050", "size": 48, "recipe": "adjacent_header", "single_window": [50, 100],
           "val_center_crop": 0.9, "feature_dim": 16}
    spec = ModelSpec.from_meta(old)
    assert spec.learnable_window is False  # the one default, wherever it is read
    assert spec.windows == ((50.0, 100.0),) * 3 and spec.val_center_crop == 0.9
    assert spec.cam_kwargs()["single_window"] == (50.0, 100.0)  # from the model, never the caller's params


@pytest.mark.parametrize("change, message", [
    ({"recipe": "four_window"}, "unknown recipe"),
    ({"size": 100000}, "outside 16..2048"),
    ({"labels": list(reversed(LABELS))}, "label order"),
    ({"extra": 1}, "unknown key"),
])
def test_bad_specs_are_one_line_errors(P, change, message):
    d = ModelSpec.from_params(P, P.cnn.backbones[0]).to_dict()
    d.update(change)
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_dict(d)
    with pytest.raises(SpecError, match="missing key 'size'"):
        ModelSpec.from_dict({k: v for k, v in ModelSpec.from_params(P, P.cnn.backbones[0]).to_dict().items()
                             if k != "size"})


def test_build_gives_the_architecture_the_spec_names(P):
    spec = ModelSpec.from_params(P, P.cnn.backbones[0])
    model = build_from_spec(spec)
    assert model.learnable_window and model.feature_dim > 0
    aug = spec_augment(spec, P.cnn.augment)
    assert aug.learnable and aug.single_window == (50.0, 100.0)
