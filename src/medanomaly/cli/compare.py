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
    metric = results["selection"]["metric"]
    for name, row in results["rows"].items():
        flag = " (baseline)" if row["baseline"] else ""
        figures = f"selection {_ms(row['selection_metric'])}, test {_ms(row['test_metric'])}"
        print(f"{name}{flag}: {figures} {metric}; {row['seconds']:.0f} s")
    print(f"results: {args.out}/results.json, {args.out}/report.html")
    if results["chosen"] is None:
        print("no candidate finished every fold; nothing chosen (see the errors in results.md)")
        return 1
    print(f"chosen on validation: {results['chosen']}")
    return 0


def _ms(value: dict) -> str:
    if value.get("mean") is None:
        return "n/a"
    return f"{value['mean']:.3f} ± {value['sd']:.3f}"
