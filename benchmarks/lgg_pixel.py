"""Seed 002's pixel-level evaluation on real brain MRI (LGG FLAIR): residual vs patch discriminator.

Data: ../shared/data/lgg_mri_2d/kaggle_3m (30 LGG patients, 1112 slices 256x256x3 TIFF:
pre-contrast, FLAIR, post-contrast; ``*_mask.tif`` FLAIR-abnormality masks, 349 slices with
tumour), read through ``benchmarks/supervised.py``'s ``lgg_manifest`` and the project's
``load_dataset`` (area resize to ``--size``, lesion masks nearest-neighbour).

Split (patient-grouped, seeded): the 30 patients are permuted with numpy's
``default_rng(0)``; the first 6 are test patients, the next 4 validation patients, the other
20 training patients. The networks train on the tumour-free slices of the training patients
only. The validation patients (normal and tumour slices) drive early stopping (normal slices,
``val_loss``), the choice of map post-processing ("tuned" rows) and the Dice threshold; the
test patients are used for nothing but the reported numbers.

Preprocessing: FLAIR (``--channels flair``) or all three channels (``--channels all``), area
resize to ``--size`` (default 64, see "Budget"). Per patient (volume), on the native 256^2
FLAIR: the head (``medanomaly.transforms.mask.head_masks``: above 10 % of the volume's 99th
percentile, opened, largest component, holes filled) and the brain (``brain_masks``: the head
eroded by 8 px, tissue above half the typical tissue intensity opened by a 4-px disk to cut it
from the scalp, largest piece grown back, closed and hole-filled, each slice kept within its
inner neighbour's brain grown by 8 px; ``results.json`` reports the share of lesion pixels it
holds), both area-resized to ``--size``. ``--region brain`` (default): the input is
skull-stripped (outside the brain -1) and the metrics' foreground is the brain, as the issue
asks ("inside the brain"); ``--region head``: scalp and skull kept, foreground = head (seed
002 does not skull-strip). Each channel is divided by a per-volume scale taken inside the
foreground (``--scale median``: 3 x the median, robust to the tumour; ``p99.5``: the 99.5th
percentile), clipped to [0, 1] and mapped to [-1, 1] (tanh outputs, as the configs). A
per-volume scale (instead of the configs' per-slice min-max) keeps a slice's tumour from
changing the scale of its normal tissue; seed 002 matches histograms per volume for the same
reason.

Models (configs/vae_lgg_2d.yaml, introvae_lgg_2d.yaml, patch_discriminator_lgg_2d.yaml):

* VAE: the config's network, latent 128, tanh; batch ``--batch-size``, ``--epochs``
  (default 100, patience 20 on the validation patients' normal slices).
* IntroVAE: the config's settings (m 120, alpha 0.5, SSIM term, lr 1e-4 / 5e-3), beta =
  0.04 * (256 / size)^2 (seed 002's 0.04 at 256^2; the config's 0.16 at 128^2), trained
  without latent search (``--introvae-epochs``, default 80).
* IntroVAE + latent search: the same trained IntroVAE, scored with ``--latent-steps`` (100)
  Adam steps on z at ``--latent-lr`` (1e-3) on L2 + SSIM (seed 002).
* Patch discriminator: the ``patch_discriminator`` detector with the VAE as its reconstructor
  (the VAE is trained once and loaded by the detector from ``OUT/vae/reconstructor_vae``), the
  embedding network at the CPU widths the config names (16-32-64-128, hidden 256, embedding
  64), patches of size/8 (seed 002's 32 at 256), stride ``--pd-stride``, default size/64 (1
  at 64^2: every pixel, as seed 002; the cost grows with 1 / stride^2; --quick: 4),
  ``--emb-epochs`` (30), ``--positive-blur`` (0). The embedding network is trained by
  triplet loss on patches of the normal training images only and never sees a
  reconstruction, so the one trained embedding network serves all three reconstructors: the
  IntroVAE rows hand their own reconstructions to the detector's ``patch_maps`` (scores,
  z-scored and raw maps).

Rows: for each reconstructor (a) the residual map, squared residual summed over channels, and
(b) the patch-discriminator map, z-scored per slice (seed 002). "Tuned" rows: for each of
the six, map post-processing chosen on the validation patients (by pixel AUROC + best Dice
inside the foreground): residual maps {squared, positive FLAIR residual max(x - x_hat, 0)} x
Gaussian smoothing sigma {0, 1, 2} px at 64^2 (scaled with the size) x suppression of the
outer {0, 3, 6} px rim of the foreground (edges dominate the residuals: set to the map's
minimum inside the foreground; the evaluated region stays the whole foreground); PD maps
{z-scored, raw} x the same smoothing and rim suppression. A reference row without any model
(the scaled FLAIR intensity as the map, smoothing chosen on validation) shows how much of
the task plain brightness solves.

Metrics on the test patients, all slices pooled (tumour and tumour-free): pixel AUROC, AP and
best Dice (``medanomaly.evaluation.pixel.pixel_metrics``, 10^4 bins) inside the foreground
and over the whole image; Dice at the threshold that gave the best Dice on the validation
patients; image AUROC (slice has tumour or not) of the mean of the top 1 % of the map inside
the foreground (residual rows) or the detector's own score, the top 1 % of the raw distance
map (PD rows);
seconds = training of the networks the row uses + reconstructing (and latent search) the
validation and test slices + computing the maps. Seed 002's tumour pixel AUROC (0.75 / 0.76 /
0.78 for VAE / IntroVAE / IntroVAE + latent search, with the patch discriminator, background
excluded, metastases on contrast-enhanced 3D GRE) stands beside the rows.

Outputs: ``OUT/results.json``, ``OUT/results.md``, ``OUT/figures/*.png`` (input |
reconstruction | residual | PD map | mask for a few test slices). Trained models are kept
(``OUT/vae/reconstructor_vae``, ``OUT/vae`` = patch discriminator, ``OUT/introvae``) with
reconstructions of the validation/test slices (``OUT/<reconstructor>/recon_<split>.npy``)
and reused unless ``--retrain``.

Budget: the default run (64^2, FLAIR) took 29 min on one CPU thread while another benchmark
held the second core (VAE 5.4 min, IntroVAE 18 min, embedding network 1.3 min, latent search
on the 319 validation + test slices 3.3 min, loading ~2 min the first time); at 128^2 the
IntroVAE epochs and the latent search cost 4-5x more, which does not fit 35 min on two cores
(``--size 128`` with fewer epochs is possible). ``--size 128`` defaults to the same epochs.

    .venv/bin/python benchmarks/lgg_pixel.py --out OUT [--size 64] [--channels flair|all]
        [--region brain|head] [--scale median|p99.5] [--epochs N] [--rows ...] [--quick]
        [--threads 1] [--retrain]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from medanomaly.base import BaseDetector
from medanomaly.checkpoint import atomic_write_text
from medanomaly.config import build_detector, load_config
from medanomaly.data import ImageSet
from medanomaly.datasets import ArrayAugment, load_dataset
from medanomaly.evaluation.pixel import pixel_metrics
from medanomaly.models.patch_discriminator import top_fraction_mean
from medanomaly.transforms import build_transforms
from medanomaly.transforms.mask import brain_masks, head_masks

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lgg_mri_2d" / "kaggle_3m"
CONFIGS = {
    "vae": ROOT / "configs" / "vae_lgg_2d.yaml",
    "introvae": ROOT / "configs" / "introvae_lgg_2d.yaml",
    "pd": ROOT / "configs" / "patch_discriminator_lgg_2d.yaml",
}
RECONSTRUCTORS = {"vae": "VAE", "introvae": "IntroVAE", "introvae_ls": "IntroVAE + latent search"}
MAPS = {"residual": "residual", "pd": "patch discriminator"}
ROWS = [f"{r}_{m}" for r in RECONSTRUCTORS for m in MAPS]
# Seed 002, Table I: metastatic brain tumour, pixel ROC-AUC inside the body (mean +- SD).
SEED_002 = {"vae": (0.75, 0.16), "introvae": (0.76, 0.17), "introvae_ls": (0.78, 0.17)}
TARGETS = {"pixel_auroc": 0.90, "best_dice": 0.45}
FLAIR = 1
SMOOTHING = (0.0, 1.0, 2.0)  # Gaussian sigma in pixels at 64x64 (scaled with the size)
RIMS = (0, 3, 6)  # outer foreground rim set to the map's minimum, pixels at 64x64


# -- split ------------------------------------------------------------------------------------
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


def split_index(groups: np.ndarray, split: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Slice indices of each part of a patient split."""
    return {name: np.flatnonzero(np.isin(groups, ids)) for name, ids in split.items()}


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


