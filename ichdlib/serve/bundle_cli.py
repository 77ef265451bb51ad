"""``ichd export --run PARAMS_OR_WORK_DIR --out BUNDLE``: write a run's bundle (:mod:`ichdlib.serve.bundle`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ichdlib.serve.bundle import MANIFEST, export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichd export``."""
    parser.add_argument("--run", required=True,
                        help="the run: its params YAML (e.g. params/demo.yaml) or its work folder with params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder")


def cli(args: argparse.Namespace) -> int:
    """``ichd export``."""
    out = export(args.run, args.out, force=args.force)
    manifest = json.loads((out / MANIFEST).read_text())
    n_files = len(manifest["files"])
    size = sum((out / f).stat().st_size for f in manifest["files"]) / 1e6
    print(f"bundle written: {out} ({n_files} weight files, {size:.1f} MB; backbones "
          f"{', '.join(b['key'] for b in manifest['backbones'])}; sequence models "
          f"{', '.join(m['key'] for m in manifest['seq']['models']) or 'none'})")
    return 0
