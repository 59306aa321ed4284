"""Data preparation of the 3D screening benchmark (Hjohlman 2022 analogue): a manifest for compare.

Healthy IXI T1 volumes (../shared/data/ixi_t1_3d, 42 volumes) train a 3D ResNet autoencoder;
a folder that mixes 8 held-out IXI normals with planted outliers is then screened. This script
writes that folder and ``OUT/manifest.csv`` (``path,label,group,split``):

* ``train``: 27 IXI volumes (normal);
* ``val``: 7 more IXI normals (the same 7 that ``engine.val_fraction: 0.2`` held out of the
  34 training volumes in the old benchmark: they choose the epoch and the threshold,
  mean + 3 SD of their scores) and 5 planted outliers made from 5 of them (one per kind
  below), so that the validation part can also rank candidates (AUROC) for ``OUT/best``;
* ``test``: the 8 held-out IXI normals and 13 planted outliers, all in ``OUT/screen``:

  - ``brats_*``: the BraTS T1c volumes of ../shared/data/brats_3d (another protocol:
    skull-stripped, z-scored inside the brain, 1 mm);
  - ``ct_*``: a body CT (../shared/data/totalseg_ct/example_ct.nii.gz) and a head CT DICOM
    series (../shared/data/dicom_head_ct);
  - held-out IXI volumes altered on disk (voxel order and header as in the original file):
    ``metal_*`` (bright metal-like streaks through 12 axial slices), ``missing_*`` (a block of
    10 axial slices set to 0), ``noise_*`` (Gaussian noise of 25 % of the 99th intensity
    percentile), ``flip_*`` (left-right mirrored voxels, header unchanged) and
    ``flip_header_*`` (voxels unchanged, the header's left-right axis mirrored: a conversion
    error, after which every reader shows a mirrored brain).

``group`` is the subject (an altered volume keeps its source's). Then::

    .venv/bin/python benchmarks/prepare_screen3d.py --out runs/screen3d
    medanomaly compare --spec screen3d --out runs/compare_screen3d
    medanomaly screen --run runs/compare_screen3d/best --data runs/screen3d/screen --out S
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from medanomaly.training.engine import split_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preparation import preparation_parser, run_preparation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
N_HELD_OUT = 8
VAL_FRACTION = 0.2  # the old benchmark's engine.val_fraction (seed 0) over the training volumes
PLANTED_KINDS = ("metal", "missing", "noise", "flip", "flip_header")


def ixi_volumes(data: Path) -> list[Path]:
    """The IXI T1 volumes, sorted by name."""
    files = sorted((data / "ixi_t1_3d" / "t1").glob("*.nii.gz"))
    if len(files) <= N_HELD_OUT:
        folder = data / "ixi_t1_3d" / "t1"
        sys.exit(f"prepare_screen3d: need more than {N_HELD_OUT} volumes in {folder}")
    return files


def split_ixi(files: list[Path], seed: int = 0) -> dict[str, list[Path]]:
    """``train``, ``val`` and ``test`` IXI volumes, as the old benchmark drew them.

    ``test``: ``N_HELD_OUT`` volumes (a seeded permutation); ``val``: the share of the rest
    that the engine's seeded hold-out (``engine.val_fraction`` 0.2, seed 0) kept for validation.
    """
    order = np.random.default_rng(seed).permutation(len(files))
    held = sorted(files[i] for i in order[:N_HELD_OUT])
    rest = [f for f in files if f not in held]
    keep, val = split_indices(len(rest), VAL_FRACTION, seed)
    return {"train": [rest[i] for i in keep], "val": [rest[i] for i in val], "test": held}


def _link(source: Path, target: Path) -> None:
    if not target.exists():
        target.symlink_to(source.resolve())


def _save(array: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """Write ``array`` as float32 NIfTI with ``affine`` and ``like``'s header (atomically)."""
    header = like.header.copy()
    header.set_data_dtype(np.float32)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine, header), tmp)
    os.replace(tmp, path)


