"""Head CT (the UAD slide deck data): train each *_head_ct_2d config on normal slices, report image
AUROC.

Data: ../shared/data/head_ct_hemorrhage (100 normal ids 100-199, 100 hemorrhage ids 000-099).

Two protocols:

* ``cv`` (default, the UAD slide deck): 2 x 5 stratified cross-validation through ``medanomaly cv``;
  each fold trains on the normal images of its training part; a validation part carved out
  of it (normal and hemorrhage slices) selects the epoch (by validation AUROC where the config
  says ``engine.monitor: val_auroc``, else by the normal validation loss) and the F1-optimal
  threshold; test metrics are reported as mean +- SD over the 10 test folds.
* ``split`` (quick): the 100 normal ids are permuted with numpy's default_rng(0); the
  first 70 are training normals (10 % of them held out by the engine for early stopping and
  the mean + 3 SD threshold); the last 30 normals and all 100 hemorrhage slices are the test
  set. No test image is seen during training, model selection or thresholding.

Every ``configs/*_head_ct_2d.yaml`` is a row, the no-model baseline ``intensity`` (CT
intensity z-scored against the normal brains, 99th percentile) included: it runs under the
same protocol and its row carries ``"baseline": true``. Both protocols write
``OUT/results.json`` (``rows``: name -> metrics, each ``{mean, sd}`` over the folds under
``cv``, and ``baseline``) and ``OUT/results.md`` (with the UAD slide deck's figures beside ours).
Wall time is per model: the sum over folds of training, thresholding and scoring, as recorded
in each fold's ``fold.json`` (so a resumed run reports the time its folds took when they ran).
The scoring speed of the CAE (images/s at 64x64, the trained model of the first fold,
inference mode, batches of ``DeepDetector.inference_batch_size``) is measured after its folds;
for ``dae`` also its training speed (training slices x epochs / seconds of the first fold, its
validation and test scoring included) and both as a share of the fp32 matmul peak measured
in the same run (FLOPs per slice counted by ``torch.utils.flop_counter``).

    .venv/bin/python benchmarks/head_ct.py [--protocol cv|split] [--models ...] [--out DIR]
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
import torch
from sklearn.metrics import roc_auc_score

from medanomaly.config import apply_overrides, build_detector, load_config
from medanomaly.data.loading import load_dataset
from medanomaly.detectors.base import BaseDetector
from medanomaly.evaluation import image_metrics
from medanomaly.evaluation.cv import cross_validate
from medanomaly.io.atomic import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (benchmarks/common.py)
    inference_flops,
    is_baseline,
    matmul_peak,
    results_row,
    speed_block,
    training_flops,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "head_ct_hemorrhage"
SUFFIX = "_head_ct_2d.yaml"
CONFIGS = {p.name.removesuffix(SUFFIX): p for p in sorted((ROOT / "configs").glob(f"*{SUFFIX}"))}
N_TRAIN_NORMAL = 70
PROTOCOLS = {
    "split": "fixed split: train 70 normal (20 held out for validation, engine.val_min); "
    "test 30 normal + 100 hemorrhage; threshold = mean + 3 SD of validation normals",
    "cv": "2 x 5 stratified CV; train on normal training slices; epoch chosen on the validation "
    "part (by the config's engine.monitor); F1 threshold on validation",
}
# The UAD slide deck's table (2 x 5 CV, test AUROC mean +- SD and F1); DAGMM "did not work".
TABLE_KEYS = ("auroc", "accuracy", "sensitivity", "precision", "f1")
SEED_003 = {"cae": (0.78, 0.09, 0.84), "ssae": (0.81, 0.08, 0.86), "fanogan": (0.87, 0.06, 0.91)}
TARGET_AUROC = 0.92


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
    detector = build_detector(config)
    write_run_config(detector, config, out / name)  # so that `medanomaly evaluate --run` works
    detector.fit(train, run_dir=out / name)
    seconds = time.perf_counter() - start
    scores = detector.score(test)
    metrics = image_metrics(test.labels, scores, detector.threshold_)
    return {
        **{key: metrics[key] for key in TABLE_KEYS},
        "auroc": float(roc_auc_score(test.labels, scores)),
        "specificity": metrics["specificity"],
        "epochs": len(detector.history_),
        "seconds": seconds,
    }


def write_run_config(detector: BaseDetector, config: dict[str, Any], run: Path) -> None:
    """The run's ``config.yaml`` with its data block, as ``medanomaly fit`` writes it."""
    detector.write_run_config(run, config.get("data"))


