"""Helpers shared by the sub-commands."""

from __future__ import annotations

import sys
from pathlib import Path

from medanomaly.checkpoint import atomic_write_text
from medanomaly.datasets import LoadReport


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
        atomic_write_text(out, "\n".join(report.lines()) + "\n")
