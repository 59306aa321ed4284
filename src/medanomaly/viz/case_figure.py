"""Pictures of one case: input | reconstruction | difference map (red = large, blue = small)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medanomaly.io.atomic import atomic_path  # noqa: E402

DIFF_CMAP = "jet"
PLANES = ("axis 0", "axis 1", "axis 2")


def orthogonal_slices(volume: np.ndarray, point: tuple[int, int, int]) -> list[np.ndarray]:
    """The three planes of a 3D ``volume`` through ``point`` (one per axis)."""
    i, j, k = point
    return [volume[i, :, :], volume[:, j, :], volume[:, :, k]]


BACKGROUND_SHARE = 0.1
"""A value held by at least this share of the voxels is taken as the background."""


def unique_names(ids: Sequence[str]) -> list[str]:
    """Short labels that tell cases apart: the file name, with parent folders where needed.

    ``a/T1.nii.gz`` and ``b/T1.nii.gz`` become ``a/T1.nii.gz`` and ``b/T1.nii.gz``; a name that
    no other case shares stays bare.
    """
    parts = [Path(str(case)).parts or (str(case),) for case in ids]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        counts = Counter(names)
        repeated = [i for i, n in enumerate(names) if counts[n] > 1 and depth[i] < len(parts[i])]
        if not repeated:
            return names
        for i in repeated:
            depth[i] += 1


def likely_foreground(image: np.ndarray) -> np.ndarray:
    """Voxels that differ from the background value (the value of at least 10 % of voxels).

    Without such a value (no flat background) every voxel counts.
    """
    values, counts = np.unique(image, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < BACKGROUND_SHARE * image.size or counts[top] == image.size:
        return np.ones(image.shape, dtype=bool)
    return image != values[top]


def peak_voxel(diff: np.ndarray, foreground: np.ndarray | None) -> tuple[int, ...]:
    """The voxel of the largest difference inside ``foreground`` (anywhere if it is empty)."""
    if foreground is None or not foreground.any():
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    inside = np.where(foreground, diff, -np.inf)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(inside)), diff.shape))


def _rows(
    image: np.ndarray, recon: np.ndarray | None, diff: np.ndarray, foreground: np.ndarray | None
) -> list[tuple]:
    """Per row: (title, image slice, recon slice, diff slice)."""
    if image.ndim == 2:
        return [("", image, recon, diff)]
    if foreground is None:
        foreground = likely_foreground(image)
    point = peak_voxel(diff, np.asarray(foreground, dtype=bool).reshape(diff.shape))
    recon_planes = orthogonal_slices(recon, point) if recon is not None else [None] * 3
    return [
        (f"{name} @ {point[n]}", img.T, None if rec is None else rec.T, dif.T)
        for n, (name, img, rec, dif) in enumerate(
            zip(
                PLANES,
                orthogonal_slices(image, point),
                recon_planes,
                orthogonal_slices(diff, point),
                strict=True,
            )
        )
    ]


def save_case_figure(
    image: np.ndarray,
    reconstruction: np.ndarray | None,
    diff_map: np.ndarray,
    path: str | Path,
    title: str = "",
    diff_max: float | None = None,
    foreground: np.ndarray | None = None,
) -> Path:
    """Save input | reconstruction | difference map overlaid on the input.

    2D images give one row; 3D volumes give three rows, the orthogonal planes through the
    voxel with the largest difference inside the foreground (so that a weak model's error in
    the air does not choose black planes).

    Args:
        image: The input, ``(C, *spatial)`` (first channel shown) or ``(*spatial)``.
        reconstruction: The model's reconstruction, same shape, or ``None``.
        diff_map: Anomaly map ``(*spatial)``.
        path: PNG file to write (atomically).
        title: Figure title (e.g. case id and score).
        diff_max: Upper end of the colour scale, shared across cases to make them comparable;
            defaults to this map's 99.9th percentile.
        foreground: Where to look for that voxel; ``None``: every voxel that differs from the
            image's background value (:func:`likely_foreground`).

    Returns:
        The path written.
    """
    image = image[0] if image.ndim == diff_map.ndim + 1 else image
    if reconstruction is not None and reconstruction.ndim == diff_map.ndim + 1:
        reconstruction = reconstruction[0]
    vmax = diff_max or float(np.percentile(diff_map, 99.9)) or 1e-12
    rows = _rows(image, reconstruction, diff_map, foreground)
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    lo, hi = float(np.min(image)), float(np.max(image))
    for ax_row, (label, img, rec, dif) in zip(axes, rows, strict=True):
        ax_row[0].imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax_row[0].set_title(f"input {label}".strip())
        if rec is not None:
            ax_row[1].imshow(rec, cmap="gray", vmin=lo, vmax=hi)
        ax_row[1].set_title("reconstruction")
        ax_row[2].imshow(img, cmap="gray", vmin=lo, vmax=hi)
        shown = ax_row[2].imshow(dif, cmap=DIFF_CMAP, vmin=0.0, vmax=vmax, alpha=0.55)
        ax_row[2].set_title("difference (red = large)")
        fig.colorbar(shown, ax=ax_row[2], fraction=0.046, pad=0.04)
        for ax in ax_row:
            ax.axis("off")
    return save_figure(fig, path, title)


def save_figure(fig: plt.Figure, path: str | Path, title: str = "") -> Path:
    """Title, lay out and write a figure as PNG atomically, then free it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
