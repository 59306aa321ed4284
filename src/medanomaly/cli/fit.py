"""``medanomaly fit``: train a detector on normal images and write a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from medanomaly.cli._common import add_override_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fit``."""
    p = sub.add_parser("fit", help="train a detector on normal images")
    p.add_argument("--config", required=True, help="YAML with model/engine/data blocks")
    p.add_argument("--data", required=True, help="folder or CSV manifest of training images")
    p.add_argument("--val", help="validation folder/manifest (normal, optionally abnormal)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--devices", type=int, help="GPUs per node (data-parallel): engine.devices")
    p.add_argument("--num-nodes", type=int, help="machines (with torchrun): engine.num_nodes")
    p.add_argument("--accelerator", help="auto, cpu, cuda or gpu: engine.accelerator")
    add_override_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train a detector and write the run directory."""
    from medanomaly.cli._common import report_skipped
    from medanomaly.config import apply_overrides, load_config
    from medanomaly.jobs.fit import fit_run

    overrides = list(args.set)
    if args.devices:
        overrides.append(f"engine.devices={args.devices}")
    if args.num_nodes:
        overrides.append(f"engine.num_nodes={args.num_nodes}")
    if args.accelerator:
        overrides.append(f"engine.accelerator={args.accelerator}")
    config = apply_overrides(load_config(args.config), overrides)
    out = Path(args.out)
    fitted = fit_run(config, args.data, out, val=args.val, resume=args.resume, strict=args.strict)
    report_skipped(fitted.train_report, out / "skipped_train.txt")
    if args.val:
        report_skipped(fitted.val_report, out / "skipped_val.txt")
    detector = fitted.detector
    train_labels = fitted.train.labels
    if not detector.is_main_process_:
        return 0
    if detector.supervised:
        n_normal, n_abnormal = int((train_labels == 0).sum()), int((train_labels == 1).sum())
        seen = f"{n_normal} normal and {n_abnormal} abnormal images"
    else:
        seen = f"{int((train_labels != 1).sum())} normal images"
    rests_on = ""
    if not detector.supervised:  # a classifier's threshold is P > 0.5
        n_val = len(detector.val_scores_)
        rests_on = f" (mean + k·SD of {n_val} held-out normal validation scores)"
    print(f"trained {detector.name} on {seen}; threshold {detector.threshold_:.6g}{rests_on}")
    print(f"run directory: {out}")
    return 0
