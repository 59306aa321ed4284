"""Foreground (body) mask, stored in ``meta["foreground"]`` for masked scores and metrics."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medanomaly.image import MedicalImage
from medanomaly.transforms._base import FOREGROUND_KEY, Transform, as_bool, as_float, check_image


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Return the largest connected component of a bool mask (face connectivity)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


class ForegroundMask(Transform):
    """Mark voxels above ``threshold`` (in any channel) as foreground; the array is unchanged.

    Seed 004 masks CCTA at HU > -990. The mask goes to ``meta["foreground"]`` (bool, spatial
    shape) and later geometric transforms keep it in step. Run it while the values are still
    in the unit the threshold is given in (HU before windowing/normalisation).

    Args:
        threshold: Voxels with a value strictly above it are foreground.
        fill_holes: Fill enclosed holes (``scipy.ndimage.binary_fill_holes``, in 2D or 3D).
        largest_component: Keep only the largest connected component (drops the table, etc.).
    """

    name = "foreground_mask"

    def __init__(
        self, threshold: float = -990.0, fill_holes: bool = True, largest_component: bool = False
    ) -> None:
        self.threshold = as_float(self.name, "threshold", threshold)
        self.fill_holes = as_bool(self.name, "fill_holes", fill_holes)
        self.largest_component = as_bool(self.name, "largest_component", largest_component)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the image with ``meta["foreground"]`` set."""
        check_image(self.name, image)
        mask = (image.array > self.threshold).any(axis=0)
        if self.largest_component:
            mask = largest_component(mask)
        if self.fill_holes:
            mask = ndimage.binary_fill_holes(mask)
        return image.with_array(image.array, meta={**image.meta, FOREGROUND_KEY: mask})
