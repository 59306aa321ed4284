"""Training-time augmentation: random flips, small affine warps, brightness/contrast jitter.

Every class here is random (``is_random``) and reproducible: give ``seed`` or call
``set_random_state(seed)``. Augmentations synthesise a new training sample on the same grid,
so ``spacing`` and ``affine`` are left as they are; ``meta["foreground"]`` follows the
geometric ones (nearest-neighbour). Defaults are deliberately small: the UAD slide deck reports that
excessive colour jitter harms performance (presumably because a normative model then learns
to reconstruct the very intensity changes that should stand out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.transforms import RandAffine as MonaiRandAffine
from monai.transforms import RandFlip as MonaiRandFlip
from monai.transforms import RandScaleIntensityFixedMean, RandShiftIntensity

from medanomaly.image import MedicalImage
from medanomaly.transforms._base import (
    RandomTransform,
    as_axes,
    as_choice,
    as_float,
    as_probability,
    check_axes,
    check_image,
    move_masks,
    to_numpy,
    with_values,
)


def _apply_with_mask(
    name: str, image: MedicalImage, op: Callable[[torch.Tensor, bool], torch.Tensor]
) -> MedicalImage:
    """Run ``op`` on the image and, with ``is_mask=True``, on its masks."""
    out = to_numpy(op(torch.as_tensor(image.array), False))
    meta = move_masks(name, image, lambda mask: op(mask, True))
    return image.with_array(out, meta=meta)


class RandFlip(RandomTransform):
    """Flip each of ``axes`` independently with probability ``prob``.

    Args:
        axes: Spatial axes that may be flipped (0-based, channel excluded).
        prob: Probability of flipping, per axis.
        seed: RNG seed.
    """

    name = "rand_flip"

    def __init__(
        self, axes: int | Sequence[int] = (0,), prob: float = 0.5, seed: int | None = None
    ) -> None:
        super().__init__(seed)
        self.axes = as_axes(self.name, "axes", axes)
        self.prob = as_probability(self.name, "prob", prob)
        self._flips = [MonaiRandFlip(prob=self.prob, spatial_axis=axis) for axis in self.axes]
        self._rng_changed()

    def _rng_changed(self) -> None:
        for flip in self._flips:
            flip.set_random_state(state=self._rng)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the randomly flipped image."""
        check_image(self.name, image)
        check_axes(self.name, image, self.axes)
        for flip in self._flips:
            # The mask call reuses the draw of the image call (randomize=False).
            image = _apply_with_mask(
                self.name, image, lambda data, is_mask, f=flip: f(data, randomize=not is_mask)
            )
        return image


class RandAffine(RandomTransform):
    """With probability ``prob``, warp by a small random rotation, translation, scale and shear.

    Each parameter is drawn uniformly from ``[-x, x]`` per axis (rotation about every axis in
    3D); the output grid is the input grid.

    Args:
        rotate_deg: Maximum rotation in degrees.
        translate: Maximum shift as a fraction of the size along each axis.
        scale: Maximum relative zoom (0.1 = 0.9x to 1.1x), per axis.
        shear: Maximum shear factor.
        prob: Probability of warping at all.
        padding_mode: Fill for samples from outside the image: border, zeros or reflection.
        seed: RNG seed.
    """

    name = "rand_affine"

    def __init__(
        self,
        rotate_deg: float = 10.0,
        translate: float = 0.05,
        scale: float = 0.1,
        shear: float = 0.05,
        prob: float = 0.5,
        padding_mode: str = "border",
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.rotate_deg = abs(as_float(self.name, "rotate_deg", rotate_deg))
        self.translate = abs(as_float(self.name, "translate", translate))
        self.scale = abs(as_float(self.name, "scale", scale))
        self.shear = abs(as_float(self.name, "shear", shear))
        self.prob = as_probability(self.name, "prob", prob)
        self.padding_mode = as_choice(
            self.name, "padding_mode", padding_mode, ("border", "zeros", "reflection")
        )

    def _monai(self, image: MedicalImage) -> MonaiRandAffine:
        """Build the MONAI transform for this image's size, drawing from ``self._rng``."""
        dims = image.spatial_dims
        rotations = 1 if dims == 2 else 3
        warp = MonaiRandAffine(
            prob=self.prob,
            rotate_range=(math.radians(self.rotate_deg),) * rotations,
            shear_range=(self.shear,) * (2 if dims == 2 else 6),
            translate_range=tuple(self.translate * n for n in image.spatial_shape),
            scale_range=(self.scale,) * dims,
            padding_mode=self.padding_mode,
        )
        warp.set_random_state(state=self._rng)
        return warp

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the randomly warped image."""
        check_image(self.name, image)
        warp = self._monai(image)

        def op(data: torch.Tensor, is_mask: bool) -> torch.Tensor:
            if is_mask:
                return warp(data, mode="nearest", padding_mode="zeros", randomize=False)
            return warp(data, mode="bilinear", randomize=True)

        return _apply_with_mask(self.name, image, op)


class RandIntensity(RandomTransform):
    """With probability ``prob``, jitter brightness and contrast.

    Brightness adds an offset drawn from ``[-brightness, brightness]`` (in the image's units,
    so run it after normalising to [0, 1] or [-1, 1]); contrast scales deviations from the
    image mean by ``1 + f`` with ``f`` drawn from ``[-contrast, contrast]``.

    Args:
        brightness: Maximum absolute offset.
        contrast: Maximum relative contrast change (below 1).
        prob: Probability of jittering at all.
        seed: RNG seed.
    """

    name = "rand_intensity"

    def __init__(
        self,
        brightness: float = 0.1,
        contrast: float = 0.1,
        prob: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.brightness = abs(as_float(self.name, "brightness", brightness))
        contrast = abs(as_float(self.name, "contrast", contrast))
        self.contrast = as_probability(self.name, "contrast", contrast)
        self.prob = as_probability(self.name, "prob", prob)
        self._shift = RandShiftIntensity(offsets=self.brightness, prob=1.0)
        self._scale = RandScaleIntensityFixedMean(factors=self.contrast, prob=1.0)
        self._rng_changed()

    def _rng_changed(self) -> None:
        self._shift.set_random_state(state=self._rng)
        self._scale.set_random_state(state=self._rng)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the jittered image."""
        check_image(self.name, image)
        if self._rng.random_sample() >= self.prob:
            return image
        return with_values(image, self._shift(self._scale(image.array)))
