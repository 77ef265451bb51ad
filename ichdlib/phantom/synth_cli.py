"""``ichd synth``: the phantom in the RSNA/Kaggle layout (:mod:`ichdlib.phantom.synth`) or, with ``--layout``,
in an external test set's layout (:mod:`ichdlib.phantom.layouts`: CQ500, PhysioNet CT-ICH)."""

from __future__ import annotations

import argparse

from ichdlib.config import SynthCfg
from ichdlib.phantom import synth
from ichdlib.phantom.layouts import LAYOUTS, generate_layout

#: Slice size of the external layouts unless ``--size`` says otherwise (their thin series hold ~250 slices).
LAYOUT_SIZE = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``ichd synth``'s options (:func:`ichdlib.phantom.synth.add_arguments`) and ``--layout``."""
    synth.add_arguments(parser)
    parser.add_argument("--layout", choices=["rsna", *LAYOUTS], default="rsna",
                        help=f"rsna (default): the Kaggle layout; {' / '.join(LAYOUTS)}: an external test set's "
                             f"layout for 'ichd validate' (--size defaults to {LAYOUT_SIZE} there)")
    parser.set_defaults(size=None)


def cli(args: argparse.Namespace) -> int:
    """Run ``ichd synth``."""
    if args.layout == "rsna":
        args.size = args.size or SynthCfg.model_fields["size"].default
        return synth.cli(args)
    if args.valid_uids:
        raise SystemExit(f"ichd synth: --valid-uids applies to the rsna layout only ({args.layout} always writes "
                         "numeric UIDs)")
    s = generate_layout(args.out, args.layout, args.studies, args.seed, args.size or LAYOUT_SIZE, args.workers,
                        shift=args.shift)
    scanner = "" if s["shift"] == "none" else f" as scanner {s['shift']}"
    print(f"wrote {s['studies']} studies in the {args.layout} layout{scanner} to {args.out} in {s['seconds']} s; "
          f"{s['positive_studies']} positive studies")
    return 0
