"""``medanomaly models``: list the registered detectors."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``models``."""
    p = sub.add_parser("models", help="list the registered detectors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print each registered name with the first line of its docstring."""
    from medanomaly.detectors.registry import get_model_class, list_models

    for name in list_models():
        doc = (get_model_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}")
    return 0
