"""AdrenalMNIST3D at 64³: the Chung & Choi 2023 analogue (3D VAE, ROC cut-off) on real 3D shapes.

Data: ../shared/data/adrenal3d/adrenalmnist3d_64.npz (MedMNIST v2, CC BY 4.0): binary adrenal
shape masks from abdominal CT (0/255), label 0 = normal, 1 = hyperplasia (enlarged gland /
mass); the official splits train 1188 (929 normal / 259 abnormal), val 98 (76 / 22), test 298
(229 / 69). Volumes are scaled to [0, 1] float32 ``(N, 1, 64, 64, 64)``.

Protocol (Chung & Choi 2023: 3D VAE on orbital CT, AUROC 0.801, sensitivity 79.2 %, specificity
72.7 % at a ROC-derived cut-off):

1. Each model of :data:`MODELS` is trained through the package API
   (``medanomaly.get_model(name, spatial_dims=3, ..., engine=...)``, then
   ``.fit(train, val=val, run_dir=OUT/<model>)``) on the *normal* training volumes only (the
   abnormal ones are left out by ``fit``). The validation split's normal volumes drive early
   stopping (or, with ``engine.monitor: val_auroc``, its normal and abnormal volumes rank the
   epochs); the test split is never seen before the final scoring.
2. A row with ``"from": <model>`` re-scores that model's trained detector with other
   settings (``"set"``): another ``map_score`` (standardised, smoothed anomaly map; its
   per-voxel scale comes from the normal training volumes, as ``fit`` would compute it),
   another ``score_reduce``, or another ``combine`` of a latent density (re-standardised on
   the normal validation volumes): same network, only the score differs.
   Rows with ``"size": 32`` train and score at 32³: the 64³ volumes area-downsampled (the
   masks' partial volumes kept), 8x cheaper per epoch, so they train longer.
   No-model rows (``volume``, ``volume32``: the mask's voxel count against the normal
   training volumes, larger = more abnormal) are fitted and cut the same way; their rows
   carry ``"baseline": true``.
3. The cut-off is Youden's J on the **validation** scores (Chung & Choi's (2023) ROC cut-off); test
   AUROC (95 % stratified bootstrap CI, 1000 resamples), sensitivity, specificity, accuracy
   and F1 at that cut-off are reported.
4. Speed of the VAE (``vae`` at 64³, else ``vae32``): training throughput = normal
   training volumes x epochs run / training seconds (the seconds include each epoch's
   validation pass and the final threshold pass), and scoring throughput = 298 test
   volumes / seconds of ``detector.score`` (after a warm-up batch; the fastest of 3
   passes) with ``--speed-threads`` torch threads.

A model whose ``OUT/<model>/model.safetensors`` exists and whose ``bench.json`` records the same
settings is loaded instead of retrained (``--retrain`` forces training). Writes
``OUT/results.json`` (``rows``: name -> metrics and ``baseline``; ``speed``, ``counts``
beside), ``OUT/results.md`` and ``OUT/roc_test.png``.

    .venv/bin/python benchmarks/adrenal3d.py --out OUT [--models vae cae] [--epochs N] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medanomaly
from medanomaly.data.sets import ImageSet
from medanomaly.evaluation import bootstrap_auroc_ci, image_metrics, youden_threshold
from medanomaly.evaluation.figures import plot_roc
from medanomaly.io.atomic import atomic_write_text
from medanomaly.transforms.mask import distance_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import is_baseline, results_row  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "adrenal3d" / "adrenalmnist3d_64.npz"
MAP_SCORE = {"smooth": 5, "reduce": "top", "top_fraction": 0.01}
# name -> {model, params (constructor), engine} or {from: trained row, map_score}.
# Epochs are sized for a CPU shared with other jobs: VAE-3D and the ResNet-10 AE train at 4-5
# volumes/s on one free thread, the CAE at about 25 (down to a third of that when the cores are
# busy); on 2 free cores the default run takes about 15 minutes, on one busy thread about an hour.
MODELS: dict[str, dict[str, Any]] = {
    "volume": {"model": "volume", "params": {"direction": "high"}, "engine": {}},
    "vae": {
        "model": "vae",  # the registry's defaults are Chung & Choi's (2023) architecture and loss
        "params": {},
        "engine": {"epochs": 5, "patience": 3, "batch_size": 16, "monitor": "val_auroc"},
    },
    "vae_map": {"from": "vae", "set": {"map_score": MAP_SCORE}},
    "cae": {
        "model": "cae",
        "params": {"channels": [16, 32, 64, 128], "latent_channels": 16},
        "engine": {"epochs": 8, "patience": 4, "batch_size": 16, "monitor": "val_auroc"},
    },
    "cae_map": {"from": "cae", "set": {"map_score": MAP_SCORE}},
    "resnet_ae": {
        "model": "resnet_ae",  # Hjohlman's (2022) ResNet autoencoder: ResNet-10, 1024-d latent
        "params": {"depth": 10, "latent_dim": 1024, "output_activation": "sigmoid"},
        "engine": {"epochs": 3, "patience": 2, "batch_size": 16, "monitor": "val_auroc"},
    },
    "volume32": {"model": "volume", "size": 32, "params": {"direction": "high"}, "engine": {}},
    "vae32": {
        "model": "vae",
        "size": 32,
        "params": {},
        "engine": {"epochs": 40, "patience": 10, "batch_size": 16, "monitor": "val_auroc"},
    },
    # the density of vae32's latent means under the normal training volumes (no retraining)
    "vae32_latent": {
        "model": "latent_density",
        "size": 32,
        "params": {"encoder_run": "vae32", "density": "gaussian", "combine": "latent"},
        "engine": {},
    },
    "vae32_latent_sum": {"from": "vae32_latent", "set": {"combine": "sum"}},
    "dae32": {
        "model": "dae",
        "size": 32,
        "params": {"features": [8, 16, 32, 64, 128, 8], "erode": 0, "median_size": 3},
        "engine": {"epochs": 20, "patience": 6, "batch_size": 16, "monitor": "val_auroc"},
    },
    "dae32_sum": {"from": "dae32", "set": {"score_reduce": "sum"}},
    "dae32_pos": {"from": "dae32", "set": {"residual": "positive"}},  # voxels the gland gained
    # on the masks' distance maps (thickness as intensity; see distance_inputs)
    "thickness": {
        "model": "intensity",  # no model: the 99th percentile of the z-scored distance map
        "input": "distance",
        "params": {"foreground_threshold": 0.0, "direction": "high"},
        "engine": {},
    },
    "vae32_dt": {
        "model": "vae",
        "size": 32,
        "input": "distance",
        "params": {},
        "engine": {"epochs": 40, "patience": 10, "batch_size": 16, "monitor": "val_auroc"},
    },
    "vae32_dt_map": {"from": "vae32_dt", "set": {"map_score": MAP_SCORE}},
    "vae32_dt_latent": {
        "model": "latent_density",
        "size": 32,
        "input": "distance",
        "params": {"encoder_run": "vae32_dt", "density": "gaussian", "combine": "sum"},
        "engine": {},
    },
    "dae32_dt": {
        "model": "dae",
        "size": 32,
        "input": "distance",
        "params": {"features": [8, 16, 32, 64, 128, 8], "erode": 0, "median_size": 3},
        "engine": {"epochs": 20, "patience": 6, "batch_size": 16, "monitor": "val_auroc"},
    },
    "dae32_dt_pos": {"from": "dae32_dt", "set": {"residual": "positive"}},  # thicker than normal
    "fpi32": {
        "model": "fpi",
        "size": 32,
        "params": {"features": [8, 16, 32, 64, 128, 8]},
        "engine": {"epochs": 10, "patience": 4, "batch_size": 16, "monitor": "val_auroc"},
    },
}
# Chung & Choi's (2023) 64^3 networks: 20-45 CPU minutes each and beaten by the 32^3 rows
# (docs/benchmarks/adrenal3d.md), so
# they run only when asked for (--models vae vae_map cae cae_map resnet_ae)
LEGACY_64 = ("vae", "vae_map", "cae", "cae_map", "resnet_ae")
DEFAULT_MODELS = [name for name in MODELS if name not in LEGACY_64]
SEED_000 = {"auroc": 0.801, "sensitivity": 0.792, "specificity": 0.727}
TARGET_AUROC = 0.85  # the moonshot; Chung & Choi's (2023) 0.80 is the target
TABLE_KEYS = ("auroc", "sensitivity", "specificity", "accuracy", "f1")
SPLITS = ("train", "val", "test")
DISTANCE_SCALE = 10.0  # voxels at 64³: distance maps / 10, clipped to 1
SPEED_REPEATS = 3  # scoring-speed passes; the fastest is reported

QUICK = {"train": 16, "val": (6, 4), "test": (10, 6), "epochs": 1}


# -- data -------------------------------------------------------------------------------------
def load_splits(path: Path, quick: bool) -> dict[str, ImageSet]:
    """The three official splits as ImageSets in [0, 1]; ``quick`` keeps a few volumes."""
    with np.load(path) as data:
        arrays = {s: (data[f"{s}_images"], data[f"{s}_labels"].reshape(-1)) for s in SPLITS}
    out = {}
    for split, (images, labels) in arrays.items():
        index = np.arange(len(labels))
        if split == "train":  # only the normal training volumes are ever used
            index = index[labels == 0][: QUICK["train"] if quick else None]
        elif quick:
            n_normal, n_abnormal = QUICK[split]
            normal, abnormal = index[labels == 0], index[labels == 1]
            index = np.concatenate([normal[:n_normal], abnormal[:n_abnormal]])
        volumes = images[index, None].astype(np.float32) / 255.0
        ids = [f"{split}_{i:04d}" for i in index]
        out[split] = ImageSet(volumes, labels[index].astype(np.int64), ids)
    return out


def distance_inputs(data: dict[str, ImageSet]) -> dict[str, ImageSet]:
    """The masks' distance maps at the file's grid: each voxel's distance to the background.

    ``medanomaly.transforms.mask.distance_map`` of the mask (voxels above 0.5), divided by
    :data:`DISTANCE_SCALE` voxels and clipped to 1 (normal glands reach about 0.6 at 64³),
    so that a model sees the gland's thickness (the clinical sign of hyperplasia) as
    intensity; the 32³ rows area-resize these maps.
    """
    out = {}
    for split, images in data.items():
        maps = np.stack([distance_map(v[0] > 0.5) for v in images.images])[:, None]
        out[split] = ImageSet(np.minimum(maps / DISTANCE_SCALE, 1.0), images.labels, images.ids)
    return out


def row_inputs(
    spec: dict[str, Any], data: dict[str, ImageSet], cache: dict[str, Any]
) -> dict[str, ImageSet]:
    """A row's input: the masks or their distance maps, at the row's size."""
    if spec.get("input", "mask") == "distance":
        if "distance maps" not in cache:  # not a row name: the rows' detectors share the dict
            cache["distance maps"] = distance_inputs(data)
        data = cache["distance maps"]
    return at_size(data, spec.get("size"))


def at_size(data: dict[str, ImageSet], size: int | None) -> dict[str, ImageSet]:
    """The splits resampled to ``size``³ (area when smaller: the masks' partial volumes).

    ``None`` keeps the grid of the file (64³).
    """
    side = data["train"].images.shape[-1]
    if size is None or size == side:
        return data
    mode = "area" if size < side else "nearest"
    out = {}
    for split, images in data.items():
        volumes = torch.nn.functional.interpolate(
            torch.from_numpy(images.images), size=(size,) * 3, mode=mode
        )
        out[split] = ImageSet(volumes.numpy(), images.labels, images.ids)
    return out


# -- training ---------------------------------------------------------------------------------
def spec_of(name: str, epochs: int | None, quick: bool) -> dict[str, Any]:
    """The row's settings with the command line's overrides applied."""
    spec = copy.deepcopy(MODELS[name])
    if "engine" in spec:
        if epochs or quick:
            spec["engine"]["epochs"] = epochs or QUICK["epochs"]
        spec["engine"].update(progress=False, seed=spec["engine"].get("seed", 0))
    return spec


def train_or_load(
    name: str, spec: dict[str, Any], data: dict[str, ImageSet], out: Path, retrain: bool
) -> tuple[Any, dict[str, Any]]:
    """Fit the row's detector (or load it when the same settings were trained before)."""
    run_dir = out / name
    record_path = run_dir / "bench.json"
    settings = {"spec": spec, "n_train": len(data["train"])}
    if not retrain and (run_dir / "model.safetensors").exists() and record_path.exists():
        record = json.loads(record_path.read_text())
        if record["settings"] == json.loads(json.dumps(settings)):
            print(
                f"  {name}: loading {run_dir / 'model.safetensors'} (trained before; --retrain to redo)"  # noqa: E501
            )
            return medanomaly.load_model(run_dir), record
        print(f"  {name}: {run_dir} holds other settings; retraining")
    params = dict(spec["params"])
    if "encoder_run" in params:  # the run of another row of this benchmark
        params["encoder_run"] = str(out / params["encoder_run"])
    detector = medanomaly.get_model(spec["model"], spatial_dims=3, **params, engine=spec["engine"])
    start = time.perf_counter()
    detector.fit(data["train"], val=data["val"], run_dir=run_dir)
    record = {"settings": settings, "seconds": time.perf_counter() - start}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return detector, record


def rescored(base: Any, settings: dict[str, Any], data: dict[str, ImageSet]) -> Any:
    """``base``'s trained detector with other scoring settings; the network is unchanged."""
    detector = copy.copy(base)
    for key, value in settings.items():
        setattr(detector, key, value)
    if "map_score" in settings:
        # what fit() does last: per-voxel scale of the normal training residuals (no augmentation)
        detector._fit_map_statistics(data["train"])
    detector.calibrate(data["val"].normal)  # e.g. a latent density's re-standardisation
    return detector


def kept_epoch(history: list[dict[str, float]], monitor: str) -> int | None:
    """The epoch whose weights ``fit`` kept (the engine's ranking: val AUROC or val loss)."""
    if not history:
        return None

    def rank(row: dict[str, float]) -> tuple[float, float]:
        loss = row.get("val_loss", row["train_loss"])
        if monitor == "val_auroc" and "val_auroc" in row:
            return (-row["val_auroc"], loss)
        return (loss, 0.0)

    return int(min(history, key=rank)["epoch"])


# -- evaluation -------------------------------------------------------------------------------
def evaluate(detector: Any, data: dict[str, ImageSet]) -> dict[str, Any]:
    """Youden cut-off on validation; test metrics at it; scores kept for the ROC figure."""
    val_scores = detector.score(data["val"])
    threshold = youden_threshold(data["val"].labels, val_scores)
    start = time.perf_counter()
    test_scores = detector.score(data["test"])
    score_seconds = time.perf_counter() - start
    metrics = image_metrics(data["test"].labels, test_scores, threshold)
    val_metrics = image_metrics(data["val"].labels, val_scores, threshold)
    return {
        **{key: metrics[key] for key in TABLE_KEYS},
        "auroc_ci": list(bootstrap_auroc_ci(data["test"].labels, test_scores)),
        "precision": metrics["precision"],
        "confusion_matrix": metrics["confusion_matrix"],
        "threshold": threshold,
        "val_auroc": val_metrics["auroc"],
        "val_sensitivity": val_metrics["sensitivity"],
        "val_specificity": val_metrics["specificity"],
        "test_score_seconds": score_seconds,
        "test_scores": test_scores.tolist(),
    }


def scoring_speed(
    detector: Any, test: ImageSet, threads: int, repeats: int = SPEED_REPEATS
) -> dict[str, Any]:
    """Volumes per second of ``detector.score`` over the test set with ``threads`` threads.

    The fastest of ``repeats`` passes is reported (on a shared CPU the others are slowed by
    other jobs); every pass's seconds are kept.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    passes = []
    try:
        detector.score(test.images[:4])  # warm-up: allocations, kernel selection
        for _ in range(repeats):
            start = time.perf_counter()
            detector.score(test)
            passes.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {
        "volumes_per_s": len(test) / min(passes),
        "volumes": len(test),
        "seconds": min(passes),
        "pass_seconds": passes,
        "threads": threads,
        "batch_size": detector.inference_batch_size(int(np.prod(test.images.shape[1:]))),
    }


def run_row(
    name: str,
    args: argparse.Namespace,
    data: dict[str, ImageSet],
    trained: dict[str, Any],
    results: dict[str, dict[str, Any]],
) -> dict[str, Any] | None:
    """Train (or load) and evaluate one row; ``None`` with a note when it cannot run."""
    spec = spec_of(name, args.epochs, args.quick)
    if "from" in spec:
        base = spec["from"]
        if base not in trained:
            print(f"  {name}: skipped ({base} is not among the models run)")
            return None
        sized = row_inputs(MODELS[base], data, trained)
        detector = rescored(trained[base], spec["set"], sized)
        row = {**evaluate(detector, sized), "model": results[base]["model"], "from": base}
        row.update(settings=spec["set"], seconds=results[base]["seconds"])
        row.update(epochs=results[base]["epochs"], epoch_kept=results[base]["epoch_kept"])
        row.update(size=results[base]["size"], baseline=results[base]["baseline"])
        row.update(input=results[base]["input"])
        return row
    needs = spec["params"].get("encoder_run")
    if needs and needs not in trained:
        print(f"  {name}: skipped (needs the trained {needs} row)")
        return None
    sized = row_inputs(spec, data, trained)
    detector, record = train_or_load(name, spec, sized, args.out, args.retrain)
    trained[name] = detector
    history = detector.history_
    monitor = "–" if detector.baseline else detector.engine_config.monitor
    row = evaluate(detector, sized)
    row.update(
        model=spec["model"],
        params=spec["params"],
        engine=spec["engine"],
        size=int(sized["train"].images.shape[-1]),
        input=spec.get("input", "mask"),
        baseline=is_baseline(spec["model"]),
        seconds=record["seconds"],
        epochs=len(history),
        epoch_kept=kept_epoch(history, monitor),
        monitor=monitor,
        train_volumes_per_s=len(sized["train"]) * len(history) / record["seconds"],
    )
    return row


# -- tables -----------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _row_cells(r: dict[str, Any]) -> list[str]:
    low, high = r["auroc_ci"]
    ci = f" ({low:.3f}–{high:.3f})" if low is not None else ""
    how = f"re-scored {r['from']}" if "from" in r else f"{r['monitor']}"
    kept = "–" if r["baseline"] else f"{r['epoch_kept']} / {r['epochs']}"
    return [
        f"{r['size']}³" + (", distance map" if r.get("input") == "distance" else ""),
        f"{r['auroc']:.3f}{ci}",
        _pct(r["sensitivity"]),
        _pct(r["specificity"]),
        _pct(r["accuracy"]),
        f"{r['f1']:.3f}" if r["f1"] is not None else "–",
        f"{r['val_auroc']:.3f}",
        kept,
        how,
        f"{r['seconds'] / 60:.1f} min",
    ]


def results_markdown(summary: dict[str, Any]) -> str:
    """The results table, with Chung & Choi's (2023) figures and the target."""
    rows, speed, n = summary["rows"], summary.get("speed"), summary["counts"]
    lines = [
        "AdrenalMNIST3D (`benchmarks/adrenal3d.py`): train on the normal training volumes "
        f"({n['train']}), epoch and Youden cut-off chosen on the validation split "
        f"({n['val_normal']} normal / {n['val_abnormal']} abnormal), metrics on the test split "
        f"({n['test_normal']} normal / {n['test_abnormal']} abnormal). "
        f"{summary['threads']} torch CPU thread(s) on a CPU shared with other jobs, so times "
        "are upper bounds." + (" **Quick smoke run: few volumes, 1 epoch.**" * summary["quick"]),
        "",
        "| row | grid | test AUROC (95 % CI) | sensitivity | specificity | accuracy | F1 | "
        "val AUROC | epoch kept / run | epoch chosen by | training |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = f"*{name} (no model)*" if r["baseline"] else name
        lines.append(f"| {label} | " + " | ".join(_row_cells(r)) + " |")
    seed = SEED_000
    lines.append(
        f"| Chung & Choi 2023 (3D VAE, orbital CT) | 64³ | {seed['auroc']:.3f} | "
        f"{_pct(seed['sensitivity'])} | {_pct(seed['specificity'])} | – | – | – | – | – | – |"
    )
    lines += ["", "Italic rows are no-model baselines, fitted and cut the same way.", ""]
    lines += verdict_lines(rows)
    lines += [
        "",
        "Cut-off: Youden's J on the validation scores (Chung & Choi's (2023) ROC cut-off), applied "
        "unchanged to the test scores. `*_map` rows re-score the trained network of the row "
        f"named in 'epoch chosen by' with `map_score: {MAP_SCORE}` (per-voxel standardised, "
        "5-voxel box-smoothed residual, mean of the top 1 %); `*_sum` rows score by the sum of "
        "the map (dae) or by the latent score plus the VAE's own (latent density); same "
        "weights, same training time.",
    ]
    if summary.get("skipped"):
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in summary["skipped"].items())]
    if speed:
        lines += [
            "",
            f"VAE-3D (`{speed.get('model', 'vae')}`) speed at {speed.get('size', 64)}³: "
            f"training {speed['train_volumes_per_s']:.1f} volumes/s "
            f"({speed['train_volumes']} normal volumes x {speed['epochs']} epochs in "
            f"{speed['train_seconds']:.0f} s, validation passes included, "
            f"{summary['threads']} thread(s)); scoring {speed['volumes_per_s']:.1f} volumes/s "
            f"({speed['volumes']} test volumes in {speed['seconds']:.1f} s, fastest of "
            f"{len(speed['pass_seconds'])} passes, batches of "
            f"{speed['batch_size']}, {speed['threads']} thread(s)); scoring target "
            f"≥ 20 volumes/s: **{'met' if speed['volumes_per_s'] >= 20 else 'missed'}**.",
        ]
    return "\n".join(lines) + "\n"