def manifest_patients(out: Path) -> tuple[Path, list[str]]:
    """The LGG manifest (``OUT/lgg_manifest.csv``) and the patient of each slice."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from supervised import lgg_manifest  # benchmarks/supervised.py

    manifest = lgg_manifest(out)
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


# -- models -----------------------------------------------------------------------------------
def engine_block(config: dict[str, Any], args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    engine = dict(config.get("engine", {}))
    engine.update(epochs=epochs, batch_size=args.batch_size, seed=args.seed, progress=False)
    engine.update(patience=min(engine.get("patience") or epochs, max(epochs // 4, 5)))
    return engine


def vae_config(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(CONFIGS["vae"])
    config["model"].update(in_channels=args.in_channels, latent_steps=0)
    config["engine"] = engine_block(config, args, args.epochs)
    return config


def introvae_config(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(CONFIGS["introvae"])
    beta = 0.04 * (256 / args.size) ** 2  # seed 002's balance at 256^2 (config: 0.16 at 128^2)
    config["model"].update(in_channels=args.in_channels, latent_steps=0, beta=beta)
    config["engine"] = engine_block(config, args, args.introvae_epochs)
    return config


def pd_config(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(CONFIGS["pd"])
    vae = vae_config(args)
    patch = max(4, args.size // 8)  # seed 002: 32 at 256x256
    config["model"].update(
        in_channels=args.in_channels,
        reconstructor={**vae["model"], "engine": vae["engine"]},
        patch_size=patch,
        stride=args.pd_stride or max(1, args.size // 64),  # seed 002: every pixel
        channels=[16, 32, 64, 128],  # the config's CPU widths
        hidden_dim=256,
        embedding_dim=64,
        positive_blur=args.positive_blur,
    )
    config["engine"] = engine_block(config, args, args.emb_epochs)
    config["engine"]["batch_size"] = 64
    return config


def _fresh(folder: Path, retrain: bool) -> None:
    if retrain and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def _timing(folder: Path) -> dict[str, float]:
    path = folder / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_timing(folder: Path, **values: float) -> None:
    atomic_write_text(folder / "timing.json", json.dumps({**_timing(folder), **values}, indent=1))


def fit_or_load(
    config: dict[str, Any], folder: Path, train: ImageSet, val: ImageSet, retrain: bool
) -> BaseDetector:
    """Fit into ``folder`` (resuming an interrupted run) unless a finished model is there."""
    if not retrain and (folder / "model.pt").exists():
        return BaseDetector.load(folder)
    start = time.perf_counter()
    detector = build_detector(config).fit(train, val, run_dir=folder, resume=True)
    _save_timing(folder, train_seconds=time.perf_counter() - start)
    return detector


def train_models(
    data: ImageSet, index: dict[str, np.ndarray], args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """The reconstructors and the patch discriminator the requested rows need."""
    train = data.subset(index["train"][data.labels[index["train"]] == 0])
    train.augment = augmentation()
    val = data.subset(index["val"])
    wanted = {row.rsplit("_", 1)[0] for row in args.rows}
    models: dict[str, Any] = {}
    if "vae" in wanted:
        _fresh(out / "vae", args.retrain)
        folder = out / "vae" / "reconstructor_vae"
        print(f"  VAE: {len(train)} normal training slices -> {folder}")
        models["vae"] = fit_or_load(vae_config(args), folder, train, val, args.retrain)
    if {"introvae", "introvae_ls"} & wanted:
        _fresh(out / "introvae", args.retrain)
        print(f"  IntroVAE -> {out / 'introvae'}")
        models["introvae"] = fit_or_load(
            introvae_config(args), out / "introvae", train, val, args.retrain
        )
    if any(row.endswith("_pd") for row in args.rows):
        if "vae" not in models:  # the patch discriminator's own reconstructor
            _fresh(out / "vae", args.retrain)
            folder = out / "vae" / "reconstructor_vae"
            fit_or_load(vae_config(args), folder, train, val, args.retrain)
        print(f"  patch discriminator (embedding network) -> {out / 'vae'}")
        # loads the finished VAE from OUT/vae/reconstructor_vae, trains the embedding network
        models["pd"] = fit_or_load(pd_config(args), out / "vae", train, val, False)
    return models


# -- reconstructions and maps -----------------------------------------------------------------
def reconstructions(
    name: str, models: dict[str, Any], images: ImageSet, split: str, args: argparse.Namespace,
    out: Path,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """Reconstructions of a split by one reconstructor (cached), and the seconds they took."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"recon_{split}.npy"
    key = f"recon_{split}_seconds"
    if path.exists() and not args.retrain and key in _timing(folder):
        return np.load(path), _timing(folder)[key]
    detector = models["introvae" if name == "introvae_ls" else name]
    detector.latent_steps = args.latent_steps if name == "introvae_ls" else 0
    detector.latent_lr = args.latent_lr
    start = time.perf_counter()
    recon = np.asarray(detector.detect(images).reconstructions, dtype=np.float32)
    seconds = time.perf_counter() - start
    np.save(path, recon)
    _save_timing(folder, **{key: seconds})
    return recon, seconds


