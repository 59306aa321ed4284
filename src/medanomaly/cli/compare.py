"""``medanomaly compare``: every candidate of a spec under one honest protocol."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``compare``."""
    p = sub.add_parser(
        "compare",
        help="compare detectors and baselines on labelled data (choices on validation only)",
    )
    p.add_argument("--spec", required=True, help="YAML spec: data, protocol, candidates")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--data", help="folder or manifest overriding the spec's data")
    p.add_argument("--no-refit", action="store_true", help="do not write OUT/best")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print the leaderboard."""
    from tqdm.auto import tqdm

    from medanomaly.model_selection.compare import compare

    results = compare(
        args.spec,
        args.out,
        data=args.data,
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
