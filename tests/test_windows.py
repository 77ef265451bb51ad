import numpy as np
import pytest
import torch

from ichdlib.windows import (
    WINDOWS,
    LearnableWindow,
    channels,
    channels_torch,
    recipe_windows,
    window,
    window_torch,
)


@pytest.mark.parametrize(
    "name,hu,expected",
    [
        ("brain", [0, 40, 80, -100, 200], [0.0, 0.5, 1.0, 0.0, 1.0]),
        ("brain", [20, 60], [0.25, 0.75]),
        ("subdural", [-20, 80, 180, 130], [0.0, 0.5, 1.0, 0.75]),
        ("bone", [-800, 600, 2000, 1300], [0.0, 0.5, 1.0, 0.75]),
        ("soft", [-150, 40, 230], [0.0, 0.5, 1.0]),
    ],
)
def test_known_hu_values_through_each_window(name, hu, expected):
    c, w = WINDOWS[name]
    np.testing.assert_allclose(window(np.array(hu, dtype=np.float32), c, w), expected, atol=1e-6)


def test_window_presets_match_the_write_up():
    assert WINDOWS["brain"] == (40, 80)
    assert WINDOWS["subdural"] == (80, 200)
    assert WINDOWS["bone"] == (600, 2800)


def _slices(seed=0, shape=(2, 8, 8)):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1100, 2500, size=shape).astype(np.float32) for _ in range(3)]


def test_seed_3window_puts_brain_on_prev_subdural_on_cur_bone_on_next():
    prev, cur, nxt = (np.full((4, 4), v, np.float32) for v in (40.0, 130.0, 1300.0))
    out = channels(prev, cur, nxt, "seed_3window")
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 0.75, 0.75])


def test_adjacent_header_uses_one_window_on_three_slices():
    prev, cur, nxt = (np.full((4, 4), v, np.float32) for v in (20.0, 40.0, 60.0))
    out = channels(prev, cur, nxt, "adjacent_header", single_window=(40, 80))
    np.testing.assert_allclose(out[:, 0, 0], [0.25, 0.5, 0.75])


def test_three_window_reads_the_same_slice():
    prev, cur, nxt = _slices()
    a = channels(prev, cur, nxt, "three_window")
    b = channels(np.zeros_like(prev), cur, np.zeros_like(nxt), "three_window")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 3, 8, 8)


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown channel recipe 'nope'"):
        recipe_windows("nope")


@pytest.mark.parametrize("recipe", ["seed_3window", "adjacent_header", "three_window"])
def test_numpy_and_torch_agree(recipe):
    prev, cur, nxt = _slices(1)
    ref = channels(prev, cur, nxt, recipe)
    got = channels_torch(*(torch.from_numpy(a) for a in (prev, cur, nxt)), recipe).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    hu = torch.from_numpy(cur).to(torch.int16)
    np.testing.assert_allclose(window_torch(hu, 80, 200).numpy(), window(hu.numpy(), 80, 200), atol=1e-6)


def test_learnable_window_starts_as_a_smooth_version_of_the_fixed_windows():
    layer = LearnableWindow("seed_3window")
    stack = torch.tensor([40.0, 80.0, 600.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = layer(stack)
    # window centers map to 0.5
    torch.testing.assert_close(out[0, :, 0, 0], torch.full((3,), 0.5))
    # below/above the window edges it saturates toward 0/1 and stays monotone
    lo = layer(torch.tensor([-200.0, -200.0, -1000.0]).view(1, 3, 1, 1))
    hi = layer(torch.tensor([300.0, 400.0, 3000.0]).view(1, 3, 1, 1))
    assert (lo < 0.1).all() and (hi > 0.9).all()
    out.sum().backward()
    assert layer.conv.weight.grad is not None


def test_a_recipe_is_data_numpy_torch_and_learnable_read_the_same_table(monkeypatch):
    """Adding one row to RECIPE_TABLE is enough: every implementation stacks from it."""
    import numpy as np
    import torch

    from ichdlib import windows as W

    monkeypatch.setitem(W.RECIPE_TABLE, "bone_next_brain_prev", (("bone", +1), ("brain", -1), ("single", 0)))
    rng = np.random.default_rng(0)
    prev, cur, nxt = (rng.uniform(-200, 1500, (2, 8, 8)).astype(np.float32) for _ in range(3))
    ch = W.channels(prev, cur, nxt, "bone_next_brain_prev", (30.0, 60.0))
    np.testing.assert_allclose(ch[:, 0], W.window(nxt, *W.WINDOWS["bone"]))
    np.testing.assert_allclose(ch[:, 1], W.window(prev, *W.WINDOWS["brain"]))
    np.testing.assert_allclose(ch[:, 2], W.window(cur, 30.0, 60.0))
    t = W.channels_torch(*(torch.from_numpy(a) for a in (prev, cur, nxt)), "bone_next_brain_prev", (30.0, 60.0))
    np.testing.assert_allclose(t.numpy(), ch, atol=1e-6)
    lw = W.LearnableWindow("bone_next_brain_prev", (30.0, 60.0))
    out = lw(torch.from_numpy(np.stack([prev, cur, nxt], axis=1)))
    # at init each learnable channel is a smooth version of its fixed window on the same slice
    assert np.corrcoef(out[:, 0].detach().numpy().ravel(), ch[:, 0].ravel())[0, 1] > 0.9
    assert np.corrcoef(out[:, 1].detach().numpy().ravel(), ch[:, 1].ravel())[0, 1] > 0.9
