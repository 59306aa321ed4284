"""Fundus image quality (DRIMDB, Şevik et al. 2014): learn good images, flag bad and outliers.

Data: ../shared/data/fundus_quality_drimdb (125 good, 69 bad = ungradable, 22 outliers = not
a fundus; RGB JPEG 760x570, a date stamp burnt into the top right).

Protocol (unsupervised rows): there are no patient ids, so each image is its own group. The
good images are permuted with ``numpy.random.default_rng(repeat)`` and cut into 5 folds, for
2 repeats (2 x 5 CV). Each fold trains on the good images of the other 4 folds (the detector
holds out ``engine.val_fraction`` of them, at least ``engine.val_min``, for early stopping on
the normal validation loss and for its threshold, mean + 3 SD of their scores) and tests on
the good images of its fold, all 69 bad and all 22 outliers. No bad or outlier image is seen
in training, model selection or thresholding. Reported per row: test AUROC good vs
bad+outlier (``auroc``), good vs bad (``auroc_bad``), good vs outlier (``auroc_outlier``), the
sensitivity and specificity at the run's own threshold, ``outliers_above_good`` (the share
of folds in which every outlier scores above every good test image), and per-fold seconds.

Rows: every ``configs/*_fundus_2d.yaml`` (``quality`` and ``intensity`` are no-model
baselines); ``sharpness`` (no model: minus the log variance of the Laplacian of the green
channel inside the field of view, threshold mean + 3 SD of held-out good images); and
``fusion``, the best unsupervised model plus ``quality``, each score standardised by the mean
and SD of its own held-out good validation scores, summed, with the threshold mean + 3 SD of
the summed validation scores. A gallery of the highest-scoring test images of the first fold
of the best row, with its maps, goes to ``OUT/gallery.png``.

    .venv/bin/python benchmarks/fundus_quality.py [--models ...] [--repeats 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from medanomaly.cli import main as cli_main  # noqa: E402
from medanomaly.config import apply_overrides, build_detector, load_config  # noqa: E402
from medanomaly.data.loading import load_dataset  # noqa: E402
from medanomaly.detectors.base import standardisation  # noqa: E402
from medanomaly.detectors.registry import get_model_class  # noqa: E402
from medanomaly.detectors.thresholds import mean_sd_threshold  # noqa: E402
from medanomaly.io import read_image  # noqa: E402
from medanomaly.io.atomic import atomic_write_text  # noqa: E402
from medanomaly.models.classifier import SupervisedClassifier  # noqa: E402
from medanomaly.training.engine import EngineConfig, split_indices  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import is_baseline, mean_sd, results_row  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fundus_quality_drimdb"
SUFFIX = "_fundus_2d.yaml"
CONFIGS = {p.name.removesuffix(SUFFIX): p for p in sorted((ROOT / "configs").glob(f"*{SUFFIX}"))}
KINDS = ("good", "bad", "outlier")
EXTRA_ROWS = ("sharpness", "fusion")
GREEN = 1
TARGET_AUROC = 0.97
GALLERY_SIZE = 8


def list_images(folder: Path, subset: int | None) -> list[tuple[Path, str]]:
    """``(path, kind)`` of every image (the first ``subset`` of each kind when given)."""
    images = []
    for kind in KINDS:
        files = sorted((folder / kind).glob("*.jpg"))
        images += [(path, kind) for path in files[:subset]]
    return images


def write_manifest(images: list[tuple[Path, str]], out: Path) -> Path:
    """``path,label`` with label 0 for good and 1 for bad and outlier images."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "fundus_manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([str(path), int(kind != "good")] for path, kind in images)
    return manifest


def folds(kinds: np.ndarray, repeats: int, k: int) -> list[tuple[str, np.ndarray]]:
    """``(fold id, test mask of good images)`` of the repeated k-fold split of the good."""
    good = np.flatnonzero(kinds == "good")
    result = []
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(good)
        for fold, part in enumerate(np.array_split(order, k)):
            mask = np.zeros(len(kinds), bool)
            mask[part] = True
            result.append((f"r{repeat + 1}_f{fold + 1}", mask))
    return result


def config_of(name: str, epochs: int | None) -> dict[str, Any]:
    overrides = ["engine.progress=false"] + ([f"engine.epochs={epochs}"] if epochs else [])
    return apply_overrides(load_config(CONFIGS[name]), overrides)


