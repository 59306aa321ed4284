"""Supervised baseline (Lin et al. 2021) beside the unsupervised CAE on the same test splits.

What labels buy: Lin et al.'s (2021) VGG-like (network A) and ResNet-like (network B) classifiers
against the convolutional autoencoder (the UAD slide deck) on two labelled sets:

* ``head_ct``: ../shared/data/head_ct_hemorrhage, 100 hemorrhage / 100 normal 2D slices
  (``labels.csv``); every image is its own group.
* ``lgg``: ../shared/data/lgg_mri_2d/kaggle_3m, FLAIR channel of 1112 slices of 30 LGG
  patients; a slice is abnormal when its FLAIR-abnormality mask is not empty. Splits are
  grouped by patient (folder), so no patient is on both sides.

Protocol (Lin et al. 2021):

1. Held-out test split: the first fold of a stratified, grouped 5-fold split
   (scikit-learn ``StratifiedGroupKFold``, shuffled with random_state 0): 20 % of the images
   (of the patients, for LGG).
2. Hyper-parameter choice: ``--folds`` (5) -fold stratified, grouped CV on the rest over the
   learning rates ``--lrs``; each fold trains for the fixed number of epochs and is scored
   by its validation AUROC; the learning rate with the best mean AUROC is chosen, per network.
3. Retraining on the whole training part with the chosen learning rate, ``--runs`` (4) times
   with seeds 0..N-1; test accuracy, precision, sensitivity, specificity and F1 at
   P(abnormal) > 0.5, and AUROC, as mean ± SD (ddof 1) over the runs.
4. The CAE on the same test images: head CT with ``configs/cae_head_ct_2d.yaml`` (its own
   pipeline: 64x64, min-max, augmentation, early stopping on 10 % of the training normals,
   mean + 3 SD threshold), trained on the normal training slices; LGG with that config's
   model and engine on the classifiers' preprocessing (the centred 64x64 crop the classifiers
   see at test time), trained on the tumour-free slices of the training patients.
   ``--cae-runs`` runs (seeds 0..).

Preprocessing: head CT as in ``configs/*_supervised_head_ct.yaml`` (foreground crop, resize,
per-image z-score as in Lin et al. 2021); LGG: resize and per-image min-max to [0, 1] for the
classifiers and the CAE alike (the CAE's sigmoid output needs [0, 1]; a z-scored LGG CAE with
a linear output did worse, AUROC 0.46 against 0.53).
5. ``OUT/report.html``: the tables and a gallery of test cases (occlusion sensitivity and
   Grad-CAM of the first retrained model of each network; LGG with the tumour mask).

Fast defaults, so that everything runs in about 15 minutes on 2 CPU cores: inputs resized to
72x72 and cropped to 64x64 (Lin et al. 2021: 164 -> 128), channel widths divided by 8 (8 -> 64
instead of 64 -> 512, FC 64/32/16 instead of 512/256/128), batch size 16 (seed: 64), 40
epochs on head CT and 30 on LGG (seed: 300 / 400) with the learning-rate decay at the same
fraction of training as in the paper (5/6 for A, 3/4 for B), learning rates {1e-3, 3e-4},
every second slice of the LGG training patients (all test slices are kept), the LGG CAE
capped at 60 epochs. ``--paper-sizes`` switches to Lin et al.'s (2021) sizes, widths, batch size and
epochs (hours on a CPU; meant for a GPU). ``--lgg-slices 5`` gives the classifiers 2.5D input
(5 adjacent FLAIR slices as channels, as in the paper) instead of single slices.

    .venv/bin/python benchmarks/supervised.py --out OUT [--datasets head_ct lgg] [--paper-sizes]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from sklearn.model_selection import StratifiedGroupKFold

from medanomaly.config import build_detector, load_config
from medanomaly.data.loading import load_dataset
from medanomaly.data.sets import ImageSet
from medanomaly.data.slabs import volume_slabs
from medanomaly.detectors.explain import save_explanation_figure
from medanomaly.evaluation import image_metrics
from medanomaly.evaluation.report import Figure, Figures, Table, Text, write_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIGS = {
    "vgg_classifier": ROOT / "configs" / "vgg_supervised_head_ct.yaml",
    "resnet_classifier": ROOT / "configs" / "resnet_supervised_head_ct.yaml",
}
CAE_CONFIG = ROOT / "configs" / "cae_head_ct_2d.yaml"
NETWORKS = {"vgg_classifier": "VGG-like (A)", "resnet_classifier": "ResNet-like (B)"}
METRICS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auroc")
# Lin et al. 2021, Table 2 (orbital MRI, 4 runs, mean +- SD) and the AUC of Fig. 3.
SEED_001 = {
    "vgg_classifier": {
        "accuracy": (0.863, 0.055),
        "precision": (0.680, 0.124),
        "sensitivity": (0.750, 0.136),
        "specificity": (0.896, 0.042),
        "f1": (0.712, 0.121),
        "auroc": (0.922, None),
    },
    "resnet_classifier": {
        "accuracy": (0.855, 0.018),
        "precision": (0.640, 0.033),
        "sensitivity": (0.821, 0.071),
        "specificity": (0.865, 0.021),
        "f1": (0.719, 0.040),
        "auroc": (0.922, None),
    },
}
FAST = {"resize": 72, "crop": 64, "width": 8, "batch_size": 16, "lgg_train_step": 2}
SEED = {"resize": 164, "crop": 128, "width": 64, "batch_size": 64, "lgg_train_step": 1}
EPOCHS = {"head_ct": 40, "lgg": 30}


# -- data -----------------------------------------------------------------------------------
def head_ct_manifest(out: Path) -> Path:
    """``path,label,group`` of the 200 head CT slices (each image its own group)."""
    folder = DATA / "head_ct_hemorrhage"
    with open(folder / "labels.csv", newline="") as handle:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(handle)]
    manifest = out / "head_ct_manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        for row in sorted(rows, key=lambda r: r["id"]):
            writer.writerow([folder / f"{row['id']}.png", row["hemorrhage"], row["id"]])
    return manifest


def lgg_manifest(out: Path, root: Path | None = None) -> Path:
    """``path,label,mask,group`` of the LGG slices; label 1 = non-empty FLAIR mask.

    ``root`` (default ``../shared/data/lgg_mri_2d/kaggle_3m``) holds one folder per patient
    with ``*_N.tif`` slices and ``*_N_mask.tif`` masks, as ``kaggle_3m``.
    """
    root = DATA / "lgg_mri_2d" / "kaggle_3m" if root is None else Path(root)
    patients = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not any(any(p.glob("*_mask.tif")) for p in patients):
        raise FileNotFoundError(
            f"{root}: no patient folders with *_N.tif / *_N_mask.tif slices (laid out like "
            "kaggle_3m: one folder per patient)"
        )
    manifest = out / "lgg_manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "mask", "group"])
        for patient in patients:
            for mask in sorted(patient.glob("*_mask.tif"), key=_slice_number):
                image = mask.with_name(mask.name.replace("_mask", ""))
                label = int(tifffile.imread(mask).any())
                writer.writerow([image, label, mask, patient.name])
    return manifest


def _slice_number(path: Path) -> int:
    return int(re.findall(r"_(\d+)(?:_mask)?\.tif$", path.name)[0])


def load_images(name: str, out: Path, resize: int, slices: int) -> ImageSet:
    """The classifiers' input (see the module docstring)."""
    transforms: list[Any] = [{"resize": {"shape": [resize, resize], "mode": "area"}}]
    if name == "head_ct":
        transforms = [
            {"crop": {"foreground": True, "threshold": 10.0, "margin": 2}},
            *transforms,
            {"z_score": {}},
        ]
        images, _ = load_dataset(head_ct_manifest(out), transforms=transforms, strict=True)
        return images
    transforms.append({"min_max": {"output": [0.0, 1.0]}})
    read = {"channel": 1}  # FLAIR
    images, _ = load_dataset(lgg_manifest(out), transforms, read_options=read, strict=True)
    return stack_neighbours(images, slices) if slices > 1 else images


