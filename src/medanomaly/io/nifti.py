"""NIfTI reader and the RAS+ reorientation shared by the 3D readers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from medanomaly.errors import ImageReadError, InvalidImageError
from medanomaly.image import SOURCE_GRID_KEY, MedicalImage, SourceGrid

#: Factor that turns a NIfTI spatial unit into millimetres.
_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def axcodes(affine: np.ndarray) -> str:
    """Return the orientation codes of an affine as a string, e.g. ``'LPS'``.

    Args:
        affine: 4x4 voxel-to-world (RAS, mm) matrix.

    Returns:
        One letter per voxel axis naming the direction in which its index grows.
    """
    return "".join(code or "?" for code in nib.aff2axcodes(affine))


def to_canonical(
    data: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Reorient a spatial-first volume to RAS+ (as ``nibabel.as_closest_canonical`` does).

    Args:
        data: Array whose first three axes are spatial; further axes (channels) are kept.
        affine: 4x4 voxel-to-world (RAS, mm) matrix of ``data``.
        spacing: Spacing in mm of the three spatial axes of ``data``.

    Returns:
        The reoriented array, its affine and its spacing, each in RAS+ axis order.
    """
    ornt = io_orientation(affine)
    canonical = apply_orientation(data, ornt)
    new_affine = affine @ inv_ornt_aff(ornt, data.shape[:3])
    new_spacing = [0.0, 0.0, 0.0]
    for old_axis, (new_axis, _flip) in enumerate(ornt):
        new_spacing[int(new_axis)] = float(spacing[old_axis])
    return canonical, new_affine, tuple(new_spacing)


def canonical_grid(affine: np.ndarray, shape: tuple[int, ...], **dicom: tuple) -> SourceGrid:
    """The :class:`SourceGrid` of a volume stored with ``affine`` and read back as RAS+.

    Args:
        affine: 4x4 voxel-to-world (RAS, mm) matrix of the stored volume.
        shape: Its spatial shape as stored.
        **dicom: ``dicom_files`` / ``dicom_frames`` for DICOM series.

    Returns:
        The stored grid, with ``index_to_source`` taking a RAS+ index to the stored index.
    """
    spatial = tuple(int(n) for n in shape[:3])
    step = inv_ornt_aff(io_orientation(affine), spatial)
    return SourceGrid(spatial, np.asarray(affine, dtype=np.float64), step, **dicom)


def read_nifti(path: Path) -> MedicalImage:
    """Read a ``.nii`` / ``.nii.gz`` file as a RAS+ volume.

    A 2D file becomes a volume with one slice; a 4D file ``(X, Y, Z, T)`` becomes ``T``
    channels; a 5D file is accepted only when its 4th axis has size 1 (NIfTI vector images).

    Args:
        path: The NIfTI file.

    Returns:
        The volume, channel-first ``(C, X, Y, Z)``, spacing taken from the header zooms.

    Raises:
        ImageReadError: The file is not a readable NIfTI file.
        InvalidImageError: It has an unsupported number of dimensions.
    """
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise ImageReadError(path, f"cannot read NIfTI file: {exc}") from exc
    file_shape = tuple(int(n) for n in data.shape)
    data = _spatial_first(data, path)
    xyz_unit = img.header.get_xyzt_units()[0]
    factor = _UNIT_TO_MM.get(xyz_unit, 1.0)
    zooms = tuple(float(z) * factor for z in (tuple(img.header.get_zooms()[:3]) + (1.0,) * 3)[:3])
    affine = img.affine.copy()
    affine[:3, :] *= factor
    original = axcodes(affine)
    grid = canonical_grid(affine, data.shape)
    data, affine, spacing = to_canonical(data, affine, zooms)
    problems = []
    if factor != 1.0:
        problems.append(f"spatial unit is '{xyz_unit}'; spacing and affine converted to mm")
    return MedicalImage(
        array=np.moveaxis(data, -1, 0),
        spacing=spacing,
        affine=affine,
        source=str(path),
        meta={
            **_nifti_meta(img, data.shape[-1], original),
            "file_shape": file_shape,
            SOURCE_GRID_KEY: grid,
        },
        problems=problems,
    )


def _spatial_first(data: np.ndarray, path: Path) -> np.ndarray:
    """Bring NIfTI data to ``(X, Y, Z, C)``."""
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        return data[..., None]
    if data.ndim == 4:
        return data
    raise InvalidImageError(
        path, f"NIfTI data has {data.ndim} dimensions (shape {data.shape}); expected 2, 3 or 4"
    )


def _nifti_meta(img: nib.Nifti1Image, n_channels: int, original: str) -> dict[str, object]:
    """Collect the header facts worth keeping."""
    slope, inter = img.header.get_slope_inter()
    descrip = img.header.get("descrip")
    meta: dict[str, object] = {
        "format": "nifti",
        "orientation_original": original,
        "orientation": "RAS",
        "dtype_on_disk": str(img.get_data_dtype()),
        "scl_slope": None if slope is None else float(slope),
        "scl_inter": None if inter is None else float(inter),
        "channel_kind": "volumes" if n_channels > 1 else "gray",
    }
    if descrip is not None:
        text = np.asarray(descrip).tobytes().rstrip(b"\0").decode("latin-1").strip()
        if text:
            meta["description"] = text
    return meta