def pd_maps(pd: Any, images: np.ndarray, recon: np.ndarray) -> dict[str, np.ndarray]:
    """The detector's view of given reconstructions: raw and z-scored maps, image scores."""
    scores, zscored, raw = pd.patch_maps(images, recon)
    return {"pd_raw": raw, "pd_z": zscored, "pd_scores": scores}


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each map ``(N, H, W)`` (``sigma`` 0: unchanged)."""
    if sigma <= 0:
        return maps
    return ndimage.gaussian_filter(maps.astype(np.float32), sigma=(0, sigma, sigma))


def top_score(maps: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Mean of the top 1 % of each map inside the foreground (the detectors' image score)."""
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


def variant_maps(
    kind: str, base: dict[str, np.ndarray], foreground: np.ndarray, size: int
) -> dict[str, np.ndarray]:
    """Named post-processed maps of one reconstructor and map kind (the "tuned" candidates)."""
    scale = size / 64
    if kind == "residual":
        sources = {"squared": base["residual"], "positive": base["positive"]}
    else:
        sources = {"z-scored": base["pd_z"], "raw": base["pd_raw"]}
    out = {}
    for name, maps in sources.items():
        for sigma in SMOOTHING:
            smoothed = smooth(maps, sigma * scale)
            for rim in RIMS:
                label = name + (f", gaussian {sigma:g} px" if sigma else "")
                label += f", rim {rim} px suppressed" if rim else ""
                out[label] = suppress_rim(smoothed, foreground, round(rim * scale))
    return out


