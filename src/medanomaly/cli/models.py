"""``medanomaly models [NAME]``: list the registered detectors, or describe one."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``models``."""
    p = sub.add_parser(
        "models",
        help="list the registered detectors; with NAME, its reference, summary, arguments "
        "(types, defaults), input dimensions and the configs that use it",
    )
    p.add_argument("name", nargs="?", help="a model to describe, e.g. cae")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the table of models, or one model's description."""
    import shutil

    from medanomaly.detectors.describe import describe, models_table
    from medanomaly.detectors.registry import get_model_class, list_models

    width = min(120, shutil.get_terminal_size((100, 24)).columns)
    if args.name is None:
        print(models_table(list_models(), width))
        return 0
    get_model_class(args.name)  # an unknown name: ConfigError with a did-you-mean (exit 2)
    print(describe(args.name.strip().lower(), width))
    return 0
