"""The package's shape: sub-packages import only downwards, no import cycles (lazy imports inside functions
count too), inference never reaches training code, real-data ingest never loads the phantom."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ichdlib"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ichdlib modules it imports anywhere in its body (top level or inside functions; not the
    ``if TYPE_CHECKING:`` blocks, which never run)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: never imported at run time
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != mod and t != "ichdlib":
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


#: The sub-packages from the bottom up: a module may import its own level and the levels below, never one
#: above. ``core`` is the top-level modules (config, layout, spec, checkpoints, registry, stages, runtime, ...).
#: A new sub-package goes in by name at its level, e.g. ``"cnn3d"`` between ``cnn`` and ``seq``, or
#: ``"validate"`` beside ``"serve"``.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("phantom",),
    ("ingest",),
    ("cnn",),
    ("cnn3d",),
    ("seq",),
    ("ensemble",),
    ("review", "distill"),
    ("serve", "validate"),
    ("app",),
]
#: Upward imports allowed on purpose, each with its reason.
ALLOWED: dict[tuple[str, str], str] = {
    # the stamps record the phantom's version; its package __init__ holds only that constant
    ("ichdlib.stages", "ichdlib.phantom"): "PHANTOM_VERSION",
}


def layer_of(module: str) -> str:
    """``ichdlib.cnn.train`` -> ``cnn``; a top-level module (``ichdlib.config``) -> ``core``."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PKG / parts[1]).is_dir()):
        return parts[1]
    return "core"


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]],
                   allowed: dict[tuple[str, str], str] | None = None) -> list[str]:
    """``importer -> imported`` for every import of a module in a higher layer (or in no layer at all)."""
    rank = {name: i for i, level in enumerate(layers) for name in level}
    out = []
    for mod in sorted(graph):
        for dep in sorted(graph[mod]):
            a, b = layer_of(mod), layer_of(dep)
            if a not in rank or b not in rank:
                out.append(f"{mod} -> {dep} (sub-package {a if a not in rank else b!r} is not in LAYERS)")
            elif rank[b] > rank[a] and (mod, dep) not in (allowed or {}):
                out.append(f"{mod} ({a}) -> {dep} ({b})")
    return out


def test_the_layer_check_finds_an_upward_import():
    graph = {"ichdlib.cnn.train": {"ichdlib.seq.train", "ichdlib.config"}, "ichdlib.seq.train": {"ichdlib.cnn.train"},
             "ichdlib.config": set()}
    assert upward_imports(graph, LAYERS) == ["ichdlib.cnn.train (cnn) -> ichdlib.seq.train (seq)"]
    assert upward_imports({"ichdlib.newpkg.x": set(), "ichdlib.config": {"ichdlib.newpkg.x"}}, LAYERS)


def test_sub_packages_import_only_downwards():
    """core <- phantom <- ingest <- cnn <- seq <- ensemble <- review <- serve <- app (lazy imports included)."""
    bad = upward_imports(import_graph(), LAYERS, ALLOWED)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _reach(graph: dict[str, set[str]], module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_inference_never_imports_training_code():
    """``ichd predict`` and bundles reach the models, the inference paths and the runtime helpers, never the
    training loops (lazy imports included)."""
    graph = import_graph()
    training = {"ichdlib.cnn.train", "ichdlib.app.train_cli", "ichdlib.seq.train", "ichdlib.distill.train",
                "ichdlib.phantom.synth", "ichdlib.cnn3d.train"}
    for module in (m for m in graph if m.startswith("ichdlib.serve.")):
        assert not (_reach(graph, module) & training), f"{module} reaches {sorted(_reach(graph, module) & training)}"


def test_real_data_ingest_does_not_load_the_phantom(ingested, tmp_path):
    """With ``synth.enabled: false`` (real data) ingest runs without importing the phantom generator."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ichdlib.config import load_params\n"
        "from ichdlib.ingest.catalog import ingest\n"
        f"P = load_params({str(PKG.parent / 'params' / 'smoke.yaml')!r}, {{'root': {str(ingested.root)!r},"
        f" 'synth': {{'enabled': False}}, 'paths': {{'work': {str(tmp_path / 'work')!r}}}}})\n"
        "cat = ingest(P, progress=False)\n"
        "print(len(cat), sorted(m for m in sys.modules if m.startswith('ichdlib.phantom')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    n, loaded = out.stdout.split(" ", 1)
    assert int(n) > 0 and loaded.strip() == "[]", out.stdout
