"""Cost of ``ddpm`` against ``dae`` on a CPU at 64²: seconds per training epoch, slices per second.

The issue's targets (2 CPU cores, 64 x 64 slices): a ``ddpm`` epoch takes at most twice a
``dae`` epoch of the same width, and ``ddpm`` scores at least 20 slices/s with at most 10
DDIM steps, in the precision the engine chooses (``engine.precision: auto``).

On ``--n`` phantom slices (64²), each round fits a ``dae`` and a ``ddpm`` of each width pair
for ``--epochs`` epochs (one after the other, so that both see the same load of a shared
machine), then scores the slices with the ``dae`` and with the ``ddpm`` at each of
``--steps``. An epoch's seconds are the fit's (training and validation on 20 held-out slices)
divided by the epochs; the first round also pays the one-off set-up, so the figures are the
medians over ``--rounds``.

    .venv/bin/python benchmarks/ddpm_cost.py --out runs/ddpm_cost [--threads 2] [--rounds 3]

Writes ``OUT/results.json`` (every round) and prints the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from medanomaly import get_model
from medanomaly.data.phantoms import make_phantoms
from medanomaly.training.engine import EngineConfig, resolve_precision

WIDTHS = {
    "16": ([16, 32, 64, 128, 256, 16], [16, 32, 64, 64], 8),
    "8": ([8, 16, 32, 64, 128, 8], [8, 16, 32, 32], 4),
}
"""Width pairs: the DAE's BasicUNet widths, the diffusion U-Net's, their norm groups."""


def _fit_seconds(name: str, params: dict, train, val, engine: dict) -> tuple[float, object]:
    detector = get_model(name, **params, engine=engine)
    start = time.perf_counter()
    detector.fit(train, val)
    return time.perf_counter() - start, detector


def _slices_per_second(detector, images) -> float:
    start = time.perf_counter()
    detector.score(images)
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Measure the rounds; write and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=512, help="training slices")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, nargs="*", default=[5, 10])
    parser.add_argument("--widths", nargs="*", default=list(WIDTHS), choices=list(WIDTHS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = make_phantoms(args.n, 0, (64, 64), seed=0)
    val = make_phantoms(20, 0, (64, 64), seed=1)
    engine = {"epochs": args.epochs, "batch_size": 16, "patience": None, "progress": False}
    rounds = []
    for round_index in range(args.rounds):
        row: dict[str, float] = {}
        for width in args.widths:
            features, channels, groups = WIDTHS[width]
            dae_params = {"features": features, "norm_groups": groups}
            seconds, dae = _fit_seconds("dae", dae_params, train, val, engine)
            row[f"dae{width}_epoch_s"] = seconds / args.epochs
            ddpm_params = {"channels": channels, "norm_groups": groups}
            seconds, ddpm = _fit_seconds("ddpm", ddpm_params, train, val, engine)
            row[f"ddpm{width}_epoch_s"] = seconds / args.epochs
            row[f"ratio{width}"] = row[f"ddpm{width}_epoch_s"] / row[f"dae{width}_epoch_s"]
            row[f"dae{width}_slices_per_s"] = _slices_per_second(dae, train)
            for steps in args.steps:
                ddpm.set_params(ddim_steps=steps)
                row[f"ddpm{width}_k{steps}_slices_per_s"] = _slices_per_second(ddpm, train)
        rounds.append(row)
        print(f"round {round_index + 1}: " + json.dumps({k: round(v, 2) for k, v in row.items()}))
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    summary = {
        "command": "benchmarks/ddpm_cost.py " + " ".join(argv or []),
        "threads": args.threads,
        "precision": resolve_precision(EngineConfig()),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "n": args.n,
        "epochs": args.epochs,
        "rounds": rounds,
        "medians": medians,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print("medians: " + json.dumps({k: round(v, 2) for k, v in medians.items()}))
    print(f"precision {summary['precision']}, load average {summary['load_average']}")


if __name__ == "__main__":
    main()
