"""Shared fixtures: a tiny phantom in a temp folder, generated and ingested once per test session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("ICHD_HEADLESS", "1")

import pytest  # noqa: E402

from ichdlib.config import Params, load_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread: on a shared 2-core CI box, two threads are several times slower for tiny models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_params(tmp_path_factory) -> Params:
    """``params/smoke.yaml`` with every path under a fresh temp root (nothing generated yet)."""
    root = tmp_path_factory.mktemp("smoke_root")
    return load_params(REPO / "params" / "smoke.yaml", {"root": str(root)})


@pytest.fixture(scope="session")
def phantom(smoke_params) -> Path:
    """The smoke phantom written in RSNA layout (with quirks and masks)."""
    from ichdlib.phantom.synth import ensure_phantom

    return ensure_phantom(smoke_params)


@pytest.fixture(scope="session")
def ingested(smoke_params, phantom) -> Params:
    """The smoke phantom ingested: ``catalog.parquet``, ``quarantine.csv`` and the HU cache exist."""
    from ichdlib.ingest.catalog import ingest

    ingest(smoke_params)
    return smoke_params


@pytest.fixture(scope="session")
def trained(ingested):
    """The smoke phantom trained end to end with the stage functions of notebooks 02-05 (each stage skips
    work whose outputs exist, so a second use in the session is cheap)."""
    from ichdlib.cnn.features import extract_all
    from ichdlib.cnn.train import train_all
    from ichdlib.ensemble.blend import run_ensemble
    from ichdlib.seq.train import train_seq

    P = ingested
    train_all(P)
    extract_all(P)
    for name in P.seq.models:
        train_seq(P, name)
    run_ensemble(P)
    return P


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``ichd run params/smoke.yaml`` once per session (HTML included) in a fresh root, with what the run
    printed on the console at the file-descriptor level (kernel subprocesses included).

    Shared by the pipeline, report and browser tests so the six notebooks run once (~60 s on 2 cores).
    """
    import sys
    from types import SimpleNamespace

    from ichdlib.run import run_pipeline

    root = tmp_path_factory.mktemp("smoke_run")
    over = {"root": str(root)}
    console = root / "console.txt"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    import contextlib

    with open(console, "w", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                results = run_pipeline(REPO / "params" / "smoke.yaml", overrides=over, html=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    P = load_params(REPO / "params" / "smoke.yaml", over)
    return SimpleNamespace(P=P, results=results, overrides=over, console=console.read_text(errors="replace"))


@pytest.fixture(scope="session")
def validate_bundle(smoke_params, tmp_path_factory) -> Path:
    """An untrained one-fold smoke bundle for ``ichd validate`` tests (seconds, no training) with a training
    thickness and an operating point as ``ichd export`` records them."""
    from ichdlib.labels import LABELS
    from ichdlib.serve.bundle import Bundle

    b = Bundle.untrained(smoke_params, folds=1)
    b.manifest["training"] = {"slice_thickness_mm": 5.0, "spacing_z_mm": 5.0, "pixel_spacing_mm": 0.9,
                              "n_studies": 8, "source": "test"}
    thresholds = {c: 0.3 + 0.05 * k for k, c in enumerate(LABELS)}
    b.manifest["operating_point"] = {"rule": "youden", "aggregate": "max", "thresholds": thresholds,
                                     "rules": {"youden": thresholds}, "fallback": [], "n_studies": 8,
                                     "n_pos": dict.fromkeys(LABELS, 3), "source": "test"}
    return b.save(tmp_path_factory.mktemp("validate_bundle") / "bundle")


@pytest.fixture(scope="session")
def external_layout(tmp_path_factory):
    """``external_layout("cq500" | "ctich", studies, seed)``: the phantom in that layout at 32 px (``ichd synth
    --layout``), written once per session for each combination. Copy it before changing it."""
    from ichdlib.phantom.layouts import generate_layout

    made: dict[tuple[str, int, int], Path] = {}

    def make(layout: str, studies: int, seed: int) -> Path:
        key = (layout, studies, seed)
        if key not in made:
            made[key] = tmp_path_factory.mktemp(f"{layout}_{studies}_{seed}") / layout
            generate_layout(made[key], layout, studies=studies, seed=seed, size=32, workers=1, progress=False)
        return made[key]

    return make
