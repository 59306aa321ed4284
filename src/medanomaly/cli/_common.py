"""Helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the readers are heavy to import; --help must stay fast
    from medanomaly.datasets import LoadReport


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) and ``--strict``, shared by fit and cv."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set engine.epochs=5",
    )
    parser.add_argument("--strict", action="store_true", help="stop on the first unreadable image")


def report_skipped(report: LoadReport, out: Path | None) -> None:
    """Print skipped cases (and why) and problems of kept cases; list the skipped in ``out``."""
    if report.warnings:
        print(f"{len(report.warnings)} problem(s) in cases that were kept:", file=sys.stderr)
        for line in report.warning_lines():
            print(f"  {line}", file=sys.stderr)
    if not report:
        return
    print(f"skipped {len(report.skipped)} unreadable case(s):", file=sys.stderr)
    for line in report.lines():
        print(f"  {line}", file=sys.stderr)
    if out is not None:
        from medanomaly.checkpoint import atomic_write_text

        atomic_write_text(out, "\n".join(report.lines()) + "\n")
