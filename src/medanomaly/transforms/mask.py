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


def disk(radius: int) -> np.ndarray:
    """A filled disk structuring element of the given radius in pixels."""
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def head_masks(slices: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Head (non-background) masks ``(n, H, W)`` of one scan's slices ``(n, H, W)``.

    A voxel is head if it exceeds ``fraction`` of the scan's 99th percentile; each slice's
    mask is opened once (noise specks), reduced to its largest component and hole-filled. A
    slice without any head voxel gets an all-true mask (nothing is excluded on a guess).
    """
    slices = _check_slices("head_masks", slices)
    threshold = fraction * float(np.percentile(slices, 99))
    masks = []
    for image in slices:
        mask = ndimage.binary_opening(image > threshold)
        if mask.any():
            mask = ndimage.binary_fill_holes(largest_component(mask))
        else:
            mask = np.ones_like(mask)
        masks.append(mask)
    return np.stack(masks)


def brain_masks(
    slices: np.ndarray,
    head: np.ndarray | None = None,
    erode: int = 8,
    opening: int = 4,
    closing: int = 6,
    fraction: float = 0.5,
    grow: int | None = 8,
) -> np.ndarray:
    """Morphological brain extraction for MRI slices of one scan (no network, no atlas).

    Relies on what T1, T2 and FLAIR share: cortical bone is dark, so a dark band separates
    the scalp from the brain. Per slice: the head is eroded by ``erode`` px (scalp); tissue
    brighter than ``fraction`` of the scan's typical tissue intensity (median inside the head
    above its 20th percentile) is opened by a disk of ``opening`` px, which cuts the thin
    bridges to the scalp; the largest piece, grown back by the same disk within the tissue,
    closed by ``closing`` px and hole-filled (ventricles, dark lesions), is the brain. The
    default radii suit ~1 mm pixels (256^2 head slices); scale them with the pixel size.
    With ``grow``, the slices must be in anatomical order: from the slice with the most
    brain outwards, each slice's brain is kept within its inner neighbour's brain grown by
    ``grow`` px (the brain narrows towards the vertex and the skull base), which drops scalp
    arcs near the vertex and much of the orbits and sinuses. Unsuited to CT (bright skull);
    below the skull base the result stays a rough tissue mask.

    Args:
        slices: ``(n, H, W)`` intensities of one scan (one threshold for all slices).
        head: ``(n, H, W)`` head masks; ``head_masks(slices)`` when omitted.
        erode: Scalp margin removed from the head, pixels.
        opening: Radius that separates brain from scalp, pixels.
        closing: Radius that smooths the brain outline, pixels.
        fraction: Tissue threshold as a fraction of the typical tissue intensity.
        grow: Largest outward step of the brain outline from one slice to the next, pixels;
            ``None`` treats the slices independently.

    Returns:
        Bool ``(n, H, W)``; all-false for a slice without brain tissue.
    """
    slices = _check_slices("brain_masks", slices)
    head = head_masks(slices) if head is None else np.asarray(head, bool)
    if head.shape != slices.shape:
        raise ValueError(f"brain_masks: head {head.shape} does not match slices {slices.shape}")
    inside = slices[head]
    if inside.size == 0:
        return np.zeros_like(head)
    threshold = fraction * float(np.median(inside[inside >= np.percentile(inside, 20)]))
    brain = np.stack(
        [
            _brain_slice(image, mask, threshold, erode, opening, closing)
            for image, mask in zip(slices, head, strict=True)
        ]
    )
    return brain if grow is None else _consistent_with_neighbours(brain, grow)


def _consistent_with_neighbours(brain: np.ndarray, grow: int) -> np.ndarray:
    """Keep each slice inside its inner neighbour's brain grown by ``grow`` px."""
    out = brain.copy()
    centre = int(out.reshape(len(out), -1).sum(axis=1).argmax())
    element = disk(grow)
    for order in (range(centre + 1, len(out)), range(centre - 1, -1, -1)):
        for k in order:
            inner = k - 1 if k > centre else k + 1
            out[k] &= ndimage.binary_dilation(out[inner], structure=element)
    return out


def _brain_slice(
    image: np.ndarray, head: np.ndarray, threshold: float, erode: int, opening: int, closing: int
) -> np.ndarray:
    core = ndimage.binary_erosion(head, structure=disk(erode)) if erode > 0 else head
    tissue = (ndimage.median_filter(image, 3) > threshold) & core
    opened = ndimage.binary_opening(tissue, structure=disk(opening))
    if not opened.any():
        return np.zeros_like(head)
    brain = ndimage.binary_dilation(largest_component(opened), structure=disk(opening)) & tissue
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(brain, structure=disk(closing)))
    return brain & core


def _check_slices(name: str, slices: np.ndarray) -> np.ndarray:
    slices = np.asarray(slices, dtype=np.float32)
    if slices.ndim != 3:
        raise ValueError(f"{name}: expected slices (n, H, W), got shape {slices.shape}")
    if not np.isfinite(slices).all():
        raise ValueError(f"{name}: the slices contain NaN or infinite values")
    return slices
