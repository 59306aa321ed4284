"""``medanomaly inspect``: show what the readers make of a file or DICOM series folder."""

from __future__ import annotations

import argparse

#: The line :func:`medanomaly.io.inspect_path` starts with when the image cannot be read.
_FAILURE_PREFIX = "cannot read:"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``inspect``."""
    p = sub.add_parser(
        "inspect",
        help="print shape, spacing, orientation, intensity range and problems of images",
    )
    p.add_argument("path", nargs="+", help="image files or DICOM series folders")
    p.add_argument(
        "--series-uid", help="SeriesInstanceUID to read when a DICOM folder holds several"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one report per path (blank-line separated); exit 1 when one cannot be read."""
    from medanomaly.io import inspect_path

    failed = False
    for index, path in enumerate(args.path):
        report = inspect_path(path, series_uid=args.series_uid)
        print(("\n" if index else "") + report, flush=True)
        failed |= any(line.startswith(_FAILURE_PREFIX) for line in report.splitlines())
    return 1 if failed else 0
