"""Post-processing steps of anomaly maps, configured like transforms.

A step acts on one case at a time: its map ``(*spatial)``, its image ``(C, *spatial)`` and,
where the detector has one, its reconstruction ``(C, *spatial)``. A list of steps in YAML
form (``[{smooth: {sigma: 1.0}}, {rim: {width: 3}}, positive]``) builds a
:class:`~medanomaly.postprocess.chain.PostProcess`.

Steps (LGG benchmark post-processing, after Kascenas et al. 2022 and Meissen et al. 2021):

* ``positive``: keep the map where the image is brighter than its reconstruction
  (``max(x - x_hat, 0)`` for hyperintense lesions); without a reconstruction, clip at 0.
* ``smooth``: Gaussian smoothing with ``sigma`` voxels.
* ``median``: median filter of ``size`` voxels.
* ``foreground``: the map outside the foreground (any channel above ``threshold``) set
  to ``fill``.
* ``rim``: the outer ``width`` voxels of the foreground set to the map's minimum inside it
  (edges dominate residuals).
* ``case_scale``: the map divided by its own ``q``-th percentile inside the foreground, so
  that one cut-off suits every case.
* ``group_scale``: the maps of each group (patient) divided by the ``q``-th percentile of
  the group's maps inside the foreground: one scale per scan, so that slices of one patient
  keep their order while one cut-off suits every patient. Cases without a group are their
  own group.
* ``score``: the case's score recomputed from the processed map inside the foreground
  (``reduce``: ``percentile`` with ``value``, ``mean`` or ``max``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy import ndimage

from medanomaly.detectors.scoring import erode_mask, median_filter
from medanomaly.errors import check_choice


def foreground_of(image: np.ndarray, threshold: float | None) -> np.ndarray:
    """Foreground voxels of one case ``(C, *spatial)``: any channel above ``threshold``.

    ``None`` keeps every voxel; an empty foreground falls back to every voxel.
    """
    if threshold is None:
        return np.ones(image.shape[1:], dtype=bool)
    inside = (np.asarray(image) > threshold).any(axis=0)
    return inside if inside.any() else np.ones_like(inside)


@dataclass(frozen=True)
class Step:
    """One map operation; subclasses set ``name`` and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    sets_score: ClassVar[bool] = False
    per_group: ClassVar[bool] = False
    """True for steps that act on a group's maps together (:meth:`apply_group`)."""

    def apply(
        self, anomaly_map: np.ndarray, image: np.ndarray, reconstruction: np.ndarray | None
    ) -> np.ndarray:
        """The processed map of one case."""
        raise NotImplementedError

    def apply_group(self, maps: list[np.ndarray], images: list[np.ndarray]) -> list[np.ndarray]:
        """The processed maps of one group's cases (steps with ``per_group``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Positive(Step):
    """Keep the map where the image (channel mean) exceeds its reconstruction."""

    name: ClassVar[str] = "positive"

    def apply(self, anomaly_map, image, reconstruction):  # noqa: D102
        if reconstruction is None:
            return np.maximum(anomaly_map, 0.0)
        brighter = np.asarray(image).mean(axis=0) > np.asarray(reconstruction).mean(axis=0)
        return np.where(brighter, anomaly_map, 0.0).astype(anomaly_map.dtype)


@dataclass(frozen=True)
class Smooth(Step):
    """Gaussian smoothing of the map (``sigma`` in voxels; 0 keeps it)."""

    name: ClassVar[str] = "smooth"
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def apply(self, anomaly_map, image, reconstruction):  # noqa: D102
        if self.sigma == 0:
            return anomaly_map
        smoothed = ndimage.gaussian_filter(anomaly_map.astype(np.float64), self.sigma)
        return smoothed.astype(anomaly_map.dtype)


@dataclass(frozen=True)
class Median(Step):
    """Median filter of ``size`` voxels (odd; 1 keeps the map)."""

    name: ClassVar[str] = "median"
    size: int = 3

    def __post_init__(self) -> None:
        if self.size < 1 or self.size % 2 == 0:
            raise ValueError(f"size must be odd and >= 1, got {self.size}")

    def apply(self, anomaly_map, image, reconstruction):  # noqa: D102
        maps = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None]
        return median_filter(maps, self.size)[0].numpy().astype(anomaly_map.dtype)


@dataclass(frozen=True)
class Foreground(Step):
    """The map outside the foreground (any channel above ``threshold``) set to ``fill``."""

    name: ClassVar[str] = "foreground"
    threshold: float = 0.0
    fill: float = 0.0

    def apply(self, anomaly_map, image, reconstruction):  # noqa: D102
        inside = foreground_of(image, self.threshold)
        return np.where(inside, anomaly_map, self.fill).astype(anomaly_map.dtype)


@dataclass(frozen=True)
class Rim(Step):
    """The outer ``width`` voxels of the foreground set to the map's minimum inside it."""

    name: ClassVar[str] = "rim"
    width: int = 3
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.width < 0:
            raise ValueError(f"width must be >= 0, got {self.width}")

    def apply(self, anomaly_map, image, reconstruction):  # noqa: D102
        if self.width == 0:
            return anomaly_map
        inside = foreground_of(image, self.threshold)
        core = erode_mask(torch.from_numpy(inside)[None], self.width)[0].numpy()
        rim = inside & ~core
        floor = anomaly_map[inside].min()
        return np.where(rim, floor, anomaly_map).astype(anomaly_map.dtype)