def run_cv(name: str, manifest: Path, out: Path, epochs: int | None) -> dict[str, Any]:
    """The UAD slide deck's 2 x 5 cross-validation (resumable: finished folds are kept)."""
    start = time.perf_counter()
    metrics = cross_validate(model_config(name, epochs), manifest, out / f"cv_{name}", 5, 2)
    image = metrics["image"]
    result = {key: image[key] for key in TABLE_KEYS}
    # seconds: the folds' own training + thresholding + scoring time (kept in fold.json, so a
    # resumed run reports what its folds took); run_seconds: this call, loading included
    result["seconds"] = metrics["cv"]["seconds"]
    return {**result, "run_seconds": time.perf_counter() - start}


def scoring_speed(run_dir: Path, manifest: Path, n_images: int = 4000) -> dict[str, float]:
    """Images per second of a trained detector scoring preprocessed 64x64 slices."""
    detector = BaseDetector.load(run_dir)
    config = model_config("cae", None)
    images, _ = load_dataset(manifest, **config["data"], strict=True)
    batch = np.resize(images.images, (n_images, *images.images.shape[1:]))
    detector.score(batch[:512])  # warm-up: allocations, kernel selection
    start = time.perf_counter()
    detector.score(batch)
    seconds = time.perf_counter() - start
    return {
        "images_per_second": n_images / seconds,
        "images": n_images,
        "batch_size": detector.inference_batch_size(int(np.prod(batch.shape[1:]))),
        "threads": torch.get_num_threads(),
    }


def dae_speed(run_dir: Path, manifest: Path) -> dict[str, Any]:
    """The DAE's training and scoring slices/s at 64x64 and their share of the matmul peak."""
    peak = matmul_peak(torch.get_num_threads())
    detector = BaseDetector.load(run_dir)
    fold_file = run_dir / "fold.json"
    record = json.loads(fold_file.read_text()) if fold_file.exists() else {}
    scoring = scoring_speed(run_dir, manifest)
    sample = torch.from_numpy(np.zeros((16, *detector.input_shape_), np.float32) + 0.5)
    torch.manual_seed(0)
    out = {"threads": peak["threads"], "matmul_peak_gflops": peak["gflops"]}
    out["scoring"] = {
        **speed_block(scoring["images_per_second"], inference_flops(detector, sample), peak),
        "images": scoring["images"],
    }
    if record.get("seconds"):
        rate = record["n_train"] * record["epochs"] / record["seconds"]
        out["training"] = {
            **speed_block(rate, training_flops(detector, sample), peak),
            "images": record["n_train"],
            "epochs": record["epochs"],
            "seconds": record["seconds"],
        }
    return out


def _number(value: Any) -> str:
    if isinstance(value, dict):
        return f"{value['mean']:.3f} ± {value['sd']:.3f}" if value.get("mean") is not None else "–"
    return "–" if value is None else f"{value:.3f}"


