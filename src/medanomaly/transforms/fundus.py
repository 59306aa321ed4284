"""Field of view of fundus photographs: the bright retinal disc on its dark surround."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medanomaly.errors import InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.transforms._base import (
    FOREGROUND_KEY,
    Transform,
    as_bool,
    as_float,
    as_optional_float,
    as_sequence,
    check_image,
    config_error,
    per_slice,
    slice_axis,
    source_of,
)
from medanomaly.transforms.mask import disk, largest_component

MIN_CONTRAST = 1e-3
"""An image whose 1st-99th percentile spread is below this share of its scale is flat."""


def fundus_fov(
    luminance: np.ndarray,
    fraction: float = 0.1,
    smooth: float = 0.005,
    opening: float = 0.01,
    min_area: float = 0.02,
) -> np.ndarray | None:
    """Field-of-view mask of one 2D fundus picture, or ``None`` when none can be found.

    A pixel is inside when its smoothed luminance exceeds ``fraction`` of the way from the
    image's dark surround (1st percentile) to its bright retina (99th percentile). The mask is
    opened with a disc (thin burnt-in text and date stamps fall away), reduced to its largest
    connected part and hole-filled.

    Args:
        luminance: ``(H, W)`` brightness (e.g. the channel maximum).
        fraction: Where between the dark and bright levels the threshold lies.
        smooth: Gaussian sigma as a share of the shorter side.
        opening: Radius of the opening disc as a share of the shorter side.
        min_area: Smallest share of the frame a field of view may cover.

    Returns:
        The bool mask, or ``None`` for a flat image (all black, all white) or no disc.
    """
    side = min(luminance.shape)
    dark, bright = np.percentile(luminance, [1, 99])
    scale = max(abs(float(bright)), abs(float(dark)), 1e-12)
    if bright - dark < MIN_CONTRAST * scale:
        return None
    smoothed = ndimage.gaussian_filter(luminance.astype(np.float32), max(smooth * side, 0.5))
    mask = smoothed > dark + fraction * (bright - dark)
    radius = int(round(opening * side))
    if radius >= 1:
        mask = ndimage.binary_opening(mask, structure=disk(radius))
    if not mask.any():
        return None
    mask = ndimage.binary_fill_holes(largest_component(mask))
    return mask if mask.mean() >= min_area else None


def _box(name: str, box: Any) -> list[float]:
    """A ``[top, bottom, left, right]`` box of shares of the frame."""
    values = [float(v) for v in as_sequence(name, "stamp_boxes", box)]
    if len(values) != 4 or not (
        0 <= values[0] < values[1] <= 1 and 0 <= values[2] < values[3] <= 1
    ):
        raise config_error(
            name,
            "stamp_boxes",
            f"boxes are [top, bottom, left, right] shares in [0, 1] (got {box!r})",
        )
    return values


class FundusFOVMask(Transform):
    """The retinal field of view of fundus photographs in ``meta["foreground"]``.

    Like ``head_ct_brain_mask`` for head CT: the bright disc of the retina on its dark
    surround (see :func:`fundus_fov`), so that burnt-in text, date stamps and the black frame
    stay out of scores and maps. Run it on the picture as read (any number of channels; the
    brightness is the channel maximum); a 3D stack is masked slice by slice along its last
    axis. A picture whose field of view cannot be found (all
    black, all white, no disc larger than ``min_area``) is refused and named, never scored.

    Args:
        fraction: Threshold between the dark (1st percentile) and bright (99th) levels.
        smooth: Gaussian sigma before thresholding, as a share of the shorter side.
        opening: Radius of the opening disc, as a share of the shorter side.
        min_area: Smallest share of the frame a field of view may cover.
        stamp_boxes: Burnt-in stamps that lie on the retina, each ``[top, bottom, left,
            right]`` as shares of the height and width (e.g. DRIMDB's date stamp,
            ``[0.0, 0.05, 0.72, 0.92]``); they are taken out of the field of view.
        strip: Set every channel outside the field of view to ``background``.
        background: The value outside when stripping; ``None``: the image minimum.
    """

    name = "fundus_fov_mask"

    def __init__(
        self,
        fraction: float = 0.1,
        smooth: float = 0.005,
        opening: float = 0.01,
        min_area: float = 0.02,
        stamp_boxes: Sequence[Sequence[float]] = (),
        strip: bool = True,
        background: float | None = None,
    ) -> None:
        self.fraction = as_float(self.name, "fraction", fraction, positive=True)
        self.smooth = as_float(self.name, "smooth", smooth)
        self.opening = as_float(self.name, "opening", opening)
        self.min_area = as_float(self.name, "min_area", min_area)
        if self.fraction >= 1 or self.smooth < 0 or self.opening < 0 or not 0 <= self.min_area < 1:
            raise config_error(
                self.name, "fraction/smooth/opening/min_area", "must be shares in [0, 1)"
            )
        self.stamp_boxes = [
            _box(self.name, box) for box in as_sequence(self.name, "stamp_boxes", stamp_boxes)
        ]
        self.strip = as_bool(self.name, "strip", strip)
        self.background = as_optional_float(self.name, "background", background)

    def _slices(self, image: MedicalImage, slices: np.ndarray) -> np.ndarray:
        """Field-of-view masks ``(n, H, W)`` of brightness slices, stamps taken out."""
        masks = []
        for brightness in slices:
            fov = fundus_fov(brightness, self.fraction, self.smooth, self.opening, self.min_area)
            if fov is None:
                low, high = float(brightness.min()), float(brightness.max())
                raise InvalidImageError(
                    source_of(image),
                    f"no fundus field of view found (values {low:g} to {high:g}: flat, all "
                    "black or all white, or no bright disc on a dark surround)",
                )
            height, width = fov.shape
            for top, bottom, left, right in self.stamp_boxes:
                rows = slice(int(top * height), int(np.ceil(bottom * height)))
                fov[rows, int(left * width) : int(np.ceil(right * width))] = False
            masks.append(fov)
        return np.stack(masks)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the image with ``meta["foreground"]`` = field of view (stripped if asked)."""
        check_image(self.name, image)
        axis = slice_axis(self.name, image, 2)
        fov = per_slice(image.array.max(axis=0), axis, lambda slices: self._slices(image, slices))
        array = image.array
        if self.strip:
            fill = float(array.min()) if self.background is None else self.background
            array = np.where(fov[None], array, np.asarray(fill, array.dtype))
        return image.with_array(array, meta={**image.meta, FOREGROUND_KEY: fov})
