"""The in-memory image every reader returns and every transform consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass
class MedicalImage:
    """A channel-first image with its geometry.

    Conventions:
        * ``array`` is float32 and channel-first: ``(C, H, W)`` for 2D, ``(C, X, Y, Z)`` for 3D.
        * 2D arrays keep the natural row/column order of the file (row 0 at the top).
        * 3D arrays are in RAS+ canonical orientation (nibabel's ``as_closest_canonical``):
          the index of axis 0 increases towards the patient's Right, axis 1 towards Anterior,
          axis 2 towards Superior.
        * ``spacing`` holds one physical spacing in millimetres per spatial axis.

    Attributes:
        array: Pixel/voxel values, float32, channel-first.
        spacing: Spacing in mm per spatial axis (``len(spacing) == array.ndim - 1``).
        affine: 4x4 voxel-to-world (RAS, mm) matrix for 3D images, else ``None``.
        source: The file or folder the image came from ('' when made in memory).
        meta: Free-form facts from the reader (modality, series UID, HU range, ...).
        problems: Non-fatal problems found while reading (e.g. uneven slice spacing).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the channel axis."""
        return tuple(self.array.shape[1:])

    def with_array(self, array: np.ndarray, **changes: Any) -> MedicalImage:
        """Return a copy holding ``array`` (and any other changed fields)."""
        return replace(self, array=array, **changes)