def results_markdown(
    protocol: str, results: dict[str, dict[str, Any]], speed: dict[str, Any] | None,
    dae: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """The results table, with the UAD slide deck's AUROC and F1 beside ours."""
    lines = [
        f"Head CT 64x64, protocol `{protocol}` (`benchmarks/head_ct.py --protocol {protocol}`): "
        f"{PROTOCOLS[protocol]}; {torch.get_num_threads()} CPU threads.",
        "",
        "| model | AUROC | accuracy | recall | precision | F1 | wall time | epoch by | "
        "the UAD slide deck AUROC | the UAD slide deck F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        seed = SEED_003.get(name)
        seed_auroc = f"{seed[0]:.2f} ± {seed[1]:.2f}" if seed else "–"
        seed_f1 = f"{seed[2]:.2f}" if seed else ("did not work" if name == "dagmm" else "–")
        cells = [_number(r.get(key)) for key in TABLE_KEYS]
        minutes = f"{r['seconds'] / 60:.1f} min"  # cv: the folds' own time (see docstring)
        monitor = model_config(name, None)["engine"].get("monitor", "val_loss")
        label = f"*{name} (no model)*" if r["baseline"] else name
        monitor = "–" if r["baseline"] else monitor
        lines.append(
            f"| {label} | {' | '.join(cells)} | {minutes} | {monitor} | {seed_auroc} | {seed_f1} |"
        )
    lines += ["", "Italic rows are no-model baselines, run under the same protocol.", ""]
    lines += verdict_lines(results)
    if speed:
        lines += [
            "",
            f"CAE scoring speed: {speed['images_per_second']:.0f} images/s at 64x64 "
            f"({speed['images']} images, batches of {speed['batch_size']}, "
            f"{speed['threads']} threads).",
        ]
    if dae:
        peak = f"{dae['matmul_peak_gflops']:.1f} GFLOP/s on {dae['threads']} threads"
        lines += ["", f"DAE speed at 64x64 (fp32 matmul peak of this run: {peak}):"]
        for what in ("training", "scoring"):
            block = dae.get(what)
            if block:
                lines.append(
                    f"- {what}: {block['images_per_second']:.1f} slices/s "
                    f"({block['gflop_per_image']:.2f} GFLOP per slice, {block['gflops']:.1f} "
                    f"GFLOP/s = {100 * block['fraction_of_matmul_peak']:.1f} % of the peak)"
                )
    return "\n".join(lines) + "\n"


def _mean(value: Any) -> float:
    if isinstance(value, dict):
        return value.get("mean") or 0.0
    return value or 0.0


def verdict_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """Which models beat the no-model rows (by mean AUROC) and the AUROC target."""
    baselines = {k: _mean(r["auroc"]) for k, r in results.items() if r["baseline"]}
    models = {k: _mean(r["auroc"]) for k, r in results.items() if not r["baseline"]}
    if not models:
        return []
    best = max(models, key=models.get)
    lines = [
        f"- Best model: `{best}` (AUROC {models[best]:.3f}); target ≥ {TARGET_AUROC}: "
        f"**{'met' if models[best] >= TARGET_AUROC else 'missed'}**."
    ]
    for name, value in baselines.items():
        above = sorted(k for k, v in models.items() if v > value)
        below = sorted(k for k, v in models.items() if v <= value)
        lines.append(
            f"- Against `{name}` (no model, AUROC {value:.3f}): above it "
            f"{', '.join(f'`{k}`' for k in above) or 'none'}; not above it "
            f"{', '.join(f'`{k}`' for k in below) or 'none'}."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("cv", "split"), default="cv")
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
    results, speed, dae = {}, None, None
    for name in args.models:
        row = run(name, manifest, args.out, args.epochs)
        results[name] = results_row(row, is_baseline(model_config(name, None)["model"]["name"]))
        r = results[name]
        print(f"{name:8s} AUROC {_number(r['auroc'])}  F1 {_number(r['f1'])}  {r['seconds']:.0f} s")
        first = args.out / (f"cv_{name}/folds/r1_f1" if args.protocol == "cv" else name)
        if name == "cae":
            speed = scoring_speed(first, manifest)
            print(f"cae scoring: {speed['images_per_second']:.0f} images/s at 64x64")
        if name == "dae":
            dae = dae_speed(first, manifest)
            print(f"dae speed: {json.dumps(dae)}")
    summary = {
        "benchmark": "head_ct",
        "protocol": args.protocol,
        "rows": results,
        "cae_scoring": speed,
        "dae_speed": dae,
        "target_auroc": TARGET_AUROC,
    }
    atomic_write_text(args.out / "results.json", json.dumps(summary, indent=1))
    markdown = results_markdown(args.protocol, results, speed, dae)
    atomic_write_text(args.out / "results.md", markdown)
    print(markdown)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
