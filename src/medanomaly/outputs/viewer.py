"""The volumes of a report's viewer: each case's scan, its map and its label outline as NIfTI.

A report with a viewer (``evaluate``, ``screen``) holds ``OUT/viewer/``::

    viewer/niivue.umd.js, viewer.js       the viewer (copied from the package, see
                                          :mod:`medanomaly.reports.viewer`)
    viewer/cases/<stem>_scan.nii.gz       the scan
    viewer/cases/<stem>_map.nii.gz        its anomaly map (float32)
    viewer/cases/<stem>_outline.nii.gz    the boundary of its label mask, where one exists

For a case read from a file the three lie in the scan's own geometry: the scan as read (3D in
RAS+ with its affine), the map sampled back onto the file's grid
(:func:`~medanomaly.outputs.source_maps.to_source_grid`, the file's affine), so the viewer
places them in world coordinates as 3D Slicer would. A case made in memory, or whose file
cannot be read again, is shown on the model's grid (the preprocessed image and the map).
A 2D picture becomes a one-slice volume, row 0 at the top.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from medanomaly.detectors.base import AnomalyResult
from medanomaly.errors import MedanomalyError
from medanomaly.io.atomic import atomic_write
from medanomaly.outputs.guard import staging_folder
from medanomaly.outputs.source_maps import to_source_grid
from medanomaly.outputs.writers import case_stem
from medanomaly.reports.viewer import CASES_DIR

_SCAN, _MAP, _OUTLINE = "scan", "map", "outline"
DISPLAY_VOXELS = 2**21
"""Most voxels of a volume in the viewer: larger ones are shown resampled (linear) to this.

