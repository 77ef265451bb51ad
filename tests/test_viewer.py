"""ichdlib.review.viewer driven headless: the state and the widgets change as the controls move."""

from __future__ import annotations

import numpy as np
import pytest
from builders import fabricated_studies

from ichdlib.review.viewer import SliceViewer, Study, ViewerState, static_figure


@pytest.fixture
def state():
    studies, cams = fabricated_studies()
    return ViewerState.from_studies(studies, cams)


def test_state_controls_change_what_is_shown(state):
    st = state
    # sorted by predicted any (the fabricated final any peaks rise with the study number)
    assert st.study_ids == ["1.2.3.2", "1.2.3.1", "1.2.3.0"] and st.uid == "1.2.3.2"
    img0, strip0, cap0 = st.image(), st.strip(), st.caption()
    # cropped to the head (the fabricated skull spans 2 * 0.34 * 48 px, plus a margin), the same box on every slice
    assert 33 <= img0.shape[0] == img0.shape[1] <= 42 and img0.shape[2] == 3 and img0.dtype == np.uint8
    assert strip0.ndim == 3
    st.set_slice(st.index + 1 if st.index < 7 else st.index - 1)
    img1, strip1 = st.image(), st.strip()
    assert img1.shape == img0.shape
    assert not np.array_equal(img0, img1) and not np.array_equal(strip0, strip1)
    assert st.caption() != cap0 and f"slice {st.index + 1}/8" in st.caption()
    st.set_slice(99)
    assert st.index == 7
    # window presets and custom level/width
    before = st.image()
    st.set_window("bone")
    assert st.window == (600.0, 2800.0) and not np.array_equal(before, st.image())
    st.set_window("custom", level=0, width=500)
    assert st.window == (0.0, 500.0) and st.window_name == "custom"
    with pytest.raises(ValueError, match="unknown window"):
        st.set_window("lung")
    # class and opacity change the overlay
    st.set_slice(4)
    a = st.image()
    st.set_label("epidural")
    b = st.image()
    assert not np.array_equal(a, b)
    st.set_opacity(0.0)
    c = st.image()
    st.set_opacity(1.0)
    assert not np.array_equal(c, st.image())
    with pytest.raises(ValueError, match="unknown class"):
        st.set_label("stroke")
    # sorting by error and by name; the study switch
    assert st.set_sort("study_uid") == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    errs = st.summary.loc[st.set_sort("error"), "error"].to_numpy()
    assert np.all(np.diff(errs) <= 0)
    st.set_study("1.2.3.0")
    assert st.uid == "1.2.3.0" and "study 1.2.3.0" in st.caption()


def test_cams_computed_once_per_study():
    studies, maps = fabricated_studies()
    calls = []

    def cam_fn(study):
        calls.append(study.uid)
        return maps[study.uid]

    st = ViewerState.from_studies(studies, cam_fn)
    for i in range(8):
        st.set_slice(i)
        st.image()
    st.set_label("subdural")
    st.image()
    st.set_study("1.2.3.0")
    st.image()
    st.set_study("1.2.3.2")
    st.image()
    assert calls == ["1.2.3.2", "1.2.3.0"] and st.cam_calls == 2


def test_widgets_drive_the_state(state):
    v = SliceViewer(state)
    png0, strip0 = v.image.value, v.strip.value
    assert png0[:4] == b"\x89PNG"
    v.slider.value = (v.slider.value + 3) % 8 + 1  # the slider numbers slices 1..n, as the caption does
    assert state.index == v.slider.value - 1 and (v.slider.min, v.slider.max) == (1, 8)
    assert v.image.value != png0 and v.strip.value != strip0
    assert f"slice {v.slider.value}/8" in v.status.value
    # full study names in the picker; the image is not stretched past 4x its pixels
    assert all(uid in label for label, uid in v.study.options)
    assert int(v.image.layout.width.removesuffix("px")) <= 4 * state.image().shape[1]
    v.window.value = "bone"
    assert state.window == (600.0, 2800.0) and v.level.disabled
    v.window.value = "custom"
    v.level.value, v.width_.value = 100, 300
    assert state.window == (100.0, 300.0) and not v.level.disabled
    v.label.value = "subdural"
    assert state.label == "subdural"
    png = v.image.value
    v.opacity.value = 0.0
    assert state.opacity == 0.0 and v.image.value != png
    v.sort.value = "study_uid"
    assert [o[1] for o in v.study.options] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    v.study.value = "1.2.3.0"
    assert state.uid == "1.2.3.0" and v.slider.value == state.index + 1 and v.slider.max == 8
    assert "ichd-slice-slider" in v.slider._dom_classes and "ichd-image" in v.image._dom_classes


def test_static_gallery_headless(state, monkeypatch):
    monkeypatch.setenv("ICHD_HEADLESS", "1")
    from ichdlib.review.viewer import show

    state.set_slice(1)
    fig = show(state, slices=2)
    assert len(fig.axes) == 3 * 3  # 3 studies x (2 slices + strip)
    assert (state.uid, state.index) == (state.study_ids[0], 1)  # state restored
    assert static_figure(state, [state.uid], 1).axes


def test_study_validation():
    with pytest.raises(ValueError, match="probabilities 'final'"):
        Study("x", hu=[np.zeros((4, 4))] * 2, probs={"final": np.zeros((3, 6))})
    with pytest.raises(ValueError, match="at least one study"):
        ViewerState([], lambda u: None)


def test_caption_of_an_unlabelled_study():
    studies, cams = fabricated_studies(n_studies=1, n=4, size=32)
    studies[0].truth = None
    st = ViewerState.from_studies(studies, cams)
    assert "unlabelled" in st.caption() and "truth" not in st.caption()
