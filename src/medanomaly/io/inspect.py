"""A plain-text report of what the readers see in a file or folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medanomaly.errors import MedanomalyError, problem_text
from medanomaly.image import MedicalImage
from medanomaly.io.dicom import list_dicom_series

#: Values below this (with a positive maximum) in a file without a unit look like CT HU.
_HU_AIR_HINT = -900.0


def format_spacing(spacing: tuple[float, ...]) -> str:
    """Format a spacing tuple like ``(1.0, 1.0, 2.0)`` (rounded to 4 decimals)."""
    return "(" + ", ".join(repr(round(float(s), 4)) for s in spacing) + ")"


def inspect_path(path: str | Path, *, series_uid: str | None = None) -> str:
    """Describe what :func:`medanomaly.io.read_image` makes of ``path``.

    The report names the format, the DICOM series found, shape, spacing in mm, orientation
    (of the file and as returned), intensity range (in HU where the file says so) and every
    problem found. Reading errors are reported in the text instead of raised.

    Args:
        path: A file or a DICOM series folder.
        series_uid: The series to read when a DICOM folder holds several.

    Returns:
        A multi-line, human-readable report.
    """
    from medanomaly.io import read_image  # late import: medanomaly.io imports this module

    path = Path(path)
    lines = [f"path: {path}"]
    n_series, series_lines = _series_lines(path) if path.is_dir() else (0, [])
    lines += series_lines
    if n_series > 1 and series_uid is None:
        lines.append("several series: pass series_uid to read one")
        return "\n".join(lines)
    try:
        image = read_image(path, series_uid=series_uid)
    except (MedanomalyError, ValueError) as exc:
        lines.append(f"cannot read: {problem_text(exc, path)}")
        return "\n".join(lines)
    lines += _image_lines(image)
    return "\n".join(lines)


def _series_lines(folder: Path) -> tuple[int, list[str]]:
    """Count and list the DICOM series of a folder (none when it cannot be listed)."""
    try:
        found = list_dicom_series(folder)
    except MedanomalyError:
        return 0, []
    lines = [f"DICOM series found: {len(found)}"]
    for info in found:
        lines.append(
            f"  {info['uid']}  {info['modality'] or '?'}  {info['n_slices']} slices  "
            f"'{info['description']}'"
        )
    return len(found), lines


def _image_lines(image: MedicalImage) -> list[str]:
    """Shape, spacing, orientation, intensities and problems of a read image."""
    meta = image.meta
    axes = "(C, H, W)" if image.spatial_dims == 2 else "(C, X, Y, Z)"
    lines = [f"format: {_format_name(meta)}"]
    if meta.get("modality"):
        lines.append(f"modality: {meta['modality']}  series: '{meta.get('series_description')}'")
    lines.append(f"shape {axes}: {tuple(image.array.shape)}")
    lines.append(f"spacing (mm): {format_spacing(image.spacing)}")
    lines.append(_orientation_line(image))
    lines += _slice_lines(meta)
    lines.append(_intensity_line(image))
    if "window_center" in meta:
        lines.append(
            f"window in file: centre {meta['window_center']:g}, width {meta['window_width']:g}"
        )
    if meta.get("group"):
        lines.append(f"patient id (group): {meta['group']}")
    lines.append("problems:" if image.problems else "problems: none")
    lines += [f"  - {problem}" for problem in image.problems]
    return lines


def _format_name(meta: dict[str, object]) -> str:
    """Format, with the transfer syntax for DICOM."""
    name = str(meta.get("format", "?"))
    if meta.get("transfer_syntax"):
        name += f" ({meta['transfer_syntax']})"
    if meta.get("converted_from"):
        name += f", {meta['converted_from']} converted to gray"
    return name


def _orientation_line(image: MedicalImage) -> str:
    """Orientation codes of the file and of the returned array."""
    meta = image.meta
    if image.spatial_dims == 2:
        return "orientation: 2D, rows top to bottom as stored"
    if "orientation_original" in meta:
        return (
            f"orientation: file {meta['orientation_original']} -> returned "
            f"{meta['orientation']} (RAS+ canonical)"
        )
    return "orientation: none in file, assumed RAS+"


def _slice_lines(meta: dict[str, object]) -> list[str]:
    """Slice step versus slice thickness, for DICOM series."""
    if "slice_step" not in meta:
        return []
    line = f"slices: {meta['n_slices']}, step {round(float(meta['slice_step']), 4)} mm"
    if "slice_thickness" in meta:
        line += f", SliceThickness {round(float(meta['slice_thickness']), 4)} mm"
    return [line]


def _intensity_line(image: MedicalImage) -> str:
    """Intensity range with its unit when known (HU for rescaled CT)."""
    low, high = float(np.min(image.array)), float(np.max(image.array))
    line = f"intensity range: {low:g} .. {high:g}"
    unit = image.meta.get("intensity_unit")
    if unit:
        line += f" {unit}"
        if image.meta.get("rescale_slope") is not None:
            line += (
                f" (rescale slope {image.meta['rescale_slope']:g}, intercept "
                f"{image.meta.get('rescale_intercept') or 0:g})"
            )
    elif low <= _HU_AIR_HINT and high > 0:
        line += " (no unit in file; values look like CT HU)"
    return line
