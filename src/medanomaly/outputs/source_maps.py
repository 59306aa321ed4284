"""Anomaly maps in the scan's own geometry: NIfTI for volumes, float TIFF + overlay for slices.

A detector makes its map on the model's grid (e.g. 64³ after resampling, cropping and
resizing). Every geometric transform records how its output index maps onto its input
(:class:`~medanomaly.image.SourceGrid`), so the map can be sampled back onto the file's own
voxel grid: each source voxel looks up its place on the model grid (linear interpolation);
voxels the model never saw (cropped away, outside its field of view) get 0.

Per case ``<stem>`` (written atomically)::

    <stem>_map.nii.gz     3D: float32, the source file's shape and affine (not RAS-reoriented;
                          for DICOM the series as stacked: columns, rows, slices by position)
    <stem>_map.tiff       2D: float32 at the image's own size
    <stem>_overlay.png    2D: the image with the map in colour, at its own size
    <stem>_map.json       score, threshold, flagged, model, source, shapes and affine
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import tifffile
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from medanomaly._version import __version__
from medanomaly.image import SourceGrid
from medanomaly.io.atomic import atomic_path, atomic_write, atomic_write_text

#: Share of the overlay taken by the map colour where the map is at its largest.
_OVERLAY_ALPHA = 0.6
#: NIfTI ``descrip`` holds at most this many bytes.
_DESCRIP_BYTES = 80


@dataclass(frozen=True)
class MapInfo:
    """What a written map records about its case.

    Attributes:
        case: The case id (source path).
        score: The case's anomaly score.
        threshold: The run's threshold (score > threshold means flagged).
        flagged: Whether the case was flagged.
        model: The detector's registry name.
        run: What identifies the run that made the map (a digest of its model file; '' when
            unknown). With it, a DICOM map's UIDs follow from its source series and the run,
            so that writing or storing it again replaces it rather than adding a copy.
    """

    case: str
    score: float
    threshold: float
    flagged: bool
    model: str
    run: str = ""


def to_source_grid(anomaly_map: np.ndarray, grid: SourceGrid) -> np.ndarray:
    """Sample a model-grid map onto the source file's voxel grid.

    Args:
        anomaly_map: The map on the model's grid, ``(*spatial)``.
        grid: The case's grid (``index_to_source`` maps a model index to a source index).

    Returns:
        float32 ``grid.shape``; 0 wherever the source voxel lies outside the model's grid.

    Raises:
        ValueError: The map's dimensionality differs from the grid's.
    """
    dims = anomaly_map.ndim
    if dims != len(grid.shape):
        raise ValueError(f"a {dims}-D map cannot go onto a {len(grid.shape)}-D source grid")
    source_to_model = np.linalg.inv(np.asarray(grid.index_to_source, dtype=np.float64))
    matrix, offset = source_to_model[:dims, :dims], source_to_model[:dims, 3]
    values = np.asarray(anomaly_map, dtype=np.float32)
    sampled = ndimage.affine_transform(
        values, matrix, offset, output_shape=grid.shape, order=1, mode="nearest"
    )
    # a voxel is seen when its nearest model voxel exists (half a voxel beyond the edges)
    seen = ndimage.affine_transform(
        np.ones(values.shape, np.float32),
        matrix,
        offset,
        output_shape=grid.shape,
        order=0,
        mode="grid-constant",
        cval=0.0,
    )
    return np.where(seen > 0.5, sampled, 0.0).astype(np.float32)


def write_source_map(
    folder: str | Path,
    stem: str,
    anomaly_map: np.ndarray,
    grid: SourceGrid,
    info: MapInfo,
    picture: np.ndarray | None = None,
    values: np.ndarray | None = None,
) -> list[Path]:
    """Write one case's map on its source grid, and the sidecar JSON.

    Args:
        folder: Output folder (created).
        stem: File stem of the case.
        anomaly_map: The map on the model's grid.
        grid: The case's source grid.
        info: Score, threshold and model, recorded beside the map.
        picture: For 2D cases, the image at its own size ``(H, W)`` for the overlay.
        values: The map already on the source grid (:func:`to_source_grid`), if computed.

    Returns:
        The files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = to_source_grid(anomaly_map, grid) if values is None else values
    if values.ndim == 3:
        written = [_write_nifti(folder / f"{stem}_map.nii.gz", values, grid, info)]
    else:
        written = [_write_tiff(folder / f"{stem}_map.tiff", values)]
        if picture is not None:
            written.append(_write_overlay(folder / f"{stem}_overlay.png", picture, values))
    sidecar = folder / f"{stem}_map.json"
    atomic_write_text(sidecar, json.dumps(_sidecar(info, grid, anomaly_map, values), indent=1))
    return [*written, sidecar]


def _sidecar(
    info: MapInfo, grid: SourceGrid, model_map: np.ndarray, values: np.ndarray
) -> dict[str, Any]:
    """The JSON beside a map."""
    return {
        **asdict(info),
        "decision_rule": "flagged iff score > threshold",
        "medanomaly_version": __version__,
        "source_shape": list(grid.shape),
        "source_affine": None if grid.affine is None else np.asarray(grid.affine).tolist(),
        "model_grid_shape": list(model_map.shape),
        "map_max": float(values.max()) if values.size else None,
        "outside_model_region": 0.0,
    }


def _write_nifti(path: Path, values: np.ndarray, grid: SourceGrid, info: MapInfo) -> Path:
    """float32 NIfTI with the source affine; ``descrip`` holds score, threshold and model."""
    image = nib.Nifti1Image(values, np.asarray(grid.affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.header.set_intent("estimate", name="anomaly")
    descrip = f"medanomaly {info.model} score={info.score:.6g} thr={info.threshold:.6g}"
    image.header["descrip"] = descrip.encode("ascii", "replace")[:_DESCRIP_BYTES]
    atomic_write(path, lambda handle: handle.write(gzip.compress(image.to_bytes())), mode="wb")
    return path


def _write_tiff(path: Path, values: np.ndarray) -> Path:
    """float32 TIFF at the image's own size."""
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, values.astype(np.float32))
    return path


def overlay_rgb(picture: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The gray picture with the map blended in colour (jet), ``(H, W, 3)`` uint8.

    Args:
        picture: The image ``(H, W)``.
        values: The map ``(H, W)``, 0 where nothing is abnormal.

    Returns:
        An RGB picture of the same size.
    """
    if picture.shape != values.shape:
        raise ValueError(f"picture {picture.shape} and map {values.shape} differ in size")
    low, high = np.percentile(picture, [1, 99.5]) if picture.size else (0.0, 1.0)
    gray = np.clip((picture - low) / max(high - low, 1e-12), 0, 1)
    peak = float(values.max()) if values.size else 0.0
    weight = np.clip(values / peak, 0, 1) if peak > 0 else np.zeros_like(values)
    colour = colormaps["jet"](weight)[..., :3]
    alpha = (_OVERLAY_ALPHA * weight)[..., None]
    blended = (1 - alpha) * gray[..., None] + alpha * colour
    return np.round(blended * 255).astype(np.uint8)


def _write_overlay(path: Path, picture: np.ndarray, values: np.ndarray) -> Path:
    """The overlay PNG at the image's own size."""
    with atomic_path(path) as tmp:
        Image.fromarray(overlay_rgb(picture, values)).save(tmp, format="PNG")
    return path
