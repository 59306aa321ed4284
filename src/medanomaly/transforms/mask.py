"""Foreground masks (body; brain in head CT) in ``meta["foreground"]``, for masked scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medanomaly.image import MedicalImage
from medanomaly.transforms._base import (
    FOREGROUND_KEY,
    Transform,
    as_bool,
    as_float,
    as_int,
    as_optional_float,
    channel_of,
    check_image,
    per_slice,
    slice_axis,
)


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

    Hjohlman 2022 masks CCTA at HU > -990. The mask goes to ``meta["foreground"]`` (bool, spatial
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


class HeadCTBrainMask(Transform):
    """Intracranial mask of head CT in ``meta["foreground"]`` (skull, air, text and frame out).

    Wraps :func:`head_ct_brain_masks` (no network, no atlas): the skull is found by its depth
    below the head's outline, so that a bleed as bright as bone in a brain window is kept. A
    3D volume is cut into slices along ``axis`` (the axial axis; 2 for RAS-ordered arrays);
    a 2D image is one slice. Works on HU (bone above 300 HU, air below -300 HU by default) and
    on windowed images such as 8-bit PNG slices (levels relative to each slice's range). Run
    it before windowing or normalisation changes what bone and air look like; with ``strip``
    every channel outside the mask is set to ``background``, so that maps and scores ignore
    the skull, the corners and burnt-in text.

    Args:
        channel: Channel whose values define the mask.
        axis: Spatial axis of the slices of a 3D volume.
        bone: Bone threshold in the image's units; ``None``: per slice (see ``ct_levels``).
        air: Air threshold in the image's units; ``None``: per slice.
        strip: Set every channel outside the brain to ``background``.
        background: The value outside the brain when stripping; ``None``: the image minimum.
    """

    name = "head_ct_brain_mask"

    def __init__(
        self,
        channel: int = 0,
        axis: int = 2,
        bone: float | None = None,
        air: float | None = None,
        strip: bool = False,
        background: float | None = None,
    ) -> None:
        self.channel = as_int(self.name, "channel", channel, minimum=0)
        self.axis = as_int(self.name, "axis", axis, minimum=0)
        self.bone = as_optional_float(self.name, "bone", bone)
        self.air = as_optional_float(self.name, "air", air)
        self.strip = as_bool(self.name, "strip", strip)
        self.background = as_optional_float(self.name, "background", background)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the image with ``meta["foreground"]`` = brain (and stripped if asked)."""
        values = channel_of(self.name, image, self.channel)
        axis = slice_axis(self.name, image, self.axis)
        brain = per_slice(values, axis, lambda s: head_ct_brain_masks(s, self.bone, self.air))
        array = image.array
        if self.strip:
            fill = float(array.min()) if self.background is None else self.background
            array = np.where(brain[None], array, np.asarray(fill, array.dtype))
        return image.with_array(array, meta={**image.meta, FOREGROUND_KEY: brain})


def distance_map(
    mask: np.ndarray, spacing: Sequence[float] | None = None, scale: float = 1.0
) -> np.ndarray:
    """Each foreground voxel's distance to the background (0 outside), divided by ``scale``.

    A shape's local thickness (twice this distance at its medial axis) is what a binary mask
    hides from intensity-based models: an enlarged gland is first of all a thicker one.

    Args:
        mask: Bool foreground, any number of axes.
        spacing: Voxel spacing per axis (distances in those units); ``None``: voxels.
        scale: Distances are divided by it.
    """
    distance = ndimage.distance_transform_edt(np.asarray(mask, bool), sampling=spacing)
    return (distance / scale).astype(np.float32)


class DistanceTransform(Transform):
    """Replace a mask image by its distance map (distance of each voxel to the background).

    For binary shape masks (segmentations): voxels above ``threshold`` (in ``channel``) are
    the shape; each becomes its Euclidean distance to the nearest background voxel, in mm
    (the image spacing) divided by ``scale_mm``, clipped to ``clip`` if given. Models then
    see thickness as intensity.

    Args:
        channel: Channel holding the mask.
        threshold: Voxels strictly above it are inside the shape.
        scale_mm: Distances are divided by it.
        clip: Upper bound of the result (``None``: none).
    """

    name = "distance_transform"

    def __init__(
        self,
        channel: int = 0,
        threshold: float = 0.5,
        scale_mm: float = 1.0,
        clip: float | None = None,
    ) -> None:
        self.channel = as_int(self.name, "channel", channel, minimum=0)
        self.threshold = as_float(self.name, "threshold", threshold)
        self.scale_mm = as_float(self.name, "scale_mm", scale_mm, positive=True)
        self.clip = as_optional_float(self.name, "clip", clip)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the one-channel distance map of the image's mask channel."""
        inside = channel_of(self.name, image, self.channel) > self.threshold
        distance = distance_map(inside, image.spacing, self.scale_mm)
        if self.clip is not None:
            distance = np.minimum(distance, self.clip)
        return image.with_array(distance[None], meta=image.meta)


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


HU_LIKE_MINIMUM = -500.0  # a slice whose minimum is below this is taken to be in HU
HU_BONE, HU_AIR = 300.0, -300.0


def ct_levels(image: np.ndarray) -> tuple[float, float]:
    """Default ``(bone, air)`` thresholds of a head CT slice, in the slice's own units.

    HU (the minimum lies below -500): bone above 300 HU, air below -300 HU. Windowed images
    (8-bit PNG, [0, 1]): between the 1st and 99.9th percentiles ``lo`` and ``hi``, bone at
    ``lo + 0.9 (hi - lo)`` and air at ``lo + 0.15 (hi - lo)``. In a brain window acute blood
    is as bright as bone, which is why the mask separates them by position, not intensity.
    """
    if float(image.min()) < HU_LIKE_MINIMUM:
        return HU_BONE, HU_AIR
    lo, hi = (float(v) for v in np.percentile(image, [1.0, 99.9]))
    return lo + 0.9 * (hi - lo), lo + 0.15 * (hi - lo)


def head_ct_brain_masks(
    slices: np.ndarray, bone: float | None = None, air: float | None = None
) -> np.ndarray:
    """Intracranial masks ``(n, H, W)`` of head CT slices ``(n, H, W)`` (no network, no atlas).

    Per slice: the head is the largest component above ``air``, hole-filled (burnt-in text,
    rulers and the frame are other components). The skull is found by its *depth* below the
    head's outline rather than by brightness alone, because in a brain window a bleed is as
    bright as bone: the share of bright (``>= bone``) pixels is measured in rings of equal
    depth, and the skull is the outer run of rings that are mostly bright. Deeper than its
    inner edge, soft tissue (in HU: above ``air``; in a brain window CSF is as dark as air)
    is opened by a quarter of the skull thickness, which cuts strands that leak through
    sutures; bright pixels deeper than half a skull thickness past that edge (a bleed, a
    calcification; nearer, a locally thicker skull) are added back whole; the largest piece,
    hole-filled, is the brain. A bleed against the skull thus keeps all but a band of half a
    skull thickness. Sizes adapt to each slice (no millimetres needed). A slice without a
    bright ring (vertex, or the skull cut off) keeps its head minus the bright pixels.

    Args:
        slices: ``(n, H, W)`` intensities (HU or windowed).
        bone: Bone threshold; ``None``: :func:`ct_levels` per slice.
        air: Air threshold; ``None``: :func:`ct_levels` per slice.

    Returns:
        Bool ``(n, H, W)``; all-false for a slice without head.
    """
    slices = _check_slices("head_ct_brain_masks", slices)
    masks = []
    for image in slices:
        default_bone, default_air = ct_levels(image)
        masks.append(
            _ct_brain_slice(
                image,
                default_bone if bone is None else bone,
                default_air if air is None else air,
                hu=float(image.min()) < HU_LIKE_MINIMUM,
            )
        )
    return np.stack(masks)


def _ct_brain_slice(image: np.ndarray, bone: float, air: float, hu: bool) -> np.ndarray:
    tissue = ndimage.binary_opening(image > air)
    if not tissue.any():
        return np.zeros(image.shape, bool)
    head = ndimage.binary_fill_holes(largest_component(tissue))
    bright = (image >= bone) & head
    depth = ndimage.distance_transform_edt(head)
    inner, thickness = _skull_depths(depth, bright, head)
    if inner is None:
        return _largest_filled(ndimage.binary_opening(head & ~bright))
    deep = head & (depth > inner)
    # bright and deep: a bleed or calcification, unless within half a skull thickness of the
    # skull's inner edge (a locally thicker skull)
    lesion = deep & bright & (depth > inner + thickness / 2)
    soft = deep & ~bright
    if hu:  # air is never brain (sinuses); in a brain window CSF is as dark as air
        soft &= image > air
    # an opening by a quarter of the skull thickness cuts the strands of soft tissue that
    # leak through sutures; bright lesions are added back whole
    soft = ndimage.binary_opening(soft, structure=disk(max(1, round(thickness / 4))))
    return _largest_filled(soft | lesion)


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    return ndimage.binary_fill_holes(largest_component(mask))


def _skull_depths(
    depth: np.ndarray, bright: np.ndarray, head: np.ndarray
) -> tuple[float | None, float]:
    """Depth of the skull's inner edge below the head outline, and the skull's thickness.

    ``None`` when no ring of depth is mostly bright (no skull in the slice).
    """
    rings = np.floor(depth[head]).astype(np.int64)
    share = np.bincount(rings, weights=bright[head]) / np.maximum(np.bincount(rings), 1)
    mostly = share >= 0.5
    if not mostly.any():
        return None, 0.0
    first = int(np.argmax(mostly))
    last = first
    while last + 1 < len(mostly) and mostly[last + 1]:
        last += 1
    return float(last + 1), float(last + 1 - first)


def _check_slices(name: str, slices: np.ndarray) -> np.ndarray:
    slices = np.asarray(slices, dtype=np.float32)
    if slices.ndim != 3:
        raise ValueError(f"{name}: expected slices (n, H, W), got shape {slices.shape}")
    if not np.isfinite(slices).all():
        raise ValueError(f"{name}: the slices contain NaN or infinite values")
    return slices
