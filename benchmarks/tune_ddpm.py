"""Choose the ``ddpm`` defaults on validation patients only: one fold of a spec, test never read.

Fits the spec's ``ddpm`` candidate (with ``--set`` changes) on the normal training slices of
one fold, its epochs ranked on the fold's tuning half as ``compare`` does, then re-scores that
one network with each scoring variant of ``--grid`` (``t0``, ``ddim_steps``, ``noise_draws``,
``residual``, ``patched``, ...: nothing that retrains) on the fold's whole validation part and
prints pixel AP, the best Dice and slice AUROC there. The fold's test part is never scored.

    .venv/bin/python benchmarks/prepare_lgg.py --out runs/lgg
    .venv/bin/python benchmarks/tune_ddpm.py --out runs/tune_ddpm/simplex \\
        --set model.noise=simplex --grid '[{"t0": 100}, {"t0": 250}, {"t0": [100, 250, 400]}]'

Writes ``OUT/validation.json`` (one row per variant, with the fitting and scoring seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np

from medanomaly.config import apply_overrides
from medanomaly.jobs.fit import fit_run
from medanomaly.metrics.image import image_metrics
from medanomaly.metrics.pixel import pixel_metrics
from medanomaly.model_selection.compare import load_labelled, protocol_splits, training_cases
from medanomaly.model_selection.spec import load_spec


def main(argv: list[str] | None = None) -> None:
    """Fit once on the fold's training normals; print validation figures per scoring variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="lgg_pixel", help="spec file or built-in name")
    parser.add_argument("--candidate", default="ddpm")
    parser.add_argument("--fold", type=int, default=1, help="1-based fold of the spec")
    parser.add_argument("--set", nargs="*", default=[], help="config changes, KEY=VALUE")
    parser.add_argument("--grid", default="[{}]", help="JSON list of model argument changes")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    spec = load_spec(args.spec)
    data = load_labelled(spec)
    split = protocol_splits(spec, data)[args.fold - 1]
    candidate = spec.candidate(args.candidate)
    config = apply_overrides(copy.deepcopy(candidate.config), list(args.set))
    images = data.images
    start = time.perf_counter()
    train = training_cases(spec, candidate, images, split.train)
    fitted = fit_run(config, train, args.out, val=images.subset(split.tune), resume=True)
    fit_seconds = time.perf_counter() - start
    val = images.subset(split.val)
    known = data.known[split.val]
    rows = []
    for change in json.loads(args.grid):
        detector = copy.deepcopy(fitted.detector).set_params(**change)
        start = time.perf_counter()
        result = detector.detect(val)
        seconds = time.perf_counter() - start
        pixel = pixel_metrics(
            result.maps[known],
            val.masks[known],
            data.foreground[split.val][known],
            per_image=False,
        )
        row = {
            "change": change,
            "val_pixel_ap": pixel["average_precision"],
            "val_pixel_auroc": pixel["auroc"],
            "val_best_dice": pixel["best_dice"],
            "val_slice_auroc": image_metrics(val.labels, result.scores, 0.0)["auroc"],
            "slices": len(val),
            "score_seconds": seconds,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "spec": args.spec,
        "fold": args.fold,
        "set": args.set,
        "epochs": len(fitted.detector.history_),
        "fit_seconds": fit_seconds,
        "history": fitted.detector.history_,
        "rows": rows,
    }
    (Path(args.out) / "validation.json").write_text(json.dumps(summary, indent=1))
    print(f"fit {fit_seconds:.0f} s, {summary['epochs']} epochs")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
