"""``medanomaly compare``: every candidate of a spec under one honest protocol."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``compare``."""
    p = sub.add_parser(
        "compare",
        help="compare detectors and baselines on labelled data (choices on validation only)",
    )
    p.add_argument(
        "--spec",
        required=True,
        help="a built-in spec name (medanomaly config list --specs) or a YAML spec file: "
        "data, protocol, candidates",
    )
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--data", help="folder or manifest overriding the spec's data")
    p.add_argument("--no-refit", action="store_true", help="do not write OUT/best")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print the leaderboard."""
    from tqdm.auto import tqdm

    from medanomaly.model_selection.compare import compare
    from medanomaly.model_selection.spec import load_spec

    spec = load_spec(args.spec, args.data)
    check_data(spec.data, args.spec)
    results = compare(
        spec,
        args.out,
        refit=not args.no_refit,
        echo=None if args.quiet else tqdm.write,
        progress=not args.quiet,
    )
    for name, row in results["rows"].items():
        auroc = row["auroc"]["mean"]
        text = "n/a" if auroc is None else f"{auroc:.3f} ± {row['auroc']['sd']:.3f}"
        extra = ""
        if row.get("dice_at_val_threshold", {}).get("mean") is not None:
            extra = f", Dice {row['dice_at_val_threshold']['mean']:.3f}"
        flag = " (baseline)" if row["baseline"] else ""
        print(f"{name}{flag}: AUROC {text}{extra}; {row['seconds']:.0f} s")
    print(f"chosen on validation: {results['chosen']}")
    print(f"results: {args.out}/results.json, {args.out}/report.html")
    return 0


def check_data(data: Path, spec: str) -> None:
    """Refuse a spec whose data is missing, saying where a built-in spec's data is looked for.

    Raises:
        MissingFileError: ``data`` is neither a folder, a manifest nor an archive URL.
    """
    from medanomaly.errors import MissingFileError
    from medanomaly.io.dicomweb import is_dicomweb_url

    if is_dicomweb_url(str(data)) or Path(data).exists():
        return
    where = ""
    if not Path(spec).expanduser().is_file():  # a built-in spec: its data is the user's
        where = (
            f" (relative to the current folder; `medanomaly config show --spec {spec}` "
            "says how to prepare it)"
        )
    raise MissingFileError(f"{data}: no such data folder or manifest{where}; or give --data")
