"""``medanomaly compare``: every candidate of a spec under one honest protocol."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medanomaly.cli._common import add_override_arguments, at_least
from medanomaly.errors import ConfigError

EPILOG = """\
Without --spec, a built-in starter spec is chosen by the data: 2D one-channel slices
(starter_2d), colour pictures (starter_rgb_2d) or volumes (starter_3d), each with the no-model
rows, vae_map, dae and their fusions at CPU sizes; --print-spec writes it out for editing.

The spec format (data, protocol, level, threshold, candidates, postprocess): docs/compare.md,
or `medanomaly config show --spec head_ct`. Threshold rules are spelled as in evaluate, cv and
screen: f1, youden, mean_sd:k=3, percentile:q=99, conformal:alpha=0.05.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``compare``."""
    p = sub.add_parser(
        "compare",
        help="compare detectors and baselines on labelled data (choices on validation only)",
        description="Compare detectors and no-model baselines under one patient-grouped "
        "protocol: each candidate is tuned on half of every validation part and chosen on "
        "the other half; the test folds only give the numbers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--spec",
        help="a built-in spec name (medanomaly config list --specs) or a YAML spec file: "
        "data, protocol, candidates (default: the starter spec for --data)",
    )
    p.add_argument("--out", help="output folder (rerun to resume)")
    p.add_argument("--data", help="folder or manifest (overrides the spec's data)")
    p.add_argument(
        "--print-spec",
        action="store_true",
        help="print the spec that would run (the starter spec without --spec) and exit",
    )
    p.add_argument("--no-refit", action="store_true", help="do not write OUT/best")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_override_arguments(p)
    p.add_argument("--accelerator", default=None, help="auto, cpu, cuda or gpu: engine.accelerator")
    p.add_argument(
        "--devices",
        type=at_least(1),
        default=None,
        help="GPUs each candidate trains on (data-parallel): engine.devices",
    )
    p.add_argument(
        "--num-workers",
        type=at_least(0),
        default=None,
        help="worker processes decoding and preprocessing the cases on their first pass",
    )
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """``--set`` plus the engine settings of ``--accelerator`` and ``--devices``."""
    overrides = list(args.set)
    if args.accelerator:
        overrides.append(f"engine.accelerator={args.accelerator}")
    if args.devices:
        overrides.append(f"engine.devices={args.devices}")
    return tuple(overrides)


def _spec(args: argparse.Namespace) -> tuple[Any, str]:
    """The spec to run (given, or the starter for ``--data``) and its YAML text."""
    import yaml

    from medanomaly.model_selection.spec import load_spec, parse_spec
    from medanomaly.model_selection.starter import starter_spec

    if args.spec is None:
        if args.data is None:
            raise ConfigError("compare: give --data (a starter spec is chosen for it) or --spec")
        _, text = starter_spec(args.data)
        return parse_spec(yaml.safe_load(text), Path.cwd(), overrides=_overrides(args)), text
    spec = load_spec(args.spec, args.data, _overrides(args))
    raw = dict(spec.source)
    data = raw.get("data")
    raw["data"] = {**data, "path": str(spec.data)} if isinstance(data, dict) else str(spec.data)
    return spec, yaml.safe_dump(raw, sort_keys=False)


def run(args: argparse.Namespace) -> int:
    """Run the comparison (or print its spec) and print the leaderboard."""
    from tqdm.auto import tqdm

    from medanomaly.model_selection.compare import compare

    spec, text = _spec(args)
    if args.print_spec:
        print(text, end="")
        return 0
    if args.out is None:
        raise ConfigError("compare: give --out (the output folder)")
    if args.devices and args.devices > 1:
        import torch

        if args.accelerator == "cpu" or torch.cuda.device_count() < args.devices:
            raise ConfigError(
                f"compare: --devices {args.devices} trains each candidate on {args.devices} "
                f"GPUs; this machine has {torch.cuda.device_count()} (use --devices 1)"
            )
    check_data(spec.data, args.spec or "the starter spec")
    results = compare(
        spec,
        args.out,
        refit=not args.no_refit,
        echo=None if args.quiet else tqdm.write,
        progress=not args.quiet,
        strict=args.strict,
        num_workers=args.num_workers,
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