def stack_neighbours(images: ImageSet, k: int) -> ImageSet:
    """2.5D: replace each LGG slice by its ``k`` neighbours of the same patient as channels."""
    stacked = np.zeros((len(images), k, *images.images.shape[2:]), np.float32)
    for patient in np.unique(images.groups):
        index = np.flatnonzero(images.groups == patient)
        index = index[np.argsort([_slice_number(Path(images.ids[i])) for i in index])]
        volume = np.moveaxis(images.images[index], 0, -1)  # (1, H, W, slices)
        stacked[index] = volume_slabs(volume, k)
    return ImageSet(stacked, images.labels, images.ids, images.masks, None, images.groups)


def test_split(images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: first fold of a stratified, grouped, shuffled 5-fold split."""
    splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    return next(splitter.split(images.images, images.labels, images.groups))


def thin_slices(images: ImageSet, index: np.ndarray, step: int) -> np.ndarray:
    """Every ``step``-th slice (by slice number) of ``index``; all of them for step 1."""
    if step <= 1:
        return index
    return np.array([i for i in index if _slice_number(Path(images.ids[i])) % step == 0])


# -- classifiers ------------------------------------------------------------------------------
def classifier_config(
    network: str,
    settings: dict[str, Any],
    epochs: int | None,
    lr: float,
    seed: int,
    channels: int,
) -> dict[str, Any]:
    """The network's config with the benchmark's sizes, widths, epochs, lr and seed.

    ``epochs`` ``None`` keeps the config's (Lin et al. 2021: 300 for A, 400 for B); otherwise the
    learning-rate decay moves to the same fraction of training (250/300, 300/400).
    """
    config = load_config(CONFIGS[network])
    model, engine = config["model"], config["engine"]
    scale = settings["width"] / 64
    epochs = epochs or engine["epochs"]
    decay_at = model["lr_milestones"][0] / engine["epochs"]
    model.update(
        in_channels=channels,
        channels=[max(1, round(c * scale)) for c in model["channels"]],
        fc_features=[max(2, round(f * scale)) for f in model["fc_features"]],
        crop_size=[settings["crop"]] * 2,
        lr_milestones=[round(epochs * decay_at)],
    )
    engine.update(
        epochs=epochs, lr=lr, seed=seed, batch_size=settings["batch_size"], progress=False
    )
    return config


def cross_validate(
    network: str, images: ImageSet, args: argparse.Namespace, settings: dict[str, Any]
) -> dict[str, Any]:
    """Validation AUROC per learning rate (k-fold, stratified, grouped); the best one."""
    splitter = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=0)
    folds = list(splitter.split(images.images, images.labels, images.groups))
    results = {}
    for lr in args.lrs:
        config = classifier_config(network, settings, args.epochs_of, lr, 0, images.images.shape[1])
        aurocs = []
        for train, val in folds:
            detector = build_detector(config).fit(images.subset(train))
            scores = detector.score(images.subset(val))
            aurocs.append(image_metrics(images.labels[val], scores, 0.5)["auroc"])
        results[str(lr)] = {"auroc": _mean_sd(aurocs), "folds": aurocs}
        print(f"    CV {network} lr {lr:g}: AUROC {_text(results[str(lr)]['auroc'])}")
    best = max(args.lrs, key=lambda lr: results[str(lr)]["auroc"]["mean"])
    return {"per_lr": results, "chosen_lr": best}


def repeated_runs(
    network: str,
    train: ImageSet,
    test: ImageSet,
    lr: float,
    args: argparse.Namespace,
    settings: dict[str, Any],
) -> tuple[dict[str, Any], Any]:
    """Retrain ``args.runs`` times on the training part; test metrics per run and summary."""
    runs, first = [], None
    for seed in range(args.runs):
        config = classifier_config(
            network, settings, args.epochs_of, lr, seed, train.images.shape[1]
        )
        start = time.perf_counter()
        detector = build_detector(config).fit(train)
        seconds = time.perf_counter() - start
        metrics = image_metrics(test.labels, detector.score(test), detector.threshold_)
        runs.append({**{k: metrics[k] for k in METRICS}, "seconds": seconds, "seed": seed})
        first = first or detector
    return {"runs": runs, "summary": _summary(runs)}, first


# -- CAE --------------------------------------------------------------------------------------
def cae_runs(
    name: str,
    images: ImageSet,
    train_index: np.ndarray,
    test_index: np.ndarray,
    out: Path,
    args: argparse.Namespace,
    crop: int,
) -> dict[str, Any]:
    """The CAE trained on normal training images, scored on the same test images."""
    config = load_config(CAE_CONFIG)
    config["engine"]["progress"] = False
    if args.cae_epochs:
        config["engine"]["epochs"] = args.cae_epochs
    if name == "head_ct":
        cae_images, _ = load_dataset(
            head_ct_manifest(out), **config["data"], augment=True, strict=True
        )
    else:
        middle = images.images.shape[1] // 2  # the centre slice of a 2.5D stack
        cae_images = ImageSet(
            _centre(images.images[:, middle : middle + 1], crop), images.labels, images.ids
        )
        config["engine"]["epochs"] = min(config["engine"]["epochs"], args.cae_epochs or 60)
    train = cae_images.subset(train_index, keep_augment=True)
    test = cae_images.subset(test_index)
    runs = []
    for seed in range(args.cae_runs):
        config["engine"]["seed"] = seed
        start = time.perf_counter()
        detector = build_detector(config).fit(_normals(train))
        seconds = time.perf_counter() - start
        metrics = image_metrics(test.labels, detector.score(test), detector.threshold_)
        runs.append({**{k: metrics[k] for k in METRICS}, "seconds": seconds, "seed": seed})
        runs[-1]["epochs"] = len(detector.history_)
    return {"runs": runs, "summary": _summary(runs), "threshold": "mean + 3 SD of val normals"}


def _normals(images: ImageSet) -> ImageSet:
    return images.subset(images.labels == 0, keep_augment=True)


def _centre(images: np.ndarray, size: int) -> np.ndarray:
    starts = [(s - size) // 2 for s in images.shape[2:]]
    return images[:, :, starts[0] : starts[0] + size, starts[1] : starts[1] + size].copy()


# -- gallery ----------------------------------------------------------------------------------
def gallery(
    name: str, detectors: dict[str, Any], test: ImageSet, folder: Path, n_cases: int
) -> list[Figures]:
    """Occlusion and Grad-CAM maps of a few test cases per network (the first run's model)."""
    blocks = []
    for network, detector in detectors.items():
        scores = detector.score(test)
        cases = _pick_cases(test.labels, scores, n_cases)
        subset = test.subset(cases)
        occlusion = detector.explain(subset, "occlusion")
        cam = detector.explain(subset, "grad_cam")
        figures = []
        for row, case in enumerate(cases):
            maps = {"occlusion (drop of P)": occlusion[row], "Grad-CAM": cam[row]}
            if test.masks is not None:
                maps["tumour mask"] = test.masks[case].astype(np.float32)
            label = "abnormal" if test.labels[case] else "normal"
            title = f"{Path(test.ids[case]).name}: {label}, P(abnormal) = {scores[case]:.2f}"
            path = folder / f"{name}_{network}_{row}.png"
            save_explanation_figure(subset.images[row], maps, path, title=title)
            figures.append(Figure(path, title))
        note = "Red = high. Occlusion: mean drop of P(abnormal) when a gray patch covers the pixel."
        blocks.append(Figures(f"{name}: {NETWORKS[network]}", figures, note))
    return blocks


def _pick_cases(labels: np.ndarray, scores: np.ndarray, n: int) -> list[int]:
    """Most confident abnormal cases first, then the most and least confident normal ones."""
    abnormal = np.flatnonzero(labels == 1)[np.argsort(-scores[labels == 1])]
    normal = np.flatnonzero(labels == 0)[np.argsort(-scores[labels == 0])]
    picks = [*abnormal[: max(1, n - 2)], *normal[:1], *abnormal[-1:]]
    return list(dict.fromkeys(int(i) for i in picks))[:n]


# -- tables -----------------------------------------------------------------------------------
def _mean_sd(values: list[float | None]) -> dict[str, Any]:
    """Mean and SD (ddof 1) of the defined values; ``n`` of ``of`` were defined."""
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    out: dict[str, Any] = {"mean": None, "sd": None, "n": len(kept), "of": len(values)}
    if len(kept):
        out["mean"] = float(kept.mean())
        out["sd"] = float(kept.std(ddof=1)) if len(kept) > 1 else None
    return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: _mean_sd([r[k] for r in runs]) for k in METRICS}
    out["seconds"] = float(np.mean([r["seconds"] for r in runs]))
    return out


def _text(value: dict[str, float | None] | tuple) -> str:
    mean, sd = (value["mean"], value["sd"]) if isinstance(value, dict) else value
    if mean is None:
        return "–"
    text = f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"
    if isinstance(value, dict) and value["n"] < value["of"]:
        text += f" ({value['n']} of {value['of']} runs defined)"
    return text


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """Rows: each network, the CAE, then Lin et al.'s (2021) figures."""
    rows = []
    for network, block in result["classifiers"].items():
        summary = block["test"]["summary"]
        rows.append(
            [NETWORKS[network], *(_text(summary[k]) for k in METRICS),
             f"lr {block['cv']['chosen_lr']:g}", f"{summary['seconds']:.0f}"]
        )  # fmt: skip
    cae = result["cae"]["summary"]
    rows.append(["CAE (unsupervised)", *(_text(cae[k]) for k in METRICS), "–",
                 f"{cae['seconds']:.0f}"])  # fmt: skip
    for network, figures in SEED_001.items():
        rows.append(
            [
                f"Lin et al. 2021 {NETWORKS[network]} (orbit MRI)",
                *(_text(figures[k]) for k in METRICS),
             "–", "–"]
        )  # fmt: skip
    return rows


COLUMNS = ["model", "accuracy", "precision", "sensitivity", "specificity", "F1", "AUROC",
           "chosen", "train s"]  # fmt: skip


def results_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "Supervised baseline (Lin et al. 2021) vs the CAE, same test split "
        "(`benchmarks/supervised.py`)",
        "",
        f"Input {s['resize']}² → crop {s['crop']}² (random in training, centred at test), "
        f"width {s['width']}/64 of the paper's channels, batch {s['batch_size']}, "
        f"{s['folds']}-fold CV over lr {s['lrs']}, {s['runs']} runs; CAE {s['cae_runs']} run(s). "
        f"Wall time {results['wall_seconds']:.0f} s.",
    ]
    for name, result in results["datasets"].items():
        split = result["split"]
        lines += [
            "",
            f"**{name}** ({split['description']}; epochs {result['epochs']}; "
            f"{result['seconds']:.0f} s)",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += [
        "",
        "Classifiers: threshold P(abnormal) > 0.5. CAE: mean + 3 SD of held-out normal scores. "
        "Lin et al.'s (2021) figures are on another task "
        "(thyroid-eye-disease activity, orbital MRI).",
    ]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------
def run_dataset(
    name: str, args: argparse.Namespace, settings: dict[str, Any], out: Path
) -> tuple[dict[str, Any], list[Any]]:
    start = time.perf_counter()
    slices = args.lgg_slices if name == "lgg" else 1
    images = load_images(name, out, settings["resize"], slices)
    train_index, test_index = test_split(images)
    if name == "lgg":
        train_index = thin_slices(images, train_index, settings["lgg_train_step"])
    train, test = images.subset(train_index), images.subset(test_index)
    args.epochs_of = args.epochs or (None if args.paper_sizes else EPOCHS[name])
    split = {
        "n_train": len(train),
        "n_test": len(test),
        "test_abnormal": int(test.labels.sum()),
        "train_abnormal": int(train.labels.sum()),
        "test_groups": sorted(set(map(str, test.groups))) if name == "lgg" else None,
        "description": f"train {len(train)} ({int(train.labels.sum())} abnormal), "
        f"test {len(test)} ({int(test.labels.sum())} abnormal)"
        + (f", {len(set(test.groups))} test patients" if name == "lgg" else "")
        + (f", 2.5D {slices} slices" if slices > 1 else ""),
    }
    print(f"{name}: {split['description']}")
    classifiers, first_models = {}, {}
    for network in args.networks:
        cv = cross_validate(network, train, args, settings)
        test_block, first_models[network] = repeated_runs(
            network, train, test, cv["chosen_lr"], args, settings
        )
        classifiers[network] = {"cv": cv, "test": test_block}
        print(f"  {network}: test {_brief(test_block['summary'])}")
    cae = cae_runs(name, images, train_index, test_index, out, args, settings["crop"])
    print(f"  cae: test {_brief(cae['summary'])}")
    result = {
        "split": split,
        "epochs": args.epochs_of or "config (300 A / 400 B)",
        "classifiers": classifiers,
        "cae": cae,
        "seconds": time.perf_counter() - start,
    }
    figures = gallery(name, first_models, test, out / "gallery", args.gallery)
    return result, figures


def _brief(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_text(summary[k])}" for k in ("accuracy", "f1", "auroc"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_supervised")
    parser.add_argument("--datasets", nargs="+", default=["head_ct", "lgg"],
                        choices=["head_ct", "lgg"])  # fmt: skip
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4])
    parser.add_argument("--epochs", type=int, help="epochs of every classifier fit")
    parser.add_argument("--cae-runs", type=int, default=1)
    parser.add_argument(
        "--cae-epochs", type=int, help="CAE epochs (default: the config's; LGG at most 60)"
    )
    parser.add_argument("--lgg-slices", type=int, default=1, help="2.5D: slices per input")
    parser.add_argument("--gallery", type=int, default=4, help="test cases per network")
    parser.add_argument(
        "--paper-sizes", action="store_true", help="Lin et al.'s (2021) sizes and epochs"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not DATA.exists():
        print(f"skipped: {DATA} not found (needs ../shared/data beside the repo)")
        return 0
    settings = dict(SEED if args.paper_sizes else FAST)
    settings.update(folds=args.folds, runs=args.runs, lrs=args.lrs, cae_runs=args.cae_runs)
    out = args.out
    (out / "gallery").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {"settings": settings, "datasets": {}}
    blocks: list[Any] = []
    for name in args.datasets:
        results["datasets"][name], figures = run_dataset(name, args, settings, out)
        blocks += figures
    results["wall_seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    markdown = results_markdown(results)
    (out / "results.md").write_text(markdown)
    write_report(
        out / "report.html", "Supervised baseline (Lin et al. 2021)", _report(results, blocks)
    )
    print(markdown)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'report.html'}")
    return 0


def _report(results: dict[str, Any], gallery_blocks: list[Any]) -> list[Any]:
    blocks: list[Any] = [Text("Protocol", " ".join(__doc__.split()))]
    for name, result in results["datasets"].items():
        blocks.append(
            Table(f"{name}: test metrics (mean ± SD over runs)", COLUMNS, table_rows(result),
                  sortable=False, note=result["split"]["description"])
        )  # fmt: skip
    return blocks + gallery_blocks


if __name__ == "__main__":
    sys.exit(main())
