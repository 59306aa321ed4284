"""``medanomaly export``: write a run's scoring as ONNX with its preprocessing and threshold."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export``."""
    p = sub.add_parser(
        "export",
        help="write a run's network and scoring as ONNX (score it with --run OUT)",
    )
    p.add_argument("--run", required=True, help="run directory (or model.safetensors)")
    p.add_argument(
        "--out",
        required=True,
        help="export folder: model.onnx, medanomaly_export.json (preprocessing, threshold, "
        "model, source run) and README.md",
    )
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export the run; one line on what was written."""
    from medanomaly.jobs.export import export_run

    done = export_run(args.run, args.out, args.format)
    print(
        f"exported {done.model} (images {done.input_shape}, dynamic batch) -> {done.folder} "
        f"in {done.seconds:.1f} s; checked against the run: largest score difference "
        f"{done.score_difference:.2g}, map difference {done.map_difference:.2g}"
    )
    return 0
