"""The install files agree: environment.yml mirrors pyproject's pins; every notebook is clean."""

from __future__ import annotations

import json
import re
import tomllib

import yaml


def _pins(specs):
    out = {}
    for s in specs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^;\s]+)", s.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_environment_yml_mirrors_pyproject_pins(repo):
    proj = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    specs = list(proj["dependencies"])
    for extra in proj["optional-dependencies"].values():
        specs += extra
    py = _pins(specs)
    env = yaml.safe_load((repo / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = _pins(pip_list)
    assert py == conda, {k: (py.get(k), conda.get(k)) for k in set(py) | set(conda) if py.get(k) != conda.get(k)}


def test_notebooks_are_committed_clean_with_a_parameters_cell(repo):
    nbs = sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert nbs, "no notebooks"
    for path in nbs:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path.name
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        src = "".join(tagged[0]["source"])
        assert "params_path" in src and "overrides" in src, path.name
        assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", path.name
