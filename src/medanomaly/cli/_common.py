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


def add_dicom_argument(parser: argparse.ArgumentParser) -> None:
    """``--dicom``: also write a DICOM Parametric Map per DICOM volume (with ``--maps``)."""
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="with --maps, also write <case>_map.dcm for DICOM volumes: a DICOM Parametric "
        "Map of the anomaly map on the source frame of reference, referencing the source series",
    )


def report_map_problems(problems: list[str]) -> None:
    """Name each case whose maps in the scan's geometry could not be written."""
    if problems:
        print(f"{len(problems)} case(s) without a map in the scan's geometry:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)


def check_dicom_needs_maps(args: argparse.Namespace) -> None:
    """``--dicom`` writes beside the maps, so it needs ``--maps``."""
    if getattr(args, "dicom", False) and not getattr(args, "maps", None):
        from medanomaly.errors import ConfigError

        raise ConfigError("--dicom writes the DICOM maps into the --maps folder: give --maps DIR")
