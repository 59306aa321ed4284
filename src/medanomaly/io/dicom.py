"""DICOM reader: a series folder (or one file) becomes one RAS+ volume.

Slices are ordered by ``ImagePositionPatient`` projected on the slice normal (the cross
product of the two ``ImageOrientationPatient`` direction cosines). The slice spacing is the
median step between these positions, never ``SliceThickness``. ``RescaleSlope`` /
``RescaleIntercept`` (or a modality LUT) are applied, so CT comes out in Hounsfield units.
Compressed transfer syntaxes are decoded by pydicom's plugins: JPEG 2000 by
pylibjpeg-openjpeg, JPEG-LS by pyjpegls, RLE by pydicom itself, JPEG Lossless and 12-bit
JPEG Extended by imagecodecs (:mod:`medanomaly.io.codecs`).

An enhanced multi-frame file is read as a series whose slices are its frames, placed by the
per-frame functional groups (:mod:`medanomaly.io.dicom_frames`). A file without the 128-byte
preamble and ``DICM`` prefix is read with ``force=True`` when it parses as a dataset with
pixel data.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from medanomaly.errors import ImageReadError
from medanomaly.image import SOURCE_GRID_KEY, MedicalImage, SourceGrid
from medanomaly.io import codecs
from medanomaly.io.dicom_frames import Slice, attribute_problem, frame_slices, int_attribute
from medanomaly.io.nifti import axcodes, canonical_grid, to_canonical

log = logging.getLogger(__name__)
codecs.register()

#: LPS (DICOM patient space) to RAS (NIfTI world space).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Relative deviation from the median slice step that counts as uneven spacing.
_STEP_TOLERANCE = 0.05
#: At most this many uneven steps are listed one by one.
_MAX_LISTED = 10
_NO_UID = "(no SeriesInstanceUID)"
#: Values longer than this are left on disk while headers are scanned (pixel data).
_DEFER_SIZE = 1024
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Transfer syntax of a file without File Meta, from the encoding pydicom found.
_ENCODING_SYNTAX = {
    (True, True): dicom_uid.ImplicitVRLittleEndian,
    (False, True): dicom_uid.ExplicitVRLittleEndian,
    (False, False): dicom_uid.ExplicitVRBigEndian,
}


@dataclass
class _Scan:
    """DICOM headers of a folder grouped by series, plus what was skipped."""

    series: dict[str, list[Slice]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Stack:
    """Sorted slices of one series and their geometry."""

    slices: list[Slice]
    affine_lps: np.ndarray
    spacing: tuple[float, float, float]
    problems: list[str]

    @property
    def files(self) -> list[Path]:
        """The distinct files of the slices, in slice order."""
        return list(dict.fromkeys(s.file for s in self.slices))

    @property
    def headers(self) -> list[Dataset]:
        """The slices' headers (a per-frame view for multi-frame files)."""
        return [s.header for s in self.slices]


def is_dicom_file(path: Path, force: bool = False) -> bool:
    """Tell whether ``path`` is a DICOM file.

    Args:
        path: The file.
        force: Also accept a file without the preamble and ``DICM`` prefix when it parses
            as a dataset with pixel data (slower: the file is parsed).
    """
    try:
        if is_dicom(path):
            return True
    except OSError:
        return False
    if not force:
        return False
    try:
        with _quiet(path):
            ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_SIZE)
    except Exception:  # any parse failure means: not DICOM
        return False
    return _holds_pixels(ds)


def series_uids(files: Sequence[Path]) -> set[str]:
    """The ``SeriesInstanceUID`` values of DICOM ``files`` (headers only; unreadable: left out)."""
    uids = set()
    for path in files:
        try:
            with _quiet(path):
                ds = pydicom.dcmread(
                    path, force=True, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
                )
        except Exception:  # not a readable header: the series reader names it later
            continue
        uids.add(str(ds.get("SeriesInstanceUID") or _NO_UID))
    return uids


def _holds_pixels(ds: Dataset) -> bool:
    """A dataset with image dimensions and pixel data."""
    return "Rows" in ds and "Columns" in ds and any(k in ds for k in _PIXEL_KEYWORDS)


