"""Data preparation of the LGG pixel benchmark: preprocessed slices and a manifest for compare.

Reads a ``kaggle_3m``-style folder (one folder per patient with ``*_N.tif`` slices and
``*_N_mask.tif`` FLAIR-abnormality masks; default ../shared/data/lgg_mri_2d/kaggle_3m) with
``lgg_pixel.load_lgg``: FLAIR, area resize to ``--size``, skull-stripped with the
morphological brain mask (-1 outside the brain), scaled per patient inside the brain (3 x the
median), mapped to [-1, 1]. Writes one ``.npy`` per slice and per mask and
``OUT/manifest.csv`` (``path,label,mask,group``; group = patient). Then::

    .venv/bin/python benchmarks/prepare_lgg.py --out runs/lgg
    medanomaly compare --spec benchmarks/specs/lgg_pixel.yaml --out runs/compare_lgg

``--data DIR`` takes any folder laid out like ``kaggle_3m``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lgg_pixel import DATA, load_lgg, manifest_patients  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def prepare(data: Path, out: Path, size: int = 64) -> Path:
    """Write the preprocessed slices, masks and ``out/manifest.csv``; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    source, _ = manifest_patients(out, data)
    slices = load_lgg(source, out / "cache", size, "flair")
    folder = out / "slices"
    folder.mkdir(exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "mask", "group"])
        for i, case in enumerate(slices.ids):
            stem = Path(case).stem
            np.save(folder / f"{stem}.npy", slices.images[i, 0].astype(np.float32))
            np.save(folder / f"{stem}_mask.npy", slices.masks[i].astype(np.uint8))
            row = [f"slices/{stem}.npy", int(slices.labels[i]), f"slices/{stem}_mask.npy"]
            writer.writerow([*row, slices.groups[i]])
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lgg")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"skipped: {args.data} not found (needs ../shared/data beside the repo)")
        return 0
    print(f"wrote {prepare(args.data, args.out, args.size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
