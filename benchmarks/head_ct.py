"""Head CT (seed 003 data): train CAE and VAE at 64x64 on normal slices, report image AUROC.

Data: ../shared/data/head_ct_hemorrhage (100 normal ids 100-199, 100 hemorrhage ids 000-099).
Fixed split (seed 0): the 100 normal ids are permuted with numpy's default_rng(0); the first
70 are training normals (10 % of them held out by the engine for early stopping and the
mean + 3 SD threshold), the last 30 normals and all 100 hemorrhage slices are the test set.
No test image is seen during training, model selection or thresholding.

    .venv/bin/python benchmarks/head_ct.py [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from medanomaly.config import apply_overrides, build_detector, load_config
from medanomaly.datasets import load_dataset
from medanomaly.evaluation import image_metrics

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "head_ct_hemorrhage"
CONFIGS = {p.name.split("_")[0]: p for p in sorted((ROOT / "configs").glob("*_head_ct_2d.yaml"))}
N_TRAIN_NORMAL = 70


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


def split_of(manifest: Path) -> np.ndarray:
    with open(manifest, newline="") as handle:
        return np.array([row["split"] for row in csv.DictReader(handle)])


def run_model(name: str, manifest: Path, out: Path, epochs: int | None) -> dict[str, float]:
    config = load_config(CONFIGS[name])
    if epochs:
        config = apply_overrides(config, [f"engine.epochs={epochs}", "engine.progress=false"])
    else:
        config = apply_overrides(config, ["engine.progress=false"])
    splits = split_of(manifest)
    data_cfg = config["data"]
    train_all, _ = load_dataset(manifest, **data_cfg, augment=True, strict=True)
    test_all, _ = load_dataset(manifest, **data_cfg, strict=True)
    train = train_all.subset(splits == "train", keep_augment=True)
    test = test_all.subset(splits == "test")
    start = time.perf_counter()
    detector = build_detector(config).fit(train, run_dir=out / name)
    seconds = time.perf_counter() - start
    scores = detector.score(test)
    metrics = image_metrics(test.labels, scores, detector.threshold_)
    return {
        "auroc": roc_auc_score(test.labels, scores),
        "sensitivity": metrics["sensitivity"],
        "specificity": metrics["specificity"],
        "epochs": len(detector.history_),
        "seconds": seconds,
        "n_train": len(train),
        "n_test": len(test),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help="override engine.epochs (quick runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_head_ct")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"skipped: {DATA} not found (needs ../shared/data beside the repo)")
        return 0
    manifest = write_manifest(DATA, args.out)
    print(
        f"head CT 64x64, train {N_TRAIN_NORMAL} normal (10% held out for validation), "
        "test 30 normal + 100 hemorrhage; threshold = mean + 3 SD of validation normals"
    )
    print(f"{'model':6s} {'AUROC':>6s} {'sens':>6s} {'spec':>6s} {'epochs':>6s} {'train s':>8s}")
    for name in args.models:
        r = run_model(name, manifest, args.out, args.epochs)
        print(
            f"{name:6s} {r['auroc']:6.3f} {r['sensitivity']:6.3f} {r['specificity']:6.3f} "
            f"{r['epochs']:6d} {r['seconds']:8.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
