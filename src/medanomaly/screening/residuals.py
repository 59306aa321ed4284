"""Reconstruction errors over all voxels and over the foreground, per case."""

from __future__ import annotations

import numpy as np

from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import AnomalyResult


def foreground_masks(images: ImageSet, threshold: float | None = None) -> tuple[np.ndarray, str]:
    """Foreground voxels ``(N, *spatial)`` of preprocessed images, and the rule used.

    The data's own mask (``images.foreground``) when it has one; else any channel above
    ``threshold`` when it is given; else any channel above the image's minimum.

    Args:
        images: The cases.
        threshold: Intensity cut-off in preprocessed units (a detector's
            ``foreground_threshold``), or ``None``.

    Returns:
        ``(masks, rule in words)``.
    """
    if images.foreground is not None:
        return np.asarray(images.foreground, dtype=bool), "foreground mask provided by the data"
    arrays = images.images
    if threshold is not None:
        return (arrays > threshold).any(axis=1), f"any channel > {threshold:g} (preprocessed)"
    lowest = arrays.min(axis=tuple(range(1, arrays.ndim)), keepdims=True)
    return (arrays > lowest).any(axis=1), "any channel above the image's minimum (preprocessed)"


def reconstruction_errors(
    images: np.ndarray, reconstructions: np.ndarray | None, foreground: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared residual per case over all voxels and over the foreground only.

    Args:
        images: Inputs ``(N, C, *spatial)``.
        reconstructions: The model's reconstructions (same shape) or ``None``.
        foreground: Foreground masks ``(N, *spatial)``.

    Returns:
        ``(mse, masked_mse)``, NaN where there is no reconstruction or no foreground voxel.
    """
    n = len(images)
    if reconstructions is None or reconstructions.shape != images.shape:
        return np.full(n, np.nan), np.full(n, np.nan)
    squared = np.square(images - reconstructions, dtype=np.float32).mean(axis=1)
    flat = squared.reshape(n, -1)
    mask = foreground.reshape(n, -1)
    mse = flat.mean(axis=1, dtype=np.float64)
    counts = mask.sum(axis=1)
    sums = np.where(mask, flat, 0.0).sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        masked = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return mse, masked


def map_percentiles(result: AnomalyResult) -> np.ndarray:
    """99.9th percentile of each case's anomaly map."""
    maps = np.asarray(result.maps)
    if maps.size == 0:
        return np.full(len(result.scores), np.nan)
    return np.percentile(maps.reshape(len(maps), -1), 99.9, axis=1)
