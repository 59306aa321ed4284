"""The in-memory image every reader returns and every transform consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

SOURCE_GRID_KEY = "source_grid"
"""``MedicalImage.meta`` key of the :class:`SourceGrid` (set by readers, kept by transforms)."""


@dataclass(frozen=True)
class SourceGrid:
    """The voxel grid of the file an image came from, and where the current array lies on it.

    Readers record it; every geometric transform composes its own index mapping onto
    ``index_to_source``, so that a map made on the model's grid can be put back onto the
    scan's own grid (:func:`medanomaly.outputs.source_maps.to_source_grid`).

    Attributes:
        shape: Spatial shape of the file's own voxel grid, in the file's axis order (for a
            DICOM series: columns, rows, slices sorted by position).
        affine: 4x4 voxel-to-world (RAS, mm) matrix of that grid; ``None`` for 2D pictures.
        index_to_source: 4x4 matrix taking a homogeneous index of the current array
            (``[i, j, k, 1]``; ``[row, column, 0, 1]`` in 2D) to the matching index in the file.
        dicom_files: For DICOM input, the source file of each slice (axis 2) in grid order.
        dicom_frames: For a multi-frame DICOM file, the frame index of each slice.
    """

    shape: tuple[int, ...]
    affine: np.ndarray | None
    index_to_source: np.ndarray
    dicom_files: tuple[str, ...] = ()
    dicom_frames: tuple[int, ...] = ()

    @classmethod
    def of_array(
        cls, shape: tuple[int, ...], affine: np.ndarray | None = None, **dicom: Any
    ) -> SourceGrid:
        """The grid of an array read as it is stored (its index is the file's index)."""
        return cls(tuple(int(n) for n in shape), affine, np.eye(4), **dicom)

    def moved(self, new_to_old: np.ndarray) -> SourceGrid:
        """The grid after a transform that maps its output index to its input by ``new_to_old``."""
        return replace(self, index_to_source=self.index_to_source @ new_to_old)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (for the preprocessing cache)."""
        return {
            "shape": list(self.shape),
            "affine": None if self.affine is None else np.asarray(self.affine).tolist(),
            "index_to_source": np.asarray(self.index_to_source).tolist(),
            "dicom_files": list(self.dicom_files),
            "dicom_frames": list(self.dicom_frames),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceGrid:
        """Inverse of :meth:`to_dict`."""
        affine = data.get("affine")
        return cls(
            shape=tuple(int(n) for n in data["shape"]),
            affine=None if affine is None else np.asarray(affine, dtype=np.float64),
            index_to_source=np.asarray(data["index_to_source"], dtype=np.float64),
            dicom_files=tuple(data.get("dicom_files", ())),
            dicom_frames=tuple(int(f) for f in data.get("dicom_frames", ())),
        )


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

    ``meta[SOURCE_GRID_KEY]`` (a :class:`SourceGrid`) ties the array to the file's own voxel
    grid, which the RAS+ reorientation and the transforms change.
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

    @property
    def source_grid(self) -> SourceGrid | None:
        """The file's own grid and the array's place on it (``None`` when made in memory)."""
        return self.meta.get(SOURCE_GRID_KEY)
