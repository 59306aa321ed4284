"""What every benchmark shares: the results format, the baseline flag and the machine's speed.

One results format: ``results.json`` holds ``rows``, a mapping from row name to that row's
metrics (numbers, or ``{"mean", "sd"}`` over folds) and ``"baseline": true|false`` (a
no-model row such as ``intensity`` or ``volume``); benchmark-specific extras sit beside
``rows``.

Speed is reported against the machine: :func:`matmul_peak` measures the fp32 matrix-multiply
rate with the same thread count in the same run, and :func:`training_flops` /
:func:`inference_flops` count a detector's floating-point operations per image with
``torch.utils.flop_counter`` (convolutions and matrix products; cheap element-wise work is
not counted), so that images/s can be turned into a share of that peak.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from medanomaly.detectors.registry import get_model_class


def is_baseline(model_name: str) -> bool:
    """True for the registered no-model baselines (``intensity``, ``volume``)."""
    return bool(getattr(get_model_class(model_name), "baseline", False))


def results_row(metrics: Mapping[str, Any], baseline: bool, **extra: Any) -> dict[str, Any]:
    """One entry of ``rows``: the ``baseline`` flag first, then the metrics and extras."""
    return {"baseline": bool(baseline), **metrics, **extra}


def mean_sd(values: list[float | None]) -> dict[str, Any]:
    """``{"mean", "sd", "n", "folds"}`` of the defined values (sample SD; ``None`` if < 2)."""
    defined = [float(v) for v in values if v is not None and np.isfinite(v)]
    return {
        "mean": float(np.mean(defined)) if defined else None,
        "sd": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
        "n": len(defined),
        "folds": [None if v is None else float(v) for v in values],
    }


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The fp32 matrix-multiply rate (GFLOP/s, best of ``repeats``) on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    finally:
        torch.set_num_threads(before)
    return {"gflops": 2 * size**3 / best / 1e9, "threads": threads, "size": size}


def _seconds(call: Any) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def training_flops(detector: Any, batch: torch.Tensor) -> float:
    """FLOPs of one training step (loss + backward) per image of ``batch``.

    Builds a fresh network of the detector (same architecture as the trained one).
    """
    network = detector.build_network(tuple(batch.shape[1:]))
    network.train()
    with FlopCounterMode(display=False) as counter:
        detector.loss(network, batch).backward()
    return counter.get_total_flops() / len(batch)


def inference_flops(detector: Any, batch: torch.Tensor) -> float:
    """FLOPs of scoring (``evaluate``: forward pass and maps) per image of ``batch``."""
    network = detector.network_
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        detector.evaluate(network, batch)
    return counter.get_total_flops() / len(batch)


def speed_block(
    images_per_second: float, flops_per_image: float, peak: Mapping[str, float]
) -> dict[str, float]:
    """Images/s, GFLOP/s achieved and their share of the measured matmul peak."""
    achieved = images_per_second * flops_per_image / 1e9
    return {
        "images_per_second": images_per_second,
        "gflop_per_image": flops_per_image / 1e9,
        "gflops": achieved,
        "fraction_of_matmul_peak": achieved / peak["gflops"] if peak.get("gflops") else None,
    }


def training_throughput(
    detector: Any, images: np.ndarray, steps: int = 20, batch_size: int | None = None
) -> float:
    """Images/s of the detector's training step (loss, backward, Adam) on a fresh network.

    Runs ``steps`` optimisation steps on batches cut from ``images`` (after two warm-up
    steps), so that the figure is measured in the same conditions as :func:`matmul_peak`;
    data loading and augmentation are left out.
    """
    batch_size = batch_size or detector.engine_config.batch_size
    network = detector.build_network(tuple(images.shape[1:]))
    network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    torch.manual_seed(0)

    def step(index: int) -> None:
        start = (index * batch_size) % max(len(images) - batch_size + 1, 1)
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        optimizer.zero_grad(set_to_none=True)
        detector.loss(network, batch).backward()
        optimizer.step()

    step(0), step(1)
    seconds = _seconds(lambda: [step(i) for i in range(steps)])
    return steps * batch_size / seconds


def fastest_pass(call: Any, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls (others jobs slow the rest on a shared CPU)."""
    return min(_seconds(call) for _ in range(repeats))
