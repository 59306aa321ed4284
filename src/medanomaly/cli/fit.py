"""``medanomaly fit``: train a detector on normal images and write a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from medanomaly._version import __version__
from medanomaly.cli._common import add_override_arguments, add_trust_argument, at_least


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fit``."""
    p = sub.add_parser("fit", help="train a detector on normal images")
    p.add_argument("--config", required=True, help="YAML with model/engine/data blocks")
    p.add_argument("--data", required=True, help="folder or CSV manifest of training images")
    p.add_argument("--val", help="validation folder/manifest (normal, optionally abnormal)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument(
        "--devices", type=at_least(1), help="GPUs per node (data-parallel): engine.devices"
    )
    p.add_argument(
        "--num-nodes", type=at_least(1), help="machines (with torchrun): engine.num_nodes"
    )
    p.add_argument("--accelerator", help="auto, cpu, cuda or gpu: engine.accelerator")
    add_override_arguments(p)
    add_trust_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train a detector and write the run directory."""
    import yaml

    from medanomaly.cli._common import report_skipped
    from medanomaly.config import apply_overrides, build_detector, load_config
    from medanomaly.data.loading import input_spec, load_dataset
    from medanomaly.detectors.base import CONFIG_FILE
    from medanomaly.io.atomic import atomic_write_text

    overrides = list(args.set)
    if args.devices:
        overrides.append(f"engine.devices={args.devices}")
    if args.num_nodes:
        overrides.append(f"engine.num_nodes={args.num_nodes}")
    if args.accelerator:
        overrides.append(f"engine.accelerator={args.accelerator}")
    config = apply_overrides(load_config(args.config), overrides)
    detector = build_detector(config)
    data_cfg = config.get("data") or {}
    out = Path(args.out)
    # streamed unless the config says otherwise: memory holds batches, never the set
    options = {"stream": True, **data_cfg, "strict": args.strict, "expect": input_spec(detector)}
    train, report = load_dataset(args.data, **options, augment=True)
    report_skipped(report, out / "skipped_train.txt")
    val = None
    if args.val:
        val, val_report = load_dataset(args.val, **options)
        report_skipped(val_report, out / "skipped_val.txt")
    config_path = out / CONFIG_FILE
    if not (args.resume and config_path.exists()):
        resolved = {**detector.config(), "data": data_cfg, "version": __version__}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, yaml.safe_dump(resolved, sort_keys=False))
    detector.fit(train, val, run_dir=out, resume=args.resume)
    if not getattr(detector, "is_main_process_", True):
        return 0
    if getattr(detector, "supervised", False):
        n_normal, n_abnormal = int((train.labels == 0).sum()), int((train.labels == 1).sum())
        seen = f"{n_normal} normal and {n_abnormal} abnormal images"
    else:
        seen = f"{int((train.labels != 1).sum())} normal images"
    rests_on = ""
    if not getattr(detector, "supervised", False):  # a classifier's threshold is P > 0.5
        n_val = len(getattr(detector, "val_scores_", []))
        rests_on = f" (mean + k·SD of {n_val} held-out normal validation scores)"
    print(f"trained {detector.name} on {seen}; threshold {detector.threshold_:.6g}{rests_on}")
    print(f"run directory: {out}")
    return 0
