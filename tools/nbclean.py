"""Strip outputs and execution counts from notebooks and make sure each names the python3 kernel.

Usage: python tools/nbclean.py [notebooks/*.ipynb]   (``--check`` exits 1 if anything would change)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def clean(nb: dict) -> dict:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
        cell.get("metadata", {}).pop("papermill", None)
    meta = nb.setdefault("metadata", {})
    meta["kernelspec"] = KERNELSPEC
    meta.setdefault("language_info", {"name": "python"})
    meta.pop("papermill", None)
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"] or sorted(Path("notebooks").glob("*.ipynb"))
    changed = []
    for p in paths:
        text = p.read_text()
        new = json.dumps(clean(json.loads(text)), indent=1, ensure_ascii=False) + "\n"
        if new != text:
            changed.append(p)
            if not check:
                p.write_text(new)
    for p in changed:
        print(("would clean " if check else "cleaned ") + str(p))
    return 1 if (check and changed) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
