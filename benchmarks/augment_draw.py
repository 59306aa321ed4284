"""Milliseconds per random training draw, with MONAI's metadata tracking and without.

The head CT specs' augmentation (``rand_flip`` + ``rand_affine``) on ``--n`` random 64²
slices, each drawn ``--repeats`` times, one thread: first through the transforms as they run
on a :class:`~medanomaly.image.MedicalImage` with MONAI tracking metadata, then through
:class:`~medanomaly.data.loading.ArrayAugment` (what training uses, without it), from the
same seed. Checks that both drew the same arrays; prints both times and their ratio.

    .venv/bin/python benchmarks/augment_draw.py [--n 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from medanomaly.data.loading import ArrayAugment
from medanomaly.image import MedicalImage
from medanomaly.transforms import build_transforms

STEPS = [
    {"rand_flip": {"axes": [1], "prob": 0.5}},
    {"rand_affine": {"rotate_deg": 5.0, "translate": 0.03, "scale": 0.05, "shear": 0.0}},
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    slices = np.random.default_rng(0).random((args.n, 1, 64, 64)).astype(np.float32)
    draws = [a for a in slices for _ in range(args.repeats)]
    transforms = build_transforms(STEPS)
    transforms.set_random_state(3)
    start = time.perf_counter()
    tracked = [
        np.asarray(transforms(MedicalImage(array=a, spacing=(1.0, 1.0))).array) for a in draws
    ]
    tracked_ms = (time.perf_counter() - start) / len(draws) * 1e3
    augment = ArrayAugment(build_transforms(STEPS)).set_random_state(3)
    start = time.perf_counter()
    plain = [augment(a) for a in draws]
    plain_ms = (time.perf_counter() - start) / len(draws) * 1e3
    same = all(np.array_equal(a, b) for a, b in zip(tracked, plain, strict=True))
    print(
        f"{len(draws)} draws: {tracked_ms:.2f} ms with MONAI metadata, {plain_ms:.2f} ms "
        f"without ({tracked_ms / plain_ms:.1f}x); same arrays: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
