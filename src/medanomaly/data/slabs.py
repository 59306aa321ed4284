"""2.5D input: ``k`` adjacent slices of a volume stacked as the channels of a 2D image.

Lin et al. 2021 feeds its 2D networks five slices around the optic-nerve plane. A 2.5D model is a
2D model with ``in_channels = k * C``; these helpers make its input from 3D volumes:

* :func:`stack_slices`: one slab ``(k * C, *plane)`` around a chosen slice of one volume.
* :func:`volume_slabs`: every slab of a volume, one per slice (a stack of 2D slices of one
  patient becomes one training example per slice, each with its neighbours as context).
* :func:`to_slabs`: an :class:`ImageSet` of 3D volumes -> an :class:`ImageSet` of slabs
  (labels, ids and groups kept; lesion and foreground masks taken at the centre slice).

Slices beyond the ends of the volume repeat the edge slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medanomaly.data.sets import ImageSet


def _check(k: int, volume: np.ndarray) -> None:
    if k < 1 or k % 2 == 0:
        raise ValueError(f"k must be a positive odd number of slices, got {k}")
    if volume.ndim != 4:
        raise ValueError(f"expected a volume (C, X, Y, Z), got shape {volume.shape}")


def stack_slices(volume: np.ndarray, index: int, k: int = 5, axis: int = -1) -> np.ndarray:
    """The ``k`` slices around ``index`` along ``axis``, stacked as channels.

    Args:
        volume: ``(C, X, Y, Z)``.
        index: The centre slice.
        k: Number of slices (odd).
        axis: Slice axis among the spatial axes (0, 1, 2 or negative).

    Returns:
        ``(k * C, *plane)``: slice ``index - k // 2`` first; channels of one slice together.
    """
    _check(k, volume)
    spatial_axis = axis % 3 + 1
    n = volume.shape[spatial_axis]
    if not 0 <= index < n:
        raise IndexError(f"slice {index} outside a volume of {n} slices along axis {axis}")
    picks = np.clip(np.arange(index - k // 2, index + k // 2 + 1), 0, n - 1)
    slab = np.take(volume, picks, axis=spatial_axis)  # (C, ..., k, ...)
    slab = np.moveaxis(slab, spatial_axis, 0)  # (k, C, *plane)
    return np.ascontiguousarray(slab.reshape(-1, *slab.shape[2:]))


def volume_slabs(volume: np.ndarray, k: int = 5, axis: int = -1) -> np.ndarray:
    """Every slab of ``volume`` along ``axis``: ``(n_slices, k * C, *plane)``."""
    _check(k, volume)
    n = volume.shape[axis % 3 + 1]
    return np.stack([stack_slices(volume, i, k, axis) for i in range(n)])


def to_slabs(
    images: ImageSet,
    k: int = 5,
    index: int | Sequence[int] | None = None,
    axis: int = -1,
) -> ImageSet:
    """Turn a set of 3D volumes into 2.5D slabs, one per volume.

    Args:
        images: Volumes ``(N, C, X, Y, Z)``.
        k: Slices per slab (odd).
        index: Centre slice, one for all or one per volume; default the middle slice.
        axis: Slice axis among the spatial axes.

    Returns:
        An :class:`ImageSet` ``(N, k * C, *plane)`` with the same labels, ids and groups.
    """
    if images.images.ndim != 5:
        raise ValueError(f"to_slabs needs volumes (N, C, X, Y, Z), got {images.images.shape}")
    n_slices = images.images.shape[axis % 3 + 2]
    centres = np.broadcast_to(
        np.asarray(n_slices // 2 if index is None else index, dtype=np.int64), (len(images),)
    )
    return ImageSet(
        images=np.stack(
            [stack_slices(v, int(i), k, axis) for v, i in zip(images.images, centres, strict=True)]
        ),
        labels=images.labels,
        ids=list(images.ids),
        masks=_centre_planes(images.masks, centres, axis),
        foreground=_centre_planes(images.foreground, centres, axis),
        groups=images.groups,
    )


def _centre_planes(masks: np.ndarray | None, centres: np.ndarray, axis: int) -> np.ndarray | None:
    """The plane of each mask ``(X, Y, Z)`` at its centre slice."""
    if masks is None:
        return None
    return np.stack(
        [np.take(m, int(i), axis=axis % 3) for m, i in zip(masks, centres, strict=True)]
    )
