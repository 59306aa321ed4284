"""DICOM reader: a series folder (or one file) becomes one RAS+ volume.

Slices are ordered by ``ImagePositionPatient`` projected on the slice normal (the cross
product of the two ``ImageOrientationPatient`` direction cosines). The slice spacing is the
median step between these positions, never ``SliceThickness``. ``RescaleSlope`` /
``RescaleIntercept`` (or a modality LUT) are applied, so CT comes out in Hounsfield units.
Compressed transfer syntaxes are decoded by pydicom's plugins (pylibjpeg, pylibjpeg-openjpeg).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from medanomaly.errors import ImageReadError
from medanomaly.image import MedicalImage
from medanomaly.io.nifti import axcodes, to_canonical

#: LPS (DICOM patient space) to RAS (NIfTI world space).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Relative deviation from the median slice step that counts as uneven spacing.
_STEP_TOLERANCE = 0.05
#: At most this many uneven steps are listed one by one.
_MAX_LISTED = 10
_NO_UID = "(no SeriesInstanceUID)"


@dataclass
class _Scan:
    """DICOM headers of a folder grouped by series, plus what was skipped."""

    series: dict[str, list[tuple[Path, Dataset]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Stack:
    """Sorted slices of one series and their geometry."""

    files: list[Path]
    headers: list[Dataset]
    affine_lps: np.ndarray
    spacing: tuple[float, float, float]
    problems: list[str]


def is_dicom_file(path: Path) -> bool:
    """Tell whether ``path`` starts with the DICOM preamble and ``DICM`` prefix."""
    try:
        return is_dicom(path)
    except OSError:
        return False


def list_dicom_series(folder: str | Path) -> list[dict[str, Any]]:
    """List the DICOM series in a folder (not its sub-folders).

    Args:
        folder: A folder holding DICOM files.

    Returns:
        One dict per series, sorted by UID, with keys ``uid``, ``description``, ``modality``,
        ``n_slices`` and ``files`` (sorted paths as strings).

    Raises:
        ImageReadError: The folder does not exist or is empty.
    """
    scan = _scan_folder(Path(folder))
    return [_series_summary(uid, items) for uid, items in sorted(scan.series.items())]


def read_dicom(path: str | Path, *, series_uid: str | None = None) -> MedicalImage:
    """Read a DICOM series folder or a single DICOM file.

    Args:
        path: A folder holding one series (or several, then pick one with ``series_uid``), or
            one DICOM file.
        series_uid: The ``SeriesInstanceUID`` to read when the folder holds several series.

    Returns:
        A RAS+ volume ``(C, X, Y, Z)``; a single file without patient geometry (e.g. a
        radiograph) gives a 2D image ``(C, H, W)``.

    Raises:
        ImageReadError: No readable series, several series and no ``series_uid``, slices that
            cannot be stacked, or pixel data that cannot be decoded (the file is named).
    """
    path = Path(path)
    if path.is_dir():
        scan = _scan_folder(path)
        items = _select_series(path, scan, series_uid)
        skipped = scan.skipped
    else:
        items = [(path, _read_header(path))]
        _check_single_uid(path, items[0][1], series_uid)
        skipped = []
    if len(items) == 1 and not _has_geometry(items[0][1]):
        return _read_planar(*items[0])
    stack = _stack_geometry(items)
    return _build_volume(path, stack, skipped)


def _read_header(path: Path) -> Dataset:
    """Read one file's header; a non-image or unreadable file raises ImageReadError."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise ImageReadError(path, "not a DICOM file (no 'DICM' prefix)") from exc
    except Exception as exc:
        raise ImageReadError(path, f"unreadable DICOM header: {exc}") from exc
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(
            path, "DICOM file holds no image (no Rows/Columns): corrupt or not an image object"
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageReadError(
            path,
            f"multi-frame DICOM ({frames} frames) is not supported; "
            "convert it to one file per slice or to NIfTI",
        )
    return ds


def _scan_folder(folder: Path) -> _Scan:
    """Read every file header in ``folder`` and group the images by series."""
    if not folder.is_dir():
        raise ImageReadError(folder, "no such folder")
    entries = sorted(folder.iterdir())
    if not entries:
        raise ImageReadError(folder, "folder is empty")
    scan = _Scan()
    subfolders = [p.name for p in entries if p.is_dir()]
    if subfolders:
        scan.skipped.append(f"sub-folders are not searched: {', '.join(subfolders)}")
    for file in (p for p in entries if p.is_file()):
        try:
            header = _read_header(file)
        except ImageReadError as exc:
            scan.skipped.append(f"skipped {file.name}: {exc.problem}")
            continue
        uid = str(header.get("SeriesInstanceUID") or _NO_UID)
        scan.series.setdefault(uid, []).append((file, header))
    return scan


def _series_summary(uid: str, items: Sequence[tuple[Path, Dataset]]) -> dict[str, Any]:
    """Describe one series for listings and error messages."""
    header = items[0][1]
    return {
        "uid": uid,
        "description": str(header.get("SeriesDescription", "") or ""),
        "modality": str(header.get("Modality", "") or ""),
        "n_slices": len(items),
        "files": sorted(str(p) for p, _ in items),
    }


def _describe_series(scan: _Scan) -> str:
    """One line per series: UID, modality, slice count and description."""
    lines = []
    for uid, items in sorted(scan.series.items()):
        info = _series_summary(uid, items)
        lines.append(
            f"  {uid} ({info['modality'] or '?'}, {info['n_slices']} slices, "
            f"'{info['description']}')"
        )
    return "\n".join(lines)


def _select_series(folder: Path, scan: _Scan, series_uid: str | None) -> list[tuple[Path, Dataset]]:
    """Pick the series to read, or explain why none can be picked."""
    if not scan.series:
        details = "; ".join(scan.skipped) or "no files"
        raise ImageReadError(folder, f"no DICOM image files found ({details})")
    if series_uid is not None:
        if series_uid not in scan.series:
            raise ImageReadError(
                folder,
                f"no series with SeriesInstanceUID {series_uid}; "
                f"series found:\n{_describe_series(scan)}",
            )
        return scan.series[series_uid]
    if len(scan.series) > 1:
        raise ImageReadError(
            folder,
            f"{len(scan.series)} DICOM series found; pass series_uid= "
            f"one of:\n{_describe_series(scan)}",
        )
    return next(iter(scan.series.values()))


def _check_single_uid(path: Path, header: Dataset, series_uid: str | None) -> None:
    """Refuse a single file whose series is not the one asked for."""
    uid = str(header.get("SeriesInstanceUID") or _NO_UID)
    if series_uid is not None and uid != series_uid:
        raise ImageReadError(path, f"file belongs to series {uid}, not {series_uid}")


def _has_geometry(header: Dataset) -> bool:
    """Tell whether a header places its slice in patient space."""
    return all(key in header for key in ("ImagePositionPatient", "ImageOrientationPatient"))


def _floats(header: Dataset, keyword: str, path: Path, count: int) -> np.ndarray:
    """Read a multi-valued numeric attribute, naming the file when it is missing or bad."""
    value = header.get(keyword)
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(path, f"missing or invalid {keyword}: {value!r}") from exc
    if numbers.shape != (count,):
        raise ImageReadError(path, f"{keyword} has {numbers.size} values, expected {count}")
    return numbers


def _pixel_spacing(header: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm, from PixelSpacing or ImagerPixelSpacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    return None


def _stack_geometry(items: list[tuple[Path, Dataset]]) -> _Stack:
    """Sort the slices along their normal and derive the LPS affine and spacing."""
    first_file, first = items[0]
    iop = _floats(first, "ImageOrientationPatient", first_file, 6)
    _check_consistent(items, iop)
    normal = np.cross(iop[:3], iop[3:])
    if not 0.9 < np.linalg.norm(normal) < 1.1:
        raise ImageReadError(
            first_file,
            f"ImageOrientationPatient {iop.tolist()} does not hold two perpendicular unit vectors",
        )
    positions = np.array([_floats(h, "ImagePositionPatient", f, 3) for f, h in items])
    order = np.argsort(positions @ normal, kind="stable")
    items = [items[i] for i in order]
    positions = positions[order]
    items, positions, problems = _drop_duplicates(items, positions, normal)
    step, step_vec = _slice_step(first, positions, normal)
    problems += _step_problems(positions @ normal, step, first, [f for f, _ in items])
    if len(items) == 1:
        problems.append(f"single slice: slice spacing {_mm(step)} mm taken from the header")
    pixel = _pixel_spacing(first)
    if pixel is None:
        problems.append("no PixelSpacing: in-plane spacing set to 1.0 mm")
        pixel = (1.0, 1.0)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * pixel[1]
    affine[:3, 1] = iop[3:] * pixel[0]
    affine[:3, 2] = step_vec
    affine[:3, 3] = positions[0]
    return _Stack(
        files=[f for f, _ in items],
        headers=[h for _, h in items],
        affine_lps=affine,
        spacing=(pixel[1], pixel[0], step),
        problems=problems,
    )


def _check_consistent(items: list[tuple[Path, Dataset]], iop: np.ndarray) -> None:
    """All slices must share orientation and matrix size to be stacked."""
    first_file, first = items[0]
    size = (first.Rows, first.Columns)
    for file, header in items[1:]:
        if (header.Rows, header.Columns) != size:
            raise ImageReadError(
                file,
                f"slice size {header.Rows}x{header.Columns} differs from "
                f"{size[0]}x{size[1]} in {first_file.name}; cannot stack",
            )
        other = _floats(header, "ImageOrientationPatient", file, 6)
        if not np.allclose(other, iop, atol=1e-4):
            raise ImageReadError(
                file,
                f"ImageOrientationPatient {other.tolist()} differs from "
                f"{iop.tolist()} in {first_file.name}; cannot stack",
            )


def _drop_duplicates(
    items: list[tuple[Path, Dataset]], positions: np.ndarray, normal: np.ndarray
) -> tuple[list[tuple[Path, Dataset]], np.ndarray, list[str]]:
    """Keep the first of several slices found at the same position."""
    along = positions @ normal
    keep = np.concatenate([[True], np.diff(along) > 1e-3])
    if keep.all():
        return items, positions, []
    dropped = [items[i][0].name for i in np.flatnonzero(~keep)]
    problem = (
        f"{len(dropped)} slice(s) share a position with another slice and were dropped: "
        f"{', '.join(dropped[:_MAX_LISTED])}"
    )
    return [it for it, k in zip(items, keep, strict=True) if k], positions[keep], [problem]


def _slice_step(
    header: Dataset, positions: np.ndarray, normal: np.ndarray
) -> tuple[float, np.ndarray]:
    """Median slice step along the normal, and the matching step vector in LPS."""
    if len(positions) > 1:
        step = float(np.median(np.diff(positions @ normal)))
        return step, np.median(np.diff(positions, axis=0), axis=0)
    step = float(header.get("SpacingBetweenSlices") or header.get("SliceThickness") or 1.0)
    return step, normal * step


def _step_problems(along: np.ndarray, step: float, header: Dataset, files: list[Path]) -> list[str]:
    """Report missing slices, uneven steps and gaps left by thin slices."""
    problems = []
    tolerance = max(_STEP_TOLERANCE * step, 0.01)
    for i, delta in enumerate(np.diff(along)):
        if abs(delta - step) <= tolerance:
            continue
        missing = int(round(delta / step)) - 1
        where = f"between {files[i].name} and {files[i + 1].name}"
        if missing >= 1:
            problems.append(
                f"gap of {_mm(delta)} mm {where} (median step {_mm(step)} mm): "
                f"about {missing} slice(s) missing"
            )
        else:
            problems.append(
                f"uneven slice step of {_mm(delta)} mm {where} (median step {_mm(step)} mm)"
            )
    if len(problems) > _MAX_LISTED:
        problems = problems[:_MAX_LISTED] + [f"... {len(problems) - _MAX_LISTED} more uneven steps"]
    if problems:
        problems.append(
            f"slices are stacked at the median step of {_mm(step)} mm; positions "
            "near the gaps are approximate"
        )
    thickness = header.get("SliceThickness")
    if thickness and len(along) > 1 and step > float(thickness) + tolerance:
        problems.append(
            f"slice step {_mm(step)} mm exceeds SliceThickness {_mm(float(thickness))}"
            f" mm: gaps of {_mm(step - float(thickness))} mm between slices"
        )
    return problems


def _mm(value: float) -> str:
    """Format a length in mm for messages."""
    return repr(round(float(value), 3))


def _read_pixels(path: Path) -> np.ndarray:
    """Decode one file and apply its modality LUT / rescale; return float32 (rows, cols[, S])."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise ImageReadError(path, f"unreadable DICOM file: {exc}") from exc
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = _syntax_name(ds) or "unknown transfer syntax"
        raise ImageReadError(path, f"cannot decode pixel data ({syntax}): {exc}") from exc
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        pixels = apply_modality_lut(pixels, ds)
    return np.asarray(pixels, dtype=np.float32)


def _build_volume(path: Path, stack: _Stack, skipped: list[str]) -> MedicalImage:
    """Decode the sorted slices and return them as a RAS+ volume."""
    slices = [_read_pixels(f) for f in stack.files]
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise ImageReadError(path, f"decoded slices have different shapes: {sorted(shapes)}")
    volume = np.stack(slices, axis=0)  # (Z, rows, cols[, S])
    volume = np.swapaxes(volume, 0, 2)  # (cols, rows, Z[, S])
    if volume.ndim == 3:
        volume = volume[..., None]
    affine = _LPS_TO_RAS @ stack.affine_lps
    original = axcodes(affine)
    volume, affine, spacing = to_canonical(volume, affine, stack.spacing)
    meta = _series_meta(stack.headers[0], stack, original)
    return MedicalImage(
        array=np.moveaxis(volume, -1, 0),
        spacing=spacing,
        affine=affine,
        source=str(path),
        meta=meta,
        problems=stack.problems + _photometric_problems(stack.headers[0]) + skipped,
    )


def _read_planar(path: Path, header: Dataset) -> MedicalImage:
    """Read one file without patient geometry as a 2D image (rows x columns)."""
    pixels = _read_pixels(path)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    problems = ["no ImagePositionPatient/ImageOrientationPatient: read as a 2D image"]
    problems += _photometric_problems(header)
    spacing = _pixel_spacing(header)
    if spacing is None:
        problems.append("no PixelSpacing: spacing set to 1.0 mm")
        spacing = (1.0, 1.0)
    return MedicalImage(
        array=np.moveaxis(pixels, -1, 0),
        spacing=spacing,
        affine=None,
        source=str(path),
        meta=_common_meta(header, [path]),
        problems=problems,
    )


def _photometric_problems(header: Dataset) -> list[str]:
    """Warn that MONOCHROME1 values are kept as stored (high values display dark)."""
    if str(header.get("PhotometricInterpretation", "")) != "MONOCHROME1":
        return []
    return ["PhotometricInterpretation MONOCHROME1: values are not inverted (high = dark)"]


def _series_meta(header: Dataset, stack: _Stack, original: str) -> dict[str, Any]:
    """Facts about a stacked series."""
    meta = _common_meta(header, stack.files)
    meta.update(
        orientation_original=original,
        orientation="RAS",
        slice_step=stack.spacing[2],
        n_slices=len(stack.files),
    )
    slopes = {(h.get("RescaleSlope"), h.get("RescaleIntercept")) for h in stack.headers}
    if len(slopes) > 1:
        meta["rescale_varies"] = True
    return meta


def _common_meta(header: Dataset, files: list[Path]) -> dict[str, Any]:
    """Facts shared by 2D and 3D DICOM images."""
    modality = str(header.get("Modality", "") or "")
    slope, intercept = header.get("RescaleSlope"), header.get("RescaleIntercept")
    rescaled = slope is not None or intercept is not None
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": modality,
        "series_uid": str(header.get("SeriesInstanceUID", "") or ""),
        "series_description": str(header.get("SeriesDescription", "") or ""),
        "transfer_syntax": _syntax_name(header),
        "photometric": str(header.get("PhotometricInterpretation", "") or ""),
        "channel_kind": "gray" if int(header.get("SamplesPerPixel", 1)) == 1 else "rgb",
        "rescale_slope": float(slope) if slope is not None else None,
        "rescale_intercept": float(intercept) if intercept is not None else None,
        "intensity_unit": _intensity_unit(header, modality, rescaled),
        "files": [str(f) for f in files],
    }
    if header.get("SliceThickness"):
        meta["slice_thickness"] = float(header.SliceThickness)
    patient = str(header.get("PatientID", "") or "").strip()
    if patient:
        meta["group"] = patient
    meta.update(_window(header))
    return meta


def _intensity_unit(header: Dataset, modality: str, rescaled: bool) -> str | None:
    """Name the unit of the rescaled values, when it is known."""
    rescale_type = str(header.get("RescaleType", "") or "")
    if rescale_type:
        return rescale_type
    if modality == "CT" and rescaled:
        return "HU"
    return None


def _window(header: Dataset) -> dict[str, Any]:
    """First window centre/width of the header, all when several; none when width <= 0."""
    centre, width = header.get("WindowCenter"), header.get("WindowWidth")
    if centre is None or width is None:
        return {}
    centres = [float(c) for c in (centre if isinstance(centre, MultiValue) else [centre])]
    widths = [float(w) for w in (width if isinstance(width, MultiValue) else [width])]
    if widths[0] <= 0:
        return {}
    window: dict[str, Any] = {"window_center": centres[0], "window_width": widths[0]}
    if len(centres) > 1:
        window["window_presets"] = list(zip(centres, widths, strict=False))
    return window


def _syntax_name(header: Dataset) -> str:
    """Name of the transfer syntax, or '' when the file meta lacks it."""
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    return "" if syntax is None else str(syntax.name)
