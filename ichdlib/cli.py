"""The ``ichd`` command line (also ``python -m ichdlib``).

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and ``cli(args) -> int``;
only the chosen module is imported, so ``ichd score`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ichdlib.locks import LockHeld

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("ichdlib.phantom.synth_cli", "write a synthetic head-CT phantom in the exact RSNA/Kaggle layout"),
    "ingest": ("ichdlib.ingest.catalog", "scan an RSNA-layout folder: catalog, folds, quarantine, HU cache"),
    "score": ("ichdlib.metrics", "score a Kaggle long-format prediction CSV against a truth CSV"),
    "run": ("ichdlib.run", "run notebooks 01-06 headless with papermill from one params file"),
    "train": ("ichdlib.app.train_cli", "run one stage (cnn, features, seq, cnn3d, distill) alone or under torchrun (DDP, fold jobs)"),
    "export": ("ichdlib.app.export_cli", "write a self-contained model bundle from a finished run (profile, runtime)"),
    "predict": ("ichdlib.serve.predict", "predict on a folder of DICOM studies with a model bundle"),
    "compare": ("ichdlib.review.compare", "compare two or more runs: stage scores, per-class losses, times, params"),
    "validate": ("ichdlib.validate.run", "external validation: study-level metrics of bundles on CQ500/CT-ICH/DICOM data"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: ichd <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'ichd <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ichd`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from ichdlib import __version__  # noqa: PLC0415  (the version only for --version)

        print(f"ichd {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ichd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ichd {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.cli(args) or 0)
    except KeyboardInterrupt:
        print(f"ichd {name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, LockHeld) as exc:
        # Library errors are written for people: show the message, not a traceback.
        print(f"ichd {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
