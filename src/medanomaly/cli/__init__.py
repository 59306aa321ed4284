"""Command line: a thin layer over the Python API, one module per sub-command.

    medanomaly fit --config C --data D --out RUN [--val V] [--resume] [--devices N]
    medanomaly score --run RUN --data D --out scores.csv [--maps DIR [--dicom]] [--strict]
    medanomaly screen --run RUN --data UNLABELLED --out DIR [--k 3] [--metal-level 3000]
                      [--eps E] [--min-samples 5] [--batch 16] [--maps DIR [--dicom]] [--strict]
    medanomaly evaluate --run RUN --data LABELLED --out DIR [--threshold RULE] [--alpha A]
                        [--maps DIR [--dicom]]

    fit, score, screen and evaluate also take [--devices N] [--num-nodes M] [--accelerator A]
    (data-parallel ranks); score, screen and evaluate take [--num-workers W] (first pass).
    medanomaly export --run RUN --out DIR [--format onnx]
    medanomaly view OUT [--port P]
    medanomaly cv --config C --data LABELLED --out DIR [--folds 5] [--repeats 2] [--set K=V]
    medanomaly compare [--spec SPEC] --data D --out DIR [--print-spec] [--set K=V] [--no-refit]
    medanomaly inspect PATH [PATH ...] [--series-uid UID]
    medanomaly manifest FOLDER --out manifest.csv [--force]
    medanomaly demo --out DIR
    medanomaly models [NAME]
    medanomaly config list [--specs] | show NAME [--spec]

``--config`` and ``--spec`` take a file or the name of a built-in one (``dae_lgg_2d``,
``head_ct``); a file wins over a name.

Each module in this package defines ``add_parser(subparsers)``, which registers its
sub-command and sets ``func``; :data:`COMMANDS` lists them in help order. The modules import
torch and the readers inside ``run`` only, so that ``--help`` answers at once.

May import every layer below it; nothing imports the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from medanomaly._version import __version__
from medanomaly.cli import (
    compare,
    configs,
    cv,
    demo,
    evaluate,
    export,
    fit,
    inspect,
    manifest,
    models,
    score,
    screen,
    view,
)
from medanomaly.errors import MedanomalyError

COMMANDS = (
    fit,
    score,
    screen,
    evaluate,
    export,
    cv,
    compare,
    inspect,
    manifest,
    demo,
    models,
    view,
    configs,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medanomaly`` command."""
    parser = argparse.ArgumentParser(
        prog="medanomaly",
        description="Find abnormal CT/MRI scans with models of normal anatomy.",
    )
    parser.add_argument("--version", action="version", version=f"medanomaly {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    for command in sub.choices.values():  # -v also after the sub-command
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more"
        )
    return parser


def _without_library_noise(record: logging.LogRecord) -> bool:
    """Drop the libraries' own notes outside ``--verbose``: pydicom, matplotlib, Lightning.

    pydicom logs every decoder plugin that fails, with its traceback, and every odd value it
    meets; the readers turn what matters into one message that names the file and the tag.
    Lightning Fabric sets its own loggers to INFO and notes the precision of every fit (ten
    lines in a 2x5 ``compare``); the run's ``config.yaml`` records that choice.
    """
    if record.name.startswith(("pydicom", "matplotlib")):
        return False
    return record.levelno >= logging.WARNING or not record.name.startswith("lightning")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medanomaly`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_without_library_noise)
        # a figure's missing glyph or font family is no user's problem
        warnings.filterwarnings(
            "ignore", message=r"(Glyph|findfont|Font family)", module="matplotlib"
        )
    if getattr(args, "trust_pickle", False):  # read by every loader, in every rank
        from medanomaly.io.safe_files import TRUST_PICKLE_ENV

        os.environ[TRUST_PICKLE_ENV] = "1"
    try:
        return args.func(args)
    except MedanomalyError as error:
        if args.verbose:
            traceback.print_exc()
        print(f"medanomaly {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
