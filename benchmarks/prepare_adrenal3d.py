"""Data preparation of the AdrenalMNIST3D benchmark: volumes and a manifest for ``compare``.

Reads ``adrenalmnist3d_64.npz`` (MedMNIST v2, CC BY 4.0: binary adrenal shape masks from
abdominal CT, 0/255, label 0 = normal, 1 = hyperplasia) and writes one compressed ``.npz``
per volume (float32 in [0, 1], ``(64, 64, 64)``, key ``image``) and ``OUT/manifest.csv`` with
``path,label,group,split``: the official train / val / test splits in the ``split`` column,
each volume its own group. Then the comparison is one command::

    .venv/bin/python benchmarks/prepare_adrenal3d.py --out runs/adrenal3d
    medanomaly compare --spec adrenal3d --out runs/compare_adrenal3d
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preparation import preparation_parser, run_preparation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "adrenal3d" / "adrenalmnist3d_64.npz"
SPLITS = ("train", "val", "test")


def write_volumes(npz: Path, out: Path) -> Path:
    """Write ``out/volumes/<split>_<index>.npz`` and ``out/manifest.csv``; return the manifest.

    Raises:
        ValueError: The archive lacks a ``<split>_images`` / ``<split>_labels`` pair or the
            counts of a pair differ (the message names the file and the key).
    """
    folder = out / "volumes"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with np.load(npz) as data:
        for split in SPLITS:
            images, labels = _split_arrays(npz, data, split)
            scale = max(float(images.max()), 1.0)  # 0/255 masks -> [0, 1]
            for i, (volume, label) in enumerate(zip(images, labels, strict=True)):
                path = folder / f"{split}_{i:04d}.npz"
                if not path.exists():
                    np.savez_compressed(path, image=(volume / scale).astype(np.float32))
                rows.append((str(path.resolve()), int(label), f"{split}_{i:04d}", split))
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "split"])
        writer.writerows(rows)
    return manifest


def _split_arrays(npz: Path, data: np.lib.npyio.NpzFile, split: str) -> tuple[np.ndarray, ...]:
    keys = (f"{split}_images", f"{split}_labels")
    missing = [k for k in keys if k not in data.files]
    if missing:
        raise ValueError(f"{npz}: no {missing} (holds {sorted(data.files)})")
    images, labels = data[keys[0]], data[keys[1]].reshape(-1)
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            f"{npz}: {keys[0]} has shape {images.shape}, {keys[1]} {len(labels)} labels; "
            "expected (N, D, H, W) and N labels"
        )
    return images, labels


def main(argv: list[str] | None = None) -> int:
    parser = preparation_parser(__doc__, DATA, "adrenal3d")
    args = parser.parse_args(argv)
    return run_preparation(write_volumes, args)


if __name__ == "__main__":
    sys.exit(main())