def _ras_transforms(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Orientation transforms from the file's voxel order to RAS+ and back."""
    on_disk = nib.orientations.io_orientation(image.affine)
    ras = nib.orientations.axcodes2ornt("RAS")
    return (
        nib.orientations.ornt_transform(on_disk, ras),
        nib.orientations.ornt_transform(ras, on_disk),
    )


def _metal(ras: np.ndarray, top: float) -> np.ndarray:
    """Six bright streaks through 12 axial slices, like metal artefacts."""
    nx, ny, nz = ras.shape
    cx, cy, cz = nx // 2, int(ny * 0.6), int(nz * 0.55)
    t = np.arange(-max(nx, ny), max(nx, ny))
    for angle in np.linspace(0, np.pi, 6, endpoint=False):
        xs = np.clip((cx + t * np.cos(angle)).astype(int), 0, nx - 1)
        ys = np.clip((cy + t * np.sin(angle)).astype(int), 0, ny - 1)
        for dz in range(-6, 6):
            ras[xs, ys, cz + dz] = 4.0 * top
            ras[np.clip(xs + 1, 0, nx - 1), ys, cz + dz] = 4.0 * top
    return ras


def alter_ras(kind: str, ras: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The planted alteration of a RAS+ array (x: left-right, y: back-front, z: up-down)."""
    ras = ras.copy()
    top = float(np.percentile(ras, 99))
    if kind == "metal":
        return _metal(ras, top)
    if kind == "missing":
        start = int(ras.shape[2] * 0.5)
        ras[:, :, start : start + 10] = 0.0
        return ras
    if kind == "noise":
        return np.clip(ras + rng.normal(0.0, 0.25 * top, ras.shape), 0, None)
    if kind == "flip":
        return ras[::-1]
    raise ValueError(f"unknown planted outlier {kind!r}")


def plant(kind: str, image: nib.Nifti1Image, rng: np.random.Generator, path: Path) -> None:
    """Write an altered copy of a volume, in the file's own voxel order and header.

    ``flip_header`` keeps the voxels and mirrors the affine's left-right axis (a conversion
    error: readers then mirror the brain); the others alter the voxels and keep the header.
    """
    array = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine.copy()
    to_ras, back = _ras_transforms(image)
    if kind == "flip_header":
        axis = int(np.flatnonzero(to_ras[:, 0] == 0)[0])  # the file axis that becomes R-L
        mirror = np.eye(4)
        mirror[axis, axis], mirror[axis, 3] = -1.0, array.shape[axis] - 1
        _save(array, affine @ mirror, image, path)
        return
    ras = nib.orientations.apply_orientation(array, to_ras)
    altered = nib.orientations.apply_orientation(alter_ras(kind, ras, rng), back)
    _save(altered, affine, image, path)


def _subject(path: Path) -> str:
    return path.name.split(".")[0]


def planted_rows(
    sources: list[Path], folder: Path, split: str, seed: int
) -> list[tuple[Path, str, str, str]]:
    """One planted outlier per kind, made from ``sources`` in turn, written to ``folder``."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind, source in zip(PLANTED_KINDS, sources, strict=False):
        target = folder / f"{kind}_{source.name}"
        if not target.exists():
            plant(kind, nib.load(source), rng, target)
        rows.append((target, "abnormal", _subject(source), split))
    return rows


def other_protocols(data: Path, folder: Path) -> list[tuple[Path, str, str, str]]:
    """The BraTS and CT test outliers, linked into ``folder``."""
    rows = []
    for case in sorted((data / "brats_3d").glob("*/*/T1c_subtrMeanDivStd.nii.gz")):
        target = folder / f"brats_{case.parent.name}.nii.gz"
        _link(case, target)
        rows.append((target, "abnormal", case.parent.name, "test"))
    ct = {"ct_body.nii.gz": data / "totalseg_ct" / "example_ct.nii.gz"}
    ct["ct_head_dicom"] = data / "dicom_head_ct"
    for name, source in ct.items():
        if source.exists():
            _link(source, folder / name)
            rows.append((folder / name, "abnormal", name.split(".")[0], "test"))
    return rows


def prepare(data: Path, out: Path) -> Path:
    """Write the planted outliers and ``out/manifest.csv``; return the manifest."""
    screen, val_folder = out / "screen", out / "val"
    screen.mkdir(parents=True, exist_ok=True)
    val_folder.mkdir(parents=True, exist_ok=True)
    parts = split_ixi(ixi_volumes(data))
    rows = [(p, "normal", _subject(p), "train") for p in parts["train"]]
    rows += [(p, "normal", _subject(p), "val") for p in parts["val"]]
    rows += planted_rows(parts["val"], val_folder, "val", seed=1)
    for path in parts["test"]:
        _link(path, screen / f"normal_{path.name}")
        rows.append((screen / f"normal_{path.name}", "normal", _subject(path), "test"))
    rows += planted_rows(parts["test"], screen, "test", seed=0)
    rows += other_protocols(data, screen)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "split"])
        writer.writerows((str(p.absolute()), label, g, s) for p, label, g, s in rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = preparation_parser(__doc__, DATA, "screen3d")
    args = parser.parse_args(argv)
    return run_preparation(prepare, args, needed=args.data / "ixi_t1_3d")


if __name__ == "__main__":
    sys.exit(main())