def split_maps(
    name: str, models: dict[str, Any], data: ImageSet, split: str, args: argparse.Namespace,
    out: Path, need_pd: bool,
) -> dict[str, Any]:  # fmt: skip
    """Reconstructions and base maps of one split for one reconstructor, with their seconds."""
    images = data.images
    recon, recon_seconds = reconstructions(name, models, data, split, args, out)
    start = time.perf_counter()
    flair = FLAIR if args.in_channels == 3 else 0
    base = {
        "recon": recon,
        "residual": ((images - recon) ** 2).sum(axis=1),
        "positive": np.maximum(images[:, flair] - recon[:, flair], 0.0),
    }
    residual_seconds = time.perf_counter() - start
    pd_seconds = 0.0
    if need_pd:
        start = time.perf_counter()
        base.update(pd_maps(models["pd"], images, recon))
        pd_seconds = time.perf_counter() - start
    base["seconds"] = {"recon": recon_seconds, "residual": residual_seconds, "pd": pd_seconds}
    return base


# -- metrics ----------------------------------------------------------------------------------
def dice_at(maps: np.ndarray, masks: np.ndarray, foreground: np.ndarray, threshold: float) -> float:
    """Dice of ``map > threshold`` against the lesion mask, both inside the foreground."""
    called = (maps > threshold) & foreground
    lesion = masks & foreground
    total = called.sum() + lesion.sum()
    return float(2 * (called & lesion).sum() / total) if total else 0.0


def evaluate(
    maps: np.ndarray, data: ImageSet, scores: np.ndarray, threshold: float | None = None
) -> dict[str, Any]:
    """Pixel metrics inside the foreground and over the whole image; image AUROC; Dice at a cut."""
    inside = pixel_metrics(maps, data.masks, data.foreground, per_image=False)
    whole = pixel_metrics(maps, data.masks, None, per_image=False)
    labels = data.labels
    result = {
        "pixel_auroc": inside["auroc"],
        "pixel_ap": inside["average_precision"],
        "best_dice": inside["best_dice"],
        "best_dice_threshold": inside["best_dice_threshold"],
        "pixel_auroc_whole": whole["auroc"],
        "pixel_ap_whole": whole["average_precision"],
        "best_dice_whole": whole["best_dice"],
        "image_auroc": float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None,
        "n_slices": len(labels),
        "n_tumour_slices": int(labels.sum()),
        "n_lesion_pixels_inside": inside["n_lesion"],
    }
    if data.groups is not None:  # spread over patients (pixel AUROC inside the foreground)
        result["per_patient_pixel_auroc"] = {
            str(g): pixel_metrics(
                maps[data.groups == g], data.masks[data.groups == g],
                data.foreground[data.groups == g], per_image=False,
            )["auroc"]
            for g in np.unique(data.groups)
        }  # fmt: skip
    if threshold is not None:
        result["dice_at_val_threshold"] = dice_at(maps, data.masks, data.foreground, threshold)
        result["val_threshold"] = threshold
    return result


def _selection_key(metrics: dict[str, Any]) -> float:
    return (metrics["pixel_auroc"] or 0.0) + (metrics["best_dice"] or 0.0)


