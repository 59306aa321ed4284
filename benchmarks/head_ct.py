"""Head CT (seed 003 data): train each *_head_ct_2d config on normal slices, report image AUROC.

Data: ../shared/data/head_ct_hemorrhage (100 normal ids 100-199, 100 hemorrhage ids 000-099).

Two protocols:

* ``split`` (default, quick): the 100 normal ids are permuted with numpy's default_rng(0); the
  first 70 are training normals (10 % of them held out by the engine for early stopping and
  the mean + 3 SD threshold); the last 30 normals and all 100 hemorrhage slices are the test
  set. No test image is seen during training, model selection or thresholding.
* ``cv`` (seed 003): 2 x 5 stratified cross-validation through ``medanomaly cv``; each fold
  trains on the normal images of its training part, a validation part carved out of it drives
  early stopping and the F1-optimal threshold, and test metrics are reported as mean +- SD.

Both write ``OUT/results.json`` and ``OUT/results.md`` (with seed 003's figures beside ours).

    .venv/bin/python benchmarks/head_ct.py [--protocol split|cv] [--models ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from medanomaly.config import apply_overrides, build_detector, load_config
from medanomaly.datasets import load_dataset
from medanomaly.evaluation import image_metrics
from medanomaly.evaluation.cv import cross_validate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "head_ct_hemorrhage"
CONFIGS = {p.name.split("_")[0]: p for p in sorted((ROOT / "configs").glob("*_head_ct_2d.yaml"))}
N_TRAIN_NORMAL = 70
PROTOCOLS = {
    "split": "fixed split: train 70 normal (10% held out for validation); test 30 normal + "
    "100 hemorrhage; threshold = mean + 3 SD of validation normals",
    "cv": "2 x 5 stratified CV; train on normal training slices; F1 threshold on validation",
}
# Seed 003's table (2 x 5 CV, test AUROC mean +- SD and F1); DAGMM "did not work".
SEED_003 = {"cae": (0.78, 0.09, 0.84), "ssae": (0.81, 0.08, 0.86), "fanogan": (0.87, 0.06, 0.91)}


def write_manifest(folder: Path, out: Path) -> Path:
    """Write ``path,label,split`` for the fixed split described in the module docstring."""
    with open(folder / "labels.csv", newline="") as handle:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(handle)]
    normal = sorted(r["id"] for r in rows if r["hemorrhage"] == "0")
    order = np.random.default_rng(0).permutation(len(normal))
    train_ids = {normal[i] for i in order[:N_TRAIN_NORMAL]}
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "head_ct_manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for row in sorted(rows, key=lambda r: r["id"]):
            split = "train" if row["id"] in train_ids else "test"
            writer.writerow([str(folder / f"{row['id']}.png"), row["hemorrhage"], split])
    return manifest


def model_config(name: str, epochs: int | None) -> dict[str, Any]:
    overrides = ["engine.progress=false"] + ([f"engine.epochs={epochs}"] if epochs else [])
    return apply_overrides(load_config(CONFIGS[name]), overrides)


def run_split(name: str, manifest: Path, out: Path, epochs: int | None) -> dict[str, Any]:
    """Train on the fixed split's training normals, test on the rest."""
    config = model_config(name, epochs)
    with open(manifest, newline="") as handle:
        splits = np.array([row["split"] for row in csv.DictReader(handle)])
    train_all, _ = load_dataset(manifest, **config["data"], augment=True, strict=True)
    test_all, _ = load_dataset(manifest, **config["data"], strict=True)
    train = train_all.subset(splits == "train", keep_augment=True)
    test = test_all.subset(splits == "test")
    start = time.perf_counter()
    detector = build_detector(config).fit(train, run_dir=out / name)
    seconds = time.perf_counter() - start
    scores = detector.score(test)
    metrics = image_metrics(test.labels, scores, detector.threshold_)
    return {
        "auroc": float(roc_auc_score(test.labels, scores)),
        "sensitivity": metrics["sensitivity"],
        "specificity": metrics["specificity"],
        "f1": metrics["f1"],
        "epochs": len(detector.history_),
        "seconds": seconds,
    }


def run_cv(name: str, manifest: Path, out: Path, epochs: int | None) -> dict[str, Any]:
    """Seed 003's 2 x 5 cross-validation (resumable: finished folds are kept)."""
    start = time.perf_counter()
    metrics = cross_validate(model_config(name, epochs), manifest, out / f"cv_{name}", 5, 2)
    image = metrics["image"]
    result = {key: image[key] for key in ("auroc", "f1", "accuracy", "sensitivity", "precision")}
    return {**result, "seconds": time.perf_counter() - start}


def _number(value: Any) -> str:
    if isinstance(value, dict):
        return f"{value['mean']:.3f} ± {value['sd']:.3f}" if value.get("mean") is not None else "–"
    return "–" if value is None else f"{value:.3f}"


def results_markdown(protocol: str, results: dict[str, dict[str, Any]]) -> str:
    """The results table, with seed 003's AUROC and F1 beside ours."""
    lines = [
        f"Head CT 64x64, protocol `{protocol}` (`benchmarks/head_ct.py --protocol {protocol}`)",
        "",
        "| model | AUROC | F1 | sensitivity | seconds | seed 003 AUROC | seed 003 F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        seed = SEED_003.get(name)
        seed_auroc = f"{seed[0]:.2f} ± {seed[1]:.2f}" if seed else "–"
        seed_f1 = f"{seed[2]:.2f}" if seed else "–"
        lines.append(
            f"| {name} | {_number(r['auroc'])} | {_number(r['f1'])} | "
            f"{_number(r['sensitivity'])} | {r['seconds']:.0f} | {seed_auroc} | {seed_f1} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("split", "cv"), default="split")
    parser.add_argument("--epochs", type=int, help="override engine.epochs (quick runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_head_ct")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"skipped: {DATA} not found (needs ../shared/data beside the repo)")
        return 0
    manifest = write_manifest(DATA, args.out)
    run = run_split if args.protocol == "split" else run_cv
    print(PROTOCOLS[args.protocol])
    results = {}
    for name in args.models:
        results[name] = run(name, manifest, args.out, args.epochs)
        r = results[name]
        print(f"{name:8s} AUROC {_number(r['auroc'])}  F1 {_number(r['f1'])}  {r['seconds']:.0f} s")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(results_markdown(args.protocol, results))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
