"""``medanomaly config list|show``: the built-in configs (and ``compare`` specs) by name."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``config`` with its ``list`` and ``show`` actions."""
    p = sub.add_parser(
        "config",
        help="the built-in configs (fit/cv --config NAME) and specs (compare --spec NAME)",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every built-in config with its description")
    listing.add_argument(
        "--specs", action="store_true", help="list the built-in compare specs instead"
    )
    listing.set_defaults(func=run_list)
    show = actions.add_parser(
        "show", help="print a built-in config, e.g. `config show dae_lgg_2d > my.yaml`"
    )
    show.add_argument("name", help="a built-in name (see `medanomaly config list`)")
    show.add_argument("--spec", action="store_true", help="a built-in compare spec instead")
    show.set_defaults(func=run_show)


def run_list(args: argparse.Namespace) -> int:
    """Print one line per built-in config (or spec): its name and its description."""
    from medanomaly.builtin import describe_all

    rows = describe_all("spec" if args.specs else "config")
    column = max(len(name) for name, _ in rows) + 2
    for name, text in rows:
        print(f"{name:<{column}}{text}".rstrip())
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Print a built-in file as it ships, comments included, for editing."""
    from medanomaly.builtin import builtin

    sys.stdout.write(builtin("spec" if args.spec else "config", args.name).read_text())
    return 0
