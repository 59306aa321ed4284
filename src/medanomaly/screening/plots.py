"""Figures of a screen: the latent map (UMAP) and the error-against-size scatter."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medanomaly.reports.figures import save_figure  # noqa: E402
from medanomaly.screening.result import ScreenResult  # noqa: E402
from medanomaly.screening.size_bias import ERRORS, SIZES  # noqa: E402


def plot_latent_map(
    embedding: np.ndarray,
    values: np.ndarray,
    flagged: np.ndarray,
    path: str | Path,
    label: str,
    title: str,
    noise: np.ndarray | None = None,
) -> Path:
    """UMAP scatter coloured by ``values``, flagged cases ringed in black.

    Args:
        embedding: 2D coordinates ``(N, 2)``.
        values: Colour per case (NaN drawn grey).
        flagged: True for the flagged cases.
        path: PNG to write.
        label: Colour-bar label.
        title: Figure title.
        noise: True for DBSCAN noise cases (marked with a small cross), or ``None``.

    Returns:
        The path written.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    values = np.ma.masked_invalid(np.asarray(values, dtype=np.float64))
    dots = ax.scatter(
        embedding[:, 0], embedding[:, 1], c=values, cmap=cmap, s=18, plotnonfinite=True
    )
    fig.colorbar(dots, ax=ax, label=label)
    if flagged.any():
        ax.scatter(
            embedding[flagged, 0],
            embedding[flagged, 1],
            s=90,
            facecolors="none",
            edgecolors="black",
            linewidths=1.4,
            label=f"flagged ({int(flagged.sum())})",
        )
    if noise is not None and noise.any():
        ax.scatter(
            embedding[noise, 0],
            embedding[noise, 1],
            s=30,
            marker="x",
            color="tab:red",
            linewidths=1.0,
            label=f"DBSCAN noise ({int(noise.sum())})",
        )
    if flagged.any() or (noise is not None and noise.any()):
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_size_bias(result: ScreenResult, path: str | Path) -> Path:
    """2x2 scatter: each error against each size, Spearman's rho in the panel titles."""
    sizes = {"voxel_count": result.voxel_counts, "foreground_voxels": result.foreground_voxels}
    errors = {"mse": result.mse, "masked_mse": result.masked_mse}
    flagged = result.flagged
    fig, axes = plt.subplots(2, 2, figsize=(8, 6.5), squeeze=False)
    for row, error in zip(axes, ERRORS, strict=True):
        for ax, size in zip(row, SIZES, strict=True):
            x, y = np.asarray(sizes[size], dtype=float), np.asarray(errors[error], dtype=float)
            ax.scatter(x[~flagged], y[~flagged], s=12, color="tab:blue", label="not flagged")
            ax.scatter(x[flagged], y[flagged], s=16, color="tab:red", label="flagged")
            found = result.size_bias[error][size]
            ax.set_title(
                f"{error} vs {size}: rho {found['rho']:.2f} (p {found['p']:.2g})"
                if math.isfinite(found["rho"])
                else f"{error} vs {size}: rho n/a",
                fontsize=9,
            )
            ax.set_xlabel(size)
            ax.set_ylabel(error)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)
