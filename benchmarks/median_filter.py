"""Milliseconds of the maps' median filter: selection network against sorting every window.

The DAE's and DDPM's maps are median filtered (5x5 in 2D, 3x3x3 in 3D) before scoring. This
times :func:`~medanomaly.detectors.scoring.median_filter` on random maps, 256 of 64² (5x5)
and 8 of 64³ (3x3x3), on ``--threads`` torch threads: as it runs (a selection network of
element-wise minima and maxima) and with the network switched off (unfold, then sort each
window with ``torch.median``); the best of ``--repeats`` calls each. Checks that both give
the same maps; prints both times and their ratio.

    .venv/bin/python benchmarks/median_filter.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from unittest import mock

import torch

from medanomaly.detectors import scoring

CASES = (("256 maps 64², 5x5", (256, 64, 64), 5), ("8 maps 64³, 3x3x3", (8, 64, 64, 64), 3))


def best_ms(call: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """The fastest of ``repeats`` calls after a warm-up call, and the result."""
    result = call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    same = True
    for name, shape, size in CASES:
        filtered = functools.partial(
            scoring.median_filter, torch.rand(shape, generator=generator), size
        )
        network_ms, by_network = best_ms(filtered, args.repeats)
        with mock.patch.object(scoring, "MEDIAN_NETWORK_WINDOW", 0):
            sort_ms, by_sort = best_ms(filtered, args.repeats)
        equal = torch.equal(by_network, by_sort)
        same &= equal
        print(
            f"{name}: {sort_ms:.1f} ms sorting each window, {network_ms:.1f} ms by the "
            f"selection network ({sort_ms / network_ms:.1f}x); same maps: {equal}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
