"""Report plumbing without running notebooks: progress lines, figure saving, summary timings, kernel config."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ichdlib import nb
from ichdlib.config import load_params
from ichdlib.progress import TrainingProgress, epoch_line
from ichdlib.run import StageResult, last_timings, quiet_kernel_config, record_timing, write_summary

REPO = Path(__file__).resolve().parents[1]


def test_headless_progress_is_one_compact_line_per_epoch():
    out = io.StringIO()
    p = TrainingProgress("resnet18_256", live=False, stream=out)
    for fold in (0, 1):
        p.fold(fold, 3)
        for epoch, val in enumerate([0.20, 0.18, 0.19]):
            assert list(p.batches(range(4))) == [0, 1, 2, 3]
            p.epoch(epoch, 0.3 - 0.01 * epoch, val, images_per_s=1234.5, seconds=12.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 6
    assert lines[0] == "resnet18_256 fold 0 epoch 1/3  train loss 0.3000  val wLL 0.2000 *    1234 img/s   12.0 s"
    assert lines[1].count("*") == 1 and "*" not in lines[2]  # the star marks a new best only
    assert max(len(ln) for ln in lines) < 100
    # a resumed fold says where it resumes
    p.fold(2, 30, start=7, best=0.1)
    assert out.getvalue().splitlines()[-1] == "resnet18_256 fold 2: resuming at epoch 8/30"
    assert "*" not in p.epoch(7, 0.2, 0.15)  # not better than the best before the interruption


def test_live_curve_has_a_line_per_fold():
    p = TrainingProgress("seq1", live=False)
    p.history = {0: [(0, 0.3, 0.2), (1, 0.2, 0.19)], 1: [(0, 0.31, None)]}
    p._epochs = 2
    fig = p.figure()
    assert [len(ax.lines) for ax in fig.axes] == [2, 1]
    assert epoch_line("m", 0, 9, 10, 0.1) == "m fold 0 epoch 10/10  train loss 0.1000"


def _own_params(tmp_path):
    """The smoke params in this test's own folder (the shared ``smoke_params`` reports folder belongs to the
    session fixtures that run the stages)."""
    return load_params(REPO / "params" / "smoke.yaml", {"root": str(tmp_path)})


def test_save_figure_keeps_the_png_and_shows_no_path(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    P = _own_params(tmp_path)
    path = nb.save_figure(fig, P, "unit_test_fig")
    assert path == P.layout.figure("unit_test_fig") and path.is_file() and path.stat().st_size > 1000
    assert path._ipython_display_() is None  # a cell ending in save_figure(...) shows no PosixPath(...)
    plt.close(fig)


def test_summary_keeps_the_last_real_timings(tmp_path):
    P = _own_params(tmp_path)
    record_timing(P, "02_cnn_training.ipynb", 175.4)
    record_timing(P, "03_feature_extraction.ipynb", 19.0)
    assert last_timings(P) == {"02_cnn_training.ipynb": 175.4, "03_feature_extraction.ipynb": 19.0}
    results = [StageResult("02", "02_cnn_training.ipynb", "skipped"), StageResult("03", "03_feature_extraction.ipynb",
                                                                                 "ran", 21.2)]
    text = write_summary(P, results).read_text()
    assert "| 02_cnn_training.ipynb | skipped; last ran in 175 s | 175 |" in text
    assert "| 03_feature_extraction.ipynb | ran | 21 |" in text
    P.layout.timings.write_text("{broken")
    assert last_timings(P) == {}  # a damaged file means "unknown", not a crash
    record_timing(P, "04_sequence_models.ipynb", 3.0)  # and the next run writes a valid file again
    assert json.loads(P.layout.timings.read_text())["04_sequence_models.ipynb"]["seconds"] == 3.0


def test_kernels_talk_over_ipc(tmp_path):
    cfg = quiet_kernel_config(tmp_path)
    assert cfg.KernelManager.transport == "ipc" and cfg.KernelManager.ip.startswith(str(tmp_path))
