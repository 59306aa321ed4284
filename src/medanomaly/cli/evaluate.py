"""``medanomaly evaluate``: metrics, scores and an HTML report of a run on labelled data."""

from __future__ import annotations

import argparse
from pathlib import Path

from medanomaly.cli._common import (
    add_device_arguments,
    add_dicom_argument,
    add_viewer_argument,
    check_dicom_needs_maps,
    in_open_unit,
)
from medanomaly.detectors.thresholds import THRESHOLD_RULES

RULE_HELP = (
    "threshold: 'run' (default: the run's own mean + k*SD of its held-out normal validation "
    f"scores) or one of {', '.join(THRESHOLD_RULES)}, with optional parameters such as "
    "mean_sd:k=2, percentile:q=99, conformal:alpha=0.01; youden/f1 are fitted on the "
    "evaluated cases themselves and marked as optimistic"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``evaluate``."""
    p = sub.add_parser("evaluate", help="evaluate a trained run on labelled data")
    p.add_argument("--run", required=True, help="run directory (or model.safetensors)")
    p.add_argument(
        "--data",
        required=True,
        help="labelled folder or CSV manifest (whose path column may hold DICOMweb archive "
        "URLs dicomweb+http://HOST:PORT/PATH/?SeriesInstanceUID=...; see docs/archive.md)",
    )
    p.add_argument("--out", required=True, help="output folder (metrics.json, scores.csv, ...)")
    p.add_argument("--threshold", default=None, metavar="RULE", help=RULE_HELP)
    p.add_argument(
        "--alpha",
        type=in_open_unit,
        default=0.05,
        help="conformal level (rule default, p-value count)",
    )
    p.add_argument(
        "--foreground-threshold",
        type=float,
        default=None,
        help="pixel metrics: foreground = any channel above this preprocessed value "
        "(default: 5 %% of each image's intensity range above its minimum)",
    )
    p.add_argument(
        "--maps", help="folder for every case's anomaly map in the scan's geometry (see score)"
    )
    add_dicom_argument(p)
    add_viewer_argument(p)
    p.add_argument("--strict", action="store_true", help="stop on the first unreadable image")
    add_device_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print a one-line summary."""
    from medanomaly.cli._common import job_options, report_map_problems
    from medanomaly.jobs.evaluate import evaluate_run
    from medanomaly.reports.evaluation import summary_line
    from medanomaly.reports.files import METRICS_FILE, REPORT_FILE

    check_dicom_needs_maps(args)

    metrics = evaluate_run(
        args.run,
        args.data,
        args.out,
        threshold=args.threshold,
        alpha=args.alpha,
        strict=args.strict,
        foreground_threshold=args.foreground_threshold,
        maps_dir=args.maps,
        dicom=args.dicom,
        options=job_options(args),
        viewer=args.viewer,
    )
    if metrics is None:  # another rank: rank 0 reports
        return 0
    image = metrics["image"]
    print(f"evaluated {metrics['n_cases']} cases: {summary_line(image)}")
    value = image["threshold"]
    shown = "+inf (nothing called abnormal)" if value is None else f"{value:.6g}"
    print(f"threshold {shown} ({image['threshold_rule']}, from {image['threshold_n']} scores)")
    report_map_problems(metrics.get("map_problems", []))
    if "pixel" in metrics:
        pixel = metrics["pixel"]
        values = ", ".join(
            f"{k} {pixel[k]:.3f}" if pixel[k] is not None else f"{k} n/a"
            for k in ("auroc", "average_precision", "best_dice")
        )
        print(f"pixel level (inside the foreground): {values}")
    if metrics["skipped"]:
        print(f"skipped {len(metrics['skipped'])} unreadable case(s): listed in {METRICS_FILE}")
    out = Path(args.out)
    print(f"wrote {out / METRICS_FILE}, {out / 'scores.csv'}, {out / REPORT_FILE}")
    if args.viewer:
        print(f"the report's viewer: medanomaly view {out}")
    return 0
