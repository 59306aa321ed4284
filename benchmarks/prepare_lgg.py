"""Data preparation of the LGG benchmarks: preprocessed FLAIR slices and a manifest for compare.

Reads a ``kaggle_3m``-style folder (one folder per patient with ``*_N.tif`` slices and
``*_N_mask.tif`` FLAIR-abnormality masks; default ../shared/data/lgg_mri_2d/kaggle_3m):

1. FLAIR (channel 1), area-resized to ``--size``;
2. skull-stripped with the morphological brain mask of each patient's native slices
   (``medanomaly.transforms.mask``; -1 outside the brain);
3. scaled per patient inside the brain (0 .. 3 x the median -> [-1, 1]): one scale per scan,
   robust to the tumour, which a per-slice transform could not give.

Writes one ``.npy`` per slice and per mask and ``OUT/manifest.csv``
(``path,label,mask,group``; label 1 = a non-empty mask; group = patient). Then::

    .venv/bin/python benchmarks/prepare_lgg.py --out runs/lgg
    medanomaly compare --spec lgg_pixel --out runs/compare_lgg

``--data DIR`` takes any folder laid out like ``kaggle_3m``.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
import tifffile
import torch

from medanomaly.data.loading import load_dataset
from medanomaly.data.sets import ImageSet
from medanomaly.transforms.mask import brain_masks, head_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preparation import preparation_parser, run_preparation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lgg_mri_2d" / "kaggle_3m"
FLAIR = 1


def source_manifest(root: Path, out: Path) -> Path:
    """``OUT/source.csv``: ``path,label,mask,group`` of the raw slices under ``root``.

    Raises:
        FileNotFoundError: If ``root`` holds no patient folders with ``*_mask.tif`` slices.
    """
    patients = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not any(any(p.glob("*_mask.tif")) for p in patients):
        raise FileNotFoundError(
            f"{root}: no patient folders with *_N.tif / *_N_mask.tif slices (laid out like "
            "kaggle_3m: one folder per patient)"
        )
    manifest = out / "source.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "mask", "group"])
        for patient in patients:
            for mask in sorted(patient.glob("*_mask.tif"), key=slice_number):
                image = mask.with_name(mask.name.replace("_mask", ""))
                writer.writerow([image, int(tifffile.imread(mask).any()), mask, patient.name])
    return manifest


def slice_number(path: Path) -> int:
    """The slice index ``N`` of ``*_N.tif`` / ``*_N_mask.tif``."""
    return int(re.findall(r"_(\d+)(?:_mask)?\.tif$", path.name)[0])


def region_masks(flair: np.ndarray, groups: np.ndarray, size: int) -> np.ndarray:
    """Brain masks ``(N, size, size)`` from native-resolution FLAIR slices ``(N, H, W)``.

    Per patient (one threshold per scan) at the native grid, whose radii suit the 256^2
    slices; then area-resized to ``size`` and kept where more than half of a pixel is inside.
    """
    brain = np.zeros((len(flair), size, size), bool)
    for patient in np.unique(groups):
        index = np.flatnonzero(groups == patient)
        native = brain_masks(flair[index], head_masks(flair[index]))
        brain[index] = area_mask(native, size)
    return brain


def area_mask(masks: np.ndarray, size: int) -> np.ndarray:
    """Boolean masks ``(n, H, W)`` area-resized to ``size``: inside where more than half is."""
    fractions = torch.nn.functional.interpolate(
        torch.from_numpy(masks[:, None].astype(np.float32)), size=(size, size), mode="area"
    )
    return fractions[:, 0].numpy() > 0.5


def scale_patient(images: np.ndarray, region: np.ndarray) -> np.ndarray:
    """One patient's slices ``(n, H, W)``: 0 .. 3 x the median in ``region`` -> [-1, 1].

    Outside ``region`` the slices are -1. The median keeps tissue mid-range and bright
    lesions below the ceiling, whatever the tumour's size.
    """
    upper = 3.0 * float(np.median(images[region])) or 1.0
    scaled = np.clip(images / upper, 0.0, 1.0) * 2.0 - 1.0
    scaled[~region] = -1.0
    return scaled.astype(np.float32)


def preprocess(manifest: Path, cache: Path, size: int) -> ImageSet:
    """The manifest's FLAIR slices at ``size``, skull-stripped and scaled per patient."""
    read = {"channel": FLAIR}
    resize = [{"resize": {"shape": [size, size], "mode": "area"}}]
    small, _ = load_dataset(manifest, resize, read_options=read, strict=True, cache=cache)
    native, _ = load_dataset(manifest, [], read_options=read, strict=True, cache=cache)
    brain = region_masks(native.images[:, 0], small.groups, size)
    scaled = np.empty(small.images.shape[:1] + small.images.shape[2:], np.float32)
    for patient in np.unique(small.groups):
        index = np.flatnonzero(small.groups == patient)
        scaled[index] = scale_patient(small.images[index, 0], brain[index])
    return ImageSet(scaled[:, None], small.labels, small.ids, small.masks, brain, small.groups)


def prepare(data: Path, out: Path, size: int = 64) -> Path:
    """Write the preprocessed slices, masks and ``out/manifest.csv``; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    slices = preprocess(source_manifest(data, out), out / "cache", size)
    folder = out / "slices"
    folder.mkdir(exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "mask", "group"])
        for i, case in enumerate(slices.ids):
            stem = Path(case).stem
            np.save(folder / f"{stem}.npy", slices.images[i, 0])
            np.save(folder / f"{stem}_mask.npy", slices.masks[i].astype(np.uint8))
            row = [f"slices/{stem}.npy", int(slices.labels[i]), f"slices/{stem}_mask.npy"]
            writer.writerow([*row, slices.groups[i]])
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = preparation_parser(__doc__, DATA, "lgg")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    return run_preparation(prepare, args, size=args.size)


if __name__ == "__main__":
    sys.exit(main())