def verdict_lines(rows: dict[str, Any]) -> list[str]:
    """The model chosen on validation, the targets, and which models beat the no-model rows."""
    models = {k: r for k, r in rows.items() if not r["baseline"]}
    baselines = {k: r["auroc"] for k, r in rows.items() if r["baseline"]}
    if not models:
        return []
    chosen = max(models, key=lambda k: models[k]["val_auroc"])  # never by the test split
    test = models[chosen]["auroc"]
    lines = [
        f"- Model chosen by validation AUROC: `{chosen}` (validation "
        f"{models[chosen]['val_auroc']:.3f}, test {test:.3f})."
    ]
    goals = ((SEED_000["auroc"], "Chung & Choi's (2023) 0.80"), (TARGET_AUROC, "moonshot"))
    for goal, label in goals:
        lines.append(f"- Its test AUROC ≥ {goal:.2f} ({label}): "
                     f"**{'met' if test >= goal else 'missed'}**.")  # fmt: skip
    for name, value in baselines.items():
        above = sorted(k for k, r in models.items() if r["auroc"] > value)
        lines.append(
            f"- Test AUROC above `{name}` (no model, {value:.3f}): "
            + (", ".join(f"`{k}`" for k in above) if above else "no model")
            + "."
        )
    return lines


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--data", type=Path, default=DATA, help="the adrenalmnist3d_64.npz file")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--epochs", type=int, help="override every trained model's epochs")
    parser.add_argument("--quick", action="store_true", help="smoke run: few volumes, 1 epoch")
    parser.add_argument("--retrain", action="store_true", help="ignore saved models")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--speed-threads", type=int, help="threads of the VAE scoring speed (default: --threads)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.exists():
        print(
            f"error: {args.data} not found: put AdrenalMNIST3D (adrenalmnist3d_64.npz, see "
            "../shared/data/adrenal3d/SOURCE.txt) there or pass --data PATH",
            file=sys.stderr,
        )
        return 1
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    data = load_splits(args.data, args.quick)
    counts = {"train": len(data["train"])}
    for split in ("val", "test"):
        counts[f"{split}_normal"] = int((data[split].labels == 0).sum())
        counts[f"{split}_abnormal"] = int((data[split].labels == 1).sum())
    print(f"data: {counts}")
    args.out.mkdir(parents=True, exist_ok=True)
    trained: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    speed = None
    for name in args.models:
        start = time.perf_counter()
        print(f"{name}: start ({time.strftime('%H:%M:%S')})", flush=True)
        row = run_row(name, args, data, trained, results)
        if row is None:
            skipped[name] = "model not registered or base row not run"
            continue
        results[name] = row
        print(
            f"{name}: test AUROC {row['auroc']:.3f}, sens {_pct(row['sensitivity'])}, "
            f"spec {_pct(row['specificity'])} (val AUROC {row['val_auroc']:.3f}; epoch "
            f"{row['epoch_kept']}/{row['epochs']}; {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        # Chung & Choi's (2023) VAE, at the first size run
        if name in ("vae", "vae32") and speed is None:
            threads = args.speed_threads or args.threads
            size = MODELS[name].get("size")
            speed = scoring_speed(trained[name], at_size(data, size)["test"], threads)
            speed.update(
                model=name,
                size=size or 64,
                train_volumes_per_s=row["train_volumes_per_s"],
                train_volumes=len(data["train"]),
                epochs=row["epochs"],
                train_seconds=row["seconds"],
            )
            print(
                f"{name} speed: training {speed['train_volumes_per_s']:.1f} volumes/s, scoring "
                f"{speed['volumes_per_s']:.1f} volumes/s ({threads} threads)",
                flush=True,
            )
    test_labels = data["test"].labels
    curves = [(test_labels, np.asarray(r["test_scores"]), r["threshold"]) for r in results.values()]
    figure = plot_roc(curves, args.out / "roc_test.png", names=list(results), title="Test ROC")
    rows = {name: results_row(r, r.pop("baseline")) for name, r in results.items()}
    summary = {
        "benchmark": "adrenal3d",
        "dataset": "AdrenalMNIST3D 64^3 (MedMNIST v2), official splits",
        "protocol": "train on normal training volumes; epoch and Youden cut-off on validation; "
        "metrics on test",
        "quick": args.quick,
        "threads": args.threads,
        "counts": counts,
        "rows": rows,
        "skipped": skipped,
        "speed": speed,
        "seed_000": SEED_000,
        "target_auroc": TARGET_AUROC,
        "roc_figure": str(figure) if figure else None,
        "wall_seconds": time.perf_counter() - wall,
    }
    atomic_write_text(args.out / "results.json", json.dumps(summary, indent=1))
    markdown = results_markdown(summary)
    atomic_write_text(args.out / "results.md", markdown)
    print(markdown)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
