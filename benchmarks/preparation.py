"""What every ``prepare_*.py`` shares: its command line and the skip when data are absent.

Each data-preparation script turns a data set of ``../shared/data`` into a manifest that a
built-in spec (``medanomaly compare --spec NAME``) reads from the current folder; ``--data``
points it at any folder laid out alike.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def preparation_parser(doc: str, data: Path, out_name: str) -> argparse.ArgumentParser:
    """``--data`` (default ``data``) and ``--out`` (default ``runs/<out_name>``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data, help=f"default {data}")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / out_name)
    return parser


def run_preparation(
    prepare: Callable[..., Path],
    args: argparse.Namespace,
    needed: Path | None = None,
    **options: Any,
) -> int:
    """``prepare(args.data, args.out, **options)``; prints what it wrote, or a skip line.

    Args:
        prepare: The script's preparation function; it returns the manifest it wrote.
        args: The parsed command line.
        needed: The path whose absence skips the run (default ``args.data``).
        **options: Further arguments of ``prepare``.
    """
    needed = args.data if needed is None else needed
    if not needed.exists():
        print(f"skipped: {needed} not found (needs ../shared/data beside the repo)")
        return 0
    print(f"wrote {prepare(args.data, args.out, **options)}")
    return 0
