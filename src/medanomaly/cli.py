"""Command line: a thin layer over the Python API.

medanomaly fit --config C --data D --out RUN [--val V] [--resume] [--devices N]
medanomaly score --run RUN --data D --out scores.csv [--maps DIR] [--strict]
medanomaly demo --out DIR
medanomaly models
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from medanomaly import __version__
from medanomaly.base import CONFIG_FILE, BaseDetector
from medanomaly.checkpoint import atomic_write_text
from medanomaly.config import apply_overrides, build_detector, load_config
from medanomaly.errors import MedanomalyError
from medanomaly.registry import get_model_class, list_models

log = logging.getLogger("medanomaly")


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train a detector on normal images")
    p.add_argument("--config", required=True, help="YAML with model/engine/data blocks")
    p.add_argument("--data", required=True, help="folder or CSV manifest of training images")
    p.add_argument("--val", help="validation folder/manifest (normal, optionally abnormal)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--devices", type=int, help="GPUs per node (data-parallel); sets engine.devices")
    p.add_argument("--num-nodes", type=int, help="machines (with torchrun); sets engine.num_nodes")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set engine.epochs=5",
    )
    p.add_argument("--strict", action="store_true", help="stop on the first unreadable image")
    p.set_defaults(func=cmd_fit)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score images with a trained run")
    p.add_argument("--run", required=True, help="run directory (or model.pt)")
    p.add_argument("--data", required=True, help="folder or CSV manifest to score")
    p.add_argument("--out", required=True, help="CSV of per-case scores")
    p.add_argument("--maps", help="folder for anomaly maps (.npy) and pictures (.png)")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any image is unreadable")
    p.set_defaults(func=cmd_score)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and score a CAE on synthetic phantoms")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--3d", dest="three_d", action="store_true", help="use 32^3 volumes")
    p.set_defaults(func=cmd_demo)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered detectors")
    p.set_defaults(func=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medanomaly`` command."""
    parser = argparse.ArgumentParser(
        prog="medanomaly",
        description="Find abnormal CT/MRI scans with models of normal anatomy.",
    )
    parser.add_argument("--version", action="version", version=f"medanomaly {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_fit, _add_score, _add_demo, _add_models):
        add(sub)
    for add in _extra_commands():
        add(sub)
    return parser


def _extra_commands() -> list:
    """Sub-commands contributed by other modules (inspect, evaluate, cv) when present."""
    return []


def _report_skipped(report, out: Path | None) -> None:
    if not report:
        return
    print(f"skipped {len(report.skipped)} unreadable case(s):", file=sys.stderr)
    for line in report.lines():
        print(f"  {line}", file=sys.stderr)
    if out is not None:
        atomic_write_text(out, "\n".join(report.lines()) + "\n")


def cmd_fit(args: argparse.Namespace) -> int:
    """Train a detector and write the run directory."""
    from medanomaly.datasets import load_dataset

    overrides = list(args.set)
    if args.devices:
        overrides.append(f"engine.devices={args.devices}")
    if args.num_nodes:
        overrides.append(f"engine.num_nodes={args.num_nodes}")
    config = apply_overrides(load_config(args.config), overrides)
    detector = build_detector(config)
    data_cfg = config.get("data") or {}
    out = Path(args.out)
    train, report = load_dataset(args.data, **data_cfg, strict=args.strict)
    _report_skipped(report, out / "skipped_train.txt")
    val = None
    if args.val:
        val, val_report = load_dataset(args.val, **data_cfg, strict=args.strict)
        _report_skipped(val_report, out / "skipped_val.txt")
    resolved = {**detector.config(), "data": data_cfg, "version": __version__}
    config_path = out / CONFIG_FILE
    if not (args.resume and config_path.exists()):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, yaml.safe_dump(resolved, sort_keys=False))
    detector.fit(train, val, run_dir=out, resume=args.resume)
    print(f"trained {detector.name} on {len(train)} images; threshold {detector.threshold_:.6g}")
    print(f"run directory: {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score a folder/manifest with a trained run and write the score table."""
    from medanomaly.datasets import load_dataset
    from medanomaly.outputs import save_maps, write_scores_csv

    detector = BaseDetector.load(args.run)
    data_cfg = (getattr(detector, "run_config_", None) or {}).get("data") or {}
    images, report = load_dataset(args.data, **data_cfg, strict=args.strict)
    out = Path(args.out)
    _report_skipped(report, out.with_suffix(".skipped.txt"))
    result = detector.detect(images)
    write_scores_csv(out, images.ids, images.labels, result)
    if args.maps:
        save_maps(args.maps, images.ids, images.images, result)
    flagged = int(result.labels.sum())
    print(f"scored {len(images)} cases ({flagged} above threshold {result.threshold:.6g}) -> {out}")
    return 1 if (report and args.strict) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the phantom demo and print the image AUROC."""
    from medanomaly.demo import run_demo

    shape = (32, 32, 32) if args.three_d else (64, 64)
    result = run_demo(args.out, shape=shape, epochs=args.epochs, seed=args.seed)
    print(
        f"demo: image AUROC {result['auroc']:.3f} on phantoms "
        f"({result['seconds']:.0f} s); pictures and scores in {args.out}"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Print the registered detector names with their one-line descriptions."""
    for name in list_models():
        doc = (get_model_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medanomaly`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except MedanomalyError as error:
        print(f"medanomaly {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