@contextmanager
def _quiet(path: Path) -> Iterator[None]:
    """Turn pydicom's warnings about ``path`` into log lines that name the file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        log.info("%s: pydicom: %s", path, warning.message)


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
        slices = _select_series(path, scan, series_uid)
        skipped = scan.skipped
    else:
        slices = _file_slices(path, *_read_header(path))
        _check_single_uid(path, slices[0].header, series_uid)
        skipped = []
    if len(slices) == 1 and not _has_geometry(slices[0].header):
        return _read_planar(slices[0])
    if not _has_geometry(slices[0].header):
        return _build_frame_stack(path, slices)
    stack = _stack_geometry(slices)
    return _build_volume(path, stack, skipped)


def _open(path: Path, header_only: bool) -> tuple[Dataset, list[str]]:
    """Parse a file (``force=True`` when it lacks the preamble); return it and its problems."""
    options: dict[str, Any] = {"defer_size": _DEFER_SIZE} if header_only else {}
    try:
        with _quiet(path):
            return pydicom.dcmread(path, **options), []
    except InvalidDicomError:
        pass
    except Exception as exc:
        raise ImageReadError(path, f"unreadable DICOM header: {_one_line(exc)}") from exc
    try:
        with _quiet(path):
            ds = pydicom.dcmread(path, force=True, **options)
    except Exception as exc:
        raise ImageReadError(path, "not a DICOM file (no 'DICM' prefix)") from exc
    if not _holds_pixels(ds):
        raise ImageReadError(
            path,
            "not a DICOM file (no 'DICM' prefix, and read with force=True it holds no image "
            "with pixel data)",
        )
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _ENCODING_SYNTAX[tuple(ds.original_encoding)]
    problem = (
        "no DICOM preamble/'DICM' prefix: read with force=True as "
        f"{ds.file_meta.TransferSyntaxUID.name}"
    )
    return ds, [problem]


def _read_header(path: Path) -> tuple[Dataset, list[str]]:
    """Read one file's header and its problems; a non-image file raises ImageReadError."""
    ds, problems = _open(path, header_only=True)
    with _quiet(path):  # odd values warn when first read
        _check_header(path, ds)
    return ds, problems


def _check_header(path: Path, ds: Dataset) -> None:
    """Refuse a dataset that holds no image, or whose image attributes are not integers."""
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(
            path, "DICOM file holds no image (no Rows/Columns): corrupt or not an image object"
        )
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise ImageReadError(path, "DICOM file holds no pixel data")
    for keyword in ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel"):
        int_attribute(ds, keyword, path, default=1)


def _file_slices(path: Path, header: Dataset, problems: list[str]) -> list[Slice]:
    """One slice for a single-frame file, one per frame for a multi-frame file."""
    if int_attribute(header, "NumberOfFrames", path, default=1) > 1:
        return frame_slices(path, header, problems)
    return [Slice(path, header, problems=problems)]


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
            header, problems = _read_header(file)
            slices = _file_slices(file, header, problems)
        except ImageReadError as exc:
            scan.skipped.append(f"skipped {file.name}: {exc.problem}")
            continue
        uid = str(header.get("SeriesInstanceUID") or _NO_UID)
        scan.series.setdefault(uid, []).extend(slices)
    return scan