def run_rows(
    data: ImageSet, index: dict[str, np.ndarray], models: dict[str, Any],
    args: argparse.Namespace, out: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Every requested row (base and tuned) on the test patients; the maps for figures."""
    val, test = data.subset(index["val"]), data.subset(index["test"])
    results: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    need_pd = any(row.endswith("_pd") for row in args.rows)
    pd_train = _timing(out / "vae").get("train_seconds", 0.0) if need_pd else 0.0
    for name in RECONSTRUCTORS:
        rows = [row for row in args.rows if row.startswith(name + "_") and
                row.removeprefix(name + "_") in MAPS]  # fmt: skip
        if not rows:
            continue
        print(f"  scoring {RECONSTRUCTORS[name]} on validation and test patients")
        trained = "introvae" if name == "introvae_ls" else name
        train_seconds = _timing(out / trained / ("reconstructor_vae" if trained == "vae" else ""))
        train_seconds = train_seconds.get("train_seconds", 0.0)
        maps = {s: split_maps(name, models, d, s, args, out, need_pd) for s, d in
                (("val", val), ("test", test))}  # fmt: skip
        kept[name] = maps["test"]
        for row in rows:
            kind = row.removeprefix(name + "_")
            candidates = {
                s: variant_maps(kind, maps[s], d.foreground, args.size)
                for s, d in (("val", val), ("test", test))
            }
            # image scores: the PD detector's own (top 1 % of the raw distance map), else
            # the top 1 % of the row's map
            pd_scores = {s: maps[s]["pd_scores"] for s in ("val", "test")} if kind == "pd" else {}
            seconds = train_seconds + sum(
                maps[s]["seconds"]["recon"] + maps[s]["seconds"][kind] for s in ("val", "test")
            )
            seconds += pd_train if kind == "pd" else 0.0
            validation = {}
            for variant, val_maps in candidates["val"].items():
                val_scores = pd_scores.get("val")
                if val_scores is None:
                    val_scores = top_score(val_maps, val.foreground)
                validation[variant] = evaluate(val_maps, val, val_scores)
            base_name = "squared" if kind == "residual" else "z-scored"
            tuned_name = max(validation, key=lambda v: _selection_key(validation[v]))
            for label, variant in (("base", base_name), ("tuned", tuned_name)):
                test_maps = candidates["test"][variant]
                test_scores = pd_scores.get("test")
                if test_scores is None:
                    test_scores = top_score(test_maps, test.foreground)
                threshold = validation[variant]["best_dice_threshold"]
                metrics = evaluate(test_maps, test, test_scores, threshold)
                key = row if label == "base" else f"{row}_tuned"
                results[key] = {
                    "reconstructor": name,
                    "map": kind,
                    "variant": variant,
                    **metrics,
                    "seconds": seconds,
                    "validation": validation[variant],
                    "seed_002_pixel_auroc": SEED_002[name][0],
                }
                print(f"    {key:28s} [{variant}] {_brief(metrics)}")
            results[row]["validation_variants"] = {
                v: {k: m[k] for k in ("pixel_auroc", "pixel_ap", "best_dice", "image_auroc")}
                for v, m in validation.items()
            }
    return results, kept


def intensity_reference(
    data: ImageSet, index: dict[str, np.ndarray], args: argparse.Namespace
) -> dict[str, Any]:
    """No model: the scaled FLAIR intensity itself as the map (FLAIR lesions are bright).

    The smoothing (0, 1, 2 px at 64^2) is chosen on the validation patients; the image score
    is the top 1 % of the map inside the foreground, as for the residual rows.
    """
    parts = {s: data.subset(index[s]) for s in ("val", "test")}
    maps = {s: d.images[:, args.flair_index] for s, d in parts.items()}
    validation = {}
    for sigma in SMOOTHING:
        smoothed = smooth(maps["val"], sigma * args.size / 64)
        scores = top_score(smoothed, parts["val"].foreground)
        validation[sigma] = evaluate(smoothed, parts["val"], scores)
    sigma = max(validation, key=lambda v: _selection_key(validation[v]))
    test_maps = smooth(maps["test"], sigma * args.size / 64)
    scores = top_score(test_maps, parts["test"].foreground)
    threshold = validation[sigma]["best_dice_threshold"]
    metrics = evaluate(test_maps, parts["test"], scores, threshold)
    print(f"    FLAIR intensity (no model) [gaussian {sigma:g} px] {_brief(metrics)}")
    return {"variant": f"gaussian {sigma:g} px", **metrics, "validation": validation[sigma]}


def _brief(m: dict[str, Any]) -> str:
    return (
        f"inside AUROC {_f(m['pixel_auroc'])} AP {_f(m['pixel_ap'])} Dice {_f(m['best_dice'])} "
        f"(@val {_f(m.get('dice_at_val_threshold'))}) | whole AUROC {_f(m['pixel_auroc_whole'])}"
        f" | image AUROC {_f(m['image_auroc'])}"
    )


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


# -- figures ----------------------------------------------------------------------------------
def figures(test: ImageSet, kept: dict[str, Any], folder: Path, n_cases: int) -> list[str]:
    """input | reconstruction | residual | PD map | mask for a few test slices, per model."""
    from medanomaly.viz import plt  # matplotlib only when drawing

    folder.mkdir(parents=True, exist_ok=True)
    lesion = test.masks.reshape(len(test), -1).sum(axis=1)
    order = np.argsort(-lesion)
    tumour = [int(i) for i in order[: max(1, n_cases - 1)]]
    normal = [int(i) for i in np.flatnonzero(test.labels == 0)[:1]]
    flair = FLAIR if test.images.shape[1] == 3 else 0
    paths = []
    for case in tumour + normal:
        names = [n for n in kept if "recon" in kept[n]]
        fig, axes = plt.subplots(len(names), 5, figsize=(12, 2.6 * len(names)), squeeze=False)
        image = test.images[case, flair]
        for ax_row, name in zip(axes, names, strict=True):
            block = kept[name]
            panels = [
                ("input (FLAIR)", image, "gray"),
                ("reconstruction", block["recon"][case, flair], "gray"),
                ("squared residual", block["residual"][case], "jet"),
                ("PD map (z)", block["pd_z"][case] if "pd_z" in block else None, "jet"),
                ("tumour mask", test.masks[case].astype(float), "gray"),
            ]
            for ax, (title, panel, cmap) in zip(ax_row, panels, strict=True):
                ax.axis("off")
                if panel is None:
                    continue
                limits = {"vmin": 0, "vmax": 1} if "mask" in title else {}
                if cmap == "gray" and not limits:
                    limits = {"vmin": -1, "vmax": 1}  # images and reconstructions in [-1, 1]
                ax.imshow(panel, cmap=cmap, **limits)
                ax.set_title(f"{RECONSTRUCTORS[name]}: {title}" if title == "input (FLAIR)"
                             else title, fontsize=8)  # fmt: skip
        fig.suptitle(f"{Path(test.ids[case]).name} ({int(lesion[case])} lesion px)")
        fig.tight_layout()
        path = folder / f"case_{len(paths)}_{Path(test.ids[case]).stem}.png"
        fig.savefig(path, dpi=70)
        plt.close(fig)
        paths.append(str(path.relative_to(folder.parent)))
    return paths


# -- report -----------------------------------------------------------------------------------
def columns(region: str) -> list[str]:
    """Table header; ``region`` names where the pixel metrics are taken."""
    return [
        "row", "map variant", f"pixel AUROC ({region})", f"AP ({region})",
        f"best Dice ({region})", f"Dice @ val thr ({region})", "pixel AUROC (whole)",
        "AP (whole)", "best Dice (whole)", "image AUROC", "seconds", "seed 002 pixel AUROC",
    ]  # fmt: skip


def region_word(settings: dict[str, Any]) -> str:
    """``brain`` or ``head``: the foreground of the run's metrics."""
    return str(settings.get("region", "head"))


def _row_name(key: str, r: dict[str, Any]) -> str:
    name = f"{RECONSTRUCTORS[r['reconstructor']]} · {MAPS[r['map']]}"
    return name + (" (tuned on val)" if key.endswith("_tuned") else "")


def results_markdown(results: dict[str, Any]) -> str:
    s, split, rows = results["settings"], results["split"], results["rows"]
    lines = [
        "# LGG FLAIR, pixel level (seed 002) — `benchmarks/lgg_pixel.py`",
        "",
        f"Test patients {split['test_patients']} ({split['n']['test']} slices, "
        f"{split['n_tumour']['test']} with tumour); validation patients {split['val_patients']} "
        f"({split['n']['val']} slices); {split['n_train_normal']} tumour-free slices of "
        f"{len(split['train_patients'])} training patients for training; "
        f"{100 * split.get('lesion_pixels_in_foreground', float('nan')):.1f} % of the lesion "
        f"pixels lie inside the {region_word(s)} mask. Size {s['size']}², "
        f"channels {s['channels']}, epochs VAE {s['epochs']} / IntroVAE {s['introvae_epochs']} / "
        f"embedding {s['emb_epochs']} (early stopping on the validation normals), latent search "
        f"{s['latent_steps']} steps at lr {s['latent_lr']:g}, {s['threads']} CPU thread(s), "
        f"intensity scale {s['scale']}. Wall time of this call "
        f"{results['wall_seconds'] / 60:.1f} min; recorded training + reconstruction time of "
        f"the models it used {results['recorded_seconds'] / 60:.1f} min (reused models are "
        "not retrained).",
        "",
        "| " + " | ".join(columns(region_word(s))) + " |",
        "|" + "---|" * len(columns(region_word(s))),
    ]
    for key, r in rows.items():
        seed = SEED_002[r["reconstructor"]]
        seed_text = f"{seed[0]:.2f} ± {seed[1]:.2f}" if r["map"] == "pd" else "–"
        cells = [
            _row_name(key, r), r["variant"], _f(r["pixel_auroc"]), _f(r["pixel_ap"]),
            _f(r["best_dice"]), _f(r.get("dice_at_val_threshold")), _f(r["pixel_auroc_whole"]),
            _f(r["pixel_ap_whole"]), _f(r["best_dice_whole"]), _f(r["image_auroc"]),
            f"{r['seconds']:.0f}", seed_text,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    ref = results.get("reference", {}).get("flair_intensity")
    if ref:
        lines += [
            "",
            f"Reference without a model: the scaled FLAIR intensity as the map "
            f"({ref['variant']}, chosen on validation): pixel AUROC {_f(ref['pixel_auroc'])}, "
            f"AP {_f(ref['pixel_ap'])}, best Dice {_f(ref['best_dice'])} (@val thr "
            f"{_f(ref.get('dice_at_val_threshold'))}), whole-image AUROC "
            f"{_f(ref['pixel_auroc_whole'])}, image AUROC {_f(ref['image_auroc'])}.",
        ]
    lines += ["", f"## Targets (best row, inside the {region_word(s)})", ""]
    for line in targets(rows):
        lines.append(f"- {line}")
    patients = split["test_patients"]
    lines += [
        "",
        f"## Pixel AUROC inside the {region_word(s)} per test patient",
        "",
        "| row | " + " | ".join(patients) + " |",
        "|---|" + "---|" * len(patients),
    ]
    for key, r in rows.items():
        per = r.get("per_patient_pixel_auroc", {})
        cells = [_f(per.get(patient)) for patient in patients]
        lines.append(f"| {_row_name(key, r)} ({r['variant']}) | " + " | ".join(cells) + " |")
    lines += ["", "## Map post-processing tried on the validation patients", ""]
    lines += [
        "Chosen per row by validation pixel AUROC + best Dice inside the "
        f'{region_word(s)}; the test numbers of the chosen variant are the "tuned" rows above.',
        "",
        "| row | variant | val pixel AUROC | val AP | val best Dice | val image AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        for variant, m in r.get("validation_variants", {}).items():
            lines.append(
                f"| {_row_name(key, r)} | {variant} | {_f(m['pixel_auroc'])} | "
                f"{_f(m['pixel_ap'])} | {_f(m['best_dice'])} | {_f(m['image_auroc'])} |"
            )
    lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    if results.get("figures"):
        lines += ["", "Figures: " + ", ".join(f"`{p}`" for p in results["figures"])]
    return "\n".join(lines) + "\n"


def targets(rows: dict[str, Any]) -> list[str]:
    """Met / missed lines for the issue's targets."""
    if not rows:
        return ["no rows"]
    best = max(rows, key=lambda k: rows[k]["pixel_auroc"] or 0.0)
    best_dice = max(rows, key=lambda k: rows[k]["best_dice"] or 0.0)
    lines = []
    for metric, key in (("pixel_auroc", best), ("best_dice", best_dice)):
        value, goal = rows[key][metric], TARGETS[metric]
        verdict = "met" if value is not None and value >= goal else "missed"
        lines.append(
            f"{metric} ≥ {goal}: **{verdict}** — best {_f(value)} ({_row_name(key, rows[key])}, "
            f"{rows[key]['variant']})"
        )
    chosen = max(rows, key=lambda k: _selection_key(rows[k]["validation"]))
    r = rows[chosen]
    lines.append(
        f'(the best rows above are picked on the test patients, as the issue\'s "best row"; '
        f"the row the validation patients pick, by pixel AUROC + best Dice, is "
        f"{_row_name(chosen, r)} [{r['variant']}]: validation {_f(r['validation']['pixel_auroc'])}"
        f" / {_f(r['validation']['best_dice'])}, test {_f(r['pixel_auroc'])} / "
        f"{_f(r['best_dice'])} pixel AUROC / best Dice)"
    )
    for suffix in ("", "_tuned"):
        pairs = [
            (name, rows.get(f"{name}_residual{suffix}"), rows.get(f"{name}_pd{suffix}"))
            for name in RECONSTRUCTORS
        ]
        pairs = [(n, a, b) for n, a, b in pairs if a and b]
        if not pairs:
            continue
        name, residual, pd = max(pairs, key=lambda p: p[1]["pixel_auroc"] or 0.0)
        ok = (pd["pixel_auroc"] or 0.0) >= (residual["pixel_auroc"] or 0.0)
        lines.append(
            f"PD map ≥ residual for the best reconstructor ({RECONSTRUCTORS[name]}"
            f"{', tuned rows' if suffix else ', base rows'}): **{'met' if ok else 'missed'}** — "
            f"PD {_f(pd['pixel_auroc'])} vs residual {_f(residual['pixel_auroc'])} pixel AUROC"
        )
    return lines


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=64, help="side of the slices (mult. of 16)")
    parser.add_argument("--channels", choices=("flair", "all"), default="flair")
    parser.add_argument(
        "--scale", choices=("median", "p99.5"), default="median", help="per-volume intensity scale"
    )
    parser.add_argument(
        "--region", choices=("brain", "head"), default="brain",
        help="brain: skull-stripped input, metrics inside the brain; head: scalp and skull kept",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, help="VAE epochs (default 100; all nets if given)")
    parser.add_argument("--introvae-epochs", type=int, help="default 80 (or --epochs)")
    parser.add_argument("--emb-epochs", type=int, help="embedding epochs, default 30 (or --epochs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pd-stride", type=int, help="patch-map stride (default size/64)")
    parser.add_argument(
        "--positive-blur", type=float, default=0.0,
        help="largest Gaussian SD (px) blurring the triplet positives (0: seed 002's triplets)",
    )  # fmt: skip
    parser.add_argument("--latent-steps", type=int, default=100)
    parser.add_argument("--latent-lr", type=float, default=1e-3)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    parser.add_argument("--figures", type=int, default=4, help="test slices drawn")
    parser.add_argument("--quick", action="store_true", help="smoke run: few slices, epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="ignore saved models")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error("--size must be a multiple of 16")
    args.introvae_epochs = args.introvae_epochs or args.epochs or 80
    args.emb_epochs = args.emb_epochs or args.epochs or 30
    args.epochs = args.epochs or 100
    if args.quick:
        args.epochs, args.introvae_epochs, args.emb_epochs = 2, 2, 1
        args.latent_steps = min(args.latent_steps, 3)
        args.pd_stride = args.pd_stride or 4
    args.in_channels = 1 if args.channels == "flair" else 3
    args.flair_index = FLAIR if args.in_channels == 3 else 0
    return args


def recorded_seconds(out: Path) -> float:
    """Sum of the training and reconstruction seconds kept in ``OUT/**/timing.json``."""
    return float(
        sum(sum(json.loads(p.read_text()).values()) for p in sorted(out.rglob("timing.json")))
    )


def quick_split(split: dict[str, list[str]]) -> dict[str, list[str]]:
    """--quick: the first 4 training, 1 validation and 1 test patient of the split."""
    keep = {"train": 4, "val": 1, "test": 1}
    return {name: patients[: keep[name]] for name, patients in split.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not DATA.exists():
        print(f"lgg_pixel: {DATA} not found; the benchmark needs ../shared/data/lgg_mri_2d "
              "beside the repository")  # fmt: skip
        return 1
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest, patients = manifest_patients(out)
    split = split_patients(patients, seed=args.seed)
    if args.quick:  # read only the patients the smoke run uses
        split = quick_split(split)
        manifest = restrict_manifest(manifest, {p for part in split.values() for p in part})
    data = load_lgg(manifest, out / "cache", args.size, args.channels, args.scale, args.region)
    index = split_index(data.groups, split)
    n_train_normal = int((data.labels[index["train"]] == 0).sum())
    print(
        f"LGG: {len(data)} slices; train {len(split['train'])} patients "
        f"({n_train_normal} normal slices), val {split['val']}, test {split['test']}"
    )
    models = train_models(data, index, args, out)
    rows, kept = run_rows(data, index, models, args, out)
    reference = intensity_reference(data, index, args)
    test = data.subset(index["test"])
    paths = figures(test, kept, out / "figures", args.figures) if args.figures else []
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "rows")}
    results = {
        "settings": {**settings, "rows": args.rows},
        "split": {
            "rule": "patients sorted, permuted with numpy default_rng(seed): first 6 test, "
            "next 4 validation, rest training" + (" (--quick: subset)" if args.quick else ""),
            "train_patients": split["train"],
            "val_patients": split["val"],
            "test_patients": split["test"],
            "n": {k: int(len(v)) for k, v in index.items()},
            "n_tumour": {k: int(data.labels[v].sum()) for k, v in index.items()},
            "n_train_normal": n_train_normal,
            "lesion_pixels_in_foreground": float(
                (data.masks & data.foreground).sum() / max(int(data.masks.sum()), 1)
            ),
        },
        "rows": rows,
        "reference": {"flair_intensity": reference},
        "figures": paths,
        "notes": NOTES,
        "wall_seconds": time.perf_counter() - start,
        "recorded_seconds": recorded_seconds(out),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    markdown = results_markdown(results)
    atomic_write_text(out / "results.md", markdown)
    print(markdown)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


NOTES = [
    "Brain = morphological brain mask of the native FLAIR (--region brain, input skull-"
    "stripped); head = non-background region, skull and scalp included (--region head, as "
    "seed 002 evaluates inside the body without skull-stripping); pixel metrics pool every "
    "test slice.",
    "Seed 002's figures are tumour pixel ROC-AUC (mean ± SD over patients) of the patch "
    "discriminator on brain metastases in contrast-enhanced 3D GRE at 256², another task.",
    "The one embedding network (trained on normal patches only) serves the three "
    "reconstructors' patch-discriminator rows.",
    "Seconds: training of the networks a row uses + reconstructions of the validation and test "
    "slices (with latent search where named) + its maps; resumed runs report the recorded times.",
    "Dice @ val thr: the cut-off that gave the best Dice on the validation patients, applied "
    "to the test patients; best Dice picks the cut-off on the test patients themselves.",
]


if __name__ == "__main__":
    sys.exit(main())
