"""``medanomaly cv``: repeated, patient-grouped, stratified k-fold cross-validation."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medanomaly.cli._common import add_override_arguments, at_least, in_open_unit


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``cv``."""
    p = sub.add_parser("cv", help="repeated grouped stratified k-fold cross-validation")
    p.add_argument(
        "--config",
        required=True,
        help="a built-in config name (medanomaly config list) or a YAML file with "
        "model/engine/data blocks",
    )
    p.add_argument("--data", required=True, help="labelled folder or CSV manifest")
    p.add_argument("--out", required=True, help="output folder; rerun the same command to resume")
    p.add_argument(
        "--folds", type=at_least(2), default=None, help="test folds per repeat (default 5)"
    )
    p.add_argument("--repeats", type=at_least(1), default=None, help="repeats (default 2)")
    p.add_argument(
        "--threshold",
        default=None,
        metavar="RULE",
        help="rule on each fold's validation part: f1 (default), youden, mean_sd[:k=3], "
        "percentile[:q=95], conformal[:alpha=0.05] or run",
    )
    p.add_argument(
        "--alpha", type=in_open_unit, default=None, help="conformal level (default 0.05)"
    )
    p.add_argument(
        "--val-fraction",
        type=in_open_unit,
        default=None,
        help="share of the training folds held out for validation (default 0.2)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the splits (default 0)")
    add_override_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Cross-validate and print mean ± SD of the headline metrics."""
    from medanomaly.config import apply_overrides, build_detector, load_config
    from medanomaly.model_selection.cv import cross_validate
    from medanomaly.reports.evaluation import summary_line
    from medanomaly.reports.files import METRICS_FILE, REPORT_FILE

    config = apply_overrides(load_config(args.config), args.set)
    build_detector(config)  # a bad model argument stops here, before any fold or file
    start = time.perf_counter()
    metrics = cross_validate(
        config,
        args.data,
        args.out,
        folds=args.folds,
        repeats=args.repeats,
        threshold=args.threshold,
        alpha=args.alpha,
        val_fraction=args.val_fraction,
        seed=args.seed,
        strict=args.strict,
        echo=lambda line: print(line, flush=True),
    )
    cv = metrics["cv"]
    print(
        f"cv {cv['repeats']}x{cv['folds']} ({cv['threshold_rule']} threshold on validation), "
        f"mean ± SD over folds: {summary_line(metrics['image'])}"
    )
    if "pixel" in metrics:
        pixel = metrics["pixel"]["auroc"]
        if pixel["mean"] is not None:
            print(f"pixel AUROC {pixel['mean']:.3f} ± {pixel['sd']:.3f}")
    out = Path(args.out)
    print(
        f"wrote {out / METRICS_FILE} and {out / REPORT_FILE} ({time.perf_counter() - start:.0f} s)"
    )
    return 0
