"""``medanomaly demo``: train and score a CAE on synthetic phantoms."""

from __future__ import annotations

import argparse

from medanomaly.cli._common import at_least


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    p = sub.add_parser("demo", help="train and score a CAE on synthetic phantoms")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--epochs", type=at_least(1), default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--3d", dest="three_d", action="store_true", help="use 32^3 volumes")
    p.add_argument(
        "--scans",
        metavar="DIR",
        help="only write phantom scans as NIfTI files (DIR/train, DIR/test, DIR/test.csv) "
        "to try fit, score and evaluate on files; nothing is trained",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the phantom demo and print the image AUROC (or only write phantom scans)."""
    if args.scans:
        from medanomaly.data.phantoms import write_phantom_scans

        written = write_phantom_scans(args.scans, seed=args.seed)
        print(
            f"demo: phantom scans in {written['train']} (normal, for fit) and "
            f"{written['test']} (normal and abnormal); labels and masks in {written['manifest']}"
        )
        return 0
    from medanomaly.demo import run_demo

    shape = (32, 32, 32) if args.three_d else (64, 64)
    result = run_demo(args.out, shape=shape, epochs=args.epochs, seed=args.seed)
    print(
        f"demo: image AUROC {result['auroc']:.3f} on phantoms ({result['seconds']:.0f} s); "
        f"pictures and scores in {args.out}"
    )
    return 0
