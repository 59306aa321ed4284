"""``medanomaly inspect``: show what the readers make of a file or DICOM series folder."""

from __future__ import annotations

import argparse

#: The line :func:`medanomaly.io.inspect_path` starts with when the image cannot be read.
_FAILURE_PREFIX = "cannot read:"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``inspect``."""
    p = sub.add_parser(
        "inspect",
        help="print shape, spacing, orientation, intensity range and problems of an image",
    )
    p.add_argument("path", help="image file or DICOM series folder")
    p.add_argument(
        "--series-uid", help="SeriesInstanceUID to read when a DICOM folder holds several"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; exit 1 when the path cannot be read at all, else 0."""
    from medanomaly.io import inspect_path

    report = inspect_path(args.path, series_uid=args.series_uid)
    print(report)
    failed = any(line.startswith(_FAILURE_PREFIX) for line in report.splitlines())
    return 1 if failed else 0
