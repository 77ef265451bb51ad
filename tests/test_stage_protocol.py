"""The stage protocol: each stage of the DAG is one object with what it reads, what it writes and one
``run(params, force) -> StageReport`` that the notebooks, ``ichd train`` and scripts call."""

from __future__ import annotations

import inspect
from pathlib import Path

import pandas as pd
import pytest

from ichdlib import nb
from ichdlib.config import ParamsError
from ichdlib.registry import resolve
from ichdlib.stages import STAGES, StageReport, forced, stage_named

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_has_one_entry_taking_params_and_force():
    assert list(STAGES) == ["01", "02", "02b", "03", "04", "05", "06", "07", "08"]  # 02b: the optional 3D member
    for s in STAGES.values():
        fn = resolve(s.entry)
        params = list(inspect.signature(fn).parameters)
        assert params[:2] == ["P", "force"], (s.number, params)
        assert stage_named(s.name) is s
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stage_named("nope")


def test_force_reads_the_notebook_parameter():
    assert forced(True, "02") and not forced(False, "02") and not forced(None, "02")
    assert forced(["02", "04"], "04") and not forced(["02"], "03")
    assert forced("all", "05") and forced("05", "05") and not forced("05", "06")
    assert nb.forced(["02"], "02")


def test_force_is_not_a_params_override():
    with pytest.raises(ParamsError, match="'force' is a notebook parameter"):
        nb.setup(REPO / "params" / "smoke.yaml", {"force": True})


def test_the_stages_report_one_shape(trained):
    P = trained
    reports = {n: STAGES[n].run(P) for n in ("01", "02", "03", "04", "05")}  # all current: nothing recomputes
    for n, rep in reports.items():
        assert isinstance(rep, StageReport) and rep.stage == STAGES[n].name and rep.seconds >= 0
        assert isinstance(rep.table(), pd.DataFrame) and len(rep.table()) == len(rep.rows) > 0
    assert list(reports["02"].table()["backbone"]) == [b.key for b in P.cnn.backbones]
    assert set(reports["03"].table()["status"]) == {"skipped"}
    assert list(reports["04"].result) == list(P.seq.models)
    assert "ensemble" in reports["05"].result.table.index
    ingest = reports["01"].table().set_index("split")
    assert ingest.loc["train", "slices"] + ingest.loc["test", "slices"] == len(reports["01"].result)
