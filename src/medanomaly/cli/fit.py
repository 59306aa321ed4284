"""``medanomaly fit``: train a detector on normal images and write a run directory."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from medanomaly.cli._common import add_override_arguments, add_trust_argument, at_least


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fit``."""
    p = sub.add_parser("fit", help="train a detector on normal images")
    p.add_argument(
        "--config",
        required=True,
        help="a built-in config name (medanomaly config list) or a YAML file with "
        "model/engine/data blocks",
    )
    p.add_argument("--data", required=True, help="folder or CSV manifest of training images")
    p.add_argument("--val", help="validation folder/manifest (normal, optionally abnormal)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out (deleted first)"
    )
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


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that holds something, unless resuming or overwriting.

    With ``overwrite`` an earlier run (a folder holding ``config.yaml``) is deleted first.

    Raises:
        ConfigError: ``out`` is not empty and neither flag allows it, both flags are given,
            or ``overwrite`` would delete a folder that is not a run.
    """
    from medanomaly.detectors.base import CONFIG_FILE
    from medanomaly.errors import ConfigError

    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in --out and --overwrite deletes it: pick one"
        )
    if resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"{out}: holds a run or other files already; give --resume to continue it, "
            "--overwrite to replace it, or a new --out"
        )
    if not (out / CONFIG_FILE).is_file():
        raise ConfigError(f"{out}: not a run folder (no {CONFIG_FILE}); --overwrite leaves it")
    shutil.rmtree(out)


def run(args: argparse.Namespace) -> int:
    """Train a detector and write the run directory."""
    from medanomaly.config import apply_overrides, build_detector, load_config

    overrides = list(args.set)
    if args.devices:
        overrides.append(f"engine.devices={args.devices}")
    if args.num_nodes:
        overrides.append(f"engine.num_nodes={args.num_nodes}")
    if args.accelerator:
        overrides.append(f"engine.accelerator={args.accelerator}")
    config = apply_overrides(load_config(args.config), overrides)
    build_detector(config)  # a bad config is refused before anything is written
    out = Path(args.out)
    if launched_rank():  # a rank the first process started: that one checked --out
        return _train(args, config, out)
    check_run_folder(out, args.resume, args.overwrite)
    created = not out.exists()
    try:
        return _train(args, config, out)
    except BaseException:
        if created and not any(out.glob("*.safetensors")):  # nothing learned: leave no half run
            shutil.rmtree(out, ignore_errors=True)
        raise


def launched_rank() -> bool:
    """True in a process that a data-parallel launcher started for a rank other than 0."""
    return any(os.environ.get(key, "0") != "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _train(args: argparse.Namespace, config: dict[str, Any], out: Path) -> int:
    """Fit the config's detector on ``args.data`` into ``out`` with ``fit_run``."""
    from medanomaly.cli._common import report_skipped
    from medanomaly.jobs.fit import fit_run

    fitted = fit_run(config, args.data, out, val=args.val, resume=args.resume, strict=args.strict)
    report_skipped(fitted.train_report, out / "skipped_train.txt")
    if args.val:
        report_skipped(fitted.val_report, out / "skipped_val.txt")
    detector, labels = fitted.detector, fitted.train.labels
    if not detector.is_main_process_:
        return 0
    if detector.supervised:
        n_normal, n_abnormal = int((labels == 0).sum()), int((labels == 1).sum())
        seen = f"{n_normal} normal and {n_abnormal} abnormal images"
    else:
        seen = f"{int((labels != 1).sum())} normal images"
    rests_on = ""
    if not detector.supervised:  # a classifier's threshold is P > 0.5
        n_val = len(detector.val_scores_)
        rests_on = f" (mean + k·SD of {n_val} held-out normal validation scores)"
    print(f"trained {detector.name} on {seen}; threshold {detector.threshold_:.6g}{rests_on}")
    print(f"run directory: {out}")
    return 0