def fold_metrics(
    scores: np.ndarray, kinds: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """AUROCs (good vs bad+outlier, vs bad, vs outlier) and the threshold's sensitivity etc."""
    abnormal = kinds != "good"

    def auroc(keep: np.ndarray) -> float | None:
        labels = abnormal[keep]
        return (
            float(roc_auc_score(labels, scores[keep])) if 0 < labels.sum() < len(labels) else None
        )

    good_scores = scores[kinds == "good"]
    outliers = scores[kinds == "outlier"]
    return {
        "auroc": auroc(np.ones(len(kinds), bool)),
        "auroc_bad": auroc(kinds != "outlier"),
        "auroc_outlier": auroc(kinds != "bad"),
        "sensitivity": float((scores[abnormal] > threshold).mean()),
        "specificity": float((good_scores <= threshold).mean()),
        "outliers_above_good": float(outliers.min() > good_scores.max()) if len(outliers) else None,
    }


def run_model(
    name: str, manifest: Path, kinds: np.ndarray, splits: list, out: Path, epochs: int | None
) -> dict[str, Any]:
    """Train ``name`` on the good images of each fold; keep each fold's scores and maps."""
    config = config_of(name, epochs)
    cache = out / "cache"
    train_all, _ = load_dataset(manifest, **config["data"], augment=True, strict=True, cache=cache)
    test_all, _ = load_dataset(manifest, **config["data"], strict=True, cache=cache)
    folds_out = []
    for fold_id, test_good in splits:
        start = time.perf_counter()
        detector = build_detector(config)
        detector.fit(train_all.subset((kinds == "good") & ~test_good, keep_augment=True))
        test = test_good | (kinds != "good")
        result = detector.detect(test_all.subset(test))
        seconds = time.perf_counter() - start
        metrics = fold_metrics(result.scores, kinds[test], detector.threshold_)
        folds_out.append(
            {
                "fold": fold_id,
                **metrics,
                "seconds": seconds,
                "epochs": len(detector.history_),
                "threshold": detector.threshold_,
                "val_scores": np.asarray(detector.val_scores_).tolist(),
                "test_index": np.flatnonzero(test).tolist(),
                "scores": result.scores.tolist(),
            }
        )
        if fold_id == splits[0][0]:
            np.save(out / f"maps_{name}.npy", np.asarray(result.maps, np.float32))
        print(f"  {name} {fold_id}: AUROC {metrics['auroc']:.3f} ({seconds:.0f} s)", flush=True)
    shape = list(test_all.images.shape[1:])
    return summarise(folds_out, is_baseline(config["model"]["name"]), shape)


def summarise(folds_out: list[dict[str, Any]], baseline: bool, shape: list[int]) -> dict:
    """One results row: ``{mean, sd}`` of each metric over the folds, and the folds."""
    keys = ("auroc", "auroc_bad", "auroc_outlier", "sensitivity", "specificity")
    metrics = {key: mean_sd([f[key] for f in folds_out]) for key in keys}
    above = [f["outliers_above_good"] for f in folds_out]
    return results_row(
        metrics,
        baseline,
        outliers_above_good=float(np.mean(above)) if above[0] is not None else None,
        seconds_per_fold=[round(f["seconds"], 1) for f in folds_out],
        epochs_per_fold=[f["epochs"] for f in folds_out],
        input_shape=shape,
        folds=folds_out,
    )


def sharpness_scores(images: np.ndarray) -> np.ndarray:
    """Minus the log variance of the Laplacian of the green channel inside the foreground."""
    scores = []
    for image in images:
        inside = ndimage.binary_erosion(image.max(axis=0) > 0.02, iterations=2)
        detail = ndimage.laplace(image[GREEN].astype(np.float64))[inside]
        scores.append(-np.log(detail.var() + 1e-12))
    return np.asarray(scores)


def run_sharpness(manifest: Path, kinds: np.ndarray, splits: list) -> dict[str, Any]:
    """The no-model sharpness row on the ``quality`` config's input (fixed 8-bit scale)."""
    config = config_of("quality", None)
    data, _ = load_dataset(manifest, **config["data"], strict=True, cache=manifest.parent / "cache")
    scores = sharpness_scores(np.asarray(data.images))
    engine = EngineConfig.from_any(config.get("engine"))
    folds_out = []
    for fold_id, test_good in splits:
        start = time.perf_counter()
        train = np.flatnonzero((kinds == "good") & ~test_good)
        _, held = split_indices(len(train), engine.val_fraction, engine.seed, engine.val_min)
        val_scores = scores[train[held]]
        threshold = mean_sd_threshold(val_scores, 3.0)
        test = test_good | (kinds != "good")
        metrics = fold_metrics(scores[test], kinds[test], threshold)
        folds_out.append(
            {
                "fold": fold_id,
                **metrics,
                "seconds": time.perf_counter() - start,
                "epochs": 0,
                "threshold": threshold,
                "val_scores": val_scores.tolist(),
                "test_index": np.flatnonzero(test).tolist(),
                "scores": scores[test].tolist(),
            }
        )
    return summarise(folds_out, True, list(data.images.shape[1:]))


def run_fusion(a: dict[str, Any], b: dict[str, Any], kinds: np.ndarray) -> dict[str, Any]:
    """Sum of two rows' scores, each standardised by its own validation normals, per fold."""
    folds_out = []
    for fa, fb in zip(a["folds"], b["folds"], strict=True):
        ma, sa = standardisation(fa["val_scores"])
        mb, sb = standardisation(fb["val_scores"])
        if len(fa["val_scores"]) == len(fb["val_scores"]):  # same held-out good images
            val = (np.asarray(fa["val_scores"]) - ma) / sa + (
                np.asarray(fb["val_scores"]) - mb
            ) / sb
            threshold = mean_sd_threshold(val, 3.0)
        else:
            threshold = 3.0 * np.sqrt(2.0)
        scores = (np.asarray(fa["scores"]) - ma) / sa + (np.asarray(fb["scores"]) - mb) / sb
        test = np.asarray(fa["test_index"])
        metrics = fold_metrics(scores, kinds[test], threshold)
        seconds = fa["seconds"] + fb["seconds"]
        folds_out.append({"fold": fa["fold"], **metrics, "seconds": seconds, "epochs": 0,
                          "scores": scores.tolist(), "test_index": test.tolist()})  # fmt: skip
    return summarise(folds_out, False, a["input_shape"])


def is_supervised(name: str) -> bool:
    """True for rows whose config names a supervised classifier (``densenet121``)."""
    model = load_config(CONFIGS[name])["model"]["name"]
    return issubclass(get_model_class(model), SupervisedClassifier)


def supervised_split(kinds: np.ndarray, seed: int = 0) -> np.ndarray:
    """``train``/``val``/``test`` per image: 60/20/20, stratified by kind (the slide deck)."""
    index = np.arange(len(kinds))
    train, rest = train_test_split(index, test_size=0.4, stratify=kinds, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=kinds[rest], random_state=seed)
    split = np.empty(len(kinds), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return split


def run_supervised(
    name: str, manifest: Path, kinds: np.ndarray, out: Path, epochs: int | None
) -> dict[str, Any]:
    """Train on the 60 % part, keep the epoch of minimum loss on the 20 % validation part."""
    config = config_of(name, epochs)
    cache = out / "cache"
    train_all, _ = load_dataset(manifest, **config["data"], augment=True, strict=True, cache=cache)
    eval_all, _ = load_dataset(manifest, **config["data"], strict=True, cache=cache)
    split = supervised_split(kinds)
    start = time.perf_counter()
    detector = build_detector(config)
    detector.fit(
        train_all.subset(split == "train", keep_augment=True), eval_all.subset(split == "val")
    )
    result = detector.detect(eval_all.subset(split == "test"))
    seconds = time.perf_counter() - start
    test_kinds = kinds[split == "test"]
    metrics = fold_metrics(result.scores, test_kinds, detector.threshold_)
    print(f"  {name} (60/20/20): AUROC {metrics['auroc']:.3f} ({seconds:.0f} s)", flush=True)
    np.save(out / f"maps_{name}.npy", np.asarray(result.maps, np.float32))
    fold = {
        "fold": "split", **metrics, "seconds": seconds, "epochs": len(detector.history_),
        "threshold": detector.threshold_, "val_scores": np.asarray(detector.val_scores_).tolist(),
        "test_index": np.flatnonzero(split == "test").tolist(), "scores": result.scores.tolist(),
    }  # fmt: skip
    row = summarise([fold], False, list(eval_all.images.shape[1:]))
    flagged, abnormal = result.scores > detector.threshold_, test_kinds != "good"
    hits = int((flagged & abnormal).sum())
    row["accuracy"] = float((flagged == abnormal).mean())
    row["precision"] = hits / max(int(flagged.sum()), 1)
    row["f1"] = 2 * hits / max(int(flagged.sum() + abnormal.sum()), 1)
    row["protocol"] = "60/20/20 split stratified by kind (seed 0); epoch of minimum val loss"
    return row


def screen_block(images: list[tuple[Path, str]], out: Path) -> dict[str, Any]:
    """``medanomaly fit`` a quality run on every good image, then ``medanomaly screen`` all.

    The good images are screened in-sample (the run was trained on them); the bad and
    outlier images were never seen.
    """
    good = out / "screen_good.csv"
    every = out / "screen_all.csv"
    for path, rows in (
        (good, [p for p, k in images if k == "good"]),
        (every, [p for p, _ in images]),
    ):
        atomic_write_text(path, "path\n" + "".join(f"{p}\n" for p in rows))
    run, screened = out / "screen_run_quality", out / "screen_quality"
    config = str(CONFIGS["quality"])
    if cli_main(["fit", "--config", config, "--data", str(good), "--out", str(run)]) != 0:
        raise RuntimeError("medanomaly fit failed")
    if cli_main(["screen", "--run", str(run), "--data", str(every), "--out", str(screened)]) != 0:
        raise RuntimeError("medanomaly screen failed")
    kind_of = {str(p): k for p, k in images}
    with open(screened / "screen.csv", newline="") as handle:
        ranked = sorted(csv.DictReader(handle), key=lambda r: int(r["rank"]))
    n_bad = sum(k != "good" for _, k in images)
    top = [kind_of[r["id"]] for r in ranked[:n_bad]]
    flagged = [kind_of[r["id"]] for r in ranked if r["flagged"] == "1"]
    return {
        "run": "quality trained on every good image (good images screened in-sample)",
        "top_n": n_bad,
        "top_n_outliers": top.count("outlier"),
        "top_n_bad": top.count("bad"),
        "precision_at_top_n": (n_bad - top.count("good")) / n_bad,
        "flagged": len(flagged),
        "flagged_precision": (len(flagged) - flagged.count("good")) / max(len(flagged), 1),
        "flagged_recall": (len(flagged) - flagged.count("good")) / n_bad,
    }


def gallery(
    name: str, row: dict[str, Any], images: list[tuple[Path, str]], out: Path, size: int
) -> Path | None:
    """The highest-scoring test images of the first fold of ``name`` with their maps."""
    maps_file = out / f"maps_{name}.npy"
    if not maps_file.exists():
        return None
    maps = np.load(maps_file)
    fold = row["folds"][0]
    order = np.argsort(fold["scores"])[::-1][:size]
    fig, axes = plt.subplots(2, len(order), figsize=(2.2 * len(order), 4.6))
    for column, position in enumerate(order):
        path, kind = images[fold["test_index"][position]]
        photo = read_image(path, keep_channels=True).array[:3]
        photo = np.moveaxis(photo / 255.0, 0, -1).clip(0, 1)
        heat = np.asarray(maps[position], np.float32)
        axes[0, column].imshow(photo)
        axes[0, column].set_title(f"{kind} {fold['scores'][position]:.2f}", fontsize=8)
        axes[1, column].imshow(photo, alpha=0.6)
        extent = (0, photo.shape[1], photo.shape[0], 0)
        axes[1, column].imshow(heat, cmap="inferno", alpha=0.6, extent=extent)
        for ax in axes[:, column]:
            ax.axis("off")
    fig.suptitle(f"fundus quality: highest {name} scores, test fold {fold['fold']}", fontsize=9)
    fig.tight_layout()
    target = out / "gallery.png"
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target


def _number(value: Any) -> str:
    if isinstance(value, dict):
        if value.get("mean") is None:
            return "–"
        sd = value.get("sd")
        return f"{value['mean']:.3f}" + ("" if sd is None else f" ± {sd:.3f}")
    return "–" if value is None else f"{value:.3f}"


def results_markdown(
    rows: dict[str, dict[str, Any]], protocol: str, screen: dict[str, Any] | None = None
) -> str:
    """The results table and how each model fares against the no-model rows."""
    lines = [
        f"Fundus quality (DRIMDB), `benchmarks/fundus_quality.py`: {protocol}; "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        "| row | AUROC good vs bad+outlier | vs bad | vs outlier | sensitivity | specificity "
        "| outliers above all good | input | s per fold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = f"*{name} (no model)*" if r["baseline"] else name
        cells = [_number(r[k]) for k in ("auroc", "auroc_bad", "auroc_outlier")]
        cells += [_number(r[k]) for k in ("sensitivity", "specificity")]
        above = "–" if r["outliers_above_good"] is None else f"{r['outliers_above_good']:.0%}"
        shape = "×".join(str(n) for n in r["input_shape"])
        seconds = np.mean(r["seconds_per_fold"])
        lines.append(f"| {label} | {' | '.join(cells)} | {above} | {shape} | {seconds:.0f} |")
    lines += ["", "Italic rows are no-model baselines, run under the same protocol.", ""]
    lines += verdict_lines(rows)
    for name, r in rows.items():
        if "protocol" in r:
            lines.append(
                f"- `{name}` (supervised, {r['protocol']}): accuracy {r['accuracy']:.3f}, "
                f"precision {r['precision']:.3f}, F1 {r['f1']:.3f}."
            )
    if screen:
        lines.append(
            f"- `medanomaly screen` ({screen['run']}): the top {screen['top_n']} hold "
            f"{screen['top_n_outliers']} outliers and {screen['top_n_bad']} bad images "
            f"(precision {screen['precision_at_top_n']:.3f}); {screen['flagged']} flagged above "
            f"mean + 3 SD, precision {screen['flagged_precision']:.3f}, recall "
            f"{screen['flagged_recall']:.3f}."
        )
    return "\n".join(lines) + "\n"


def verdict_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The best row against the target, and where a model loses to ``quality``."""
    mean = {k: r["auroc"]["mean"] or 0.0 for k, r in rows.items()}
    best = max(mean, key=mean.get)
    lines = [
        f"- Best row: `{best}` (AUROC {mean[best]:.3f}); target ≥ {TARGET_AUROC}: "
        f"**{'met' if mean[best] >= TARGET_AUROC else 'missed'}**."
    ]
    if "quality" in mean:
        below = sorted(
            k for k, r in rows.items() if not r["baseline"] and mean[k] <= mean["quality"]
        )
        lines.append(
            f"- Models not above `quality` (no model, AUROC {mean['quality']:.3f}): "
            f"{', '.join(f'`{k}`' for k in below) or 'none'}."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = [*CONFIGS, *EXTRA_ROWS]
    parser.add_argument("--models", nargs="+", default=choices, choices=choices)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, help="override engine.epochs (quick runs)")
    parser.add_argument("--subset", type=int, help="first N images of each kind (quick runs)")
    parser.add_argument("--max-folds", type=int, help="run only the first N folds (CPU time)")
    parser.add_argument("--screen", action="store_true", help="also fit + screen the folder")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_fundus_quality")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"skipped: {args.data} not found (needs ../shared/data beside the repo)")
        return 0
    images = list_images(args.data, args.subset)
    kinds = np.array([kind for _, kind in images])
    manifest = write_manifest(images, args.out)
    splits = folds(kinds, args.repeats, args.folds)[: args.max_folds]
    protocol = (
        f"{args.repeats} x {args.folds} CV over the good images ({(kinds == 'good').sum()} good, "
        f"{(kinds == 'bad').sum()} bad, {(kinds == 'outlier').sum()} outliers), trained on good "
        "only, threshold mean + 3 SD of held-out good images"
        + (f"; only the first {len(splits)} fold(s) run" if args.max_folds else "")
    )
    print(protocol, flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for name in [m for m in args.models if m in CONFIGS]:
        if is_supervised(name):
            rows[name] = run_supervised(name, manifest, kinds, args.out, args.epochs)
        else:
            rows[name] = run_model(name, manifest, kinds, splits, args.out, args.epochs)
    if "sharpness" in args.models:
        rows["sharpness"] = run_sharpness(manifest, kinds, splits)
    models = [
        k for k, r in rows.items() if not r["baseline"] and k in CONFIGS and not is_supervised(k)
    ]
    best = max(models, key=lambda k: rows[k]["auroc"]["mean"] or 0.0) if models else None
    if "fusion" in args.models and best and "quality" in rows:
        rows[f"fusion ({best} + quality)"] = run_fusion(rows[best], rows["quality"], kinds)
    mapped = [k for k in rows if k in CONFIGS and not is_supervised(k)]
    top = max(mapped, key=lambda k: rows[k]["auroc"]["mean"] or 0.0) if mapped else None
    picture = gallery(top, rows[top], images, args.out, GALLERY_SIZE) if top else None
    summary = {
        "benchmark": "fundus_quality",
        "protocol": protocol,
        "rows": rows,
        "target_auroc": TARGET_AUROC,
        "gallery": None if picture is None else picture.name,
        "screen": screen_block(images, args.out) if args.screen else None,
    }
    atomic_write_text(args.out / "results.json", json.dumps(summary, indent=1))
    markdown = results_markdown(rows, protocol, summary["screen"])
    atomic_write_text(args.out / "results.md", markdown)
    print(markdown)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
