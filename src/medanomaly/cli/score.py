"""``medanomaly score``: score a folder or manifest with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from medanomaly.cli._common import add_dicom_argument, check_dicom_needs_maps


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``score``."""
    p = sub.add_parser("score", help="score images with a trained run")
    p.add_argument("--run", required=True, help="run directory (or model.pt)")
    p.add_argument("--data", required=True, help="folder or CSV manifest to score")
    p.add_argument("--out", required=True, help="CSV of per-case scores")
    p.add_argument(
        "--maps",
        help="folder for anomaly maps: on the scan's own grid (<case>_map.nii.gz for volumes, "
        "<case>_map.tiff + <case>_overlay.png for slices, <case>_map.json with score, threshold "
        "and model) and on the model's grid (.npy, .png)",
    )
    add_dicom_argument(p)
    p.add_argument("--strict", action="store_true", help="exit non-zero if any image is unreadable")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score with the run's own preprocessing and write the score table (and maps)."""
    from medanomaly.base import BaseDetector
    from medanomaly.cli._common import report_map_problems, report_skipped
    from medanomaly.datasets import input_spec, load_dataset
    from medanomaly.evaluation import conformal_pvalues
    from medanomaly.outputs import save_maps, write_scores_csv

    check_dicom_needs_maps(args)
    detector = BaseDetector.load(args.run)
    data_cfg = (getattr(detector, "run_config_", None) or {}).get("data") or {}
    out = Path(args.out)
    images, report = load_dataset(args.data, **data_cfg, expect=input_spec(detector))
    report_skipped(report, out.with_suffix(".skipped.txt"))
    result = detector.detect(images)
    p_values = conformal_pvalues(detector.val_scores_, result.scores)
    write_scores_csv(out, images.ids, images.labels, result, extra={"p_value": p_values})
    if args.maps:
        written = save_maps(
            args.maps,
            images.ids,
            images.images,
            result,
            images.grids,
            model=detector.name,
            dicom=args.dicom,
        )
        report_map_problems(written.problems)
    flagged = int(result.labels.sum())
    print(f"scored {len(images)} cases ({flagged} above threshold {result.threshold:.6g}) -> {out}")
    return 1 if (report and args.strict) else 0