@dataclass(frozen=True)
class CaseScale(Step):
    """The map divided by its own ``q``-th percentile inside the foreground (when > 0)."""

    name: ClassVar[str] = "case_scale"
    q: float = 75.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.q <= 100.0:
            raise ValueError(f"q must lie in (0, 100], got {self.q}")

    def apply(self, anomaly_map, image, reconstruction):  # noqa: D102
        inside = foreground_of(image, self.threshold)
        scale = float(np.percentile(anomaly_map[inside], self.q))
        return (anomaly_map / scale).astype(anomaly_map.dtype) if scale > 0 else anomaly_map


@dataclass(frozen=True)
class GroupScale(Step):
    """A group's maps divided by the ``q``-th percentile of them all inside the foreground."""

    name: ClassVar[str] = "group_scale"
    per_group: ClassVar[bool] = True
    q: float = 75.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.q <= 100.0:
            raise ValueError(f"q must lie in (0, 100], got {self.q}")

    def apply_group(self, maps, images):  # noqa: D102
        inside = [m[foreground_of(x, self.threshold)] for m, x in zip(maps, images, strict=True)]
        scale = float(np.percentile(np.concatenate(inside), self.q))
        return [(m / scale).astype(m.dtype) for m in maps] if scale > 0 else maps


REDUCTIONS = ("percentile", "mean", "max")


@dataclass(frozen=True)
class Score(Step):
    """Recompute the case's score from the processed map inside the foreground."""

    name: ClassVar[str] = "score"
    sets_score: ClassVar[bool] = True
    reduce: str = "percentile"
    value: float = 99.0
    threshold: float | None = 0.0

    def __post_init__(self) -> None:
        check_choice("score step", "reduce", self.reduce, REDUCTIONS)

    def apply(self, anomaly_map, image, reconstruction):  # noqa: D102
        return anomaly_map

    def reduce_map(self, anomaly_map: np.ndarray, image: np.ndarray) -> float:
        """The score of one processed map."""
        values = anomaly_map[foreground_of(image, self.threshold)]
        if self.reduce == "mean":
            return float(values.mean())
        if self.reduce == "max":
            return float(values.max())
        return float(np.percentile(values, self.value))


STEPS: dict[str, type[Step]] = {
    cls.name: cls
    for cls in (Positive, Smooth, Median, Foreground, Rim, CaseScale, GroupScale, Score)
}
