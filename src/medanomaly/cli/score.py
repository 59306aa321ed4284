"""``medanomaly score``: score a folder or manifest with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from medanomaly.cli._common import (
    add_archive_arguments,
    add_device_arguments,
    add_dicom_argument,
    add_strict_argument,
    archive_settings,
    check_dicom_needs_maps,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``score``."""
    p = sub.add_parser("score", help="score images with a trained run")
    p.add_argument("--run", required=True, help="run directory (or model.safetensors)")
    p.add_argument(
        "--data",
        required=True,
        help="folder, CSV manifest, or DICOMweb archive dicomweb+http://HOST:PORT/PATH/?FILTERS "
        "(QIDO-RS filters such as Modality=CT&StudyDate=20240101-20240131) to score",
    )
    p.add_argument("--out", required=True, help="CSV of per-case scores")
    p.add_argument(
        "--maps",
        help="folder for anomaly maps: on the scan's own grid (<case>_map.nii.gz for volumes, "
        "<case>_map.tiff + <case>_overlay.png for slices, <case>_map.json with score, threshold "
        "and model) and on the model's grid (.npy, .png)",
    )
    add_dicom_argument(p)
    add_archive_arguments(p)
    add_strict_argument(p)
    add_device_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score with the run's own preprocessing and write the score table (and maps)."""
    from medanomaly.cli._common import job_options, report_lines, report_map_problems
    from medanomaly.jobs.score import score_run

    out = Path(args.out)
    store = archive_settings(args, out.with_name(out.stem + "_maps"))
    check_dicom_needs_maps(args)
    summary = score_run(
        args.run,
        args.data,
        out,
        args.maps,
        args.dicom,
        args.strict,
        options=job_options(args),
        store=store,
    )
    if summary is None:  # another rank: rank 0 reports
        return 0
    report_lines(summary.skipped, summary.warnings, out.with_suffix(".skipped.txt"))
    report_map_problems(summary.map_problems)
    print(
        f"scored {summary.n_cases} cases ({summary.n_flagged} above threshold "
        f"{summary.threshold:.6g}) -> {out}"
    )
    return 0
