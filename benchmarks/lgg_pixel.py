"""Pixel-level detection of FLAIR lesions in brain MRI (LGG): models against the FLAIR intensity.

Data: ``--data DIR`` (default ../shared/data/lgg_mri_2d/kaggle_3m: 30 LGG patients, 1112
slices 256x256x3 TIFF: pre-contrast, FLAIR, post-contrast; ``*_mask.tif`` FLAIR-abnormality
masks, 349 slices with tumour), one folder per patient with ``*_N.tif`` and ``*_N_mask.tif``,
read through ``lgg_manifest`` (below) and the project's
``load_dataset`` (area resize to ``--size``, lesion masks nearest-neighbour).

Protocols (patient-grouped; a patient is never on two sides):

* ``cv`` (default): the sorted patients are permuted with ``default_rng(seed)`` and cut into
  ``--folds`` (5) test folds, so every patient is a test patient exactly once. In each fold,
  ``--n-val`` (4) validation patients are drawn from the training part
  (``default_rng(seed + 1 + fold)``), the others are training patients.
* ``split``: one fixed split (permutation with ``default_rng(seed)``: first 6 test, next 4
  validation, the other 20 training patients), the protocol of earlier versions.

In every fold the networks train on the tumour-free slices of the training patients only;
the validation patients (normal and tumour slices) choose the epoch (early stopping on their
normal slices), each row's map post-processing and its Dice cut-off; the test patients are
used for nothing but the reported numbers.

Preprocessing (every row sees the same input): FLAIR (``--channels flair``) or all three
channels (``--channels all``), area resize to ``--size``. Per patient, on the native 256^2
FLAIR: the head (``medanomaly.transforms.mask.head_masks``) and the brain (the
morphological ``brain_masks``: no network, no atlas; ``results.json`` reports the share of
lesion pixels it holds), area-resized to ``--size``. ``--region brain`` (default): the input
is skull-stripped (-1 outside the brain) and the metrics' foreground is the brain;
``--region head`` keeps scalp and skull. Each channel is divided by a per-volume scale taken
inside the foreground (``--scale median``: 3 x the median, robust to the tumour; ``p99.5``),
clipped to [0, 1] and mapped to [-1, 1].

Rows (``--rows``; defaults: ``cv`` runs intensity, dae, fpi and vae_residual, ``split`` all):

* ``intensity`` (**no model**, configs/intensity_lgg_2d.yaml): the FLAIR intensity
  standardised by the mean and SD inside the brains of the normal training slices; what a
  threshold on brightness finds (Meissen et al. 2021).
* ``dae`` (configs/dae_lgg_2d.yaml): denoising U-Net trained to remove coarse noise
  (Kascenas et al. 2022); map = median-filtered |x - f(x)| inside the eroded brain.
* ``fpi`` (configs/fpi_lgg_2d.yaml): U-Net trained on foreign patches of other normal
  slices blended into normal ones, map = predicted blend factor.
* ``vae_residual``, ``vae_pd``, ``introvae_*``, ``introvae_ls_*`` (Kobayashi et al. 2020): the VAE /
  IntroVAE (/ + latent search) residual and patch-discriminator maps, settings as the
  configs vae_lgg_2d.yaml, introvae_lgg_2d.yaml and patch_discriminator_lgg_2d.yaml (IntroVAE
  beta = 0.04 * (256 / size)^2, latent search ``--latent-steps`` at ``--latent-lr``; the
  embedding network is trained on normal patches only and serves every reconstructor).

Post-processing (every row alike, chosen per fold on the validation patients by pixel AP +
transfer Dice inside the foreground, the Dice of cut-offs carried from validation patient
to validation patient: each patient gets the best-Dice cut-off of the other validation
patients): the map as is or Gaussian-smoothed (sigma 1 or 2 px at 64^2, scaled with the
size) x the outer 0, 3 or 6 px of the foreground set to the map's minimum (edges dominate
residuals; the evaluated region stays the whole foreground) x as is or "patient-scaled"
(each patient's maps divided by their own 75th percentile inside the brain, so that one
cut-off suits every patient); residual rows also try the positive FLAIR residual
max(x - x_hat, 0), dae the positive residual max(x - f(x), 0), PD rows the raw (not
z-scored) distance map. ``untuned`` in ``results.json`` keeps the raw map's figures.

Metrics inside the foreground, over the test slices (tumour and tumour-free): pixel AUROC,
AP (average precision) and two Dice figures: ``dice_at_val_threshold`` (the cut-off that gave
the best Dice on the fold's validation patients, applied to its test patients) and
``best_dice`` (the oracle ⌈Dice⌉: the cut-off chosen on the test pixels themselves, as in
the literature). ``cv`` reports them pooled over all test folds (every slice of every
patient once, each fold's maps and scores divided by its validation cut-off so that the
folds' networks share one scale; Dice at the validation cut-off sums each fold's overlaps at
its own cut-off) and per fold as mean ± SD. Image AUROC: slice has tumour or not, scored by
the mean of the top 1 % of the map inside the foreground (PD rows: the detector's score).
Seconds: training of the row's networks + scoring of the validation and test slices, summed
over the folds.

Speed (``dae``, first fold, ``--threads`` threads): training slices/s = training slices x
epochs run / training seconds (validation passes included), scoring slices/s = the fastest
of 3 ``detect`` passes over the test slices, each also as a share of the fp32 matmul peak
measured in the same run (FLOPs per slice counted by ``torch.utils.flop_counter``).

Outputs: ``OUT/results.json`` (``rows``: row -> metrics with ``"baseline"``; ``folds``,
``split``, ``speed``, ``settings`` beside), ``OUT/results.md``, ``OUT/figures/*.png`` (input |
each row's map | mask for the test slices with the largest lesions). Each fold keeps its
trained models and test maps under ``OUT/folds/<fold>/``; a fold whose ``fold.json`` holds the
same settings is reused, and an interrupted training resumes (``--retrain`` starts afresh).

    .venv/bin/python benchmarks/lgg_pixel.py --out OUT [--protocol cv|split] [--data DIR]
        [--folds 5] [--size 64] [--rows ...] [--channels flair|all] [--region brain|head]
        [--epochs N] [--threads 2] [--quick] [--retrain]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from medanomaly.config import build_detector, load_config
from medanomaly.data.loading import ArrayAugment, load_dataset
from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import BaseDetector
from medanomaly.detectors.scoring import top_fraction_mean
from medanomaly.evaluation.pixel import pixel_metrics
from medanomaly.io.atomic import atomic_write_text
from medanomaly.transforms import build_transforms
from medanomaly.transforms.mask import brain_masks, head_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (benchmarks/common.py)
    fastest_pass,
    inference_flops,
    is_baseline,
    matmul_peak,
    mean_sd,
    results_row,
    speed_block,
    training_flops,
    training_throughput,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lgg_mri_2d" / "kaggle_3m"
CONFIGS = {
    name: ROOT / "configs" / f"{name}_lgg_2d.yaml"
    for name in ("intensity", "dae", "fpi", "vae", "introvae", "patch_discriminator")
}
DETECTORS = {
    "intensity": "no model: FLAIR intensity, standardised",
    "dae": "denoising U-Net (coarse noise)",
    "fpi": "foreign patch interpolation U-Net",
}
RECONSTRUCTORS = {"vae": "VAE", "introvae": "IntroVAE", "introvae_ls": "IntroVAE + latent search"}
MAPS = {"residual": "residual", "pd": "patch discriminator"}
RECON_ROWS = [f"{r}_{m}" for r in RECONSTRUCTORS for m in MAPS]
ROWS = [*DETECTORS, *RECON_ROWS]
DEFAULT_ROWS = {"cv": ["intensity", "dae", "fpi", "vae_residual"], "split": ROWS}
# Kobayashi et al. 2020, Table I: metastatic brain tumour, pixel ROC-AUC inside the body
# (mean +- SD).
SEED_002 = {"vae": (0.75, 0.16), "introvae": (0.76, 0.17), "introvae_ls": (0.78, 0.17)}
TARGETS = {"pixel_auroc": 0.95, "dice_margin": 0.05}
METRICS = ("pixel_auroc", "pixel_ap", "dice_at_val_threshold", "best_dice", "image_auroc")
FLAIR = 1
SMOOTHING = (0.0, 1.0, 2.0)  # Gaussian sigma in pixels at 64x64 (scaled with the size)
RIMS = (0, 3, 6)  # outer foreground rim set to the map's minimum, pixels at 64x64
PATIENT_PERCENTILE = 75.0  # the per-patient map scale of the "patient-scaled" variants
VARIANTS = 3  # version of the candidate set: saved folds of another version are re-scored
FOLD_FILE = "fold.json"
# the config's 200 (Kobayashi et al. 2020) with early stopping; CPU budget
DEFAULT_EPOCHS = {"vae": 100}
QUICK_PATIENTS = 6


# -- splits -----------------------------------------------------------------------------------
def split_patients(
    patients: list[str], n_val: int = 4, n_test: int = 6, seed: int = 0
) -> dict[str, list[str]]:
    """Seeded patient-level split: ``{"train", "val", "test"}`` -> sorted patient ids.

    The sorted unique patients are permuted with ``default_rng(seed)``; the first ``n_test``
    are test patients, the next ``n_val`` validation patients, the rest training patients.
    """
    unique = sorted({str(p) for p in patients})
    if n_val + n_test >= len(unique):
        raise ValueError(f"{len(unique)} patients cannot give {n_val} val + {n_test} test + train")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    return {
        "train": sorted(order[n_val + n_test :]),
        "val": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def cv_folds(
    patients: list[str], folds: int = 5, n_val: int = 4, seed: int = 0
) -> list[dict[str, list[str]]]:
    """Patient-grouped k-fold: every patient is a test patient exactly once.

    The sorted unique patients are permuted with ``default_rng(seed)`` and cut into
    ``folds`` near-equal test folds; from each fold's training part, ``n_val`` validation
    patients are drawn with ``default_rng(seed + 1 + fold)``.
    """
    unique = sorted({str(p) for p in patients})
    if folds < 2 or len(unique) < folds:
        raise ValueError(f"{len(unique)} patients cannot be cut into {folds} folds")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    out = []
    for k, test in enumerate(np.array_split(np.array(order), folds)):
        rest = [p for p in order if p not in set(test)]
        if n_val >= len(rest):
            raise ValueError(f"fold {k + 1}: {len(rest)} patients cannot give {n_val} val + train")
        rest = [rest[i] for i in np.random.default_rng(seed + 1 + k).permutation(len(rest))]
        test_ids = sorted(str(p) for p in test)
        out.append({"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": test_ids})
    return out


def split_index(groups: np.ndarray, split: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Slice indices of each part of a patient split."""
    return {name: np.flatnonzero(np.isin(groups, ids)) for name, ids in split.items()}