def _series_summary(uid: str, slices: Sequence[Slice]) -> dict[str, Any]:
    """Describe one series for listings and error messages."""
    header = slices[0].header
    return {
        "uid": uid,
        "description": str(header.get("SeriesDescription", "") or ""),
        "modality": str(header.get("Modality", "") or ""),
        "n_slices": len(slices),
        "files": sorted({str(s.file) for s in slices}),
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


def _select_series(folder: Path, scan: _Scan, series_uid: str | None) -> list[Slice]:
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


def _floats(item: Slice, keyword: str, count: int) -> np.ndarray:
    """Read a multi-valued numeric attribute, naming the file and tag when it is missing or bad."""
    value = item.header.get(keyword)
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(
            item.file, item.where + attribute_problem(keyword, value, "missing or invalid")
        ) from exc
    if numbers.shape != (count,):
        raise ImageReadError(
            item.file,
            item.where + attribute_problem(keyword, value, f"has {numbers.size} values, expected"),
        )
    return numbers


def _pixel_spacing(item: Slice) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm, from PixelSpacing or ImagerPixelSpacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = item.header.get(keyword)
        if value is not None and len(value) == 2:
            spacing = _floats(item, keyword, 2)
            return float(spacing[0]), float(spacing[1])
    return None


def _optional_float(item: Slice, keyword: str) -> float | None:
    """A single numeric attribute, ``None`` when absent; a bad value names file and tag."""
    value = item.header.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(item.file, item.where + attribute_problem(keyword, value)) from exc


def _stack_geometry(slices: list[Slice]) -> _Stack:
    """Sort the slices along their normal and derive the LPS affine and spacing."""
    first = slices[0]
    iop = _floats(first, "ImageOrientationPatient", 6)
    _check_consistent(slices, iop)
    normal = np.cross(iop[:3], iop[3:])
    if not 0.9 < np.linalg.norm(normal) < 1.1:
        raise ImageReadError(
            first.file,
            first.where + f"ImageOrientationPatient {iop.tolist()} does not hold two "
            "perpendicular unit vectors",
        )
    positions = np.array([_floats(s, "ImagePositionPatient", 3) for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    slices, positions, problems = _drop_duplicates(slices, positions, normal)
    step, step_vec = _slice_step(first, positions, normal)
    problems += _step_problems(positions @ normal, step, first, slices)
    if len(slices) == 1:
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
        slices=slices, affine_lps=affine, spacing=(pixel[1], pixel[0], step), problems=problems
    )


def _check_consistent(slices: list[Slice], iop: np.ndarray) -> None:
    """All slices must share orientation and matrix size to be stacked."""
    first = slices[0]
    size = (first.header.Rows, first.header.Columns)
    for item in slices[1:]:
        header = item.header
        if (header.Rows, header.Columns) != size:
            raise ImageReadError(
                item.file,
                f"{item.where}slice size {header.Rows}x{header.Columns} differs from "
                f"{size[0]}x{size[1]} in {first.label}; cannot stack",
            )
        other = _floats(item, "ImageOrientationPatient", 6)
        if not np.allclose(other, iop, atol=1e-4):
            raise ImageReadError(
                item.file,
                f"{item.where}ImageOrientationPatient {other.tolist()} differs from "
                f"{iop.tolist()} in {first.label}; cannot stack",
            )


def _drop_duplicates(
    slices: list[Slice], positions: np.ndarray, normal: np.ndarray
) -> tuple[list[Slice], np.ndarray, list[str]]:
    """Keep the first of several slices found at the same position."""
    along = positions @ normal
    keep = np.concatenate([[True], np.diff(along) > 1e-3])
    if keep.all():
        return slices, positions, []
    dropped = [slices[i].label for i in np.flatnonzero(~keep)]
    problem = (
        f"{len(dropped)} slice(s) share a position with another slice and were dropped: "
        f"{', '.join(dropped[:_MAX_LISTED])}"
    )
    return [s for s, k in zip(slices, keep, strict=True) if k], positions[keep], [problem]


def _slice_step(item: Slice, positions: np.ndarray, normal: np.ndarray) -> tuple[float, np.ndarray]:
    """Median slice step along the normal, and the matching step vector in LPS."""
    if len(positions) > 1:
        step = float(np.median(np.diff(positions @ normal)))
        return step, np.median(np.diff(positions, axis=0), axis=0)
    step = (
        _optional_float(item, "SpacingBetweenSlices")
        or _optional_float(item, "SliceThickness")
        or 1.0
    )
    return step, normal * step


def _step_problems(along: np.ndarray, step: float, first: Slice, slices: list[Slice]) -> list[str]:
    """Report missing slices, uneven steps and gaps left by thin slices."""
    problems = []
    tolerance = max(_STEP_TOLERANCE * step, 0.01)
    for i, delta in enumerate(np.diff(along)):
        if abs(delta - step) <= tolerance:
            continue
        missing = int(round(delta / step)) - 1
        where = f"between {slices[i].label} and {slices[i + 1].label}"
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
    thickness = _optional_float(first, "SliceThickness")
    if thickness and len(along) > 1 and step > thickness + tolerance:
        problems.append(
            f"slice step {_mm(step)} mm exceeds SliceThickness {_mm(thickness)}"
            f" mm: gaps of {_mm(step - thickness)} mm between slices"
        )
    return problems


def _mm(value: float) -> str:
    """Format a length in mm for messages."""
    return repr(round(float(value), 3))


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (pydicom lists failed plugins on several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _decode(path: Path) -> tuple[Dataset, np.ndarray]:
    """Decode every frame of one file; return the dataset and its stored values."""
    ds, _problems = _open(path, header_only=False)
    try:
        with _quiet(path):
            return ds, ds.pixel_array
    except Exception as exc:
        syntax = _syntax_name(ds) or "unknown transfer syntax"
        problem = f"cannot decode pixel data ({syntax}): {_one_line(exc)}"
        raise ImageReadError(path, problem) from exc


class _PixelReader:
    """Decodes the slices of a stack, each file once (a multi-frame file holds many slices)."""

    def __init__(self) -> None:
        self._decoded: dict[Path, np.ndarray] = {}

    def __call__(self, item: Slice) -> np.ndarray:
        """The slice's values after its modality LUT / rescale, float32 (rows, cols[, S])."""
        if item.file not in self._decoded:
            self._decoded = {item.file: _decode(item.file)[1]}  # keep one file in memory
        pixels = self._decoded[item.file]
        if item.frame is not None:
            pixels = pixels[item.frame]
        if int_attribute(item.header, "SamplesPerPixel", item.file, default=1) == 1:
            pixels = apply_modality_lut(pixels, item.header)
        return np.asarray(pixels, dtype=np.float32)


def _read_stack(path: Path, slices: list[Slice]) -> np.ndarray:
    """Decode the slices as ``(cols, rows, n_slices, samples)``."""
    read = _PixelReader()
    arrays = [read(s) for s in slices]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ImageReadError(path, f"decoded slices have different shapes: {sorted(shapes)}")
    volume = np.stack(arrays, axis=0)  # (Z, rows, cols[, S])
    volume = np.swapaxes(volume, 0, 2)  # (cols, rows, Z[, S])
    return volume[..., None] if volume.ndim == 3 else volume


def _build_volume(path: Path, stack: _Stack, skipped: list[str]) -> MedicalImage:
    """Decode the sorted slices and return them as a RAS+ volume."""
    volume = _read_stack(path, stack.slices)
    affine = _LPS_TO_RAS @ stack.affine_lps
    original = axcodes(affine)
    grid = canonical_grid(
        affine,
        volume.shape[:3],
        dicom_files=tuple(str(s.file) for s in stack.slices),
        dicom_frames=tuple(s.frame for s in stack.slices if s.frame is not None),
    )
    volume, affine, spacing = to_canonical(volume, affine, stack.spacing)
    meta = _series_meta(stack.slices[0], stack, original)
    meta[SOURCE_GRID_KEY] = grid
    return MedicalImage(
        array=np.moveaxis(volume, -1, 0),
        spacing=spacing,
        affine=affine,
        source=str(path),
        meta=meta,
        problems=_slice_problems(stack.slices)
        + stack.problems
        + _photometric_problems(stack.slices[0].header)
        + skipped,
    )


def _build_frame_stack(path: Path, slices: list[Slice]) -> MedicalImage:
    """A multi-frame file without patient geometry: its frames along the third axis."""
    volume = _read_stack(path, slices)
    pixel = _pixel_spacing(slices[0]) or (1.0, 1.0)
    spacing = (pixel[1], pixel[0], 1.0)
    meta = _common_meta(slices[0].header, [path])
    meta.update(
        geometry="none in file: frames stacked along axis 2, identity orientation assumed",
        n_slices=len(slices),
    )
    meta[SOURCE_GRID_KEY] = SourceGrid.of_array(
        volume.shape[:3],
        np.diag([*spacing, 1.0]),
        dicom_files=(str(path),) * len(slices),
        dicom_frames=tuple(s.frame for s in slices if s.frame is not None),
    )
    problems = [
        f"{len(slices)} frames without ImagePositionPatient/ImageOrientationPatient (a cine or "
        "multi-frame picture): stacked along the third axis with 1 mm steps",
        *_photometric_problems(slices[0].header),
    ]
    return MedicalImage(
        array=np.moveaxis(volume, -1, 0),
        spacing=spacing,
        affine=np.diag([*spacing, 1.0]),
        source=str(path),
        meta=meta,
        problems=_slice_problems(slices) + problems,
    )


def _slice_problems(slices: list[Slice]) -> list[str]:
    """Problems found while reading the files (each listed once)."""
    return list(dict.fromkeys(p for s in slices for p in s.problems))


def _read_planar(item: Slice) -> MedicalImage:
    """Read one file without patient geometry as a 2D image (rows x columns)."""
    pixels = _PixelReader()(item)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    problems = [
        *item.problems,
        "no ImagePositionPatient/ImageOrientationPatient: read as a 2D image",
        *_photometric_problems(item.header),
    ]
    spacing = _pixel_spacing(item)
    if spacing is None:
        problems.append("no PixelSpacing: spacing set to 1.0 mm")
        spacing = (1.0, 1.0)
    meta = _common_meta(item.header, [item.file])
    meta[SOURCE_GRID_KEY] = SourceGrid.of_array(pixels.shape[:2], dicom_files=(str(item.file),))
    return MedicalImage(
        array=np.moveaxis(pixels, -1, 0),
        spacing=spacing,
        affine=None,
        source=str(item.file),
        meta=meta,
        problems=problems,
    )


def _photometric_problems(header: Dataset) -> list[str]:
    """Warn that MONOCHROME1 values are kept as stored (high values display dark)."""
    if str(header.get("PhotometricInterpretation", "")) != "MONOCHROME1":
        return []
    return ["PhotometricInterpretation MONOCHROME1: values are not inverted (high = dark)"]


def _series_meta(first: Slice, stack: _Stack, original: str) -> dict[str, Any]:
    """Facts about a stacked series."""
    meta = _common_meta(first.header, stack.files)
    meta.update(
        orientation_original=original,
        orientation="RAS",
        slice_step=stack.spacing[2],
        n_slices=len(stack.slices),
    )
    if first.frame is not None:
        meta["n_frames"] = len(stack.slices)
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
        "frame_of_reference_uid": str(header.get("FrameOfReferenceUID", "") or ""),
        "transfer_syntax": _syntax_name(header),
        "photometric": str(header.get("PhotometricInterpretation", "") or ""),
        "channel_kind": "gray" if int(header.get("SamplesPerPixel", 1)) == 1 else "rgb",
        "rescale_slope": _number_or_none(slope),
        "rescale_intercept": _number_or_none(intercept),
        "intensity_unit": _intensity_unit(header, modality, rescaled),
        "files": [str(f) for f in files],
    }
    thickness = _number_or_none(header.get("SliceThickness"))
    if thickness:
        meta["slice_thickness"] = thickness
    patient = str(header.get("PatientID", "") or "").strip()
    if patient:
        meta["group"] = patient
    meta.update(_window(header))
    return meta


def _number_or_none(value: Any) -> float | None:
    """A header number for the image's facts; ``None`` when absent or unreadable."""
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _intensity_unit(header: Dataset, modality: str, rescaled: bool) -> str | None:
    """Name the unit of the rescaled values, when it is known."""
    rescale_type = str(header.get("RescaleType", "") or "")
    if rescale_type:
        return rescale_type
    if modality == "CT" and rescaled:
        return "HU"
    return None


def _window(header: Dataset) -> dict[str, Any]:
    """First window centre/width of the header, all when several; none when absent or bad."""
    centre, width = header.get("WindowCenter"), header.get("WindowWidth")
    if centre is None or width is None:
        return {}
    try:
        centres = [float(c) for c in (centre if isinstance(centre, MultiValue) else [centre])]
        widths = [float(w) for w in (width if isinstance(width, MultiValue) else [width])]
    except (TypeError, ValueError):
        return {}
    if not widths or widths[0] <= 0:
        return {}
    window: dict[str, Any] = {"window_center": centres[0], "window_width": widths[0]}
    if len(centres) > 1:
        window["window_presets"] = list(zip(centres, widths, strict=False))
    return window


def _syntax_name(header: Dataset) -> str:
    """Name of the transfer syntax, or '' when the file meta lacks it."""
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    return "" if syntax is None else str(syntax.name)
