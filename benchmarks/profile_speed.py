"""Where a model's training step and scoring spend their time, per torch operator.

The diagnostic behind ``docs/benchmarks/speed.md``: builds a model as ``benchmarks/speed.py``
does (its config, synthetic phantoms, one variant: ``32-true before``, ``32-true`` or
``auto``), fits it once to warm up, then runs ``torch.profiler`` over one epoch of
``--steps`` training steps and over scoring ``--images`` new phantoms, and prints each
profile's operators by self CPU time (the top ``--rows``).

    .venv/bin/python benchmarks/profile_speed.py --model dae --variant auto [--size 64]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/speed.py)


def profiled(call: Callable[[], Any]) -> Any:
    """``call()`` under the profiler: its operators' averages (``EventList``)."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        call()
    return profiler.key_averages()


def fit_as_variant(detector: Any, variant: str, train: Any, val: Any) -> None:
    """Fit ``detector`` as ``speed.measure`` does for ``variant``.

    ``32-true before`` trains contiguous, then scores channels-last.
    """
    if variant == speed.BEFORE:
        engine = {**detector.engine_config.to_dict(), "memory_format": "contiguous"}
        detector.set_params(engine=engine)
    detector.fit(train, val)
    if variant == speed.BEFORE:
        speed.score_as_before(detector)


def print_profiles(args: argparse.Namespace) -> None:
    """Fit and score the model of ``args`` under the profiler; print both tables."""
    detector = speed.build(args.model, args.variant, speed.FULL)
    dims = int(detector.get_params()["spatial_dims"])
    shape = (args.size,) * dims
    batch = detector.engine_config.batch_size
    train = speed.phantoms(args.steps * batch, shape, seed=0)
    val = speed.phantoms(batch, shape, seed=1)
    fit_as_variant(detector, args.variant, train[: 2 * batch], val)  # warm-up
    images = speed.phantoms(args.images, shape, seed=2)
    detector.score(images)
    for name, call in (
        (
            f"training, {args.steps} steps of {batch}",
            lambda: fit_as_variant(detector, args.variant, train, val),
        ),
        (f"scoring, {args.images} images", lambda: detector.score(images)),
    ):
        table = profiled(call).table(sort_by="self_cpu_time_total", row_limit=args.rows)
        print(f"{args.model} {'x'.join(map(str, shape))} {args.variant}: {name}\n{table}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(speed.MODELS), default="dae")
    parser.add_argument("--variant", choices=(speed.BEFORE, *speed.PRECISIONS), default="auto")
    parser.add_argument("--size", type=int, default=64, help="side of the 2D/3D input")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        print_profiles(args)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