def fold_splits(patients: list[str], args: argparse.Namespace) -> dict[str, dict[str, list[str]]]:
    """``{fold name: split}`` of the protocol (``--quick``: a few patients)."""
    if args.quick:  # 6 patients: split 4 / 1 / 1, cv 3 folds of 2 test, 1 validation patient
        patients = sorted({str(p) for p in patients})
        patients = [
            patients[i] for i in np.random.default_rng(args.seed).permutation(len(patients))
        ]
        patients = patients[:QUICK_PATIENTS]
        if args.protocol == "split":
            return {"split": split_patients(patients, n_val=1, n_test=1, seed=args.seed)}
        folds = cv_folds(patients, min(args.folds, 3), n_val=1, seed=args.seed)
    elif args.protocol == "split":
        return {"split": split_patients(patients, seed=args.seed)}
    else:
        folds = cv_folds(patients, args.folds, args.n_val, args.seed)
    return {f"f{k + 1}": split for k, split in enumerate(folds)}


# -- data -------------------------------------------------------------------------------------
def region_masks(flair: np.ndarray, groups: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Head and brain masks ``(N, size, size)`` from native-resolution FLAIR slices ``(N, H, W)``.

    Per patient (one threshold per scan): ``head_masks`` and the morphological ``brain_masks``
    at the native grid (their radii suit the 256^2 slices), then area-resized to ``size`` and
    kept where more than half of a pixel is inside.
    """
    head = np.zeros((len(flair), size, size), bool)
    brain = np.zeros_like(head)
    for patient in np.unique(groups):
        index = np.flatnonzero(groups == patient)
        patient_head = head_masks(flair[index])
        patient_brain = brain_masks(flair[index], patient_head)
        head[index], brain[index] = (_area_mask(m, size) for m in (patient_head, patient_brain))
    return head, brain


def _area_mask(masks: np.ndarray, size: int) -> np.ndarray:
    fractions = torch.nn.functional.interpolate(
        torch.from_numpy(masks[:, None].astype(np.float32)), size=(size, size), mode="area"
    )
    return fractions[:, 0].numpy() > 0.5


def normalise_volume(images: np.ndarray, region: np.ndarray, scale: str = "median") -> np.ndarray:
    """One patient's slices ``(n, C, H, W)`` -> [-1, 1] per channel, -1 outside ``region``.

    ``scale``: ``median`` maps 0 .. 3 x the median inside the region to [-1, 1] (robust to
    the tumour: in the brain, tissue keeps the middle of the range and bright lesions stay
    below the ceiling); ``p99.5`` maps 0 .. the region's 99.5th percentile to [-1, 1].
    """
    out = np.empty_like(images, dtype=np.float32)
    for c in range(images.shape[1]):
        channel = images[:, c]
        if scale == "median":
            upper = 3.0 * float(np.median(channel[region])) or 1.0
        else:
            upper = float(np.percentile(channel[region], 99.5)) or 1.0
        out[:, c] = np.clip(channel / upper, 0.0, 1.0) * 2.0 - 1.0
    out[~np.broadcast_to(region[:, None], out.shape)] = -1.0
    return out


def lgg_manifest(out: Path, root: Path) -> Path:
    """``OUT/lgg_manifest.csv``: ``path,label,mask,group`` of the LGG slices of ``root``.

    ``root`` holds one folder per patient with ``*_N.tif`` slices and ``*_N_mask.tif`` masks,
    as ``kaggle_3m``; label 1 = a non-empty FLAIR-abnormality mask; group = the patient.
    """
    root = Path(root)
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


def manifest_patients(out: Path, data_dir: Path) -> tuple[Path, list[str]]:
    """The LGG manifest of ``data_dir`` (``OUT/lgg_manifest.csv``) and each slice's patient."""
    manifest = lgg_manifest(out, data_dir)
    with open(manifest, newline="") as handle:
        return manifest, [row["group"] for row in csv.DictReader(handle)]


def restrict_manifest(manifest: Path, patients: set[str]) -> Path:
    """A copy of the manifest with only the given patients' slices (``*_subset.csv``)."""
    with open(manifest, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row["group"] in patients]
        fields = list(reader.fieldnames or [])
    subset = manifest.with_name(manifest.stem + "_subset.csv")
    with open(subset, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return subset


def load_lgg(
    manifest: Path, cache: Path, size: int, channels: str, scale: str = "median",
    region: str = "brain",
) -> ImageSet:  # fmt: skip
    """The manifest's LGG slices, preprocessed; ``foreground`` holds the brain (or head) masks.

    ``region`` ``brain``: skull-stripped input (outside the brain -1) scaled inside the brain;
    ``head``: the whole head (scalp and skull kept) scaled inside the head.
    """
    read = {"channel": FLAIR} if channels == "flair" else {"keep_channels": True}
    resize = [{"resize": {"shape": [size, size], "mode": "area"}}]
    raw, _ = load_dataset(manifest, resize, read_options=read, strict=True, cache=cache)
    native, _ = load_dataset(
        manifest, [], read_options={"channel": FLAIR}, strict=True, cache=cache
    )
    if list(native.ids) != list(raw.ids):
        raise RuntimeError("lgg_pixel: the native and resized reads list different slices")
    head, brain = region_masks(native.images[:, 0], raw.groups, size)
    foreground = brain if region == "brain" else head
    scaled = np.empty_like(raw.images, dtype=np.float32)
    for patient in np.unique(raw.groups):
        index = np.flatnonzero(raw.groups == patient)
        scaled[index] = normalise_volume(raw.images[index], foreground[index], scale)
    return ImageSet(scaled, raw.labels, raw.ids, raw.masks, foreground, raw.groups)


def augmentation() -> ArrayAugment:
    """The configs' random transforms (horizontal flip, small rotation and zoom)."""
    steps = [
        t for t in load_config(CONFIGS["vae"])["data"]["transforms"] if "rand_" in next(iter(t))
    ]
    return ArrayAugment(build_transforms(steps).split_deterministic()[1])


# -- model configs ----------------------------------------------------------------------------
def engine_block(config: dict[str, Any], args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    engine = dict(config.get("engine", {}))
    engine.update(epochs=epochs, seed=args.seed, progress=False)
    engine.update(patience=min(engine.get("patience") or epochs, max(epochs // 4, 5)))
    return engine


def row_epochs(name: str, args: argparse.Namespace) -> int:
    """Epochs of a network: the config's, ``--epochs`` for all, or the per-model options."""
    specific = {"introvae": args.introvae_epochs, "patch_discriminator": args.emb_epochs}
    if args.quick:
        return 1 if name == "patch_discriminator" else 2
    config_epochs = load_config(CONFIGS[name]).get("engine", {}).get("epochs", 50)
    return specific.get(name) or args.epochs or DEFAULT_EPOCHS.get(name) or config_epochs


def detector_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """A detector row's config (its YAML file) for the benchmark's input."""
    config = load_config(CONFIGS[name])
    config["model"].update(in_channels=args.in_channels)
    config["engine"] = engine_block(config, args, row_epochs(name, args))
    return config


def vae_config(args: argparse.Namespace) -> dict[str, Any]:
    config = detector_config("vae", args)
    config["model"].update(latent_steps=0)
    config["engine"]["batch_size"] = args.batch_size
    return config


def introvae_config(args: argparse.Namespace) -> dict[str, Any]:
    config = detector_config("introvae", args)
    # Kobayashi et al.'s (2020) balance at 256^2 (config: 0.16 at 128^2)
    beta = 0.04 * (256 / args.size) ** 2
    config["model"].update(latent_steps=0, beta=beta)
    config["engine"]["batch_size"] = args.batch_size
    return config


def pd_config(args: argparse.Namespace) -> dict[str, Any]:
    config = detector_config("patch_discriminator", args)
    vae = vae_config(args)
    patch = max(4, args.size // 8)  # Kobayashi et al. 2020: 32 at 256x256
    config["model"].update(
        reconstructor={**vae["model"], "engine": vae["engine"]},
        patch_size=patch,
        stride=args.pd_stride or max(1, args.size // 64),  # Kobayashi et al. 2020: every pixel
        channels=[16, 32, 64, 128],  # the config's CPU widths
        hidden_dim=256,
        embedding_dim=64,
        positive_blur=args.positive_blur,
    )
    config["engine"]["batch_size"] = 64
    return config


def _timing(folder: Path) -> dict[str, float]:
    path = folder / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_timing(folder: Path, **values: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "timing.json", json.dumps({**_timing(folder), **values}, indent=1))


def fit_or_load(
    config: dict[str, Any], folder: Path, train: ImageSet, val: ImageSet, retrain: bool
) -> BaseDetector:
    """Fit into ``folder`` (resuming an interrupted run) unless a finished model is there."""
    if not retrain and (folder / "model.safetensors").exists():
        return BaseDetector.load(folder)
    if retrain and folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    detector = build_detector(config).fit(train, val, run_dir=folder, resume=True)
    _save_timing(folder, train_seconds=time.perf_counter() - start)
    return detector


# -- maps of one fold -------------------------------------------------------------------------
def detector_maps(
    name: str, train: ImageSet, parts: dict[str, ImageSet], args: argparse.Namespace, out: Path
) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """A detector row's maps of the validation and test slices, and its seconds."""
    folder = out / name
    detector = fit_or_load(detector_config(name, args), folder, train, parts["val"], args.retrain)
    start = time.perf_counter()
    maps = {split: {"map": detector.detect(data).maps} for split, data in parts.items()}
    seconds = _timing(folder).get("train_seconds", 0.0) + time.perf_counter() - start
    if name == "dae":  # the one-sided residual (lesions brighter than the repair) as a variant
        positive = copy.copy(detector)
        positive.residual = "positive"
        for split, data in parts.items():
            maps[split]["positive residual"] = positive.detect(data).maps
    return maps, seconds


def train_reconstructors(
    train: ImageSet, val: ImageSet, rows: list[str], args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """The reconstructors and the patch discriminator that the requested rows need."""
    wanted = {row.rsplit("_", 1)[0] for row in rows}
    models: dict[str, Any] = {}
    if "vae" in wanted or any(row.endswith("_pd") for row in rows):
        folder = out / "vae" / "reconstructor_vae"
        models["vae"] = fit_or_load(vae_config(args), folder, train, val, args.retrain)
    if {"introvae", "introvae_ls"} & wanted:
        models["introvae"] = fit_or_load(
            introvae_config(args), out / "introvae", train, val, args.retrain
        )
    if any(row.endswith("_pd") for row in rows):
        # loads the finished VAE from OUT/vae/reconstructor_vae, trains the embedding network
        models["pd"] = fit_or_load(pd_config(args), out / "vae", train, val, False)
    return models


def reconstruction_maps(
    name: str, models: dict[str, Any], data: ImageSet, need_pd: bool, args: argparse.Namespace
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Residual (and patch-discriminator) maps of one split by one reconstructor, and seconds."""
    detector = models["introvae" if name == "introvae_ls" else name]
    detector.latent_steps = args.latent_steps if name == "introvae_ls" else 0
    detector.latent_lr = args.latent_lr
    start = time.perf_counter()
    recon = np.asarray(detector.detect(data).reconstructions, dtype=np.float32)
    seconds = {"residual": time.perf_counter() - start, "pd": 0.0}
    flair = FLAIR if args.in_channels == 3 else 0
    base = {
        "recon": recon,
        "residual": ((data.images - recon) ** 2).sum(axis=1),
        "positive": np.maximum(data.images[:, flair] - recon[:, flair], 0.0),
    }
    if need_pd:
        start = time.perf_counter()
        scores, base["pd_z"], base["pd_raw"] = models["pd"].patch_maps(data.images, recon)
        base["pd_scores"] = np.asarray(scores)
        seconds["pd"] = seconds["residual"] + time.perf_counter() - start
    return base, seconds


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each map ``(N, H, W)`` (``sigma`` 0: unchanged)."""
    if sigma <= 0:
        return maps
    return ndimage.gaussian_filter(maps.astype(np.float32), sigma=(0, sigma, sigma))


def top_score(maps: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Mean of the top 1 % of each map inside the foreground (the image score of a row)."""
    return top_fraction_mean(torch.from_numpy(maps), torch.from_numpy(foreground), 0.01).numpy()


def suppress_rim(maps: np.ndarray, foreground: np.ndarray, width: int) -> np.ndarray:
    """Set the outer ``width`` pixels of the foreground to each map's foreground minimum.

    The edge of the brain (or of the head: scalp, skull) dominates residuals. Uses only the
    input's mask; the evaluated region (the whole foreground) is unchanged.
    """
    if width <= 0:
        return maps
    out = maps.copy()
    for i, (image_map, mask) in enumerate(zip(maps, foreground, strict=True)):
        rim = mask & ~ndimage.binary_erosion(mask, iterations=width)
        if rim.any():
            out[i][rim] = image_map[mask].min()
    return out


def map_sources(kind: str, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The raw maps a row's post-processing starts from (the first is the untuned map)."""
    if kind == "residual":
        return {"squared": base["residual"], "positive": base["positive"]}
    if kind == "pd":
        return {"z-scored": base["pd_z"], "raw": base["pd_raw"]}
    return base  # a detector row: its map (first) and any alternatives


def patient_scaled(maps: np.ndarray, data: ImageSet) -> np.ndarray:
    """Each patient's maps divided by their 75th percentile inside the patient's foreground.

    Unsupervised and per patient (a new patient's own maps): it puts every patient's maps on
    one scale, so that a cut-off chosen on the validation patients transfers (lesions are far
    fewer than a quarter of a volume's brain pixels, so they do not set the scale).
    """
    out = np.empty_like(maps, dtype=np.float32)
    for patient in np.unique(data.groups):
        keep = data.groups == patient
        inside = maps[keep][data.foreground[keep]]
        scale = float(np.percentile(inside, PATIENT_PERCENTILE)) if inside.size else 0.0
        out[keep] = maps[keep] / (scale if scale > 0 else 1.0)
    return out


def variant_maps(kind: str, base: dict[str, np.ndarray], data: ImageSet, size: int) -> dict:
    """Named post-processed maps of one row (the candidates chosen among on validation)."""
    scale = size / 64
    out = {}
    for name, maps in map_sources(kind, base).items():
        for sigma in SMOOTHING:
            smoothed = smooth(maps, sigma * scale)
            for rim in RIMS:
                label = name + (f", gaussian {sigma:g} px" if sigma else "")
                label += f", rim {rim} px suppressed" if rim else ""
                variant = suppress_rim(smoothed, data.foreground, round(rim * scale))
                out[label] = variant
                out[label + ", patient-scaled"] = patient_scaled(variant, data)
    return out


# -- metrics ----------------------------------------------------------------------------------
def dice_counts(
    maps: np.ndarray, masks: np.ndarray, foreground: np.ndarray, threshold: float
) -> dict[str, int]:
    """Overlap, called and lesion pixel counts of ``map > threshold`` inside the foreground."""
    called = (maps > threshold) & foreground
    lesion = masks & foreground
    return {
        "overlap": int((called & lesion).sum()),
        "called": int(called.sum()),
        "lesion": int(lesion.sum()),
    }


def dice_from(counts: dict[str, int]) -> float:
    """Dice of pooled overlap counts (0 when nothing is called and nothing is lesion)."""
    total = counts["called"] + counts["lesion"]
    return float(2 * counts["overlap"] / total) if total else 0.0


def dice_at(maps: np.ndarray, masks: np.ndarray, foreground: np.ndarray, threshold: float) -> float:
    """Dice of ``map > threshold`` against the lesion mask, both inside the foreground."""
    return dice_from(dice_counts(maps, masks, foreground, threshold))


def evaluate(
    maps: np.ndarray, data: ImageSet, scores: np.ndarray, threshold: float | None = None
) -> dict[str, Any]:
    """Pixel metrics inside the foreground; image AUROC; Dice at a given cut-off."""
    inside = pixel_metrics(maps, data.masks, data.foreground, per_image=False)
    labels = data.labels
    result = {
        "pixel_auroc": inside["auroc"],
        "pixel_ap": inside["average_precision"],
        "best_dice": inside["best_dice"],
        "best_dice_threshold": inside["best_dice_threshold"],
        "image_auroc": float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None,
        "n_slices": len(labels),
        "n_tumour_slices": int(labels.sum()),
    }
    if threshold is not None:
        counts = dice_counts(maps, data.masks, data.foreground, threshold)
        result.update(dice_at_val_threshold=dice_from(counts), val_threshold=threshold)
        result["dice_counts"] = counts
    return result


def transfer_dice(maps: np.ndarray, data: ImageSet) -> float | None:
    """Dice of cut-offs carried from patient to patient, within one set of patients.

    For each patient, the best-Dice cut-off of the *other* patients is applied to it; the
    overlaps are pooled. This is what ``dice_at_val_threshold`` asks of a map (a cut-off
    chosen on some patients must suit others); ``None`` with fewer than two patients.
    """
    patients = np.unique(data.groups)
    if len(patients) < 2:
        return None
    totals = {"overlap": 0, "called": 0, "lesion": 0}
    for patient in patients:
        here = data.groups == patient
        others = pixel_metrics(
            maps[~here], data.masks[~here], data.foreground[~here], per_image=False
        )
        if others["best_dice_threshold"] is None:
            continue
        counts = dice_counts(
            maps[here], data.masks[here], data.foreground[here], others["best_dice_threshold"]
        )
        totals = {k: totals[k] + counts[k] for k in totals}
    return dice_from(totals)


def _selection_key(metrics: dict[str, Any]) -> float:
    dice = metrics.get("transfer_dice")
    dice = metrics["best_dice"] if dice is None else dice
    return (metrics["pixel_ap"] or 0.0) + (dice or 0.0)


def choose_and_test(
    kind: str, maps: dict[str, dict[str, np.ndarray]], parts: dict[str, ImageSet],
    args: argparse.Namespace, own_scores: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Post-processing and cut-off chosen on validation; test metrics of the choice and raw map.

    Returns the fold result of the row, with the chosen (``"test_maps"``) and untuned test
    maps and image scores kept for pooling (removed before writing JSON).
    """
    val, test = parts["val"], parts["test"]
    candidates = {s: variant_maps(kind, maps[s], parts[s], args.size) for s in parts}

    def scores_of(split: str, variant_maps_: np.ndarray) -> np.ndarray:
        if own_scores is not None:
            return own_scores[split]
        return top_score(variant_maps_, parts[split].foreground)

    validation = {
        name: {**evaluate(m, val, scores_of("val", m)), "transfer_dice": transfer_dice(m, val)}
        for name, m in candidates["val"].items()
    }
    chosen = max(validation, key=lambda v: _selection_key(validation[v]))
    untuned = next(iter(candidates["test"]))
    result: dict[str, Any] = {"variant": chosen, "validation": validation[chosen]}
    for label, variant in (("tuned", chosen), ("untuned", untuned)):
        test_maps = candidates["test"][variant]
        scores = scores_of("test", test_maps)
        threshold = validation[variant]["best_dice_threshold"]
        metrics = evaluate(test_maps, test, scores, threshold)
        if label == "tuned":
            result.update(metrics, test_maps=test_maps, test_scores=scores)
        else:
            result["untuned"] = {"variant": untuned, **metrics}
            result["untuned_maps"] = test_maps
            result["untuned_scores"] = scores
    result["validation_variants"] = {
        v: {k: m[k] for k in ("pixel_auroc", "pixel_ap", "best_dice", "image_auroc")}
        for v, m in validation.items()
    }
    return result


# -- one fold ---------------------------------------------------------------------------------
def run_fold(
    name: str, split: dict[str, list[str]], data: ImageSet, args: argparse.Namespace,
    out: Path,
) -> dict[str, Any]:  # fmt: skip
    """Every requested row on one fold (reused when ``fold.json`` has the same settings)."""
    folder = out / "folds" / name
    settings = fold_settings(split, args)
    cached = folder / FOLD_FILE
    if cached.exists() and not args.retrain:
        record = json.loads(cached.read_text())
        if record["settings"] == settings:
            print(f"  fold {name}: reusing {cached}")
            return load_fold_maps(record, folder)
    index = split_index(data.groups, split)
    train = data.subset(index["train"][data.labels[index["train"]] == 0])
    train.augment = augmentation()
    parts = {"val": data.subset(index["val"]), "test": data.subset(index["test"])}
    print(
        f"  fold {name}: train {len(split['train'])} patients ({len(train)} normal slices), "
        f"val {split['val']}, test {split['test']}",
        flush=True,
    )
    rows: dict[str, Any] = {}
    for row in [r for r in args.rows if r in DETECTORS]:
        maps, seconds = detector_maps(row, train, parts, args, folder)
        rows[row] = {**choose_and_test(row, maps, parts, args), "seconds": seconds}
        print(f"    {row:22s} {_brief(rows[row])}", flush=True)
    rows.update(reconstructor_rows(train, parts, args, folder))
    record = {"settings": settings, "split": split, "rows": rows}
    save_fold(record, folder)
    return record


def reconstructor_rows(
    train: ImageSet, parts: dict[str, ImageSet], args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    """The Kobayashi et al. 2020 rows (VAE / IntroVAE residual, patch-discriminator maps) of a
    fold."""
    wanted = [r for r in args.rows if r in RECON_ROWS]
    if not wanted:
        return {}
    models = train_reconstructors(train, parts["val"], wanted, args, folder)
    need_pd = any(row.endswith("_pd") for row in wanted)
    pd_train = _timing(folder / "vae").get("train_seconds", 0.0) if need_pd else 0.0
    rows: dict[str, Any] = {}
    for name in RECONSTRUCTORS:
        kinds = [k for k in MAPS if f"{name}_{k}" in wanted]
        if not kinds:
            continue
        trained = "introvae" if name == "introvae_ls" else name
        sub = "reconstructor_vae" if trained == "vae" else ""
        train_seconds = _timing(folder / trained / sub).get("train_seconds", 0.0)
        maps, seconds = {}, {}
        for split, data in parts.items():
            maps[split], seconds[split] = reconstruction_maps(name, models, data, need_pd, args)
        for kind in kinds:
            own = {s: maps[s]["pd_scores"] for s in parts} if kind == "pd" else None
            row = f"{name}_{kind}"
            spent = train_seconds + sum(seconds[s][kind] for s in parts)
            spent += pd_train if kind == "pd" else 0.0
            rows[row] = {**choose_and_test(kind, maps, parts, args, own), "seconds": spent}
            rows[row]["seed_002_pixel_auroc"] = SEED_002[name][0]
            print(f"    {row:22s} {_brief(rows[row])}", flush=True)
    return rows


def fold_settings(split: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """What a fold's results depend on (a saved fold with other settings is recomputed)."""
    keys = (
        "size", "channels", "region", "scale", "epochs", "introvae_epochs", "emb_epochs",
        "batch_size", "pd_stride", "positive_blur", "latent_steps", "latent_lr", "seed",
        "quick", "data",
    )  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in keys}
    configs = {r: load_config(CONFIGS[r]) for r in DETECTORS if r in args.rows}
    return {
        **settings,
        "rows": sorted(args.rows),
        "split": split,
        "configs": configs,
        "variants": VARIANTS,
    }


MAP_KEYS = ("test_maps", "test_scores", "untuned_maps", "untuned_scores")


def save_fold(record: dict[str, Any], folder: Path) -> None:
    """Write the fold's maps (``maps/<row>_<key>.npy``, float16 maps) and then ``fold.json``."""
    (folder / "maps").mkdir(parents=True, exist_ok=True)
    for row, result in record["rows"].items():
        for key in MAP_KEYS:
            array = result[key].astype(np.float16 if key.endswith("maps") else np.float64)
            np.save(folder / "maps" / f"{row}_{key}.npy", array)
    plain = {
        **record,
        "rows": {
            row: {k: v for k, v in result.items() if k not in MAP_KEYS}
            for row, result in record["rows"].items()
        },
    }
    atomic_write_text(folder / FOLD_FILE, json.dumps(plain, indent=1))


def load_fold_maps(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A saved fold record with its maps read back."""
    for row, result in record["rows"].items():
        for key in MAP_KEYS:
            result[key] = np.load(folder / "maps" / f"{row}_{key}.npy").astype(np.float32)
    return record


def dae_speed(
    detector: BaseDetector, train: ImageSet, test: ImageSet, folder: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """The DAE's training and scoring slices/s and their share of the matmul peak.

    Measured together, in this call: the matmul peak, 20 training steps of a fresh network
    (loss, backward, Adam; no data loading) and the fastest of 3 ``detect`` passes over the
    test slices. The end-to-end training rate of the fold (slices x epochs / recorded
    training seconds, validation passes and data loading included) is kept beside.
    """
    peak = matmul_peak(args.threads)
    batch = torch.from_numpy(train.images[: detector.engine_config.batch_size])
    torch.manual_seed(0)
    train_flops = training_flops(detector, batch)
    score_flops = inference_flops(detector, torch.from_numpy(test.images[:16]))
    train_rate = training_throughput(detector, train.images)
    detector.detect(test.images[:4])  # warm-up
    score_seconds = fastest_pass(lambda: detector.detect(test))
    recorded = _timing(folder).get("train_seconds")
    epochs = len(detector.history_)
    return {
        "threads": args.threads,
        "matmul_peak_gflops": peak["gflops"],
        "training": {**speed_block(train_rate, train_flops, peak), "steps": 20},
        "scoring": {
            **speed_block(len(test) / score_seconds, score_flops, peak),
            "slices": len(test), "seconds": score_seconds,
        },
        "training_end_to_end": {
            "slices_per_second": len(train) * epochs / recorded, "slices": len(train),
            "epochs": epochs, "seconds": recorded,
        } if recorded else None,
    }  # fmt: skip


def first_fold_speed(
    folds: dict[str, dict[str, Any]], data: ImageSet, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """:func:`dae_speed` of the first fold's trained DAE on that fold's slices."""
    name, fold = next(iter(folds.items()))
    index = split_index(data.groups, fold["split"])
    train = data.subset(index["train"][data.labels[index["train"]] == 0])
    folder = out / "folds" / name / "dae"
    return dae_speed(BaseDetector.load(folder), train, data.subset(index["test"]), folder, args)


# -- pooling over folds -----------------------------------------------------------------------
def in_cutoff_units(
    maps: np.ndarray, scores: np.ndarray, cutoff: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """A fold's test maps and image scores divided by that fold's validation Dice cut-off.

    Each fold trains its own network, whose maps have their own scale; pooled over folds
    as they are, one cut-off cannot suit them all and the pooled AUROC, AP and oracle Dice
    mostly measure how the scales differ. In units of the fold's own cut-off (chosen on
    that fold's validation patients only) the validation cut-off is 1 in every fold. A
    cut-off that is not positive leaves the fold as it is.
    """
    if cutoff is None or cutoff <= 0:
        return maps, scores
    return maps / cutoff, scores / cutoff


def tuned_in_cutoff_units(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`in_cutoff_units` of a fold row's chosen (tuned) test maps and scores."""
    return in_cutoff_units(result["test_maps"], result["test_scores"], result["val_threshold"])


def pool(folds: dict[str, dict[str, Any]], data: ImageSet) -> dict[str, Any]:
    """Each row's metrics pooled over the test folds, and per fold as mean ± SD."""
    rows: dict[str, Any] = {}
    names = [r for r in ROWS if all(r in f["rows"] for f in folds.values())]
    for row in names:
        index = np.concatenate(
            [split_index(data.groups, {"test": f["split"]["test"]})["test"] for f in folds.values()]
        )
        test = data.subset(index)
        results = [f["rows"][row] for f in folds.values()]
        tuned = [tuned_in_cutoff_units(r) for r in results]
        pooled = evaluate(
            np.concatenate([maps for maps, _ in tuned]),
            test,
            np.concatenate([scores for _, scores in tuned]),
        )
        counts = {
            k: sum(r["dice_counts"][k] for r in results) for k in ("overlap", "called", "lesion")
        }
        raw = [
            in_cutoff_units(r["untuned_maps"], r["untuned_scores"], r["untuned"]["val_threshold"])
            for r in results
        ]
        untuned = evaluate(
            np.concatenate([maps for maps, _ in raw]), test, np.concatenate([s for _, s in raw])
        )
        untuned_counts = {
            k: sum(r["untuned"]["dice_counts"][k] for r in results)
            for k in ("overlap", "called", "lesion")
        }
        rows[row] = results_row(
            {
                "pixel_auroc": pooled["pixel_auroc"],
                "pixel_ap": pooled["pixel_ap"],
                "dice_at_val_threshold": dice_from(counts),
                "best_dice": pooled["best_dice"],
                "image_auroc": pooled["image_auroc"],
            },
            baseline=is_baseline(row) if row in DETECTORS else False,
            description=describe(row),
            per_fold={m: mean_sd([r.get(m) for r in results]) for m in METRICS},
            variants={name: r["variant"] for name, r in zip(folds, results, strict=True)},
            untuned={
                "variant": results[0]["untuned"]["variant"],
                "pixel_auroc": untuned["pixel_auroc"],
                "pixel_ap": untuned["pixel_ap"],
                "dice_at_val_threshold": dice_from(untuned_counts),
                "best_dice": untuned["best_dice"],
            },
            seconds=float(sum(r["seconds"] for r in results)),
            per_patient_pixel_auroc=per_patient(pooled_maps(results), test),
            **({"seed_002_pixel_auroc": results[0]["seed_002_pixel_auroc"]}
               if "seed_002_pixel_auroc" in results[0] else {}),
        )  # fmt: skip
    return rows


def pooled_maps(results: list[dict[str, Any]]) -> np.ndarray:
    return np.concatenate([tuned_in_cutoff_units(r)[0] for r in results])


def per_patient(maps: np.ndarray, test: ImageSet) -> dict[str, float | None]:
    """Pixel AUROC inside the foreground of each test patient."""
    out = {}
    for patient in np.unique(test.groups):
        keep = test.groups == patient
        metrics = pixel_metrics(
            maps[keep], test.masks[keep], test.foreground[keep], per_image=False
        )
        out[str(patient)] = metrics["auroc"]
    return out


def describe(row: str) -> str:
    """A row's name in the tables."""
    if row in DETECTORS:
        return DETECTORS[row]
    name, kind = row.rsplit("_", 1)
    return f"{RECONSTRUCTORS[name]} · {MAPS[kind]}"


# -- figures ----------------------------------------------------------------------------------
def figures(
    folds: dict[str, dict[str, Any]], data: ImageSet, folder: Path, n_cases: int, flair: int
) -> list[str]:
    """input | each row's (post-processed) map | mask, for the test slices with most lesion."""
    from medanomaly.viz.case_figure import plt  # matplotlib only when drawing

    folder.mkdir(parents=True, exist_ok=True)
    names = [r for r in ROWS if all(r in f["rows"] for f in folds.values())]
    index = np.concatenate(
        [split_index(data.groups, {"test": f["split"]["test"]})["test"] for f in folds.values()]
    )
    test = data.subset(index)
    maps = {r: pooled_maps([f["rows"][r] for f in folds.values()]) for r in names}
    lesion = test.masks.reshape(len(test), -1).sum(axis=1)
    cases = [int(i) for i in np.argsort(-lesion)[:n_cases]]
    paths = []
    for case in cases:
        panels = [("input (FLAIR)", test.images[case, flair], "gray", (-1, 1))]
        panels += [(describe(r), maps[r][case], "jet", None) for r in names]
        panels.append(("tumour mask", test.masks[case].astype(float), "gray", (0, 1)))
        fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
        for ax, (title, panel, cmap, limits) in zip(np.atleast_1d(axes), panels, strict=True):
            ax.axis("off")
            inside = test.foreground[case]
            if limits is None:  # colour range of the map inside the brain
                values = panel[inside] if inside.any() else panel.ravel()
                limits = (float(values.min()), float(values.max()) or 1.0)
            ax.imshow(panel, cmap=cmap, vmin=limits[0], vmax=limits[1])
            ax.set_title(title, fontsize=7)
        fig.suptitle(f"{Path(test.ids[case]).name} ({int(lesion[case])} lesion px)", fontsize=8)
        fig.tight_layout()
        path = folder / f"case_{len(paths)}_{Path(test.ids[case]).stem}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(str(path.relative_to(folder.parent)))
    return paths


# -- report -----------------------------------------------------------------------------------
def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ms(block: dict[str, Any]) -> str:
    if block.get("mean") is None:
        return "–"
    sd = block.get("sd")
    return f"{block['mean']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _brief(m: dict[str, Any]) -> str:
    return (
        f"[{m['variant']}] AUROC {_f(m['pixel_auroc'])} AP {_f(m['pixel_ap'])} "
        f"Dice@val {_f(m.get('dice_at_val_threshold'))} best Dice {_f(m['best_dice'])} "
        f"image AUROC {_f(m['image_auroc'])}"
    )


def targets(rows: dict[str, Any]) -> list[str]:
    """Met / missed lines: the best model against the no-model row."""
    baseline = rows.get("intensity")
    models = {k: r for k, r in rows.items() if not r["baseline"]}
    if not models:
        return ["no model rows"]
    best = max(models, key=lambda k: models[k]["pixel_ap"] or 0.0)
    r = models[best]
    lines = [f"best model by pooled AP: {r['description']} (`{best}`)"]
    auroc_ok = (r["pixel_auroc"] or 0.0) >= TARGETS["pixel_auroc"]
    lines.append(
        f"pixel AUROC ≥ {TARGETS['pixel_auroc']}: **{'met' if auroc_ok else 'missed'}** "
        f"({_f(r['pixel_auroc'])})"
    )
    if baseline:
        ap_ok = (r["pixel_ap"] or 0.0) > (baseline["pixel_ap"] or 0.0)
        dice_ok = (r["dice_at_val_threshold"] or 0.0) >= (
            baseline["dice_at_val_threshold"] or 0.0
        ) + TARGETS["dice_margin"]
        lines.append(
            f"AP above the intensity row: **{'met' if ap_ok else 'missed'}** "
            f"({_f(r['pixel_ap'])} vs {_f(baseline['pixel_ap'])})"
        )
        lines.append(
            f"Dice at the validation cut-off ≥ intensity + {TARGETS['dice_margin']}: "
            f"**{'met' if dice_ok else 'missed'}** ({_f(r['dice_at_val_threshold'])} vs "
            f"{_f(baseline['dice_at_val_threshold'])})"
        )
        for m in models.values():
            beats = (m["pixel_ap"] or 0.0) > (baseline["pixel_ap"] or 0.0) and (
                m["dice_at_val_threshold"] or 0.0
            ) > (baseline["dice_at_val_threshold"] or 0.0)
            lines.append(
                f"{m['description']}: {'beats' if beats else 'does not beat'} the FLAIR "
                f"intensity on AP and Dice at the validation cut-off"
            )
    return lines


def results_markdown(results: dict[str, Any]) -> str:
    s, rows, protocol = results["settings"], results["rows"], results["protocol"]
    region = s["region"]
    n_folds = len(results["folds"])
    how = (
        f"patient-grouped {n_folds}-fold cross-validation over {results['n_patients']} patients"
        f" ({len(next(iter(results['folds'].values()))['val'])} validation patients per "
        "fold); pooled over the test folds, each fold's maps in units of its validation cut-off"
        if protocol == "cv" else "one fixed patient split"
    )  # fmt: skip
    lines = [
        f"# LGG FLAIR, pixel level — `benchmarks/lgg_pixel.py --protocol {protocol}`",
        "",
        f"{how}. {results['n_slices']} slices, size {s['size']}², channels {s['channels']}, "
        f"metrics inside the {region} "
        f"({100 * results['lesion_pixels_in_foreground']:.1f} % of the lesion pixels lie "
        f"inside the {region} mask); {s['threads']} CPU thread(s); wall time of this call "
        f"{results['wall_seconds'] / 60:.1f} min." + (" **Quick smoke run.**" * s["quick"]),
        "",
        "| row | pixel AUROC | AP | Dice @ val cut-off | ⌈Dice⌉ (oracle) | AP per fold | "
        "Dice @ val per fold | image AUROC | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        name = f"*{r['description']}*" if r["baseline"] else r["description"]
        cells = [
            f"{name} (`{key}`)", _f(r["pixel_auroc"]), _f(r["pixel_ap"]),
            _f(r["dice_at_val_threshold"]), _f(r["best_dice"]), _ms(r["per_fold"]["pixel_ap"]),
            _ms(r["per_fold"]["dice_at_val_threshold"]), _f(r["image_auroc"]),
            f"{r['seconds']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Italic rows are no-model baselines. Post-processing chosen per fold on validation:",
        "",
    ]
    lines += [f"- `{k}`: " + "; ".join(f"{f}: {v}" for f, v in r["variants"].items())
              for k, r in rows.items()]  # fmt: skip
    lines += ["", "Untuned (raw map, no post-processing; Dice cut-off still from validation):", ""]
    lines += ["| row | pixel AUROC | AP | Dice @ val cut-off | ⌈Dice⌉ |", "|---|---|---|---|---|"]
    for key, r in rows.items():
        u = r["untuned"]
        lines.append(
            f"| `{key}` ({u['variant']}) | {_f(u['pixel_auroc'])} | {_f(u['pixel_ap'])} | "
            f"{_f(u['dice_at_val_threshold'])} | {_f(u['best_dice'])} |"
        )
    lines += ["", "## Targets", ""] + [f"- {line}" for line in targets(rows)]
    speed = rows.get("dae", {}).get("speed")
    if speed:
        lines += ["", "## Speed of `dae` (first fold)", ""] + speed_lines(speed, s["size"])
    lines += ["", "## Folds", ""]
    for name, split in results["folds"].items():
        lines.append(f"- {name}: test {split['test']}; validation {split['val']}")
    if results.get("figures"):
        lines += ["", "Figures: " + ", ".join(f"`{p}`" for p in results["figures"])]
    return "\n".join(lines) + "\n"


def speed_lines(speed: dict[str, Any], size: int) -> list[str]:
    lines = [f"fp32 matmul peak of this machine in this run: {speed['matmul_peak_gflops']:.1f} "
             f"GFLOP/s on {speed['threads']} thread(s)."]  # fmt: skip
    for what in ("training", "scoring"):
        block = speed.get(what)
        if not block:
            continue
        lines.append(
            f"- {what}: {block['images_per_second']:.1f} slices/s at {size}² "
            f"({block['gflop_per_image']:.2f} GFLOP per slice, {block['gflops']:.1f} GFLOP/s = "
            f"{100 * block['fraction_of_matmul_peak']:.1f} % of the matmul peak)"
        )
    end_to_end = speed.get("training_end_to_end")
    if end_to_end:
        lines.append(
            f"- training end to end (fold 1 as it ran, validation passes and augmentation "
            f"included): {end_to_end['slices_per_second']:.1f} slices/s "
            f"({end_to_end['slices']} slices x {end_to_end['epochs']} epochs in "
            f"{end_to_end['seconds']:.0f} s)"
        )
    return lines


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--protocol", choices=("cv", "split"), default="cv")
    parser.add_argument("--data", type=Path, default=DATA, help="folder laid out like kaggle_3m")
    parser.add_argument("--folds", type=int, default=5, help="cv: test folds")
    parser.add_argument("--n-val", type=int, default=4, help="cv: validation patients per fold")
    parser.add_argument("--size", type=int, default=64, help="side of the slices (mult. of 16)")
    parser.add_argument("--channels", choices=("flair", "all"), default="flair")
    parser.add_argument(
        "--scale", choices=("median", "p99.5"), default="median", help="per-volume intensity scale"
    )
    parser.add_argument(
        "--region", choices=("brain", "head"), default="brain",
        help="brain: skull-stripped input, metrics inside the brain; head: scalp and skull kept",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, help="epochs of every network (default: configs)")
    parser.add_argument("--introvae-epochs", type=int, help="default 80 (or --epochs)")
    parser.add_argument("--emb-epochs", type=int, help="embedding epochs, default 30 (or --epochs)")
    parser.add_argument("--batch-size", type=int, default=32, help="VAE / IntroVAE batch size")
    parser.add_argument("--pd-stride", type=int, help="patch-map stride (default size/64)")
    parser.add_argument("--positive-blur", type=float, default=0.0)
    parser.add_argument("--latent-steps", type=int, default=100)
    parser.add_argument("--latent-lr", type=float, default=1e-3)
    parser.add_argument("--rows", nargs="+", choices=ROWS, help="default: see the docstring")
    parser.add_argument("--figures", type=int, default=4, help="test slices drawn")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="skip DAE speed")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 patients, 2 epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="ignore saved models and folds")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error("--size must be a multiple of 16")
    args.rows = args.rows or DEFAULT_ROWS[args.protocol]
    args.introvae_epochs = args.introvae_epochs or args.epochs or 80
    args.emb_epochs = args.emb_epochs or args.epochs or 30
    if args.quick:
        args.latent_steps = min(args.latent_steps, 3)
        args.pd_stride = args.pd_stride or 4
    args.in_channels = 1 if args.channels == "flair" else 3
    args.flair_index = FLAIR if args.in_channels == 3 else 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.exists():
        print(f"lgg_pixel: {args.data} not found; the benchmark needs ../shared/data/lgg_mri_2d "
              "beside the repository, or --data DIR laid out like kaggle_3m")  # fmt: skip
        return 1
    torch.set_num_threads(args.threads)
    # the rows use their own cut-offs (chosen on validation), not the detectors' default
    # threshold, so its small-sample warning would only be noise here
    logging.getLogger("medanomaly.detectors.base").setLevel(logging.ERROR)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest, patients = manifest_patients(out, args.data)
    splits = fold_splits(patients, args)
    args.fold_names = list(splits)
    used = {p for split in splits.values() for part in split.values() for p in part}
    if used != set(patients):  # --quick reads only the patients it uses
        manifest = restrict_manifest(manifest, used)
    data = load_lgg(manifest, out / "cache", args.size, args.channels, args.scale, args.region)
    print(
        f"LGG: {len(data)} slices of {len(used)} patients; {len(splits)} fold(s); rows {args.rows}"
    )
    folds = {name: run_fold(name, split, data, args, out) for name, split in splits.items()}
    rows = pool(folds, data)
    if "dae" in rows and args.speed:  # measured now, on the first fold's DAE (not cached)
        rows["dae"]["speed"] = first_fold_speed(folds, data, args, out)
    paths = (
        figures(folds, data, out / "figures", args.figures, args.flair_index)
        if args.figures
        else []
    )
    settings = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"
    }
    results = {
        "benchmark": "lgg_pixel",
        "protocol": args.protocol,
        "rows": rows,
        "folds": {name: f["split"] for name, f in folds.items()},
        "per_fold": {name: {r: {k: v for k, v in m.items() if k not in MAP_KEYS}
                            for r, m in f["rows"].items()} for name, f in folds.items()},
        "n_patients": len(used),
        "n_slices": len(data),
        "lesion_pixels_in_foreground": float(
            (data.masks & data.foreground).sum() / max(int(data.masks.sum()), 1)
        ),
        "settings": settings,
        "figures": paths,
        "wall_seconds": time.perf_counter() - start,
    }  # fmt: skip
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    markdown = results_markdown(results)
    atomic_write_text(out / "results.md", markdown)
    print(markdown)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
