"""Intensity transforms: HU window, clipping, min-max, z-score and percentile rescaling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import NormalizeIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

from medanomaly.errors import ConfigError, InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.transforms._base import (
    Transform,
    as_bool,
    as_float,
    as_optional_float,
    as_range,
    check_image,
    get_foreground,
    source_of,
    with_values,
)


def _constant(image: MedicalImage, value: float) -> MedicalImage:
    """Return ``image`` with every voxel set to ``value`` (used for flat images)."""
    return with_values(image, np.full_like(image.array, value, dtype=np.float32))


class HUWindow(Transform):
    """Apply a CT window: clip to ``[center - width/2, center + width/2]`` and map to ``output``.

    Chung & Choi 2023 (orbit CT) uses centre 40 HU, width 400 HU, so -160 HU -> 0 and 240 HU -> 1.

    Args:
        center: Window centre (level) in HU.
        width: Window width in HU (> 0).
        output: ``(low, high)`` the window edges are mapped to.
    """

    name = "hu_window"

    def __init__(self, center: float, width: float, output: Sequence[float] = (0.0, 1.0)) -> None:
        self.center = as_float(self.name, "center", center)
        self.width = as_float(self.name, "width", width, positive=True)
        self.output = as_range(self.name, "output", output)
        self._scale = ScaleIntensityRange(
            a_min=self.center - self.width / 2,
            a_max=self.center + self.width / 2,
            b_min=self.output[0],
            b_max=self.output[1],
            clip=True,
        )

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Window the image."""
        check_image(self.name, image)
        return with_values(image, self._scale(image.array))


class Clip(Transform):
    """Clip values to ``[lower, upper]`` (either bound may be left open).

    Hjohlman 2022 cuts CT off at ``lower=-1024`` HU for a uniform background.

    Args:
        lower: Values below become ``lower``; ``None`` for no lower bound.
        upper: Values above become ``upper``; ``None`` for no upper bound.
    """

    name = "clip"

    def __init__(self, lower: float | None = None, upper: float | None = None) -> None:
        self.lower = as_optional_float(self.name, "lower", lower)
        self.upper = as_optional_float(self.name, "upper", upper)
        if self.lower is None and self.upper is None:
            raise ConfigError("transform 'clip': give 'lower', 'upper' or both")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ConfigError(f"transform 'clip': lower {lower} is above upper {upper}")

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Clip the image."""
        check_image(self.name, image)
        return with_values(image, np.clip(image.array, self.lower, self.upper))


class MinMax(Transform):
    """Rescale linearly: the image minimum goes to ``output[0]``, the maximum to ``output[1]``.

    A constant image becomes ``output[0]`` everywhere.

    Args:
        output: Target range, e.g. ``[0, 1]`` or ``[-1, 1]``.
    """

    name = "min_max"

    def __init__(self, output: Sequence[float] = (0.0, 1.0)) -> None:
        self.output = as_range(self.name, "output", output)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Rescale the image."""
        check_image(self.name, image)
        low, high = float(image.array.min()), float(image.array.max())
        if low == high:
            return _constant(image, self.output[0])
        scale = ScaleIntensityRange(low, high, self.output[0], self.output[1], clip=True)
        return with_values(image, scale(image.array))


class ZScore(Transform):
    """Subtract a mean and divide by a standard deviation.

    With ``mean`` and ``std`` left out the statistics are the image's own (over all channels);
    with both given they are fixed dataset statistics (Hjohlman 2022). ``foreground_only`` computes
    the per-image statistics inside ``meta["foreground"]`` only (run ``foreground_mask``
    first); every voxel is still normalised with them. A flat image is only centred.

    Args:
        mean: Dataset mean, or ``None`` for per-image statistics.
        std: Dataset standard deviation (> 0), or ``None`` for per-image statistics.
        foreground_only: Compute per-image statistics inside the foreground mask.
    """

    name = "z_score"

    def __init__(
        self, mean: float | None = None, std: float | None = None, foreground_only: bool = False
    ) -> None:
        self.mean = as_optional_float(self.name, "mean", mean)
        self.std = as_optional_float(self.name, "std", std)
        self.foreground_only = as_bool(self.name, "foreground_only", foreground_only)
        if (self.mean is None) != (self.std is None):
            raise ConfigError("transform 'z_score': give both 'mean' and 'std', or neither")
        if self.std is not None and self.std <= 0:
            raise ConfigError(f"transform 'z_score': argument 'std' must be > 0 (got {std})")
        if self.foreground_only and self.mean is not None:
            raise ConfigError(
                "transform 'z_score': 'foreground_only' applies to per-image statistics; "
                "leave it out when 'mean' and 'std' are given"
            )

    def _statistics(self, image: MedicalImage) -> tuple[float, float]:
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        values = image.array
        if self.foreground_only:
            mask = get_foreground(self.name, image)
            if mask is None or not mask.any():
                problem = "no" if mask is None else "an empty"
                raise InvalidImageError(
                    source_of(image),
                    f"z_score: foreground_only needs a foreground mask but the image has {problem}"
                    " meta['foreground'] (run foreground_mask first)",
                )
            values = image.array[:, mask]
        std = float(values.std())
        return float(values.mean()), (std if std > 0 else 1.0)

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Normalise the image."""
        check_image(self.name, image)
        mean, std = self._statistics(image)
        return with_values(image, NormalizeIntensity(subtrahend=mean, divisor=std)(image.array))


class PercentileRescale(Transform):
    """Map the ``lower``/``upper`` percentiles to ``output`` (the UAD slide deck: 0-99.99).

    Args:
        lower: Lower percentile in [0, 100).
        upper: Upper percentile in (lower, 100].
        output: Target range.
        clip: Clip values outside the percentile range to ``output``.
    """

    name = "percentile_rescale"

    def __init__(
        self,
        lower: float = 0.0,
        upper: float = 99.99,
        output: Sequence[float] = (0.0, 1.0),
        clip: bool = True,
    ) -> None:
        self.lower, self.upper = as_range(self.name, "lower/upper", (lower, upper))
        if self.lower < 0 or self.upper > 100:
            raise ConfigError(
                f"transform 'percentile_rescale': percentiles must lie in [0, 100] "
                f"(got lower={lower}, upper={upper})"
            )
        self.output = as_range(self.name, "output", output)
        self.clip = as_bool(self.name, "clip", clip)
        self._scale = ScaleIntensityRangePercentiles(
            self.lower, self.upper, self.output[0], self.output[1], clip=self.clip
        )

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Rescale the image; a flat image becomes ``output[0]``."""
        check_image(self.name, image)
        if float(image.array.min()) == float(image.array.max()):
            return _constant(image, self.output[0])
        return with_values(image, self._scale(image.array))
