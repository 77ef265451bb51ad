"""The artifacts layer: the run layout is spelled once (``ichdlib/layout.py``), models carry their specs,
one loader and one fold enumerator serve every stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ichdlib import layout
from ichdlib.config import load_params
from ichdlib.layout import ModelDir, RunLayout, fold_numbers

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "ichdlib"

#: File names of a run's work and reports folders: a string literal equal to one of them, anywhere in the
#: package but the layout module, is a second spelling of the layout.
FILES = {layout.CATALOG, layout.QUARANTINE, layout.INGEST_REPORT, layout.INGEST_STATE, layout.OOF, layout.TEST,
         layout.DONE, layout.META, layout.OOF_FEAT, layout.TEST_FEAT, layout.OOF_PROB, layout.TEST_PROB,
         layout.TEST_PROB_FOLDS, layout.DIGESTS, layout.METRICS, layout.SUBMISSION, layout.TIMINGS, layout.SUMMARY,
         layout.PARAMS_FILE}
#: Folder names, flagged where they are joined onto a path (``x / "cnn"``): as words they name stages too.
DIRS = {layout.CNN, layout.FEATURES, layout.SEQ, layout.STAGES, layout.LOGS, layout.INPUTS, layout.FIGURES,
        layout.MASKS}
#: Per-fold and per-size file names built with f-strings (``f"fold{k}.pt"``, ``f"cache_{size}.npy"``).
PATTERNS = re.compile(r"^(fold|part_fold|cache_)$")
SUFFIX = re.compile(r"\.(pt|csv|parquet|npy|npz|json)$")


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def layout_spellings(source: str, name: str = "<src>") -> list[str]:
    """``line: text`` of every place ``source`` spells a run-layout name (docstrings and messages, where the
    name is part of a longer text, do not count)."""
    tree = ast.parse(source, name)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in FILES:
                found.append(f"{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value in DIRS:
            found.append(f"{node.lineno}: / {node.right.value!r}")
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and PATTERNS.match(str(node.values[0].value)) and isinstance(node.values[-1], ast.Constant) \
                and SUFFIX.search(str(node.values[-1].value)):
            found.append(f"{node.lineno}: f{ast.unparse(node)[1:]}")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


def test_the_checker_sees_the_spellings_and_not_the_prose():
    src = '''
"""Writes metrics.json."""
a = work / "cnn" / key / "oof.parquet"
b = f"fold{k}.pt"
c = {f"cache_{size}": 1.0}
msg = f"no metrics.json in {rep}; run notebook 05"
stage = "cnn"
'''
    assert [s.split(":")[0] for s in layout_spellings(src)] == ["3", "3", "4"]


def test_the_run_layout_is_spelled_only_in_the_layout_module():
    bad = {}
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "layout.py":
            continue
        hits = layout_spellings(path.read_text(), str(path))
        if hits:
            bad[str(path.relative_to(REPO))] = hits
    assert not bad, "run-layout names spelled outside ichdlib/layout.py (use RunLayout):\n" + "\n".join(
        f"{p}: {'; '.join(h)}" for p, h in bad.items())


def test_layout_from_params(tmp_path):
    P = load_params(REPO / "params" / "smoke.yaml", {"root": str(tmp_path), "run": "r1"})
    L = P.layout
    assert L == RunLayout.from_params(P) and L.work == P.work_dir and L.reports == P.reports_dir
    assert L.catalog == P.catalog_path == L.work / "catalog.parquet"
    assert L.cnn("k").checkpoint(2) == L.work / "cnn" / "k" / "fold2.pt"
    assert L.seq("seq1").oof == L.work / "seq" / "seq1" / "oof.parquet"
    assert L.features("k").test_prob_folds.parent == L.work / "features" / "k"
    assert L.metrics.parent == L.figure("x").parent.parent == L.reports
    assert L.mask("ID_1") == P.data_root / "masks" / "ID_1.npz"
    assert L.outputs_root("reports:submission.csv") == (L.reports, "submission.csv")
    for patterns in layout.STAGE_OUTPUTS.values():  # the stamp globs are relative and name known folders
        for p in patterns:
            base, glob = L.outputs_root(p)
            assert base in (L.work, L.reports) and not Path(glob).is_absolute()


def test_one_fold_enumerator(tmp_path):
    d = ModelDir(tmp_path / "m")
    assert d.folds() == [] and fold_numbers(tmp_path / "none") == []
    d.path.mkdir()
    for name in ("fold3.pt", "fold0.pt", "fold0_last.pt", "fold1_log.csv", "foldx.pt", "fold10.pt"):
        (d.path / name).write_bytes(b"")
    assert d.folds() == [0, 3, 10]


def test_the_loader_returns_models_that_carry_their_spec(trained):
    from ichdlib.checkpoints import load_checkpoint
    from ichdlib.spec import CnnSpec, ModelSpec, SeqSpec

    P = trained
    cnn = load_checkpoint(P.layout.cnn(P.cnn.backbones[0].key).checkpoint(0))
    assert isinstance(cnn.spec, CnnSpec) and ModelSpec is CnnSpec and not cnn.training
    assert cnn.spec.size == P.cnn.backbones[0].size and cnn.meta["fold"] == 0
    seq = load_checkpoint(P.layout.seq(P.seq.models[0]).checkpoint(0))
    assert isinstance(seq.spec, SeqSpec) and seq.spec.model == P.seq.models[0]
    assert seq.spec.backbones == tuple(b.key for b in P.cnn.backbones)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(P.layout.cnn("nope").checkpoint(0))
