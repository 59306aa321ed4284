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
