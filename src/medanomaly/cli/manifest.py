"""``medanomaly manifest``: write the manifest a folder is read as, for a user to edit."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``manifest``."""
    p = sub.add_parser(
        "manifest",
        help="write the CSV manifest (path, label, group, mask) that fit/score would use",
        description="List the cases medanomaly finds in FOLDER (label folders, a DICOM series, "
        "a folder of series, patient folders with NIfTI/DICOM/pictures and *_mask or *seg* "
        "files) as an editable manifest: paths relative to the manifest's folder.",
    )
    p.add_argument("folder", help="the folder to list")
    p.add_argument("--out", required=True, help="the manifest to write (.csv)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List the folder's cases and write them; name what was left out."""
    import sys
    from pathlib import Path

    from medanomaly.data.listing import list_cases, write_manifest
    from medanomaly.errors import ConfigError

    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"{out}: a manifest is a .csv file")
    if out.exists() and not args.force:
        raise ConfigError(f"{out}: exists; give --force to replace it")
    cases = list_cases(args.folder)
    kept = [case for case in cases if case.problem is None]
    write_manifest(out, kept)
    for case in cases:
        if case.problem is not None:
            print(f"left out {case.path}: {case.problem}", file=sys.stderr)
    groups = len({case.group for case in kept if case.group})
    masks = sum(case.mask is not None for case in kept)
    print(f"wrote {len(kept)} cases ({groups} groups, {masks} with a mask) -> {out}")
    return 0