The browser draws every layer of the open case into a volume texture when a case opens and
whenever the threshold moves; without a GPU (software WebGL, as in headless Chromium) that
costs about 0.3 s of CPU per million voxels for the three layers, so a 240x240x155 scan is
shown at 148x148x96 (benchmarks/viewer_export.py --part open). The map, made on the model's
coarser grid, loses nothing; the full-resolution scan is the source file."""


@dataclass
class ViewerVolumes:
    """Writes the viewer's volumes of each chunk of cases and collects their entries.

    Args:
        folder: The report's ``viewer/`` folder.
        read_options: The run's ``data.read_options`` (which channel a scan shows).
        masks: Lesion mask file of each case id that has one.
    """

    folder: Path
    read_options: Mapping[str, Any] = field(default_factory=dict)
    masks: Mapping[str, str | Path | None] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    max_voxels: int = DISPLAY_VOXELS

    def write(
        self, part: Any, result: AnomalyResult, indices: Sequence[int]
    ) -> list[dict[str, Any]]:
        """Write the volumes of a chunk of cases (an ``ImageSet``) and return their entries.

        Each entry is flagged at ``result.threshold``; :func:`flag_entries` flags them again
        at a threshold chosen later.

        Args:
            part: The chunk, with ``ids``, ``images``, ``labels``, ``grids`` and ``masks``.
            result: Its detection (scores and maps on the model's grid).
            indices: Each case's index in the job's table (numbers the file stems).
        """
        folder = Path(self.folder) / CASES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        found = []
        for j, case_id in enumerate(part.ids):
            stem = case_stem(case_id, int(indices[j]))
            grid = None if part.grids is None else part.grids[j]
            volumes = None
            if grid is not None:
                volumes = self._source_volumes(case_id, np.asarray(result.maps[j]), grid)
            if volumes is None:
                lesion = None if part.masks is None else np.asarray(part.masks[j])
                volumes = _model_volumes(part.images[j], np.asarray(result.maps[j]), lesion)
            volumes, shrink = _display_size(volumes, self.max_voxels)
            files = {}
            for kind, (array, affine) in volumes.items():
                name = f"{stem}_{kind}.nii.gz"
                array = outline(array > 0) if kind == _OUTLINE else array
                _write_nifti(folder / name, array, affine, outline_mask=kind == _OUTLINE)
                files[kind] = f"{CASES_DIR}/{name}"
            values, map_affine = volumes[_MAP]
            score = float(result.scores[j])
            found.append(
                {
                    "index": int(indices[j]),
                    "id": str(case_id),
                    "name": Path(str(case_id)).name,
                    "score": score,
                    "flagged": bool(score > result.threshold),
                    "label": int(part.labels[j]),
                    "dims": 3 if values.ndim == 3 and values.shape[2] > 1 else 2,
                    "grid": "model" if grid is None or "scan" not in files else "source",
                    "map_min": float(values.min()) if values.size else 0.0,
                    "map_max": float(values.max()) if values.size else 0.0,
                    "display_scale": shrink,
                    "peak_mm": _peak(values, map_affine),
                    **files,
                }
            )
        self.entries += found
        return found

    def _source_volumes(
        self, case_id: str, model_map: np.ndarray, grid: Any
    ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """Scan, map (and outline) in the scan's own geometry; ``None`` if it cannot be read."""
        from medanomaly.io import read_image

        try:
            image = read_image(case_id, **dict(self.read_options))
            values = to_source_grid(model_map, grid)
            mask_file = self.masks.get(str(case_id))
            mask = None if mask_file is None else read_image(mask_file).array[0] > 0
            mask = mask if mask is not None and mask.any() else None
        except (MedanomalyError, ValueError, OSError):
            return None
        scan = image.array[0]
        if scan.ndim == 2:
            volumes = {_SCAN: _picture(scan), _MAP: _picture(values)}
            if mask is not None and mask.shape == scan.shape:
                volumes[_OUTLINE] = _picture(mask)
            return volumes
        volumes = {
            _SCAN: (scan, np.asarray(image.affine)),
            _MAP: (values, np.asarray(grid.affine)),
        }
        if mask is not None and mask.shape == scan.shape:
            volumes[_OUTLINE] = (mask, np.asarray(image.affine))
        return volumes


def viewer_volumes(detector: Any, data: str | Path, folder: Path) -> ViewerVolumes:
    """The writer of the viewer's volumes: into the staging folder of ``folder``.

    Scans are read with the run's ``read_options``; the lesion masks are those the folder or
    manifest names.
    """
    from medanomaly.data.listing import list_cases
    from medanomaly.io.dicomweb import is_dicomweb_url

    options = detector.run_config_.get("data") or {}
    masks: dict[str, Any] = {}
    if not is_dicomweb_url(data):  # an archive's series have no masks: no second search
        masks = {str(c.path): c.mask for c in list_cases(data, options.get("label_names"))}
    return ViewerVolumes(
        staging_folder(folder),
        read_options=dict(options.get("read_options") or {}),
        masks={k: v for k, v in masks.items() if v is not None},
    )


def flag_entries(entries: Sequence[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """The entries flagged at ``threshold`` (score > threshold)."""
    return [{**entry, "flagged": bool(entry["score"] > threshold)} for entry in entries]


def _model_volumes(
    image: np.ndarray, model_map: np.ndarray, lesion: np.ndarray | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The preprocessed image's first channel, the map and the lesion outline (model grid)."""
    scan = np.asarray(image, dtype=np.float32)[0]
    if scan.ndim == 2:
        volumes = {_SCAN: _picture(scan), _MAP: _picture(model_map)}
        if lesion is not None and lesion.any():
            volumes[_OUTLINE] = _picture(lesion > 0)
        return volumes
    volumes = {_SCAN: (scan, np.eye(4)), _MAP: (model_map, np.eye(4))}
    if lesion is not None and lesion.any():
        volumes[_OUTLINE] = (lesion > 0, np.eye(4))
    return volumes


def _display_size(
    volumes: dict[str, tuple[np.ndarray, np.ndarray]], max_voxels: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """The volumes resampled to at most ``max_voxels`` each, and the scale (1: unchanged).

    Scan and map are resampled linearly, the label mask by nearest neighbour (its outline is
    drawn afterwards); each affine follows its volume, so they stay in place in the world.
    """
    largest = max(a.size for a, _ in volumes.values())
    if largest <= max_voxels:
        return volumes, 1.0
    scale = (max_voxels / largest) ** (1 / 3)
    resized = {}
    for kind, (array, affine) in volumes.items():
        shape = np.maximum(1, np.round(np.asarray(array.shape) * scale)).astype(int)
        steps = (np.asarray(array.shape) - 1) / np.maximum(shape - 1, 1)
        order = 0 if kind == _OUTLINE else 1  # the mask stays a mask
        values = ndimage.zoom(np.asarray(array, np.float32), shape / array.shape, order=order)
        moved = np.asarray(affine, np.float64) @ np.diag([*steps, 1.0])
        resized[kind] = (values, moved)
    return resized, float(scale)


def _peak(values: np.ndarray, affine: np.ndarray) -> list[float]:
    """World position (mm) of the map's largest value: where the viewer opens a volume."""
    if not values.size:
        return [0.0, 0.0, 0.0]
    index = np.unravel_index(int(np.argmax(values)), values.shape)
    padded = [*index, *([0] * (3 - len(index)))][:3]
    return [float(v) for v in (np.asarray(affine) @ np.array([*padded, 1.0]))[:3]]


def _picture(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 2D array ``(rows, columns)`` as a one-slice volume shown with row 0 at the top."""
    return np.ascontiguousarray(np.asarray(values).T[:, ::-1, None]), np.eye(4)


def outline(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` that touch the outside (face neighbours), as uint8 0/1."""
    mask = np.asarray(mask, dtype=bool)
    inner = ndimage.binary_erosion(mask, border_value=0)
    return (mask & ~inner).astype(np.uint8)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, outline_mask: bool) -> None:
    """gzip-compressed NIfTI: float32, or uint8 for an outline (drawn in one colour)."""
    data = np.asarray(array, dtype=np.uint8 if outline_mask else np.float32)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    payload = gzip.compress(image.to_bytes(), compresslevel=1)  # fast to write and to read
    atomic_write(path, lambda handle: handle.write(payload), mode="wb")
